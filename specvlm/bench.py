"""End-to-end decoding speed: AR vs speculative decoding vs SpecVLM on one pair, in one run.

    python -m specvlm bench --frames 16 64 --max-new-tokens 64 --self --out figures/bench.json

For each frame count, every method decodes the same prompt; each is timed `repeats` times
after one warm-up (device-synchronised wall clock, median reported), and its tokens are
compared with AR's. A speedup is reported only for outputs equal to AR token for token;
otherwise the row says so. Decode time starts after all prefill work (the target's prefill,
scores, selection and the draft's prefill), as in the paper's reference code; prefill is
reported beside it. `paths=("plain", "fast")` runs every method on the plain path
(`decoding.py`: dynamic caches, uncompiled) and on the fast path (`fast.py`: static caches,
fixed-shape steps, CUDA graphs on a GPU); each row's speedup is against AR on the same path,
and `speedup_vs_plain_ar` against the plain AR. Outputs of both paths are compared with the plain AR
(the plain path runs first; with the fast path alone, with its AR: the result's "reference"), those of
every call of a row, warm-up included; a row that differs records where and the target's top-2 logit
margin there ("divergence", `first_divergence`).
`selection=True` adds SELECTION_RUNS: SpecVLM's tree at 75% and 95% pruning and every other
selection method at 90%.
`self_speculation=True` adds the paper's Self-SD setting: the target drafts for itself, its
draft cache holding its own video pruned by SpecVLM's selection ("drafter": "self").
`transformers_baselines=True` adds transformers' own greedy `generate` (default dynamic cache, and
a static cache, which transformers compiles on CUDA) and assisted generation (the draft as
`assistant_model`, seeing the whole video), timed end to end since `generate` has
no separate prefill: `speedup_vs_ar_total` compares every row's prefill + decode with AR's.
Rows "hf-generate", "hf-assisted", then, only for pairs whose output layers differ in size (where
"hf-assisted" is transformers' *universal* assisted decoding, `assisted_mode`), "hf-assisted-padded":
token-level assisted generation with the draft's output layer padded to the target's rows
(`padded_output_layer`), then "hf-generate-static".

Besides times, each project row records what the cost model (`cost_model.predicted_vs_measured`)
needs to predict its speedup from this run alone:
  "accepted_hist"  rounds per accepted count (None for AR);
  "prompt_tokens", "draft_prompt_tokens"  cache lengths when decoding starts;
  "step_ms"        medians of device-synchronised passes on the row's path at those lengths:
                   {"target_step"} (1 token) on AR rows, {"draft_step"} (1 token) and {"verify"}
                   (k + 1 tokens, or the tree's nodes with its mask) on speculative rows; on the
                   fast path's tree rows also {"draft_feed"} (the draft catching up on depth + 1
                   tokens) and {"draft_level"} (one tree level, with its mask). Plain-path passes
                   are timed one at a time; fast-path passes `QUEUED` in a row without waiting
                   for the device (per pass: what a pass costs inside a round), plus
                   {"draft_step_synced"} / {"target_step_synced"}, one pass on an idle device (the
                   difference is the host's launch time, exposed once per round).
                   They are timed after the row's timed repetitions, on caches prefilled anew
                   (plain: a forward into a DynamicCache, then a crop) or on the row's own static
                   caches with its compiled step functions (fast), so decode times are untouched;
  "row_s"          the row's whole wall time: compiling its steps, warm-up, repetitions, step timings
                   (what a long run's time limit must allow per row);
  "kv_bytes"       target and draft KV bytes holding the text at the end (fast path: also the
                   "allocated" static buffers); "peak_memory_bytes" on CUDA (reset per row);
  "draft_fused"    whether the draft ran with its projections fused (`fusion.py`: the fast path
                   on CUDA); the plain path and assisted generation get it unfused;
  "draft_few_rows" whether those fused products of a few rows ran as `few_rows.py`'s kernels.
  "draft_vocab"    on the fast path, the number of tokens the draft proposed from ($SPECVLM_DRAFT_VOCAB,
                   `draft_vocab.py`; None: its whole vocabulary);
  "draft_picks_kernel"  on the fast path's tree rows, how a tree level's tokens were picked: "torch"
                   (`torch.topk`) or "triton" (`top_k.py`), $SPECVLM_PICKS resolved as `fast.picks_kernel`
                   does ("auto" gives "triton" on a CUDA card the kernels run on, for a tree that ranks at
                   most `top_k.MAX_K` tokens at a node from a vocabulary the kernels' merge holds, `top_k.fits`);
                   None elsewhere (a chain picks by argmax).
  "draft_l2_prefetch"  on the fast path, whether the draft's decoder layers prefetched their weights into
                   L2 ($SPECVLM_L2_PREFETCH, `l2_prefetch.py`); None for AR and the plain path.
  "draft_combo_kernels"  on the fast path, whether the draft's steps were compiled with inductor's combo
                   kernels ($SPECVLM_DRAFT_COMBO, `fast.draft_combo_kernels`; False where they were not
                   compiled); None for AR and the plain path.
  "step_kernels"   with `step_kernels=True` (`bench --step-kernels`), on fast-path rows only: per queued pass
                   (the draft's step, feed and level, the verification, AR's step) its kernels by category and
                   the costliest by name, and the host's share (`pass_kernels`, `host_side`).
  "draft_pdl"      on the fast path, whether the draft's inductor kernels were compiled for programmatic
                   dependent launch ($SPECVLM_DRAFT_PDL, `fast.draft_pdl`; False where they were not compiled
                   or the card is older than compute capability 9.0); None for AR and the plain path.
"""

from __future__ import annotations

import contextlib
import functools
import json
import platform
import statistics
import time
from datetime import date

import torch
import transformers

from .cost_model import DEFAULT_TREE_NAME, histogram, tree_name
from .decoding import Stopwatch, generate_ar, generate_sd, positions, prefill_pruned
from .fusion import is_fused, unfuse_projections, uses_few_rows
from .l2_prefetch import attached as l2_prefetching
from .models import DEFAULT_QUESTION, Pair
from .trees import MC_SIM_7B_63, Tree, tree_attention_bias

RUNS = (
    ("ar", None, 0.0),
    ("sd", "chain", 0.0),
    ("specvlm", "chain", 0.9),
    ("sd", "tree", 0.0),
    ("specvlm", "tree", 0.5),
    ("specvlm", "tree", 0.9),
    ("uniform", "tree", 0.9),
)
# with selection=True: SpecVLM's tree at the issue's other ratios, and every other selection method at 90%
SELECTION_RUNS = (
    ("specvlm", "tree", 0.75),
    ("specvlm", "tree", 0.95),
    *((method, "tree", 0.9) for method in ("random", "window-front", "window-middle", "window-back", "top")),
)
# the target drafting for itself with its own pruned video (Self-SD); unpruned it would only repeat the target
SELF_RUNS = (
    ("specvlm", "chain", 0.5),
    ("specvlm", "chain", 0.9),
    ("specvlm", "tree", 0.5),
    ("specvlm", "tree", 0.9),
)
# transformers' baselines: (method, assisted, static cache, draft's output layer padded to the target's rows);
# a padded row runs only where assisted generation would otherwise be universal (`assisted_mode`)
HF_RUNS = (("hf-generate", False, False, False), ("hf-assisted", True, False, False),
           ("hf-assisted-padded", True, False, True), ("hf-generate-static", False, True, False))
STEP_WARMUP = 3  # compile, record the CUDA graph, replay: timed calls replay
QUEUED = 8  # fast-path passes timed back to back per sample (see `median_ms`)


def run_label(method: str, shape: str | None, ratio: float, drafter: str | None = None) -> str:
    """A run's name for `bench(only=...)`: "ar", "sd-chain-0", "specvlm-tree-0.9", "self-specvlm-chain-0.5",
    "specvlm-tree:grown-0.5" (a tree passed to `bench(trees=...)` by that name)."""
    if method == "ar":
        return "ar"
    return ("self-" if drafter == "self" else "") + f"{method}-{shape}-{ratio:g}"


def with_trees(runs, tree_names=()) -> list[tuple]:
    """`runs` (method, shape, ratio), each tree run followed by the same run with each named tree ("tree:NAME")."""
    return [variant for method, shape, ratio in runs
            for variant in [(method, shape, ratio)]
            + [(method, f"tree:{name}", ratio) for name in tree_names] * (shape == "tree")]


def run_labels(self_speculation: bool = True, transformers_baselines: bool = True, drafter: str = "draft",
               universal: bool = True, selection: bool = False, tree_names=()) -> list[str]:
    """The row names a `bench` call with these options runs, in its order (the transformers
    baselines by their method). `drafter` "self": the pair's draft is its target, so every
    speculative row is self-speculation. `universal`: the pair's assisted generation is
    universal (`assisted_mode`), which adds "hf-assisted-padded". `selection`: SELECTION_RUNS.
    `tree_names`: the trees passed to `bench(trees=...)`, each adding a row beside every tree row."""
    return ([run_label(*run, drafter) for run in with_trees(RUNS + SELECTION_RUNS * selection, tree_names)]
            + [run_label(*run, "self") for run in with_trees(SELF_RUNS, tree_names)] * self_speculation
            + [method for method, _, _, padded in HF_RUNS if universal or not padded] * transformers_baselines)


def timed(fn, repeats: int):
    """(the first timed result, median decode s, median prefill s, the tokens of every call, warm-up
    first): a row's equality to AR is judged on all of them, not on one."""
    warmup = fn()
    results = [fn() for _ in range(repeats)]
    return results[0], statistics.median(r.decode_s for r in results), statistics.median(
        sum(v for k, v in r.timings.items() if k != "decode") for r in results), \
        [r.tokens for r in [warmup, *results]]


def tree_of(shape: str | None, trees: dict | None = None) -> Tree | None:
    """The tree a row's `shape` names: "tree" is `MC_SIM_7B_63`, "tree:NAME" the tree `trees[NAME]`;
    None for a chain or AR."""
    if shape == "tree":
        return MC_SIM_7B_63
    if shape and shape.startswith("tree:"):
        return (trees or {})[shape[len("tree:"):]]
    return None


def tree_record(shape: str, tree: Tree) -> dict:
    """What a tree row records of its tree: {"name", "nodes" (drafted, the root not counted), "depth", "paths"}."""
    return {"name": DEFAULT_TREE_NAME if shape == "tree" else shape[len("tree:"):], "nodes": len(tree.paths),
            "depth": tree.depth, "paths": [list(path) for path in tree.paths]}


def run_once(path: str, pair: Pair, prompt, draft_prompt, method: str, shape, ratio: float, k: int, max_new_tokens: int,
             trees: dict | None = None):
    """One generation on the "plain" or "fast" path."""
    tree = tree_of(shape, trees)
    if path == "timeline":  # the fast path's generation under the profiler: `timeline.profile_decode`
        from .timeline import profile_decode

        return profile_decode(pair, prompt, method, warmup=0, ratio=ratio, k=k, tree=tree,
                              max_new_tokens=max_new_tokens, draft_prompt=draft_prompt)
    if path == "fast":
        from .fast import generate_fast

        return generate_fast(pair, prompt, method, ratio, k, tree=tree, max_new_tokens=max_new_tokens,
                             draft_prompt=draft_prompt)
    if method == "ar":
        return generate_ar(pair.target, prompt, max_new_tokens)
    return generate_sd(pair, prompt, method, ratio, k, max_new_tokens, draft_prompt=draft_prompt, tree=tree)


# ----------------------------------------------------------------------------------------
# isolated passes at a row's context lengths (after its timed repetitions)


def median_ms(device: torch.device, call, reset, repeats: int, warmup: int = STEP_WARMUP, queued: int = 1) -> float:
    """Median wall-clock ms of `call()` over `repeats` timed samples after `warmup` untimed ones,
    synchronised with the device; `reset()` runs before each call and at the end. A sample
    times `queued` calls in a row with no wait for the device between them and is divided by
    `queued`: with queued > 1 the host prepares a call while the device runs the last one, as
    the fast path's decoding loops do, and `reset` is timed with the calls (it must not wait for
    the device: the fast path's only moves a write position); queued=1 times a call that starts
    on an idle device, host work included, `reset` untimed before it."""
    if repeats < 1 or queued < 1:
        raise ValueError(f"step timings need at least one repetition and one call, got {repeats} and {queued}.")
    times = []
    for i in range(warmup + repeats):
        if queued == 1:
            reset()  # untimed: it may wait for the device (the plain path crops a cache)
        watch = Stopwatch(device)
        for _ in range(queued):
            if queued > 1:
                reset()
            call()
        watch.lap("pass")
        if i >= warmup:
            times.append(1000 * watch.laps["pass"] / queued)
    reset()
    return statistics.median(times)


def pass_kernels(device: torch.device, call, reset, repeats: int, wall_ms: float | None = None,
                 layers: int | None = None, graphs: bool = False, replay=None) -> dict:
    """What the device ran for a pass, as `profile.kernel_breakdown` reports it: `repeats` samples of
    `QUEUED` calls in a row (each after `reset()`, as `median_ms` queues them) under `torch.profiler`,
    per call; `wall_ms`: the pass's queued time from `median_ms`, taken as its wall time (profiling
    slows the host, so the profiled calls are not timed). On a CPU, the operators' own CPU time.
    "host": `host_side`, the host's time queuing the same calls, taken first, before this process
    runs the profiler here (`replay`: as `host_side` takes it).
    "graph_kernels_visible" (`profile.graph_kernels_visible`; None unless
    `graphs`): whether the profiler saw the kernels of a pass replayed from a CUDA graph, at least
    one per layer of a model of `layers` layers."""
    from .profile import graph_kernels_visible, kernel_breakdown, kernel_records  # profile.py imports this module

    host = host_side(device, call, reset, repeats, replay=replay)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        reset()
        call()
        Stopwatch(device)  # waits for the device
        with torch.profiler.profile(activities=activities) as profiler:
            for _ in range(repeats):
                for _ in range(QUEUED):
                    reset()
                    call()
            Stopwatch(device)
    finally:
        reset()
    breakdown = kernel_breakdown(kernel_records(profiler, device), repeats * QUEUED,
                                 None if wall_ms is None else 1000 * wall_ms)
    visible = graph_kernels_visible(breakdown["kernels_per_step"], layers, graphs) if layers else None
    return {**breakdown, "graph_kernels_visible": visible, "host": host}


def host_side(device: torch.device, call, reset, repeats: int, top: int = 12, replay=None) -> dict:
    """The host's share of a queued pass, in µs per call: `repeats` samples of `QUEUED` calls in a
    row (each after `reset()`), each sample timed when the host has queued its last call
    ("host_us_per_step") and again once the device has finished it ("queued_us_per_step"),
    medians over the samples. Where the two are about equal the host, not the device, sets the
    pace. The same samples again with Python's garbage collector paused ("..._without_gc"), which a
    process holding many objects may run often. "top": the `top` Python functions by their own
    time per call, from a third set of samples under `cProfile` (its overhead inflates them, not
    their order), each {"function", "own_us_per_step", "calls_per_step"}. `replay`: where the pass
    replays a CUDA graph (`fast.StaticLM.last_graph`), that graph's `replay`: "replay_us_per_step"
    times it alone, `QUEUED` replays in a row and then waited for, with nothing on the host between
    them but their launches (None without `replay`). Timed on the host's clock as the queued samples
    are, it is about the device's time for the pass, the gaps inside the graph included, plus the
    same first launch and final wait as theirs. Where it is about the queued time, the device sets the pace; where it is
    well below, the host's work between the passes does. The collector and the profiler are back as
    they were, and `reset()` has run last, even where a call raises."""
    import cProfile
    import gc
    import pstats

    def timed(profiler=None) -> tuple[float, float]:
        host, total = [], []
        for _ in range(repeats):
            Stopwatch(device)
            began = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            try:
                for _ in range(QUEUED):
                    reset()
                    call()
            finally:
                if profiler is not None:
                    profiler.disable()
            host.append(time.perf_counter() - began)
            Stopwatch(device)
            total.append(time.perf_counter() - began)
        return 1e6 * statistics.median(host) / QUEUED, 1e6 * statistics.median(total) / QUEUED

    collecting = gc.isenabled()
    profiler = cProfile.Profile()
    try:
        host_us, queued_us = timed()
        gc.disable()
        host_without_gc_us, queued_without_gc_us = timed()
        if collecting:
            gc.enable()
        timed(profiler)
        replay_us = None if replay is None else 1e3 * median_ms(device, replay, lambda: None, repeats, queued=QUEUED)
    finally:
        if collecting:
            gc.enable()
        reset()
    calls = repeats * QUEUED
    own = sorted(pstats.Stats(profiler).stats.items(), key=lambda item: -item[1][2])[:top]
    return {"host_us_per_step": host_us, "queued_us_per_step": queued_us, "replay_us_per_step": replay_us,
            "host_us_per_step_without_gc": host_without_gc_us, "queued_us_per_step_without_gc": queued_without_gc_us,
            "top": [{"function": f"{name} ({file.rsplit('/', 1)[-1]}:{line})", "own_us_per_step": 1e6 * tottime / calls,
                     "calls_per_step": count / calls}
                    for (file, line, name), (_, count, tottime, _, _) in own]}


def last_replay(call, reset, engine):
    """The `replay` of the CUDA graph that `call()` replays on `engine` (a `fast.StaticLM`), found by
    calling it once (then `reset()`); None where its steps are not captured by hand."""
    call()
    reset()
    graph = engine.last_graph
    return None if graph is None else graph.replay


def crop_to(cache, length: int) -> None:
    """Drop a DynamicCache's entries past `length` (transformers' `crop` takes how many to drop)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def kv_bytes_per_token(keys, values) -> int:
    """Bytes one cached token takes over all layers: keys/values are [1, H, L, d] per layer."""
    return sum(t.shape[1] * t.shape[-1] * t.element_size() for t in (*keys, *values))


def plain_steps(pair: Pair, prompt, draft_prompt, res, shape, k: int, repeats: int, trees: dict | None = None) -> dict:
    """Step timings on the plain path: caches prefilled anew exactly as the row's (the draft's
    with the row's kept video tokens), one forward into each, cropped back after every pass."""
    target, token, device = pair.target, res.tokens[0], pair.target.device
    _, cache = prefill_pruned(target, prompt, None)
    start = cache.get_seq_length()
    reset = lambda: crop_to(cache, start)
    per_token = {"target": kv_bytes_per_token([l.keys for l in cache.layers], [l.values for l in cache.layers])}
    if shape is None:
        steps = {"target_step": median_ms(device, lambda: target.step([token], positions(prompt, 0, 1), cache),
                                          reset, repeats)}
        return {"step_ms": steps, "per_token": per_token, "allocated": None}
    tree = tree_of(shape, trees)
    if tree is not None:
        mask = tree_attention_bias(tree, start, target.dtype, device=device)
        where = prompt.next_position + tree.depths
        verify = lambda: target.step([token] * tree.num_nodes, where, cache, mask)
    else:
        verify = lambda: target.step([token] * (k + 1), positions(prompt, 0, k + 1), cache)
    steps = {"verify": median_ms(device, verify, reset, repeats)}
    del cache
    _, draft_cache = prefill_pruned(pair.draft, draft_prompt, res.kept)
    draft_start = draft_cache.get_seq_length()
    steps["draft_step"] = median_ms(
        device, lambda: pair.draft.step([token], positions(draft_prompt, 0, 1), draft_cache),
        lambda: crop_to(draft_cache, draft_start), repeats)
    per_token["draft"] = kv_bytes_per_token([l.keys for l in draft_cache.layers], [l.values for l in draft_cache.layers])
    return {"step_ms": steps, "per_token": per_token, "allocated": None}


@torch.no_grad()  # the steps were compiled without grad: dynamo's guards would compile them again
def fast_steps(pair: Pair, prompt, draft_prompt, res, shape, k: int, repeats: int, trees: dict | None = None,
               kernels: bool = False) -> dict:
    """Step timings on the fast path: the row's own static caches and step functions (compiled
    as in the run), their write position set back to where decoding started before each pass.
    Passes are timed queued back to back (`QUEUED` per sample), as the decoding loops run them;
    "draft_step_synced" (or "target_step_synced" on AR rows) times one pass started on an idle
    device, as a round's first pass starts after the host has read the last verification.
    `kernels`: also "kernels" {pass: `pass_kernels`} for the passes (the target's step or
    verification, the draft's step, feed and level; not the round's glue), profiled in this
    process on the row's own weights, caches and compiled steps, after all of the row's timings."""
    from .fast import DraftLevels, compile_options, static_lm

    device, token = pair.target.device, res.tokens[0]
    options = compile_options(None, device)  # what `generate_fast` used in `run_once`
    timed = {}  # pass -> (call, reset, its StaticLM) of every pass timed queued, for `kernels`

    def queued_ms(call, reset, name, engine):
        timed[name] = (call, reset, engine)
        return median_ms(device, call, reset, repeats, queued=QUEUED)

    def profiled(steps: dict) -> dict:
        return {name: pass_kernels(device, call, reset, repeats, steps[name], len(engine.cache.keys),
                                   engine.graphs is not None, replay=last_replay(call, reset, engine))
                for name, (call, reset, engine) in timed.items()}

    target = static_lm(pair.target, "target", options)
    start = prompt.input_ids.shape[1]
    reset = lambda: setattr(target, "length", start)
    per_token = {"target": kv_bytes_per_token(target.cache.keys, target.cache.values)}
    allocated = {"target": per_token["target"] * target.cache.capacity}
    if shape is None:
        ar_step = lambda: target.extend([token], prompt.next_position, 1)
        steps = {"target_step": queued_ms(ar_step, reset, "target_step", target),
                 "target_step_synced": median_ms(device, ar_step, reset, repeats)}
        return {"step_ms": steps, "per_token": per_token, "allocated": allocated,
                **({"kernels": profiled(steps)} if kernels else {})}
    tree = tree_of(shape, trees)
    if tree is not None:
        pattern = target.constant(tree, lambda: tree.mask)  # the key and mask `fast.tree_round` uses
        where = (prompt.next_position + tree.depths).tolist()
        verify = lambda: target.step([token] * tree.num_nodes, where, pattern)
    else:
        verify = lambda: target.extend([token] * (k + 1), prompt.next_position, k + 1)
    steps = {"verify": queued_ms(verify, reset, "verify", target)}
    draft = static_lm(pair.draft, "draft", options)
    draft_start = len(draft_prompt.rows(res.kept))
    draft_reset = lambda: setattr(draft, "length", draft_start)
    draft_step = lambda: draft.extend([token], draft_prompt.next_position, 1)
    steps["draft_step"] = queued_ms(draft_step, draft_reset, "draft_step", draft)
    steps["draft_step_synced"] = median_ms(device, draft_step, draft_reset, repeats)
    if tree is not None:  # the tree round's wider draft passes, with the shapes and masks `fast.draft_tree` uses
        levels, feed = DraftLevels.of(tree), tree.depth + 1
        steps["draft_feed"] = queued_ms(lambda: draft.extend([token] * feed, draft_prompt.next_position, feed),
                                        draft_reset, "draft_feed", draft)
        level_pattern = draft.constant((tree, 1), lambda: levels.patterns[0])  # `verify` keeps the target's `pattern`
        nodes = len(levels.nodes[0])
        steps["draft_level"] = queued_ms(lambda: draft.step([token] * nodes, [draft_prompt.next_position + 1] * nodes,
                                                            level_pattern, start=draft_start), draft_reset,
                                        "draft_level", draft)
        draft_logits = draft_step().clone()  # the picks' input: the draft's logits, float32, on its device
        draft_reset()
        steps.update(round_glue(target, draft, tree, levels, verify, reset, draft_logits, start, repeats))
    per_token["draft"] = kv_bytes_per_token(draft.cache.keys, draft.cache.values)
    allocated["draft"] = per_token["draft"] * draft.cache.capacity
    return {"step_ms": steps, "per_token": per_token, "allocated": allocated,
            **({"kernels": profiled(steps)} if kernels else {})}


def round_glue(target, draft, tree, levels, verify, reset, draft_logits: torch.Tensor, start: int,
               repeats: int) -> dict:
    """The work of a tree round on the fast path besides its passes (`cost_model.glue_ms`), timed
    with the row's step functions and shapes:
    - "draft_picks": the token picks between the draft's passes (per level a top-k and two
      indexings: `fast.pick_level`), all levels of a round, queued: the larger of their device
      and host time (in a round the host's part hides behind the passes, the device's adds);
    - "accept_synced": the acceptance (`fast.accept_round`: argmaxes, one copy to the host, the
      host's `tree_accept`) started on an idle device, as it ends a round; in a round its
      kernels' launch overlaps the verification;
    - "target_move": the KV move of an accepted path of the tree's depth, queued (a round moves
      only when it accepted a token: `cost_model.glue_ms` weighs it so).
    The picks read random logits of the passes' shapes, in the dtype and on the device of
    `draft_logits` (a draft step's output, [1, V]); `verify()` runs one verification from slot
    `start`, `reset()` sets the target's write position back there. Every cache's write position
    ends where it started."""
    from .fast import accept_round, path_moves, pick_level, picks_kernel, to_target

    device, draft_device = target.lm.device, draft_logits.device
    queued_ms = functools.partial(median_ms, device, repeats=repeats, queued=QUEUED)
    rows = [1] + [len(nodes) for nodes in levels.nodes]  # logits rows each depth picks from
    generator = torch.Generator(draft_device).manual_seed(0)
    vocab = draft_logits.shape[-1]
    logits = [torch.randn(n, vocab, generator=generator, device=draft_device).to(draft_logits.dtype) for n in rows]
    tokens = torch.zeros(tree.num_nodes, dtype=torch.long, device=draft_device)  # as `fast.draft_tree` keeps them

    kernel = picks_kernel(draft_device, max(levels.top), vocab)

    def picks():
        for depth, level_logits in enumerate(logits[:tree.depth], start=1):
            pick_level(draft, tree, levels, depth, level_logits, tokens, kernel)

    glue = {"draft_picks": queued_ms(picks, lambda: None)}
    verify_logits = verify().clone()  # a static output buffer: the next step may overwrite it
    reset()
    node_tokens = to_target(tokens, device)
    glue["accept_synced"] = median_ms(device, lambda: accept_round(tree, node_tokens, verify_logits), lambda: None,
                                      repeats)
    path = [node for node in tree.retrieve[0, 1:].tolist() if node > 0]  # the first leaf's root-to-leaf path
    moves = path_moves(start, path, tree.depth)
    glue["target_move"] = queued_ms(lambda: target.move(*moves), lambda: None)
    return glue


def measure(path: str, pair: Pair, prompt, draft_prompt, method: str, shape, ratio: float, k: int,
            max_new_tokens: int, repeats: int, step_repeats: int, timeline: bool = False, trees: dict | None = None,
            step_kernels: bool = False) -> dict:
    """One method on one path: timed generations, then its isolated passes and memory; with
    `timeline` (fast path only) one more generation under the profiler (`timeline.profile_decode`);
    with `step_kernels` (fast path only) each queued pass profiled (`fast_steps`' "kernels")."""
    device = pair.target.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res, decode_s, prefill_s, outputs = timed(lambda: run_once(path, pair, prompt, draft_prompt, method, shape, ratio,
                                                               k, max_new_tokens, trees), repeats)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if path == "fast":
        steps = fast_steps(pair, prompt, draft_prompt, res, shape, k, step_repeats, trees, kernels=step_kernels)
    else:
        steps = plain_steps(pair, prompt, draft_prompt, res, shape, k, step_repeats, trees)
    per_token = steps["per_token"]
    kv = {"target": per_token["target"] * res.target_cache_len,
          "draft": per_token["draft"] * res.draft_cache_len if res.draft_cache_len is not None else None}
    if steps["allocated"] is not None:
        kv["allocated"] = steps["allocated"]
    profiled = run_once("timeline", pair, prompt, draft_prompt, method, shape, ratio, k, max_new_tokens, trees) \
        if timeline and path == "fast" else None
    if profiled is not None and profiled.pop("tokens") != res.tokens:
        raise RuntimeError(f"{method}: the profiled generation's tokens differ from the timed one's.")
    return {"res": res, "outputs": outputs, "decode_s": decode_s, "prefill_s": prefill_s, "peak": peak,
            "step_ms": steps["step_ms"], "step_kernels": steps.get("kernels"),
            "kv_bytes": kv, "timeline": profiled, "draft_fused": is_fused(pair.draft) if method != "ar" else None,
            "draft_few_rows": uses_few_rows(pair.draft) if method != "ar" else None,
            "draft_vocab": draft_vocab_size(pair.draft) if path == "fast" and method != "ar" else None,
            "draft_picks_kernel": picks_of(pair.draft, tree_of(shape, trees)) if path == "fast" and method != "ar" else None,
            "draft_l2_prefetch": l2_prefetching(pair.draft) if path == "fast" and method != "ar" else None,
            "draft_combo_kernels": combo_of(pair.draft) if path == "fast" and method != "ar" else None,
            "draft_pdl": pdl_of(pair.draft) if path == "fast" and method != "ar" else None}


def picks_of(draft, tree: Tree | None) -> str | None:
    """How the fast path picks `tree`'s levels for `draft` ($SPECVLM_PICKS resolved as `generate_fast`
    resolves it); None for a chain, which picks by argmax."""
    from .fast import DraftLevels, draft_vocabulary, picked_columns, picks_kernel

    if tree is None:
        return None
    return picks_kernel(draft.device, max(DraftLevels.of(tree).top), picked_columns(draft, draft_vocabulary(draft)))


def draft_engine(draft):
    """The fast path's `StaticLM` for `draft` in its draft role, None if it has not drafted there."""
    from .fast import _ENGINES

    return _ENGINES.get(draft, {}).get("draft")


def combo_of(draft) -> bool:
    """Whether the fast path's steps for `draft` in its draft role were compiled with inductor's combo kernels."""
    engine = draft_engine(draft)
    return engine is not None and engine.compiled_with_combo


def pdl_of(draft) -> bool:
    """Whether the fast path's steps for `draft` in its draft role were compiled for programmatic dependent launch."""
    engine = draft_engine(draft)
    return engine is not None and engine.compiled_with_pdl


def draft_vocab_size(draft) -> int | None:
    """The size of the draft vocabulary the fast path drafts from ($SPECVLM_DRAFT_VOCAB), None for the whole."""
    from .fast import draft_vocabulary

    vocabulary = draft_vocabulary(draft)
    return None if vocabulary is None else len(vocabulary)


# ----------------------------------------------------------------------------------------
# the benchmark


def hf_generate(pair: Pair, prompt, max_new_tokens: int, assisted: bool, static: bool = False) -> tuple[list[int], float]:
    """transformers' own greedy `generate` on the target, as users call it (assisted: with the
    draft as `assistant_model`, which sees the whole video; static: `cache_implementation="static"`,
    which transformers also compiles on CUDA): (new tokens, wall seconds including the vision
    tower and the prefill)."""
    model = pair.target.model
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in prompt.inputs.items()}
    if "pixel_values_videos" in inputs:
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(pair.target.dtype)
    extra = {"assistant_model": pair.draft.model} if assisted else {}
    if static:
        extra["cache_implementation"] = "static"
    if assisted and assisted_mode(pair) == "universal":
        extra.update(tokenizer=pair.target.processor.tokenizer, assistant_tokenizer=pair.draft.processor.tokenizer)
    watch = Stopwatch(pair.target.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    watch.lap("total")
    return out[0, prompt.input_ids.shape[1]:].tolist(), watch.laps["total"]


def assisted_mode(pair: Pair) -> str:
    """How transformers' assisted generation treats the pair: "token" when both text configs
    have one `vocab_size` (what transformers compares); otherwise it calls the tokenizers
    different (as for the llava-hf 7B and 0.5B checkpoints: 152128 and 152000 padded rows, one
    tokenizer) and needs both tokenizers passed, "universal" assisted decoding, which drafts
    through text."""
    sizes = {lm.model.config.get_text_config().vocab_size for lm in (pair.target, pair.draft)}
    return "token" if len(sizes) == 1 else "universal"


class PaddedOutput(torch.nn.Module):
    """An output layer whose logits [..., V] are followed by `extra` logits at the lowest value of
    their dtype: [..., V + extra]. The first V are the layer's own, bit for bit; the padding never
    wins a greedy argmax and takes no probability (its softmax terms are exactly 0)."""

    def __init__(self, layer: torch.nn.Module, extra: int):
        super().__init__()
        self.layer, self.extra = layer, extra

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.layer(hidden)
        return torch.nn.functional.pad(logits, (0, self.extra), value=torch.finfo(logits.dtype).min)


@contextlib.contextmanager
def padded_output_layer(model, rows: int):
    """Within the block, `model` (a transformers model with an output layer of V rows) computes
    logits over `rows` >= V entries (`PaddedOutput`), and `config.get_text_config().vocab_size`,
    the field transformers' assisted generation compares between target and assistant, reads
    `rows`. Yields the padded layer.

    Invariants: logits [..., :V] are the old ones and the padding logits are the dtype's lowest
    value, so greedy argmax returns the token the old layer picks and every probability over the
    real rows is unchanged (transformers stops a draft whose top probability falls below its
    assistant confidence threshold; copies of a real row would have taken probability from the
    real ones, zero rows would win whenever every real logit is negative). Input embeddings are
    untouched, so token ids fed to the model must stay below V. On leaving the block, also by an
    exception, the model has its old output module (the same object, hence the same tie) and its
    old `vocab_size`."""
    layer = model.get_output_embeddings()
    weight = getattr(layer, "weight", None)
    if weight is None or weight.dim() != 2:
        raise TypeError(f"{type(model).__name__} has no output layer with a 2-D weight to pad "
                        f"(get_output_embeddings() gave {type(layer).__name__}).")
    vocab = weight.shape[0]
    if rows < vocab:
        raise ValueError(f"padding only adds rows: the output layer has {vocab}, asked for {rows}.")
    text = model.config.get_text_config()
    padded, old_vocab = PaddedOutput(layer, rows - vocab), text.vocab_size
    model.set_output_embeddings(padded)
    text.vocab_size = rows
    try:
        yield padded
    finally:
        model.set_output_embeddings(layer)
        text.vocab_size = old_vocab


def hf_prefill_s(pair: Pair, prompt, repeats: int) -> float | None:
    """Median seconds of plain `generate(max_new_tokens=1)`: vision tower, prefill and the first
    token; None when transformers refuses even that."""
    try:
        return statistics.median(hf_generate(pair, prompt, 1, False)[1] for _ in range(repeats))
    except Exception:
        return None


def hf_rows(pair: Pair, prompt, reference: list[int], ar: dict, frames: int, max_new_tokens: int,
            repeats: int, only=None, progress=None) -> list[dict]:
    """Rows for transformers' `generate` and assisted generation, timed end to end (prefill
    included, so compared with the project's AR prefill + decode: `speedup_vs_ar_total`).
    `generate` has no separate prefill, so its decode is estimated as the end-to-end time less
    that of `generate(max_new_tokens=1)` (vision tower, prefill and the first token; the same
    for every baseline): `prefill_s`, `decode_s` and `speedup_vs_ar` (the project's AR decode
    over this row's). Assisted generation's decode also holds its draft's prefill. For a pair in
    universal mode (`assisted_mode`) "hf-assisted-padded" runs token-level assisted generation with
    the draft's output layer padded to the target's rows ("draft_output_rows": [draft's, padded])."""
    rows, prefill_s, measured_prefill = [], None, False
    mode = assisted_mode(pair)
    target_rows = pair.target.model.get_output_embeddings().weight.shape[0]
    draft_rows = pair.draft.model.get_output_embeddings().weight.shape[0]
    for method, assisted, static, padded in HF_RUNS:
        if (only is not None and method not in only) or (padded and mode != "universal"):
            continue
        if progress and rows:
            progress(rows)
        row = {"path": "transformers", "frames": frames, "video_tokens": prompt.num_video_tokens, "method": method,
               "draft": "assistant" if assisted else None, "ratio": 0.0,
               "assisted_mode": ("token" if padded else mode) if assisted else None,
               "cache": "static" if static else "dynamic",
               "draft_video_tokens": prompt.num_video_tokens if assisted else None,
               "draft_fused": is_fused(pair.draft) if assisted else None}
        if padded:
            row["draft_output_rows"] = [draft_rows, target_rows]
        # padded once per row, outside the timed calls; the draft is restored even if generate raises
        padding = padded_output_layer(pair.draft.model, target_rows) if padded else contextlib.nullcontext()
        try:
            with padding:
                warmup = hf_generate(pair, prompt, max_new_tokens, assisted, static)  # warm-up (and compile)
                runs = [hf_generate(pair, prompt, max_new_tokens, assisted, static) for _ in range(repeats)]
        except Exception as error:  # a baseline transformers refuses is reported, not fatal to the run
            rows.append({**row, "new_tokens": 0, "equal_to_ar": False, "total_s": None, "speedup_vs_ar_total": None,
                         "error": f"{type(error).__name__}: {error}"})
            continue
        if not measured_prefill:
            prefill_s, measured_prefill = hf_prefill_s(pair, prompt, repeats), True
        tokens, total_s = runs[0][0], statistics.median(t for _, t in runs)
        differing = next((out for out, _ in [warmup, *runs] if out != reference), None)
        same = differing is None and ar["equal_to_ar"]
        row["divergence"] = first_divergence(pair.target, prompt, differing, reference) if differing is not None else None
        decode_s = max(total_s - prefill_s, 0.0) if prefill_s else None
        rows.append({**row, "new_tokens": len(tokens), "equal_to_ar": same, "total_s": total_s,
                     "prefill_s": prefill_s, "decode_s": decode_s,
                     "speedup_vs_ar": ar["decode_s"] / decode_s if same and decode_s else None,
                     "speedup_vs_ar_total": ar["total_s"] / total_s if same else None})
    return rows


def make_row(path: str, frames: int, prompt, draft_prompt, drafter, method, shape, ratio, m: dict, ar: dict,
             reference: list[int], plain_ar_s, target, tree: Tree | None = None) -> dict:
    """A JSON row; every speedup is None unless the tokens of every call of this row and of its AR
    (warm-up included) equal the reference. "divergence": `first_divergence` of the first call that
    does not (None where all do)."""
    res, decode_s, prefill_s = m["res"], m["decode_s"], m["prefill_s"]
    differing = next((tokens for tokens in m["outputs"] if tokens != reference), None)
    same = differing is None and all(tokens == reference for tokens in ar["outputs"])
    return {
        "path": path, "speedup_vs_plain_ar": (plain_ar_s / decode_s) if same and plain_ar_s and decode_s else None,
        "frames": frames, "video_tokens": prompt.num_video_tokens, "method": method,
        "draft": "tree" if tree is not None else shape,
        "drafter": drafter, "ratio": ratio, "new_tokens": len(res.tokens), "equal_to_ar": same,
        "mean_accepted": res.mean_accepted, "rounds": res.rounds,
        "accepted_hist": histogram(res.accepted) if res.accepted else None,
        "decode_s": decode_s, "prefill_s": prefill_s,
        "tokens_per_s": len(res.tokens) / decode_s if decode_s else None,
        "speedup_vs_ar": (ar["decode_s"] / decode_s) if same and decode_s else None,
        "draft_video_tokens": res.draft_video_tokens, "total_s": decode_s + prefill_s,
        "speedup_vs_ar_total": (ar["decode_s"] + ar["prefill_s"]) / (decode_s + prefill_s) if same else None,
        "prompt_tokens": prompt.input_ids.shape[1],
        "draft_prompt_tokens": len(draft_prompt.rows(res.kept)) if drafter else None,
        "step_ms": m["step_ms"], "kv_bytes": m["kv_bytes"], "peak_memory_bytes": m["peak"],
        "draft_fused": m.get("draft_fused"),  # the draft's projections stacked (`fusion.py`)
        "draft_few_rows": m.get("draft_few_rows"),  # ... and run as `few_rows.py`'s kernels
        "draft_vocab": m.get("draft_vocab"),  # the fast path's draft vocabulary, in tokens (None: whole)
        "draft_picks_kernel": m.get("draft_picks_kernel"),  # its tree levels' top-k: "torch" or "triton"
        "draft_l2_prefetch": m.get("draft_l2_prefetch"),  # its decoder layers prefetched their weights into L2
        "draft_combo_kernels": m.get("draft_combo_kernels"),  # its steps compiled with inductor's combo kernels
        "draft_pdl": m.get("draft_pdl"),  # its steps compiled for programmatic dependent launch
        "divergence": first_divergence(target, prompt, differing, reference) if differing is not None else None,
        **({"tree": tree_record(shape, tree)} if tree is not None else {}),
        **({"timeline": m["timeline"]} if m.get("timeline") else {}),
        **({"step_kernels": m["step_kernels"]} if m.get("step_kernels") else {}),
    }


def bench(pair: Pair, video_for, frames_list, max_new_tokens=64, k=5, repeats=3, question=DEFAULT_QUESTION,
          paths=("plain",), transformers_baselines: bool = False, self_speculation: bool = False,
          step_repeats: int = 5, stand_in: bool | None = None, progress=None, only=None,
          timeline: bool = False, selection: bool = False, trees: dict[str, Tree] | None = None,
          step_kernels: bool = False) -> dict:
    """`video_for(frames)` returns a `Video`; returns a JSON-ready dict of rows (module docstring).
    `stand_in`: whether the pair stands in for real checkpoints (default: "stand-in" in its name).
    `progress(result)` is called after every row with the result so far, marked `"partial": True`
    (e.g. to save it: a long run cut short still records where and how it ran).
    `only`: names of the rows to run (`run_labels()`); AR always runs, as every row's reference.
    `timeline`: each fast-path row also profiles one generation (`timeline.profile_decode`: busy
    and idle device time per phase of a round), under "timeline". `selection`: also SELECTION_RUNS (SpecVLM's
    tree at 75% and 95%, and the other selection methods at 90%). `trees`: more trees by name (e.g. one
    `tree_search` grew for this pair), each adding a row "METHOD-tree:NAME-RATIO" beside every tree row
    (which drafts `MC_SIM_7B_63`); every tree row records its tree under "tree" (`tree_record`).
    `step_kernels`: each fast-path row also records, under "step_kernels", the kernels of each of its
    queued passes (`pass_kernels`: per pass, by category, the costliest by name), profiled in this
    process on the row's own models, caches and compiled steps."""
    trees = dict(trees or {})
    bad = [name for name, tree in trees.items() if not isinstance(tree, Tree) or not name or ":" in name]
    if bad:
        raise ValueError(f"trees must map names (without ':') to sv.Tree objects; check {bad!r}.")
    if only is not None:
        universal = transformers_baselines and assisted_mode(pair) == "universal"
        known = run_labels(self_speculation, transformers_baselines, "self" if pair.draft is pair.target else "draft",
                           universal, selection, tuple(trees))
        unknown = set(only) - set(known)
        if unknown:
            raise ValueError(f"bench rows {sorted(unknown)} are not among this call's rows (see --self, --selection, --tree and "
                             f"--transformers; hf-assisted-padded only for a pair whose output layers differ in "
                             f"size): choose from {known}.")
    self_pair = Pair(pair.target, pair.target, name=f"{pair.name}: target drafting for itself") \
        if self_speculation else None
    if not paths or set(paths) - {"plain", "fast"}:
        raise ValueError(f"paths must name one or both of 'plain' and 'fast', got {paths!r}.")
    paths = tuple(sorted(dict.fromkeys(paths), key=lambda path: path != "plain"))  # the plain AR is the reference
    rows = []
    header = {**run_facts(pair, stand_in, max_new_tokens, k, repeats, step_repeats, self_speculation, selection),
              "question": question, "reference": f"AR on the {paths[0]} path"}

    def report(done=(), partial=True) -> dict:  # the result so far: every fact of the run, its rows
        fast = {}
        if "fast" in paths:
            from .fast import capture_report, fast_attention

            fast = {"fast_attention": fast_attention(None), "fast_path": capture_report(pair)}
        return {**header, "rows": rows + list(done), **fast, **({"partial": True} if partial else {})}

    for frames in frames_list:
        video = video_for(frames)
        prompt = pair.target.prepare(video, question)
        draft_prompt = prompt if pair.draft is pair.target else pair.draft.prepare(video, question)
        drafter = "self" if pair.draft is pair.target else "draft"
        plan = [(pair, draft_prompt, drafter if method != "ar" else None, method, shape, ratio)
                for method, shape, ratio in with_trees(RUNS + SELECTION_RUNS * selection, trees)]
        if self_pair is not None:
            plan += [(self_pair, prompt, "self", method, shape, ratio)
                     for method, shape, ratio in with_trees(SELF_RUNS, trees)]
        if only is not None:
            plan = [p for p in plan if p[3] == "ar" or run_label(*p[3:], p[2]) in only]
        plain_ar_s, reference = None, None
        for path in paths:
            ar = None
            if path != "fast":  # the plain path runs transformers' modules as they are (the fast path fuses its draft)
                unfuse_projections(pair.draft)
            for run_pair, run_draft_prompt, run_drafter, method, shape, ratio in plan:
                started = time.perf_counter()
                m = measure(path, run_pair, prompt, run_draft_prompt, method, shape, ratio, k, max_new_tokens,
                            repeats, step_repeats, timeline, trees, step_kernels)
                row_s = time.perf_counter() - started
                if method == "ar":
                    ar = m
                    reference = reference or m["res"].tokens
                    agrees = all(tokens == reference for tokens in m["outputs"])
                    plain_ar_s = plain_ar_s or (m["decode_s"] if path == "plain" and agrees else None)
                rows.append({**make_row(path, frames, prompt, run_draft_prompt, run_drafter, method, shape, ratio, m,
                                        ar, reference, plain_ar_s, pair.target, tree_of(shape, trees)),
                             "row_s": row_s})
                if progress:
                    progress(report())
        if transformers_baselines:
            plain_ar = next(r for r in rows if r["frames"] == frames and r["method"] == "ar")
            unfuse_projections(pair.draft)  # assisted generation gets the draft as users load it
            rows += hf_rows(pair, prompt, reference, plain_ar, frames, max_new_tokens, repeats, only,
                            (lambda done: progress(report(done))) if progress else None)
            if progress:
                progress(report())
    return report(partial=False)


def run_facts(pair: Pair, stand_in, max_new_tokens, k, repeats, step_repeats, self_speculation,
              selection) -> dict:
    """What a `bench` result records beside its rows: the pair, card, dtype, versions, date and settings."""
    from . import __version__  # here: the package may import this module while it initialises

    card = card_name(pair.target.device)
    return {
        "pair": pair.name, "stand_in": ("stand-in" in pair.name.lower()) if stand_in is None else bool(stand_in),
        "device": card, "card": card, "card_id": card_id(pair.target.device), "dtype": str(pair.target.dtype),
        "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "specvlm": __version__,
        "date": str(date.today()), "max_new_tokens": max_new_tokens, "k": k, "repeats": repeats,
        "step_repeats": step_repeats, "self_speculation": self_speculation, "selection": selection,
        "timing": "median decode wall clock after one warm-up; device-synchronised; step_ms: medians of passes at "
                  "the cache lengths when decoding starts, after the timed repetitions (plain path: one pass at a "
                  f"time; fast path: {QUEUED} passes queued back to back, '_synced' ones one at a time)",
    }


def table(result: dict) -> str:
    """The rows as text: one line per row; "by" is who drafts ("draft" model, "self" = the target
    with its own pruned video); step columns are the row's isolated passes in ms."""
    stand_in = " (stand-in)" if result.get("stand_in") and "stand-in" not in result["pair"] else ""
    lines = [f"{result['pair']}{stand_in} on {result['device']} ({result['dtype']}), {result['date']}",
             f"{'path':<5} {'frames':>6} {'video':>6} {'method':<8} {'by':<5} {'draft':<5} {'ratio':>5} {'d.vid':>6} "
             f"{'MAT':>5} {'decode s':>9} {'tok/s':>7} {'x AR':>6} {'= AR':>5} {'step ms (AR | draft, verify)':>28}"]
    for r in result["rows"]:
        if r.get("path") == "transformers" and r.get("error"):
            lines.append(f"{'hf':<5} {r['frames']:>6} {r['video_tokens']:>6} {r['method']:<12} failed: {r['error'][:120]}")
            continue
        if r.get("path") == "transformers":
            total = "-" if r["speedup_vs_ar_total"] is None else f"{r['speedup_vs_ar_total']:.2f}"
            decode = ""
            if r.get("decode_s") is not None:
                speed = "-" if r["speedup_vs_ar"] is None else f"{r['speedup_vs_ar']:.2f}"
                decode = f"decode {r['decode_s']:.3f} s (x AR {speed}), prefill {r['prefill_s']:.3f} s, "
            lines.append(f"{'hf':<5} {r['frames']:>6} {r['video_tokens']:>6} {r['method']:<12} total {r['total_s']:.3f} s, "
                         f"{decode}x AR (prefill + decode) {total}, = AR {same_as_ar(r)}")
            continue
        speed = "-" if r["speedup_vs_ar"] is None else f"{r['speedup_vs_ar']:.2f}"
        steps = r.get("step_ms") or {}
        if "target_step" in steps:
            step = f"{steps['target_step']:.3f}"
        elif steps:
            step = f"{steps['draft_step']:.3f}, {steps['verify']:.3f}"
        else:
            step = "-"
        draft_video = "-" if r["method"] == "ar" or r["draft_video_tokens"] is None else r["draft_video_tokens"]
        shape = r["draft"] or "-"
        if tree_name(r) not in (None, DEFAULT_TREE_NAME):
            shape = f"tree:{r['tree']['name']}"  # a tree passed by name; "tree" alone is mc_sim_7b_63
        lines.append(f"{r.get('path', 'plain'):<5} {r['frames']:>6} {r['video_tokens']:>6} {r['method']:<8} "
                     f"{r.get('drafter') or '-':<5} {shape:<5} {r['ratio']:>5.2f} {draft_video:>6} "
                     f"{r['mean_accepted']:>5.2f} {r['decode_s']:>9.3f} {r['tokens_per_s']:>7.1f} {speed:>6} "
                     f"{same_as_ar(r):>5} {step:>28}")
    return "\n".join(lines)


def same_as_ar(row: dict) -> str:
    """"yes", or "NO" with where the row left AR's tokens and the target's top-2 margin there."""
    if row["equal_to_ar"]:
        return "yes"
    where = row.get("divergence")
    return "NO" if not where else f"NO at token {where['index']} (margin {where['reference_margin']:.3g})"


@torch.no_grad()
def first_divergence(target, prompt, tokens: list[int], reference: list[int]) -> dict | None:
    """Where `tokens` leave `reference` (AR's) and how close the target's call was there
    (README, "Measuring speed"): {"index", "token", "reference_token", "reference_margin"}, the margin
    being the gap between the target's two largest logits after the prompt and reference[:index],
    computed on the plain path one token per step, as AR's own output was. In bf16 a gap near 0 is rounding that differs between kernels; a
    clear gap (say above 0.05) is a bug. None where the tokens are equal. A token past either
    end is None."""
    if tokens == reference:
        return None
    index = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    logits, cache = prefill_pruned(target, prompt, None)
    for i, token in enumerate(reference[:index]):  # one token per step, as `generate_ar` computed them
        logits = target.step([token], positions(prompt, i, 1), cache)[0, -1]
    top = logits.float().topk(2).values
    return {"index": index, "token": tokens[index] if index < len(tokens) else None,
            "reference_token": reference[index] if index < len(reference) else None,
            "reference_margin": float(top[0] - top[1])}


def card_name(device: torch.device) -> str:
    """The card a measurement ran on: the CUDA device's name, else the CPU's."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def card_id(device: torch.device) -> str | None:
    """The CUDA card's UUID (as `nvidia-smi -L` prints it, without "GPU-"), None off CUDA: two
    results with the same id ran on the same card, so their timings compare without a machine's
    difference in them."""
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None


def save(result: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
