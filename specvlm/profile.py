"""Where a decode step's time goes: one fast-path step under `torch.profiler`, its kernels by kind.

`costs.py` says how far a step sits above its floor (weights + KV bytes over the copy
bandwidth); this module says why. `profile_step` builds the random-weight language model at a
real shape exactly as `costs.measure_costs` does (`costs.build_lm`, the cache filled by the
same path factories), warms the step up (compilation and CUDA-graph capture included), times
it outside the profiler (`costs.time_ms`: device-synchronised; "wall" one step at a time, on an
idle device; "queued" `QUEUED` steps in a row, the host preparing each while the device runs the
last, as the fast path's decoding loops run), then records `repeats` steps with
`torch.profiler`. `kernel_breakdown` groups the recorded GPU kernels by name into five
categories and divides by the steps:

    attention      flash / fmha / cudnn / sdpa / flex kernels, inductor templates (FlexAttention's
                   decode kernel), inductor kernels fused into an attention's inputs (named after it),
                   and softmax kernels (`fast.grouped_attention`'s; its two batched matmuls are matmul)
    matmul         gemm / gemv / cutlass / cublas / nvjet kernels, aten mm ops
    elementwise    norms, rotary, activations: inductor's fused triton kernels, reductions
    copy           cache writes and copies: index_copy / index_put / scatter / memcpy / memset
    other          the rest

The time the GPU is *not* running a kernel, `idle_share = 1 - busy / wall`, is launch gaps
and host work: what CUDA graphs remove. A step far above its floor with a small idle share is
slow in its kernels (which ones: the categories and the top 10); one with a large idle share
is launch-bound.

Kernels replayed inside a CUDA graph are not always visible to the profiler. When a
graph-replayed step shows (almost) no kernels, the result says `graph_kernels_visible: false`
and carries a second profile of the same step without CUDA graphs (`without_graphs`, by
default the eager fast path), so a breakdown is still there, labelled as such; both wall
times are reported.

    python -m specvlm.profile --shapes llava-ov-7b llava-ov-0.5b --contexts 16384 1638 --attention flex \\
        --out "figures/profile_llava_flex_{card}.json" --png figures/profile_llava_flex.png

The largest shape given is taken as the target: it also gets the chain verification (k + 1 =
6 tokens) and the tree verification (`MC_SIM_7B_63`, 26 nodes); the others get the one-token
step (`--kinds` overrides). On a CPU the "kernels" are the aten ops' self CPU times (there is
no device timeline): enough to test the harness, not a GPU profile.

Not handled: several GPUs or streams (busy time is a plain sum of kernel times); transformers'
own paths beyond "eager" and "sdpa" (`costs.PATHS`).
"""

from __future__ import annotations

import re
import time
from datetime import date

import torch
import transformers
from torch.autograd import DeviceType

from . import costs, fast
# QUEUED: steps per queued sample, as bench times them
from .bench import QUEUED, card_id, card_name, host_side, last_replay, save
from .cost_model import load
from .models import resolved_dtype
from .fusion import fuse_projections
from .trees import MC_SIM_7B_63, Tree

# first match wins: attention before matmul (fmha_cutlass... is attention; a language model's
# only cudnn kernels are its sdpa's, reductions included), copy before
# elementwise (at::native's index kernels are "elementwise" kernels too). Inductor names a fused
# kernel after the ops it fused (`triton_red_fused__to_copy_add_mean_mul_pow_rsqrt`: an RMS norm
# with a cast), so a fused kernel is a copy only when it writes the cache (index_copy).
# `fast.grouped_attention` is two batched matmuls around a softmax: its softmax counts as
# attention, its matmuls as matmul (a kernel's name does not tell them from the weights').
CATEGORIES = (
    ("attention", r"flash|fmha|sdpa|scaled_dot_product|flex|attention|cudnn|softmax|triton_tem_fused_(?!.*mm)"),
    ("matmul", r"gemm|gemv|cutlass|cublas|nvjet|xmma|s16816|splitk|few_rows|(^|[^a-z])(add|b)?mm([^a-z]|$)|matmul"),
    ("copy", r"index_copy|index_put|scatter|memcpy|memset|direct_copy|copy_kernel|CatArray|"
             r"aten::(copy_|cat|fill_|zero_|clone)$"),
    ("elementwise", r"triton_(poi|red|per)|elementwise|reduce|rms|norm|rotary|rope|silu|"
                    r"aten::(mul|add|sub|div|neg|pow|rsqrt|mean|sigmoid|exp|where|masked_fill)"),
)
OTHER = "other"
# costs' own fast paths, one per attention: here the one path "fast", its attention given apart
FAST_PATHS = {path for path in costs.PATHS if path.split("-")[0] == "fast"}
CATEGORY_NAMES = tuple(name for name, _ in CATEGORIES) + (OTHER,)
_PATTERNS = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in CATEGORIES]
TOP = 10


def category(name: str) -> str:
    """The category of a kernel name: category("void pytorch_flash::flash_fwd_kernel<...>") -> "attention";
    category("nvjet_tst_128x64_64x8") -> "matmul"; category("triton_red_fused_add_mean_pow_rsqrt_0") -> "elementwise"."""
    return next((label for label, pattern in _PATTERNS if pattern.search(name)), OTHER)


def kernel_breakdown(events, steps: int, wall_us_per_step: float | None = None,
                     floor_us: float | None = None) -> dict:
    """Group kernel records by category and divide by `steps`; pure.

    events: (name, device_time_us, count) records, device_time_us being the total over all
    `count` calls (one record per kernel name, or several: they are summed). E.g. with
    steps=2, events [("nvjet_a", 60, 4), ("flash_fwd", 30, 2), ("triton_poi_x", 10, 2)]:
    matmul 30 us and 2 kernels per step, attention 15 us, busy 50 us per step; with
    wall_us_per_step=100, idle_share 0.5.
    Returns {"categories": {name: {"us_per_step", "kernels_per_step", "share"}} (share of the
    busy time), "kernels_per_step", "gpu_busy_us_per_step", "wall_us_per_step", "idle_share"
    (1 - busy / wall; None without a wall time; below 0 when the profiled kernels outlast the
    unprofiled wall time), "floor_us", "wall_x_floor", "top": the TOP kernels by time, each
    {"name" (80 characters at most), "category", "us_per_step", "calls_per_step"}}.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    per_name: dict[str, list[float]] = {}
    for name, us, count in events:
        total = per_name.setdefault(name, [0.0, 0])
        total[0] += us
        total[1] += count
    busy = sum(us for us, _ in per_name.values()) / steps
    categories = {label: {"us_per_step": 0.0, "kernels_per_step": 0.0, "share": 0.0} for label in CATEGORY_NAMES}
    for name, (us, count) in per_name.items():
        entry = categories[category(name)]
        entry["us_per_step"] += us / steps
        entry["kernels_per_step"] += count / steps
    for entry in categories.values():
        entry["share"] = entry["us_per_step"] / busy if busy else 0.0
    top = sorted(per_name.items(), key=lambda item: -item[1][0])[:TOP]
    return {
        "categories": categories,
        "kernels_per_step": sum(count for _, count in per_name.values()) / steps,
        "gpu_busy_us_per_step": busy,
        "wall_us_per_step": wall_us_per_step,
        "idle_share": None if not wall_us_per_step else 1 - busy / wall_us_per_step,
        "floor_us": floor_us,
        "wall_x_floor": wall_us_per_step / floor_us if wall_us_per_step and floor_us else None,
        "top": [{"name": name[:80], "category": category(name), "us_per_step": us / steps,
                 "calls_per_step": count / steps} for name, (us, count) in top],
    }


def kernel_records(profiler, device: torch.device) -> list[tuple[str, float, int]]:
    """(name, device_time_us, count) of every device kernel, memcpy and memset a finished
    `torch.profiler.profile` saw; on a CPU, of every op's self CPU time instead."""
    averages = profiler.key_averages()
    if device.type == "cuda":
        return [(e.key, e.device_time_total, e.count) for e in averages
                if e.device_type == DeviceType.CUDA and e.count]
    return [(e.key, e.self_cpu_time_total, e.count) for e in averages
            if e.device_type == DeviceType.CPU and not e.is_user_annotation and e.count]


def graph_kernels_visible(kernels_per_step: float, num_layers: int, graphs: bool) -> bool | None:
    """Did the profiler see a CUDA-graph-replayed step's kernels? None without graphs; else
    whether it saw at least one kernel per layer (every layer launches several; a replay seen
    from outside shows only the input copies). (3.0, 24, True) -> False; (310.0, 24, True) -> True."""
    return kernels_per_step >= num_layers if graphs else None


def _make_step(model, path: str, attention: str, compile, context_len: int, query_len: int, tree: Tree | None,
               vocabulary: int | None = None):
    if path == "fast":
        return costs.fast_step(attention, compile, vocabulary)(model, context_len, query_len, tree)
    if vocabulary is not None:
        raise ValueError("a draft vocabulary cuts the fast path's output layer; transformers' paths keep theirs whole.")
    if attention != "sdpa":
        raise ValueError(f"attention={attention!r} applies to the fast path only; transformers' path is "
                         f"chosen by path= ({sorted(set(costs.PATHS) - FAST_PATHS)}).")
    return costs.PATHS[path](model, context_len, query_len, tree)


def _profiled(make_step, device: torch.device, repeats: int, warmup: int) -> tuple[float, float, float, list, dict]:
    """(setup_s, wall_us, queued_us, records, host): make the step and warm it up (compilation, graph
    capture), time it outside the profiler (median us per step: one at a time, and QUEUED in a
    row, the latter with the host's share of it: `bench.host_side`), then profile `repeats` steps."""
    began = time.perf_counter()
    step = make_step()
    for _ in range(warmup):
        step()
    costs._sync(device)
    setup_s = time.perf_counter() - began
    wall_us = 1000 * costs.time_ms(step, device, repeats, warmup=1)
    engine = getattr(step, "engine", None)  # a fast-path step's: its CUDA graph, timed alone too
    replay = None if engine is None else last_replay(step, lambda: None, engine)
    host = host_side(device, step, lambda: None, repeats, replay=replay)
    queued_us = host["queued_us_per_step"]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(repeats):
            step()
            costs._sync(device)
    return setup_s, wall_us, queued_us, kernel_records(profiler, device), host


def profile_step(shape, context_len: int, query_len: int | None = None, path: str = "fast",
                 attention: str = "sdpa", tree: Tree | None = None, device=None, dtype=None,
                 repeats: int = 20, warmup: int = 3, compile=None, fallback=False, model=None,
                 bandwidth: float | None = None, seed: int = 0, vocabulary: int | None = None) -> dict:
    """Profile one pass of `query_len` tokens (default 1, or `tree.num_nodes`) after
    `context_len` cached ones at `shape` (a `costs.SHAPES` name or a Qwen2Config).

    path "fast" (`costs.fast_step(attention, compile)`: CUDA graphs on CUDA unless compile says
    otherwise) or transformers' "eager" / "sdpa". `model`: a `costs.build_lm` model to reuse
    (else built); `bandwidth` in bytes/s (else measured); `vocabulary`: the fast path's logits
    cover only the first that many token ids (a draft vocabulary: `costs.fast_step`), and the floor
    counts only those rows of the output layer. When the step is replayed from CUDA
    graphs and the profile sees fewer kernels per step than the model has layers, the result has
    graph_kernels_visible False and `without_graphs`: the same step with compile=`fallback`
    (False: eager; "default": inductor's kernels launched one by one), profiled the same way.
    Returns `kernel_breakdown`'s keys plus shape, context, query_len, path, attention, compile, vocabulary,
    device, dtype, bandwidth_GBps, weight_bytes, kv_bytes, setup_s (making the step and its warm-up:
    compilation included), host (`bench.host_side`: the host's time queuing steps), graph_kernels_visible
    (None when no CUDA graph is involved) and without_graphs (None or a breakdown).
    """
    valid = ("fast", *sorted(set(costs.PATHS) - FAST_PATHS))
    if path not in valid:
        raise ValueError(f"unknown path {path!r}; choose one of {valid} (attention= picks the fast path's kernel).")
    config = costs.lm_config(shape) if isinstance(shape, str) else shape
    if context_len < 1 or repeats < 1:
        raise ValueError(f"context_len and repeats must be >= 1; got {context_len}, {repeats}.")
    query_len = query_len or (tree.num_nodes if tree is not None else 1)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolved_dtype(dtype, device)
    model = model if model is not None else costs.build_lm(config, device, dtype, seed)
    bandwidth = bandwidth or costs.measure_bandwidth(device)
    weights = costs.weight_bytes(config, dtype, vocabulary)  # checks `vocabulary` against the output layer
    kv = costs.kv_bytes(config, context_len + query_len, dtype)
    floor_us = 1e6 * (weights + kv) / bandwidth

    setup_s, wall_us, queued_us, records, host = _profiled(
        lambda: _make_step(model, path, attention, compile, context_len, query_len, tree, vocabulary), device, repeats,
        warmup)
    result = {"shape": shape if isinstance(shape, str) else "custom", "context": int(context_len),
              "query_len": query_len, "vocabulary": vocabulary, "path": path,
              "attention": attention if path == "fast" else path,
              "compile": str(fast.compile_options(compile, device)) if path == "fast" else "None",
              "device": card_name(device), "dtype": str(dtype).removeprefix("torch."),
              "bandwidth_GBps": bandwidth / 1e9, "weight_bytes": weights, "kv_bytes": kv, "setup_s": setup_s,
              **kernel_breakdown(records, repeats, wall_us, floor_us),
              "queued_us_per_step": queued_us, "queued_x_floor": queued_us / floor_us, "host": host}
    graphs = path == "fast" and fast.cuda_graphs(fast.compile_options(compile, device), device) is not None
    result["graph_kernels_visible"] = graph_kernels_visible(result["kernels_per_step"], config.num_hidden_layers, graphs)
    result["without_graphs"] = None
    if result["graph_kernels_visible"] is False:
        setup_s, wall_us, _, records, _ = _profiled(
            lambda: _make_step(model, path, attention, fallback, context_len, query_len, tree, vocabulary), device,
            repeats, warmup)
        label = "eager fast path" if not fallback else f"fast path compiled with {fallback!r}, no CUDA graphs"
        result["without_graphs"] = {"label": label, "compile": str(fast.compile_options(fallback, device)),
                                    "setup_s": setup_s, **kernel_breakdown(records, repeats, wall_us, floor_us)}
    return result


def breakdown_of(row: dict) -> dict:
    """The breakdown to show for a row: its own, or its without-graphs one when its graph's
    kernels were invisible."""
    return row["without_graphs"] if row.get("without_graphs") else row


def kinds_for(shapes, kinds=None) -> dict:
    """{shape: kinds}: `kinds` for every shape when given; else the largest shape (the target)
    gets ("step", "chain", "tree") and the others ("step",)."""
    if kinds:
        return {shape: tuple(kinds) for shape in shapes}
    target = max(shapes, key=lambda s: costs.num_params(costs.lm_config(s)))
    return {shape: costs.KINDS if shape == target else ("step",) for shape in shapes}


def profile_shapes(shapes, contexts, kinds=None, attention: str = "sdpa", device=None, dtype=None, k: int = 5,
                   tree: Tree = MC_SIM_7B_63, repeats: int = 20, fallback=False, progress=None,
                   fuse: bool = False, few_rows: bool = False, vocabulary: int | None = None) -> dict:
    """`profile_step` for each shape, context (largest first) and kind; one model per shape,
    one bandwidth measurement. `fuse`: each model's q/k/v and gate/up projections stacked into one
    matmul each first (`fusion.fuse_projections`, as the fast path does for a draft on CUDA);
    `few_rows` (with `fuse`): their products of a few rows as `few_rows.py`'s kernels; `vocabulary`:
    the steps' logits over the first that many token ids (`profile_step`).
    JSON-ready: card, versions, date, dtype, bandwidth, fused, rows."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolved_dtype(dtype, device)
    plan = kinds_for(shapes, kinds)
    bad = [kind for kinds in plan.values() for kind in kinds if kind not in costs.KINDS]
    if bad:
        raise ValueError(f"unknown kind(s) {bad}; choose from {costs.KINDS}.")
    bandwidth = costs.measure_bandwidth(device)
    queries = {"step": (1, None), "chain": (k + 1, None), "tree": (tree.num_nodes, tree)}
    rows = []
    for shape in shapes:
        model = costs.build_lm(shape, device, dtype)
        if fuse:
            fuse_projections(costs._BareLM(model), few_rows=few_rows)
        for context in sorted(contexts, reverse=True):  # largest first: flex reuses one engine
            for kind in plan[shape]:
                query_len, kind_tree = queries[kind]
                row = {"kind": kind, "fused": fuse, "few_rows": fuse and few_rows, **profile_step(shape, context, query_len, "fast", attention, kind_tree, device,
                                                    dtype, repeats, model=model, bandwidth=bandwidth,
                                                    fallback=fallback, vocabulary=vocabulary)}
                rows.append(row)
                if progress:
                    progress(row)
        model = None
        costs._free(device)
    return {"card": card_name(device), "card_id": card_id(device), "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "transformers": transformers.__version__, "date": str(date.today()), "bandwidth_GBps": bandwidth / 1e9,
            "attention": attention, "fused": fuse, "few_rows": fuse and few_rows, "vocabulary": vocabulary,
            "repeats": repeats, "k": k, "tree_nodes": tree.num_nodes,
            "weights": "random: matrices, embeddings, biases normal(0, 0.02), norms 1; KV cache random",
            "timing": "wall: median device-synchronised step outside the profiler, one at a time; queued: "
                      f"{QUEUED} steps in a row, per step; kernels: profiler, per step",
            "floor": "(weight bytes + KV bytes read) / copy bandwidth measured in this run",
            "rows": rows}


def combine(runs: dict, note: str = "") -> dict:
    """Profile results of several runs (label -> result, on one card) as one result whose rows
    carry their run's `label`, `attention`, `date` and versions, e.g. the same step before and
    after a kernel change: {"masked sdpa": result_a, "grouped": result_b} -> rows of both."""
    results = list(runs.values())
    for key in ("card", "dtype", "repeats", "k", "tree_nodes"):
        values = {result[key] for result in results}
        if len(values) != 1:
            raise ValueError(f"combine profiles of one card, dtype and settings only; got {key} {sorted(map(str, values))}.")
    rows = [{**row, "label": label, "attention": result["attention"], "date": result["date"], "card_id": result.get("card_id"),
             "torch": result["torch"], "transformers": result["transformers"]}
            for label, result in runs.items() for row in result["rows"]]
    return {**{key: results[0][key] for key in ("card", "dtype", "repeats", "k", "tree_nodes", "weights", "timing",
                                                "floor")},
            "attention": "per row", "bandwidth_GBps": min(result["bandwidth_GBps"] for result in results),
            "date": max(result["date"] for result in results), "torch": results[0]["torch"],
            "transformers": results[0]["transformers"], "note": note, "rows": rows}


def table(result: dict) -> str:
    """Markdown: one line per profiled step (and one per without-graphs profile), us per step;
    "queued" columns (steps timed in a row) where the profile measured them."""
    head = ["shape", "context", "q", "profile", "wall us", "floor us", "x floor", "queued us", "queued x floor",
            "kernels", "busy us", "idle", *CATEGORY_NAMES]
    bandwidth = f"{result['bandwidth_GBps']:.0f} GB/s" + (" (the lowest of the runs)" if result["attention"] == "per row"
                                                          else "")
    lines = [f"{result['card']} ({result['dtype']}), copy bandwidth {bandwidth}, "
             f"{result['attention']} attention, random weights at the shapes, {result['date']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        variants = [("graphs" if row["graph_kernels_visible"] is not None else row["path"], row)]
        if row["without_graphs"]:
            variants.append((row["without_graphs"]["label"], row["without_graphs"]))
        for label, b in variants:
            idle = "-" if b["idle_share"] is None else f"{b['idle_share']:.0%}"
            shape = f"{row['shape']} ({row['label']})" if "label" in row else row["shape"]
            queued = b.get("queued_us_per_step")
            cells = [shape, row["context"], row["query_len"], label, f"{b['wall_us_per_step']:.0f}",
                     f"{b['floor_us']:.0f}", f"{b['wall_x_floor']:.2f}",
                     "-" if queued is None else f"{queued:.0f}",
                     "-" if queued is None else f"{b['queued_x_floor']:.2f}",
                     f"{b['kernels_per_step']:.0f}",
                     f"{b['gpu_busy_us_per_step']:.0f}", idle,
                     *(f"{b['categories'][c]['us_per_step']:.0f}" for c in CATEGORY_NAMES)]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def plot_profile(json_path, out=None):
    """Stacked horizontal bars, one per profiled (shape, context, query): us per step in each
    kernel category, the floor (black bar) and the wall time (black diamond, "x floor" beside
    it; a white dot for the queued time per step, where measured). A row whose graph kernels
    were invisible (marked *) shows its without-graphs breakdown, and that profile's wall time
    as a hollow diamond. Saved to `out` when given; returns the Figure."""
    import matplotlib.pyplot as plt

    result = load(json_path)
    rows = result["rows"]
    colours = dict(zip(CATEGORY_NAMES, ("tab:purple", "tab:blue", "tab:orange", "tab:green", "0.7")))
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.6))
    labels = []
    for y, row in enumerate(rows):
        b = breakdown_of(row)
        left = 0.0
        for name in CATEGORY_NAMES:
            width = b["categories"][name]["us_per_step"]
            ax.barh(y, width, left=left, color=colours[name], height=0.6, label=name if y == 0 else None)
            left += width
        ax.plot([row["floor_us"]] * 2, [y - 0.4, y + 0.4], color="black", lw=2.5,
                label="floor: bytes / bandwidth" if y == 0 else None)
        ax.plot(row["wall_us_per_step"], y, "D", color="black", label="wall time per step" if y == 0 else None)
        ax.annotate(f"  {row['wall_x_floor']:.1f}x floor", (row["wall_us_per_step"], y), va="center", fontsize=7)
        if row.get("queued_us_per_step"):
            first = not any(r.get("queued_us_per_step") for r in rows[:y])
            ax.plot(row["queued_us_per_step"], y, "o", mfc="white", mec="black", ms=5,
                    label=f"queued: per step, {QUEUED} in a row" if first else None)
        if row["without_graphs"]:
            ax.plot(b["wall_us_per_step"], y, "D", mfc="none", mec="black",
                    label="wall time without CUDA graphs" if not any(r["without_graphs"] for r in rows[:y]) else None)
        note = " *" if row["without_graphs"] else ""
        run = f"\n{row['label']}" if "label" in row else ""
        labels.append(f"{row['shape']}, {row['context']} ctx, {row['query_len']} tok{note}{run}")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, ax.get_xlim()[1] * 1.12)  # room for the "x floor" notes
    ax.set_xlabel("microseconds per step (kernel time stacked by category)")
    title = f"Where a fast-path step's time goes: {result['card']} ({result['dtype']}, {result['attention']} attention)" \
            f"\nrandom weights at the shapes"
    if any(row["without_graphs"] for row in rows):
        title += "; * kernels from the profile without CUDA graphs"
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=120, bbox_inches="tight")
    return fig


def inductor_setting(text: str) -> tuple[str, object]:
    """'triton.enable_pdl=True' -> ("triton.enable_pdl", True): a key of `torch._inductor.config`
    and the value read by the type of the key's default: a flag takes True/False/1/0 (any case), an
    int or float key a number, a text key the text as given; a key whose default is None takes None,
    True/False (any case), an int or a float where the text reads as one, else the text. Raises
    ValueError naming what was wrong: no '=', a key inductor does not have (with close matches), a
    value not of its key's type, or a key holding another type (a list, a dict, a function)."""
    import difflib

    import torch._inductor.config as inductor_config

    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    defaults = inductor_config.get_config_copy()
    if not sep or not key:
        raise ValueError(f"an inductor setting is KEY=VALUE (e.g. triton.enable_pdl=True), got {text!r}")
    if key not in defaults:
        near = difflib.get_close_matches(key, list(defaults), n=3)
        raise ValueError(f"torch._inductor.config has no {key!r}" + (f"; similar: {', '.join(near)}" if near else
                         "; its keys are those of torch._inductor.config.get_config_copy()"))
    default = defaults[key]
    if isinstance(default, bool):
        flags = {"true": True, "1": True, "false": False, "0": False}
        if value.lower() not in flags:
            raise ValueError(f"{key} is a flag: give True or False, got {value!r}")
        return key, flags[value.lower()]
    if isinstance(default, (int, float)):
        try:
            return key, type(default)(value)
        except ValueError:
            raise ValueError(f"{key} takes a number ({type(default).__name__}), got {value!r}") from None
    if default is None:  # the key's type is not known: None, a flag or a number where the text reads as one
        flags = {"none": None, "true": True, "false": False}
        if value.lower() in flags:
            return key, flags[value.lower()]
        for number in (int, float):
            try:
                return key, number(value)
            except ValueError:
                pass
        return key, value
    if isinstance(default, str):
        return key, value
    raise ValueError(f"{key} holds a {type(default).__name__}, which --inductor does not set; "
                     "set it in Python (torch._inductor.config)")


def main(argv=None) -> int:
    import argparse
    import sys

    import shlex

    from .__main__ import (device, dtypes, flash_refusal, git_commit, out_file, portable_out, positive_int,
                           recorded_environment)

    parser = argparse.ArgumentParser(prog="python -m specvlm.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["llava-ov-7b", "llava-ov-0.5b"], choices=sorted(costs.SHAPES),
                        metavar="SHAPE", help=f"language-model shapes: {', '.join(costs.SHAPES)}")
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=[16384, 1638],
                        help="cached tokens (1638: 16k with 90%% of the video pruned)")
    parser.add_argument("--kinds", nargs="+", default=None, choices=costs.KINDS,
                        help="default: step, chain and tree for the largest shape, step for the others")
    parser.add_argument("--attention", default="sdpa", choices=fast.ATTENTIONS)
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--fuse", action="store_true",
                        help="stack each model's q/k/v and gate/up projections into one matmul each (fusion.py)")
    parser.add_argument("--few-rows", action="store_true",
                        help="with --fuse: products of a few rows as few_rows.py's Triton kernels")
    parser.add_argument("--draft-vocab", type=positive_int, default=None, metavar="N",
                        help="the fast path's output layer cut to the first N token ids, as a draft vocabulary "
                             "(SPECVLM_DRAFT_VOCAB) cuts a draft's; the floor counts only those rows")
    parser.add_argument("--combo-kernels", action="store_true",
                        help="compile with inductor's combo kernels, which launch data-independent kernels as one "
                             "(torch._inductor.config.combo_kernels, set for the whole process)")
    parser.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                        help="set torch._inductor.config keys for the whole process before anything compiles "
                             "(e.g. triton.enable_pdl=True: Hopper's programmatic dependent launch for inductor's "
                             "Triton kernels); the JSON records them")
    parser.add_argument("--fallback", default="eager", choices=("eager", "inductor"),
                        help="the profile without CUDA graphs when their kernels are invisible: eager steps, "
                             "or inductor's kernels launched one by one")
    parser.add_argument("--device", type=device, default=None)
    parser.add_argument("--dtype", default=None, choices=dtypes(), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", type=out_file, default=None, help="JSON path; '{card}' becomes the card's name")
    parser.add_argument("--png", type=out_file, default=None, help="also plot the JSON here ('{card}' likewise)")
    args = parser.parse_args(argv)
    refusal = flash_refusal(args.device, args.dtype) if args.attention == "flash" else None
    if refusal:
        parser.error(f"argument --attention: {refusal}")
    if args.few_rows and not args.fuse:
        parser.error("--few-rows runs the fused projections' products as Triton kernels: give --fuse too.")
    if args.png and not args.out:
        parser.error("--png plots the JSON written by --out: give --out too.")
    too_few = [shape for shape in args.shapes if args.draft_vocab and args.draft_vocab > costs.lm_config(shape).vocab_size]
    if too_few:
        parser.error(f"argument --draft-vocab: {args.draft_vocab} token ids, more than the output layer of "
                     f"{', '.join(too_few)} has ({costs.lm_config(too_few[0]).vocab_size:,} rows).")
    try:
        settings = dict(inductor_setting(text) for text in args.inductor)
    except ValueError as error:
        parser.error(f"argument --inductor: {error}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    fallback = False if args.fallback == "eager" else "default"
    import torch._inductor.config as inductor_config

    if args.combo_kernels:
        inductor_config.combo_kernels = True
    for key, value in settings.items():
        setattr(inductor_config, key, value)
    result = profile_shapes(args.shapes, args.contexts, args.kinds, args.attention, args.device, dtype,
                            repeats=args.repeats, fallback=fallback, fuse=args.fuse, few_rows=args.few_rows,
                            vocabulary=args.draft_vocab,
                            progress=lambda r: print(f"{r['shape']} {r['kind']} {r['context']}: "
                                                     f"{r['wall_us_per_step']:.0f} us, {r['kernels_per_step']:.0f} "
                                                     f"kernels/step", file=sys.stderr, flush=True))
    result["command"] = recorded_environment() + "python -m specvlm.profile " + \
        shlex.join(portable_out(sys.argv[1:] if argv is None else argv))
    result["code"] = git_commit()
    result["combo_kernels"] = bool(inductor_config.combo_kernels)
    result["inductor"] = {key: getattr(inductor_config, key) for key in settings}
    print(table(result))
    slug = costs.card_slug(result["card"])
    if args.out:
        save(result, args.out.replace("{card}", slug))
        if args.png:
            plot_profile(args.out.replace("{card}", slug), args.png.replace("{card}", slug))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
