"""Predicted speedup of speculative decoding from step costs and accepted lengths.

A decoding step's cost is measured (`costs.py`, or the step timings of a run); how many tokens
a round yields is measured (the accepted lengths of a run). Their ratio predicts the speedup,
and says where a round's time goes, which is what decides whether pruning the draft pays.

Chain of k drafted tokens, as `decoding.chain_round` runs it:

    draft:   k passes at the draft's context c_d (the first also feeds the committed tokens the
             draft has not seen yet: 1 after a rejection, 2 after a full acceptance; there is no
             separate catch-up pass, and a pass of 1 or 2 tokens costs the same, memory-bound)
    target:  1 pass over the last committed token + k proposals at the target's context c_t

    round_ms         = k * t_draft(c_d) + t_verify(k + 1, c_t)
    tokens per round = E[a] + 1, a = accepted draft tokens in a round (0..k)
    speedup          = tokens per round * t_ar(c_t) / round_ms

E.g. t_draft = 1 ms, t_verify = t_ar = 10 ms, k = 5, everything accepted: 6 * 10 / (5 + 10) = 4.
Nothing accepted: 1 * 10 / 15 = 0.67, slower than the target alone.

Tree (`decoding.tree_round`): one draft pass per level, `depth` passes whatever the width
(level widths in `draft_passes`), then one target pass over all nodes with the tree mask:
`round_ms = depth * t_draft(c_d) + t_verify(N + 1, c_t)`. Anything else a round pays (the plain
path's copy of the target's cache to keep the accepted path, the fast path's `launch_ms`) goes
into `extra_ms`.

SpecVLM changes only c_d: the draft's cache holds the text and `keep` of the video tokens
instead of all of them. With step costs roughly affine in context, t(c) = a + b * c,

    round_sd - round_specvlm = passes * b_draft * (video - keep)
    pruning gain = (tokens_specvlm / tokens_sd) * round_sd / round_specvlm

so pruning pays when the draft's cache-dependent part, passes * b_draft * video, is a large
share of the round: long videos, a draft whose step cost grows steeply with its cache (slow
attention kernels, or self-speculation where the draft is the large target), and a cheap
verification. When draft steps are flat in context (launch-bound small drafts) the gain is ~1
however much is pruned. `sweep_video_length` draws exactly this trade.

Acceptance is given either as a histogram (`hist[a]` = rounds with a accepted tokens, see
`histogram`) or as the mean accepted length (a float); only its mean enters a speedup, since
a round's cost does not depend on how much of it is accepted.
A fast-path run queues its passes without waiting for the device, so its step timings are
queued ones; the host's launch time shows once per round (`launch_ms`: the first pass after the
host reads a verification), added to the round by `predicted_vs_measured`. A fast-path tree row
also times the rest of its round (`glue_ms`: the draft's token picks between passes, the host's
acceptance, the target's KV move), added likewise; `round_breakdown` splits a measured round
into all of these and what they leave unexplained.

A run's answer is finite, and `predicted_vs_measured` counts what its two sides really paid for.
The speculative side pays `rounds` rounds, whose histogram also counts the last round's tokens
past the answer's end (verified, then dropped). The AR reference pays one pass per token after
the prefill's, plus, on the fast path, the pass it queued after the end token (`ar_passes`).
So a finished run's predicted speedup is `ar_passes * t_ar / (rounds * round_ms)`: the rate
above times `ar_passes / committed`, where `committed = tokens per round * rounds`.

Not modelled: prefill, scoring and selection (decode time only, as the benchmark measures),
a chain round's picks and acceptance, the short last rounds near `max_new_tokens`.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence

from .pruning import keep_budget
from .trees import MC_SIM_7B_63, Tree


def histogram(accepted: Sequence[int]) -> list[int]:
    """Accepted counts per round -> rounds per accepted count: [2, 0, 2, 3] -> [1, 0, 2, 1]."""
    if not accepted:
        raise ValueError("no rounds: a histogram needs at least one round's accepted count.")
    if any(not isinstance(a, numbers.Integral) or a < 0 for a in accepted):
        raise ValueError(f"accepted counts must be integers >= 0, got {list(accepted)}.")
    hist = [0] * (max(accepted) + 1)
    for a in accepted:
        hist[a] += 1
    return hist


def tokens_per_round(acceptance) -> float:
    """Expected tokens a round commits: mean accepted + 1 (the target's bonus token).
    `acceptance`: a histogram (`hist[a]` rounds accepted a tokens) or the mean accepted length.
    tokens_per_round([1, 0, 2, 1]) -> 2.75;  tokens_per_round(2.5) -> 3.5"""
    if isinstance(acceptance, numbers.Real) and not isinstance(acceptance, bool):
        if acceptance < 0:
            raise ValueError(f"mean accepted length must be >= 0, got {acceptance}.")
        return float(acceptance) + 1
    counts = list(acceptance)
    if not counts or any(c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"a histogram needs non-negative counts and at least one round, got {counts}.")
    return sum(a * c for a, c in enumerate(counts)) / sum(counts) + 1


def ar_passes(new_tokens: int, max_new_tokens: int, queued_ahead: bool) -> int:
    """Target passes the AR reference runs for an answer of `new_tokens` tokens (the first from
    the prefill): one per later token; and when it queues each step before it reads the token
    that step feeds on (`queued_ahead`: the fast path's `_generate_ar` since it queues), also the
    step queued after the end token, which runs and is dropped, unless `max_new_tokens` kept it
    from being queued.
    ar_passes(33, 64, True) -> 33;  ar_passes(33, 64, False) -> 32;  ar_passes(64, 64, True) -> 63"""
    if new_tokens < 1 or max_new_tokens < new_tokens:
        raise ValueError(f"an answer has 1..max_new_tokens tokens, got {new_tokens} of {max_new_tokens}.")
    return new_tokens - 1 + (queued_ahead and 1 < new_tokens < max_new_tokens)


def ar_queued_ahead(ar_row: dict) -> bool:
    """Whether a bench AR row's decoding queued its steps ahead (`ar_passes`): the fast path's, in
    runs whose AR row times its step both queued and synced ("target_step_synced" came with the
    queued AR; earlier fast-path runs waited for each token)."""
    return ar_row.get("path") == "fast" and "target_step_synced" in (ar_row.get("step_ms") or {})


def chain_round_ms(k: int, t_draft: float, t_verify: float) -> float:
    """One chain round: k draft passes + one verification of k + 1 tokens.
    chain_round_ms(5, 1.0, 10.0) -> 15.0"""
    if k < 1:
        raise ValueError(f"a chain drafts k >= 1 tokens per round, got k={k}.")
    return k * t_draft + t_verify


def draft_passes(tree: Tree) -> list[int]:
    """New tokens fed by each draft pass of a tree round, not counting the committed tokens the
    first pass also catches up on: the root, then per level the nodes that have children.
    draft_passes(MC_SIM_7B_63) -> [1, 4, 4, 1, 1]"""
    parents = set(tree.parents.tolist())
    return [1] + [sum(int(n) in parents for n in tree.level_nodes(d)) for d in range(1, tree.depth)]


def tree_round_ms(tree: Tree, t_draft: float, t_verify: float, extra_ms: float = 0.0, t_feed: float | None = None,
                  t_level: float | None = None, wide_feed: float = 1.0) -> float:
    """One tree round: `tree.depth` draft passes + one verification of all nodes (+ `extra_ms`).
    The first pass catches up on the tokens the last round committed: `t_feed` when that is
    several (a share `wide_feed` of the rounds: those after a round that accepted a token),
    else a one-token step; each later pass feeds one tree level (`t_level`). Both default to
    `t_draft`. tree_round_ms(MC_SIM_7B_63, 1.0, 12.0) -> 17.0;
    tree_round_ms(MC_SIM_7B_63, 1.0, 12.0, t_feed=2.0, t_level=1.5, wide_feed=0.5) -> 1.5 + 4 * 1.5 + 12 = 19.5"""
    first = wide_feed * (t_draft if t_feed is None else t_feed) + (1 - wide_feed) * t_draft
    levels = (len(draft_passes(tree)) - 1) * (t_draft if t_level is None else t_level)
    return first + levels + t_verify + extra_ms


def speedup(acceptance, round_ms: float, t_ar: float) -> float:
    """Tokens per round * t_ar / round time: speedup([0, 0, 0, 0, 0, 1], 15.0, 10.0) -> 4.0"""
    if round_ms <= 0 or t_ar <= 0:
        raise ValueError(f"step costs must be > 0, got round_ms={round_ms}, t_ar={t_ar}.")
    return tokens_per_round(acceptance) * t_ar / round_ms


def chain_speedup(acceptance, k: int, t_draft: float, t_verify: float, t_ar: float) -> float:
    """chain_speedup([0, 0, 0, 0, 0, 1], k=5, t_draft=1, t_verify=10, t_ar=10) -> 4.0"""
    return speedup(acceptance, chain_round_ms(k, t_draft, t_verify), t_ar)


def tree_speedup(acceptance, tree: Tree, t_draft: float, t_verify: float, t_ar: float) -> float:
    """tree_speedup(2.0, MC_SIM_7B_63, t_draft=1, t_verify=12, t_ar=10) -> 3 * 10 / 17"""
    return speedup(acceptance, tree_round_ms(tree, t_draft, t_verify), t_ar)


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise linear through (xs, ys), the end segments extended beyond the measured range.
    interpolate([1000, 3000], [2, 4], 2000) -> 3.0;  ... 5000 -> 6.0;  ... 0 -> 1.0"""
    points = sorted(zip(xs, ys))
    if not points:
        raise ValueError("no points to interpolate.")
    if len({px for px, _ in points}) < len(points):
        raise ValueError(f"each x may be measured once, got {sorted(xs)}.")
    if len(points) == 1:
        return float(points[0][1])
    i = 1
    while i < len(points) - 1 and x > points[i][0]:
        i += 1
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def load(result_or_path) -> dict:
    """A result dict (of `costs.measure_costs` or `bench.bench`), or read from its JSON file."""
    if isinstance(result_or_path, dict):
        return result_or_path
    with open(result_or_path) as f:
        return json.load(f)


class CostTable:
    """Step costs of one path from a `costs.measure_costs` result (dict or JSON path), as
    functions of context length: `ms(shape, kind, context)`, linear in context between measured
    points and beyond them, never below the pass's bytes-over-bandwidth floor.
    Kinds: "step" (1 token: an AR step, or a draft pass), "chain" (k + 1), "tree"."""

    def __init__(self, result, path: str = "sdpa"):
        result = load(result)
        self.device, self.path, self.k = result["device"], path, result["k"]
        self.tree_nodes = result.get("tree_nodes", MC_SIM_7B_63.num_nodes)  # tokens of the "tree" rows' verification
        self.curves = {}
        for r in result["rows"]:
            if r["path"] == path and r["ms"] is not None:
                self.curves.setdefault((r["shape"], r["kind"]), []).append((r["context"], r["ms"], r["floor_ms"]))
        if not self.curves:
            paths = sorted({r["path"] for r in result["rows"]})
            raise ValueError(f"no measured rows for path {path!r}; this result has {paths}.")

    def ms(self, shape: str, kind: str, context: float) -> float:
        points = self.curves.get((shape, kind))
        if not points:
            raise ValueError(f"no measured {kind!r} rows for shape {shape!r} on path {self.path!r}; "
                             f"measured: {sorted(self.curves)}.")
        contexts, ms, floors = zip(*points)
        return max(interpolate(contexts, ms, context), interpolate(contexts, floors, context))


def predict(table: CostTable, target: str, draft: str, context: float, draft_context: float, acceptance,
            k: int = 5, tree: Tree | None = None) -> dict:
    """Predicted round of a target/draft pair (shape names in `table`) at the target's and the
    draft's context lengths. Returns the step costs used, the round's time, the draft's share
    of it, tokens per round and the speedup over the target alone."""
    if tree is None and k != table.k:
        raise ValueError(f"the table's chain verification was measured for k={table.k} ({table.k + 1} tokens), "
                         f"not k={k}; measure costs with k={k}.")
    t_ar = table.ms(target, "step", context)
    t_draft = table.ms(draft, "step", draft_context)
    if tree is None:
        t_verify, passes = table.ms(target, "chain", context), k
        round_ms = chain_round_ms(k, t_draft, t_verify)
    else:
        t_verify = table.ms(target, "tree", context)
        round_ms, passes = tree_round_ms(tree, t_draft, t_verify), tree.depth
    return {"t_ar": t_ar, "t_draft": t_draft, "t_verify": t_verify, "round_ms": round_ms,
            "draft_share": passes * t_draft / round_ms, "tokens_per_round": tokens_per_round(acceptance),
            "speedup": speedup(acceptance, round_ms, t_ar)}


def pruning_gain(table: CostTable, target: str, draft: str, video_tokens: int, ratio: float, acceptance_sd,
                 acceptance_specvlm=None, text_tokens: int = 0, k: int = 5, tree: Tree | None = None) -> float:
    """Predicted SpecVLM speedup / predicted plain-SD speedup: the draft sees
    `keep_budget(video_tokens, ratio)` of the video instead of all of it. `acceptance_specvlm`
    defaults to `acceptance_sd` (the paper's finding: pruning the draft barely changes it)."""
    return sweep_video_length(table, target, draft, [video_tokens], ratio, acceptance_sd, acceptance_specvlm,
                              text_tokens, k, tree)[0]["gain"]


def sweep_video_length(table: CostTable, target: str, draft: str, video_tokens: Sequence[int], ratio: float,
                       acceptance_sd, acceptance_specvlm=None, text_tokens: int = 0, k: int = 5,
                       tree: Tree | None = None) -> list[dict]:
    """For each video length: predicted speedups of plain SD and SpecVLM, the gain of pruning,
    and the draft's share of a round in each. Contexts: target and SD draft `text + video`,
    SpecVLM draft `text + keep_budget(video, ratio)`. E.g. LLaVA-OneVision, 196 tokens a frame
    and one newline: `video_tokens=[196 * f + 1 for f in (8, 16, 32, 64, 128)]`."""
    acceptance_specvlm = acceptance_sd if acceptance_specvlm is None else acceptance_specvlm
    rows = []
    for video in video_tokens:
        context = text_tokens + video
        keep = keep_budget(video, ratio)
        sd = predict(table, target, draft, context, context, acceptance_sd, k, tree)
        spec = predict(table, target, draft, context, text_tokens + keep, acceptance_specvlm, k, tree)
        rows.append({"video_tokens": video, "draft_video_tokens": keep, "sd_speedup": sd["speedup"],
                     "specvlm_speedup": spec["speedup"], "gain": spec["speedup"] / sd["speedup"],
                     "draft_share_sd": sd["draft_share"], "draft_share_specvlm": spec["draft_share"]})
    return rows


def predicted_vs_measured(bench_result, table: CostTable | None = None, target: str | None = None,
                          draft: str | None = None, text_tokens: int = 0) -> list[dict]:
    """Compare the speedups a `bench.py` result measured with the ones its step costs predict.

    Fields read (a missing optional field lowers what can be said, never fails):
      top level:  "k", "rows"
      each row:   "frames", "method", "draft" ("chain" | "tree" | None for AR), "ratio",
                  "mean_accepted", "speedup_vs_ar", "decode_s", "rounds", "new_tokens",
                  "video_tokens", "draft_video_tokens"
      optional:   "accepted_hist" (list: rounds per accepted count; else "mean_accepted"),
                  "step_ms": median ms per pass in that run, {"target_step"} on AR rows,
                  {"draft_step", "verify"} on speculative rows, and on tree rows of the fast path
                  also {"draft_feed", "draft_level"} (the tree round's wider draft passes);
                  fast-path rows also {"draft_step_synced"} (see `launch_ms`), and tree rows there
                  {"draft_picks", "accept_synced", "target_move"} (see `glue_ms`),
                  "prompt_tokens", "draft_prompt_tokens" (cache length when decoding starts).
    Step costs come from the run's own "step_ms" when present (t_ar from the AR row of the same
    path and frame count), else from `table` (with `target` and `draft` shape names) at the row's
    contexts: "prompt_tokens", else `text_tokens + video_tokens`; the draft's likewise with
    "draft_video_tokens". A tree row's tree is the one it records (`row_tree`; `MC_SIM_7B_63` in older runs); a
    table only predicts tree rows whose tree has as many tokens as its "tree" verification (`tree_nodes`).
    Each output row: path, drafter, frames, method, draft, tree_name (tree rows), ratio, tokens_per_round, measured, predicted,
    source ("run" | "table" | None), measured_round_ms (decode time / rounds), predicted_round_ms, and
    finished_share: `ar_passes / committed` (see the module's docstring and `finished_share`), by
    which the rate `speedup(acceptance, round_ms, t_ar)` is scaled to this finished answer.
    """
    result = load(bench_result)
    k = result.get("k", 5)
    ar_rows = {(r.get("path"), r["frames"]): r for r in result["rows"] if r["method"] == "ar"}
    out = []
    for r in result["rows"]:
        if r["method"] == "ar" or r.get("path") == "transformers":  # hf rows are timed end to end only
            continue
        tree = row_tree(r)
        acceptance = r.get("accepted_hist") or r["mean_accepted"]
        row = {"path": r.get("path"), "drafter": r.get("drafter"), "frames": r["frames"], "method": r["method"], "draft": r.get("draft"),
               "tree_name": tree_name(r),
               "ratio": r.get("ratio"),
               "tokens_per_round": tokens_per_round(acceptance), "measured": r.get("speedup_vs_ar"),
               "predicted": None, "source": None, "predicted_round_ms": None, "finished_share": None,
               "measured_round_ms": 1000 * r["decode_s"] / r["rounds"] if r.get("rounds") else None}
        ar_row = ar_rows.get((r.get("path"), r["frames"]))
        costs = _run_costs(r, ar_row)
        if costs is not None:
            row["source"] = "run"
        elif table is not None and target and draft and (tree is None or tree.num_nodes == table.tree_nodes):
            context = r.get("prompt_tokens") or text_tokens + r["video_tokens"]
            draft_video = r.get("draft_video_tokens") or r["video_tokens"]
            draft_context = r.get("draft_prompt_tokens") or context - r["video_tokens"] + draft_video
            kind = "chain" if tree is None else "tree"
            costs = (table.ms(target, "step", context), table.ms(draft, "step", draft_context),
                     table.ms(target, kind, context))
            row["source"] = "table"
        if costs is not None:
            t_ar, t_draft, t_verify = costs
            steps = (r.get("step_ms") or {}) if row["source"] == "run" else {}
            if tree is None:
                round_ms = chain_round_ms(k, t_draft, t_verify) + launch_ms(steps)
            else:
                round_ms = sum(tree_round_parts(tree, t_draft, t_verify, steps, acceptance).values())
            row["predicted_round_ms"] = round_ms
            row["finished_share"] = finished_share(r, ar_row, result.get("max_new_tokens"))
            if row["finished_share"] is not None:
                row["predicted"] = speedup(acceptance, round_ms, t_ar) * row["finished_share"]
        out.append(row)
    return out


def finished_share(row: dict, ar_row: dict | None, max_new_tokens: int | None) -> float | None:
    """AR passes over committed tokens for one bench row's finished answer (module docstring):
    the share of the rate's tokens the AR reference really paid passes for, counted from the AR
    row (`ar_passes`, `ar_queued_ahead`). 1.0 when the row lacks its histogram or rounds, the AR
    row its token count, or the result its `max_new_tokens`; None when they contradict each other
    (an answer longer than `max_new_tokens`)."""
    hist, rounds = row.get("accepted_hist"), row.get("rounds")
    new_tokens = (ar_row or {}).get("new_tokens")
    if not (hist and rounds and new_tokens and max_new_tokens):
        return 1.0
    if not 1 <= new_tokens <= max_new_tokens:
        return None
    committed = tokens_per_round(hist) * rounds
    return ar_passes(new_tokens, max_new_tokens, ar_queued_ahead(ar_row)) / committed


def launch_ms(steps: dict) -> float:
    """The host time a round exposes: a round's first pass starts on an idle device (the host has
    just read the verification's result), the later ones are queued while the device runs. From
    a fast-path run's step timings: "draft_step_synced" - "draft_step" (one pass on an idle
    device minus one queued pass), else 0 (step timings that were not queued already include it).
    launch_ms({"draft_step": 1.5, "draft_step_synced": 2.1}) -> 0.6 (up to rounding)"""
    synced, queued = steps.get("draft_step_synced"), steps.get("draft_step")
    return max(0.0, synced - queued) if synced is not None and queued is not None else 0.0


GLUE = ("draft_picks", "accept_synced", "target_move")


def glue_ms(steps: dict, move_share: float = 1.0) -> float:
    """The rest of a fast-path tree round, besides its passes and `launch_ms`, from the run's
    step timings (`bench.round_glue`): the draft's token picks between passes, the host's
    acceptance after the verification, and the target's KV move, which only a share
    `move_share` of the rounds makes (those that accepted a token: `wide_feed_share`); 0 for
    each one not timed (runs before these were timed, chain rows, the plain path).
    glue_ms({"draft_picks": 0.2, "accept_synced": 0.3, "target_move": 0.1}, move_share=0.5) -> 0.55"""
    return (steps.get("draft_picks", 0.0) + steps.get("accept_synced", 0.0)
            + move_share * steps.get("target_move", 0.0))


def row_tree(row: dict) -> Tree | None:
    """The tree a bench row drafted: the rank paths it records under "tree", else `MC_SIM_7B_63` (runs
    before rows recorded their tree all drafted it); None for chain and AR rows."""
    if row.get("draft") != "tree":
        return None
    return Tree.from_paths(row["tree"]["paths"]) if row.get("tree") else MC_SIM_7B_63


DEFAULT_TREE_NAME = "mc_sim_7b_63"  # what every tree row drafted before rows named their tree


def tree_name(row: dict) -> str | None:
    """The name of the tree a bench row drafted ("mc_sim_7b_63" unless it records another); None for
    chain and AR rows."""
    return (row.get("tree") or {}).get("name", DEFAULT_TREE_NAME) if row.get("draft") == "tree" else None


def round_breakdown(row: dict, tree: Tree | None = None) -> dict[str, float]:
    """A fast-path tree row's measured round (decode ms / rounds) split by the row's own step
    timings, in ms: "draft passes" (the catch-up feed and one pass per level, as `tree_round_ms`
    counts them), "verification", "draft picks", "acceptance", "KV move" (in the rounds that
    accepted a token), "launch" (`launch_ms`) and "unexplained", the rest (negative where the
    timings add up to more than the measured round). The parts add up to the measured round; all
    but "unexplained" add up to the round `predicted_vs_measured` predicts from the run's own
    step timings (source "run": the AR row has its "target_step")."""
    steps = row.get("step_ms") or {}
    needed = ("draft_step", "verify")
    if row.get("draft") != "tree" or not row.get("rounds") or any(name not in steps for name in needed):
        raise ValueError(f"round_breakdown needs a tree row with rounds and step timings {needed}; got draft "
                         f"{row.get('draft')!r}, {row.get('rounds')} rounds, step_ms {sorted(steps)}.")
    acceptance = row.get("accepted_hist") or row["mean_accepted"]
    parts = tree_round_parts(tree or row_tree(row), steps["draft_step"], steps["verify"], steps, acceptance)
    parts["unexplained"] = 1000 * row["decode_s"] / row["rounds"] - sum(parts.values())
    return parts


def tree_round_parts(tree: Tree, t_draft: float, t_verify: float, steps: dict, acceptance) -> dict[str, float]:
    """A tree round's predicted ms by part, from a draft step and a verification (ms) and a run's
    other step timings `steps` (each part missing from them counts 0, or `t_draft` for the wider
    passes): "draft passes" (`tree_round_ms`'s, the wide catch-up feed in the rounds after one
    that accepted a token), "verification", "draft picks", "acceptance", "KV move" (in the rounds
    that accepted a token), "launch" (`launch_ms`). Their sum is the round `predicted_vs_measured`
    predicts; `round_breakdown` adds what a measured round leaves unexplained."""
    share = wide_feed_share(acceptance)  # rounds that accepted a token: they feed wide and move their KV
    return {"draft passes": tree_round_ms(tree, t_draft, 0.0, t_feed=steps.get("draft_feed"),
                                          t_level=steps.get("draft_level"), wide_feed=share),
            "verification": t_verify, "draft picks": steps.get("draft_picks", 0.0),
            "acceptance": steps.get("accept_synced", 0.0), "KV move": share * steps.get("target_move", 0.0),
            "launch": launch_ms(steps)}


def wide_feed_share(acceptance) -> float:
    """The share of rounds whose draft catches up on more than one token: those that follow a
    round that accepted at least one drafted token, estimated from the accepted-count histogram
    (a mean alone gives 1 when it is above 0). wide_feed_share([1, 2, 1]) -> 0.75"""
    if isinstance(acceptance, numbers.Real) and not isinstance(acceptance, bool):  # a mean, as tokens_per_round takes
        return 1.0 if acceptance > 0 else 0.0
    rounds = sum(acceptance)
    return (rounds - acceptance[0]) / rounds if rounds else 0.0


def _run_costs(row: dict, ar_row: dict | None):
    """(t_ar, t_draft, t_verify) from a run's own step timings, or None when any is missing."""
    steps, ar_steps = row.get("step_ms") or {}, (ar_row or {}).get("step_ms") or {}
    costs = (ar_steps.get("target_step"), steps.get("draft_step"), steps.get("verify"))
    return None if any(c is None for c in costs) else costs
