"""Figures of measured and predicted decoding speed, drawn from results; nothing here runs a model.

Three kinds of result, each a dict (or its JSON file, read with `cost_model.load`):

    bench.bench(...)                     rows per path, frame count and run: decode_s, speedup_vs_ar, ...
    costs.measure_costs(...)             rows per shape, path, kind and context: ms, floor_ms
    cost_model.sweep_video_length(...)   a list of rows per video length: sd_speedup, specvlm_speedup, gain

    plot_speedups(bench)          decode speedup over AR on the same path, one panel per frame count
    plot_ms_per_token(bench)      decode ms per new token of one run on each path (what the fast path buys)
    plot_cost_curves(costs)       ms per pass vs context and its ratio to the bytes-over-bandwidth floor
    plot_predictions(frames, {label: sweep}, title)   predicted SD and SpecVLM speedups, and the pruning gain
    plot_round_timeline(bench)    ms per round by phase and idle gap, from `bench --timeline` rows
    plot_round_budget(bench, floor)   a tree row's round by its step timings, beside the round a
                                  target speedup allows and the same round with draft passes at their floor

Every title says where the numbers come from (pair, card, dtype); the caller adds what the
result cannot know (which clip, which assumption). Rows of a bench result without a "path" field
(runs made before the fast path existed) count as "plain".
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from .cost_model import DEFAULT_TREE_NAME, draft_passes, load, round_breakdown, row_tree, tokens_per_round, tree_name

PATH_COLOURS = {"plain": "tab:blue", "fast": "tab:orange", "eager": "tab:red", "sdpa": "tab:blue",
                "transformers": "tab:gray"}
KIND_MARKERS = {"step": "o", "chain": "s", "tree": "^"}


def run_label(row: dict) -> str:
    """How a bench row is named in a figure:
    {"method": "specvlm", "draft": "tree", "ratio": 0.9} -> "SpecVLM tree 90%";  {"method": "ar"} -> "AR";
    with "drafter": "self" (the target drafting for itself) -> "self SpecVLM tree 90%"; a tree other than
    mc_sim_7b_63 is named: {..., "tree": {"name": "grown", ...}} -> "SpecVLM tree (grown) 90%"."""
    names = {"ar": "AR", "sd": "SD", "specvlm": "SpecVLM"}
    label = names.get(row["method"], row["method"])
    if row.get("draft"):
        label += f" {row['draft']}"
    if tree_name(row) not in (None, DEFAULT_TREE_NAME):
        label += f" ({row['tree']['name']})"
    if row.get("ratio"):
        label += f" {row['ratio']:.0%}"
    return f"self {label}" if row.get("drafter") == "self" else label


def bench_rows(result, path: str | None = None, frames: int | None = None) -> list[dict]:
    """The rows of a bench result, each with its "path" filled in, optionally of one path and frame count."""
    rows = [{"path": "plain", **r} for r in load(result)["rows"]]
    return [r for r in rows if (path is None or r["path"] == path) and (frames is None or r["frames"] == frames)]


def _unique(values) -> list:
    return list(dict.fromkeys(values))


def _by_label(rows: list[dict], where: str) -> dict:
    """{run_label(row): row}; two rows with one label (e.g. two k values) would hide one: raise."""
    out = {}
    for row in rows:
        label = run_label(row)
        if label in out:
            raise ValueError(f"two rows labelled {label!r} {where}: keep one (e.g. one k) before plotting.")
        out[label] = row
    return out


def _colour(path: str, index: int) -> str:
    return PATH_COLOURS.get(path, plt.rcParams["axes.prop_cycle"].by_key()["color"][index % 10])


def _source(result: dict) -> str:
    """A title's source, "pair on card (dtype)"; partial runs may lack "device" (then "card" names it) and "dtype"."""
    device = result.get("device") or result.get("card", "unknown card")
    dtype = result.get("dtype", "dtype not recorded").removeprefix("torch.")
    return f"{result['pair']} on {device} ({dtype})"


def plot_speedups(result, title: str | None = None):
    """Bars of `speedup_vs_ar` (AR on the same path = 1) for every speculative run: one panel per
    frame count, one colour per path. A run whose tokens differ from AR's has no speedup: it is
    marked "not = AR" instead of a bar, and a baseline that raised is marked "error". Rows
    without a decode speedup at all (transformers' rows of runs that timed them end to end only)
    are left out. Returns the Figure."""
    result = load(result)
    rows = [r for r in bench_rows(result) if r["method"] != "ar" and ("speedup_vs_ar" in r or "error" in r)]
    if not rows:
        raise ValueError("this bench result has no speculative rows (method sd, specvlm, ...) to compare with AR.")
    frames, paths = sorted({r["frames"] for r in rows}), _unique(r["path"] for r in rows)
    labels = _unique(run_label(r) for r in rows)
    width = 0.8 / len(paths)
    fig, axes = plt.subplots(1, len(frames), figsize=(5.2 * len(frames), 4.2), sharey=True, squeeze=False)
    top = max(r.get("speedup_vs_ar") or 0 for r in rows)
    labelled = set()  # paths already in the legend
    for ax, count in zip(axes[0], frames):
        for p, path in enumerate(paths):
            of = _by_label([r for r in rows if r["frames"] == count and r["path"] == path],
                           f"on path {path!r} at {count} frames")
            for i, label in enumerate(labels):
                x = i + (p - (len(paths) - 1) / 2) * width
                row = of.get(label)
                if row is None:
                    continue
                if row.get("speedup_vs_ar") is None:
                    ax.text(x, 0.05, "error" if "error" in row else "not = AR", rotation=90, ha="center",
                            va="bottom", fontsize=7, color="red")
                else:
                    ax.bar(x, row["speedup_vs_ar"], width, color=_colour(path, p),
                           label=None if path in labelled else path)
                    labelled.add(path)
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        video = next(r["video_tokens"] for r in rows if r["frames"] == count)
        ax.set_title(f"{count} frames ({video} video tokens)", fontsize=10)
        ax.set_ylim(0, max(1.35, 1.2 * top))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("decode speedup over AR on the same path (x)")
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    axes[0][0].legend(handles.values(), handles.keys(), title="path", fontsize=8, title_fontsize=8, loc="upper left",
                      ncol=len(paths))
    fig.suptitle(title or f"{_source(result)}: speculative decoding vs AR (dashed: AR)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_ms_per_token(result, method: str = "ar", title: str | None = None):
    """Decode milliseconds per new token of one run, one bar per path and frame count, each bar
    labelled with its value; the ratio of the first path to each other one written above the
    group. `method`: a method with one run per path and frame count ("ar"), or one run's label
    (`run_label`, e.g. "SpecVLM tree 90%"). Returns the Figure."""
    result = load(result)
    rows = [r for r in bench_rows(result) if method in (r["method"], run_label(r))]
    if not rows:
        raise ValueError(f"no rows of method {method!r}; this result has {sorted({r['method'] for r in bench_rows(result)})}.")
    frames, paths = sorted({r["frames"] for r in rows}), _unique(r["path"] for r in rows)
    width = 0.8 / len(paths)
    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(frames), 3.8))
    top = 0.0
    for f, count in enumerate(frames):
        ms = {}
        for p, path in enumerate(paths):
            of = [r for r in rows if r["frames"] == count and r["path"] == path]
            if len(of) > 1:
                raise ValueError(f"{len(of)} rows of method {method!r} on path {path!r} at {count} frames "
                                 f"({', '.join(map(run_label, of))}): pass one run's label, or keep one row.")
            row = of[0] if of else None
            if row is None or not row["new_tokens"]:
                continue
            ms[path] = 1000 * row["decode_s"] / row["new_tokens"]
            x = f + (p - (len(paths) - 1) / 2) * width
            ax.bar(x, ms[path], width, color=_colour(path, p), label=path if f == 0 else None)
            ax.text(x, ms[path], f"{ms[path]:.2f}", ha="center", va="bottom", fontsize=8)
            top = max(top, ms[path])
        ratios = [f"{paths[0]}/{p}: {ms[paths[0]] / ms[p]:.1f}x" for p in paths[1:] if paths[0] in ms and ms.get(p)]
        if ratios:
            ax.text(f, 0.97, "\n".join(ratios), ha="center", va="top", fontsize=8, transform=ax.get_xaxis_transform(),
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax.set_xticks(range(len(frames)), [f"{c} frames" for c in frames])
    ax.set_ylim(0, 1.4 * top or 1.0)  # every bar 0 ms: keep a visible axis
    ax.set_ylabel("decode ms per new token")
    ax.legend(title="path", fontsize=8, title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    name = run_label({"method": method})
    ax.set_title(title or f"{name} decoding, {_source(result)}", fontsize=10)
    fig.tight_layout()
    return fig


def _context_ticks(ax, contexts) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [f"{c / 1024:g}k" if c >= 1024 else str(c) for c in contexts])
    ax.minorticks_off()


def plot_cost_curves(result, title: str | None = None):
    """Two rows, one column per shape: on top ms per forward pass against context length (log-log;
    a colour per path, a marker per kind; dashed: the one-token step's floor, weights + KV bytes
    over the measured copy bandwidth), below each pass's ratio to its own floor. Returns the Figure."""
    result = load(result)
    rows = [r for r in result["rows"] if r["ms"] is not None]
    if not rows:
        raise ValueError("this costs result has no timed rows (every point was skipped).")
    shapes, paths = _unique(r["shape"] for r in rows), _unique(r["path"] for r in rows)
    kinds = [k for k in KIND_MARKERS if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.4 * len(shapes), 6.4), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    for column, shape in enumerate(shapes):
        ms_ax, ratio_ax = axes[0][column], axes[1][column]
        of_shape = [r for r in rows if r["shape"] == shape]
        for p, path in enumerate(paths):
            for kind in kinds:
                points = sorted((r["context"], r["ms"], r["floor_ms"]) for r in of_shape
                                if r["path"] == path and r["kind"] == kind)
                if not points:
                    continue
                contexts, ms, floors = zip(*points)
                style = {"color": _colour(path, p), "marker": KIND_MARKERS[kind], "lw": 1.2, "ms": 5}
                ms_ax.plot(contexts, ms, **style)
                ratio_ax.plot(contexts, [m / f for m, f in zip(ms, floors)], **style)
        floor = sorted((r["context"], r["floor_ms"]) for r in of_shape if r["kind"] == kinds[0] and r["path"] == paths[0])
        ms_ax.plot(*zip(*floor), color="black", ls="--", lw=1)
        ratio_ax.axhline(1.0, color="black", ls="--", lw=1)
        contexts = sorted({r["context"] for r in of_shape})
        for ax in (ms_ax, ratio_ax):
            ax.set_yscale("log")
            _context_ticks(ax, contexts)
            ax.grid(True, which="major", alpha=0.3)
        params = result.get("shapes", {}).get(shape, {}).get("params")
        size = "" if params is None else f" ({params / 1e9:.2f}B params)" if params >= 1e8 else f" ({params / 1e6:.2f}M params)"
        ms_ax.set_title(f"{shape}{size}", fontsize=10)
        ms_ax.set_ylabel("ms per forward pass")
        ratio_ax.set_ylabel("time / floor (x)")
        ratio_ax.set_xlabel("context length (cached tokens)")
    handles = [Line2D([], [], color=_colour(p, i), lw=1.5, label=f"{p} path") for i, p in enumerate(paths)]
    names = {"step": "1 token (AR or draft step)", "chain": f"{result.get('k', 5) + 1} tokens (chain verify)",
             "tree": f"{result.get('tree_nodes', 26)} tokens (tree verify)"}
    handles += [Line2D([], [], color="0.4", marker=KIND_MARKERS[k], ls="", label=names[k]) for k in kinds]
    handles.append(Line2D([], [], color="black", ls="--", label="floor: (weights + KV) bytes / bandwidth"))
    fig.suptitle(title or f"One forward pass on {result['device']} ({result['dtype']}), random weights at real "
                          f"LM shapes, transformers {result.get('transformers', '?')}, {result.get('date', '?')}",
                 fontsize=10)
    fig.tight_layout()
    fig.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def plot_predictions(frames: Sequence[int], sweeps: dict[str, list[dict]], title: str):
    """Left: predicted speedup over AR of plain SD (dashed) and SpecVLM (solid) against frames,
    one colour per scenario; right: the pruning gain, SpecVLM / SD. `sweeps` maps a scenario's
    label to the rows of `cost_model.sweep_video_length`, one per entry of `frames`; `title`
    (required) says where the costs come from and what is assumed.
    Returns the Figure (its legend sits below the panels: save with `bbox_inches="tight"`)."""
    if not sweeps:
        raise ValueError("no scenarios to plot: pass {label: rows of cost_model.sweep_video_length}.")
    for label, rows in sweeps.items():
        if len(rows) != len(frames):
            raise ValueError(f"scenario {label!r} has {len(rows)} rows for {len(frames)} frame counts; "
                             f"sweep the same video lengths as `frames`.")
    fig, (speed_ax, gain_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(sweeps.items()):
        colour = colours[i % len(colours)]
        speed_ax.plot(frames, [r["sd_speedup"] for r in rows], color=colour, ls="--", marker="o", ms=4)
        speed_ax.plot(frames, [r["specvlm_speedup"] for r in rows], color=colour, marker="o", ms=4, label=label)
        gain_ax.plot(frames, [r["gain"] for r in rows], color=colour, marker="o", ms=4, label=label)
    for ax in (speed_ax, gain_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(frames), [str(f) for f in frames])
        ax.minorticks_off()
        ax.axhline(1.0, color="black", lw=1)
        ax.set_xlabel("frames")
        ax.grid(alpha=0.3)
    speed_ax.set_ylabel("predicted decode speedup over AR (x)")
    speed_ax.set_title("plain SD (dashed) and SpecVLM (solid)", fontsize=10)
    gain_ax.set_ylabel("pruning gain: SpecVLM / SD (x)")
    gain_ax.set_title("what pruning the draft's video adds", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.legend(*speed_ax.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(2, len(sweeps)), fontsize=8)
    return fig


ROUND_PARTS = (  # (label, colour) of `round_parts`, in the bar's order
    ("draft kernels", "tab:orange"), ("verification kernels", "tab:blue"), ("other kernels", "tab:gray"),
    ("idle inside the draft", "gold"), ("idle between rounds", "tab:red"), ("other idle (short gaps between kernels)", "lightgray"))


def round_parts(timeline: dict) -> dict:
    """A decode timeline (`timeline.decode_timeline`, one profiled generation) as ms per round:
    device busy time of the draft, the verification and the rest (KV moves, copies), and the
    device's idle time inside draft phases (gaps between draft kernels), between rounds (from
    the last kernel of a round to the first of the next: the host reading, accepting and
    launching) and the rest: gaps shorter than the timeline's threshold between the kernels of
    every pass, longer ones inside a verification, and the tail from the last kernel to the end
    of the decode.
    The parts add up to the timeline's decode time per round."""
    rounds = max(timeline["rounds"], 1)
    phases, gaps = timeline["phases"], timeline["idle_by_transition"]
    between = sum(v["ms"] for k, v in gaps.items() if k.split(">")[0] in ("accept", "start"))
    inside_draft = gaps.get("draft>draft", {"ms": 0.0})["ms"]
    busy = {"draft kernels": phases["draft"]["busy_ms"], "verification kernels": phases["verify"]["busy_ms"]}
    busy["other kernels"] = timeline["busy_ms"] - sum(busy.values())
    idle = {"idle inside the draft": inside_draft, "idle between rounds": between,
            "other idle (short gaps between kernels)": timeline["idle_ms"] - inside_draft - between}
    return {label: ms / rounds for label, ms in {**busy, **idle}.items()}


def plot_round_timeline(result, title: str | None = None):
    """One bar per speculative fast-path row that carries a timeline (`bench --timeline`): ms
    per round split by `round_parts`, the row's tokens per round written beside it."""
    result = load(result)
    rows = [r for r in bench_rows(result, "fast") if r.get("timeline") and r["method"] != "ar"]
    if not rows:
        raise ValueError("no fast-path row with a timeline: run the benchmark with --timeline.")
    height = 0.5 * len(rows) + 2.2
    fig, ax = plt.subplots(figsize=(9, height))
    labels = [run_label(r) for r in rows]
    left = [0.0] * len(rows)
    for part, colour in ROUND_PARTS:
        widths = [round_parts(r["timeline"])[part] for r in rows]
        ax.barh(labels, widths, left=left, color=colour, label=part)
        left = [a + b for a, b in zip(left, widths)]
    for y, (row, end) in enumerate(zip(rows, left)):
        ax.text(end + 0.2, y, f"{row['timeline']['new_tokens'] / max(row['timeline']['rounds'], 1):.1f} tokens/round",
                va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.25)
    ax.set_xlabel("ms per round (one profiled generation)")
    ax.set_title(title or f"Where a round's time goes: {_source(result)}", fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, ncol=3, loc="lower center")
    fig.tight_layout(rect=(0, 0.45 / height, 1, 1))  # the legend's two lines below the axis label
    return fig


BUDGET_COLOURS = {"draft passes": "tab:orange", "verification": "tab:blue", "draft picks": "tab:red",
                  "acceptance": "tab:purple", "KV move": "tab:brown", "launch": "tab:pink", "unexplained": "tab:gray"}


def round_budget(result, draft_floor_ms: float, target: float = 2.5, method: str = "specvlm",
                 ratio: float | None = None, tree: str | None = None) -> dict:
    """The numbers `plot_round_budget` draws, for the first fast-path tree row of `method` (and
    `ratio`, and the tree named `tree`, e.g. "mc_sim_7b_63", if given) that equals AR: {"row",
    "measured": `cost_model.round_breakdown` (ms per round), "at floor": the same with every draft
    pass at `draft_floor_ms`, "allowed_ms": the round at which the row would run `target` times its
    AR (AR's decode ms / (target x rounds), the inverse of the row's `speedup_vs_ar`), "passes":
    draft passes per round of the row's tree}."""
    result = load(result)
    rows = bench_rows(result, "fast")
    row = next((r for r in rows if r["method"] == method and r.get("draft") == "tree"
                and (ratio is None or r.get("ratio") == ratio) and r.get("speedup_vs_ar") is not None
                and (tree is None or tree_name(r) == tree)), None)
    ar = next((r for r in rows if r["method"] == "ar" and row is not None and r["frames"] == row["frames"]), None)
    if row is None or ar is None:
        raise ValueError(f"no fast-path tree row of method {method!r}{f' at ratio {ratio}' if ratio is not None else ''}"
                         f"{f' with tree {tree!r}' if tree is not None else ''} that equals AR, with its AR row, in this "
                         "result.")
    measured = round_breakdown(row)
    passes = len(draft_passes(row_tree(row)))
    at_floor = {**measured, "draft passes": passes * draft_floor_ms}
    allowed = 1000 * ar["decode_s"] / (target * row["rounds"])
    return {"row": row, "measured": measured, "at floor": at_floor, "allowed_ms": allowed, "passes": passes}


def plot_round_budget(result, draft_floor_ms: float, target: float = 2.5, method: str = "specvlm",
                      ratio: float | None = None, floor_source: str = "", title: str | None = None,
                      tree: str | None = None):
    """A Figure with two bars of ms per round: the row `round_budget` picks, its measured round
    split by its step timings (`cost_model.round_breakdown`), and the same round with each draft
    pass at `draft_floor_ms` (bytes over copy bandwidth, from a profile: `floor_source` says which,
    in the bar's label); a dashed line at the round that would give `target` times the project's
    AR. A negative "unexplained" part (the step timings add up to more than the measured round)
    is drawn as nothing and written beside the bar."""
    budget = round_budget(result, draft_floor_ms, target, method, ratio, tree)
    fig, ax = plt.subplots(figsize=(10, 3))
    source = f"\n({floor_source})" if floor_source else ""
    labels = ["measured", f"draft passes at their floor,\n{draft_floor_ms:.2f} ms each{source}"]
    left = [0.0, 0.0]
    for part, colour in BUDGET_COLOURS.items():
        widths = [max(budget[bar][part], 0.0) for bar in ("measured", "at floor")]
        ax.barh(labels, widths, left=left, color=colour, label=part)
        left = [a + b for a, b in zip(left, widths)]
    over = -budget["measured"]["unexplained"]
    if over > 0:
        for y in (0, 1):
            ax.text(left[y] + 0.1, y, f"timings exceed the measured round by {over:.2f} ms", va="center", fontsize=8)
    ax.axvline(budget["allowed_ms"], color="black", linestyle="--", linewidth=1)
    ax.invert_yaxis()
    ax.text(budget["allowed_ms"], 0.5, f" the round for {target:g}x AR", fontsize=8, va="center")
    ax.set_xlim(0, max(left + [budget["allowed_ms"]]) * 1.1)
    ax.set_xlabel("ms per round")
    ax.set_title(title or f"A round against its budget: {_source(load(result))}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig
