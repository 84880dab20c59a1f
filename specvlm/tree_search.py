"""A static tree for one pair, built from the draft's measured ranks and chosen by the cost model.

The construction Medusa describes for its sparse trees (greedy by path probability, from each rank's measured
accuracy), with this pair's own measurements:

1. *Ranks* (`draft_ranks`). Decode a clip with the target alone; feed the draft (on its pruned
   video) the target's answer, teacher-forced, and record at every answer token the rank of the
   target's token among the draft's: rank 0 is the draft's top-1. Greedy tree verification tests
   exactly this: a round that starts at token t accepts the tree's nodes along the rank path
   (ranks[t], ranks[t+1], ...) for as long as that path is in the tree (`replay` decodes a whole
   answer so, round by round, without running a model).
2. *How likely a node is*, two ways:
   - `rank_profile`: p[r], the share of tokens at rank r; taking ranks at different depths as
     independent (Medusa's assumption), the node with rank path (r1, ..., rd) is accepted with
     probability p[r1] * ... * p[rd];
   - `path_frequencies`: the share of answer positions whose ranks begin with that path, as
     measured: no assumption, but noisy for rare paths.
   Either way a round accepts, on average over its starting token, the sum of that over the
   tree's nodes (`expected_accepted`).
3. *The best tree of each size* (`grown_tree`): best-first from the root, always adding the
   likeliest child of a node already in (so the result is a valid tree).
4. *The size and depth* (`best_tree`): the tree with the most tokens per millisecond of round,
   `(1 + expected_accepted) / round_ms`, where a round costs one draft pass per level and one
   verification whose cost grows with the tree's size (`round_model`, from a bench run's step timings).

    python -m specvlm.tree_search --bench figures/bench_widened_7b_0.5b_192f_grown_nvidia-h100-80gb-hbm3.json \
        --check-seeds 4 --out figures/tree_measured_tiny_192f_specvlm50.json
    python -m specvlm bench ... --tree measured=figures/tree_measured_tiny_192f_specvlm50.json \
        --only specvlm-tree-0.5 specvlm-tree:measured-0.5

Independence misjudges depth wherever acceptance is correlated along a path (a draft right, or wrong,
in runs of tokens): measured frequencies see that, at the price of noise for rare paths.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .cost_model import DEFAULT_TREE_NAME, draft_passes, row_tree, tree_name, tree_round_ms
from .trees import MC_SIM_7B_63, Tree


@torch.no_grad()
def draft_ranks(pair, prompt, method: str = "specvlm", ratio: float = 0.5, max_new_tokens: int = 64) -> torch.Tensor:
    """Ranks [T-1] (long): at each token t >= 1 of the target's greedy answer (T tokens), how many
    of the draft's logits beat the target's token, the draft having seen its pruned video and the
    answer's tokens before t. The answer's first token comes from the target's prefill in
    speculative decoding, so it is not ranked."""
    from .decoding import SCORED_METHODS, generate_ar, positions, prefill_pruned, prefill_target, select_video_tokens

    scores = prefill_target(pair.target, prompt, with_scores=True)[2] if method in SCORED_METHODS else None
    answer = generate_ar(pair.target, prompt, max_new_tokens).tokens
    if len(answer) < 2:
        return torch.zeros(0, dtype=torch.long)
    keep = select_video_tokens(method, prompt, ratio, scores)
    _, cache = prefill_pruned(pair.draft, prompt, keep)
    logits = pair.draft.step(answer[:-1], positions(prompt, 0, len(answer) - 1), cache)[0]  # row t-1 predicts t
    target_tokens = torch.tensor(answer[1:], device=logits.device)
    chosen = logits.gather(1, target_tokens[:, None])
    return (logits > chosen).sum(1).cpu()


def rank_profile(ranks, max_rank: int = 8) -> list[float]:
    """p[r] for r < max_rank: the share of `ranks` (one tensor or a list of them) equal to r.
    The rest (ranks >= max_rank) is never accepted by a tree that keeps ranks below max_rank.
    rank_profile(torch.tensor([0, 0, 1, 9]), max_rank=3) -> [0.5, 0.25, 0.0]"""
    ranks = torch.cat([torch.as_tensor(r).flatten() for r in ranks]) if isinstance(ranks, (list, tuple)) else ranks
    if ranks.numel() == 0:
        raise ValueError("no ranks to profile: the answers were shorter than two tokens.")
    counts, total = [int((ranks == r).sum()) for r in range(max_rank)], ranks.numel()
    return [n / total for n in counts]  # exact fractions: a float32 mean can sum past 1


def path_frequencies(ranks, max_depth: int) -> dict[tuple[int, ...], float]:
    """{rank path: share of answer positions whose ranks begin with it}, for paths up to max_depth
    long, from one rank sequence per answer (a position near an answer's end starts only the paths
    that fit before it). path_frequencies([[0, 0, 1]], 2) -> {(0,): 2/3, (0, 0): 1/3, (0, 1): 1/3, (1,): 1/3}"""
    counts: dict[tuple[int, ...], int] = {}
    positions = 0
    for answer in ranks:
        answer = [int(r) for r in answer]
        positions += len(answer)
        for t in range(len(answer)):
            for depth in range(1, min(max_depth, len(answer) - t) + 1):
                path = tuple(answer[t:t + depth])
                counts[path] = counts.get(path, 0) + 1
    if positions == 0:
        raise ValueError("no ranks to count: the answers were shorter than two tokens.")
    return {path: n / positions for path, n in counts.items()}


def check_profile(profile: Sequence[float]) -> None:
    if not profile or any(p < 0 for p in profile) or sum(profile) > 1 + 1e-9:
        raise ValueError(f"a rank profile is a list of probabilities >= 0 with sum <= 1, got {list(profile)!r}.")


def path_probability(path: Sequence[int], profile: Sequence[float]) -> float:
    """p[r1] * ... * p[rd]; 0 for a rank beyond the profile. path_probability((0, 1), [0.5, 0.25]) -> 0.125"""
    prob = 1.0
    for rank in path:
        prob *= profile[rank] if rank < len(profile) else 0.0
    return prob


def likelihood(profile_or_frequencies) -> Callable[[tuple[int, ...]], float]:
    """path -> how likely its node is accepted: from a rank profile (a list: ranks independent) or
    from measured path frequencies (a dict, `path_frequencies`)."""
    if isinstance(profile_or_frequencies, dict):
        return lambda path: profile_or_frequencies.get(tuple(path), 0.0)
    check_profile(profile_or_frequencies)
    return lambda path: path_probability(path, profile_or_frequencies)


def expected_accepted(tree: Tree, profile_or_frequencies) -> float:
    """Drafted tokens a round of `tree` accepts on average over its starting token: the sum over its
    nodes of how likely each is (`likelihood`). For a chain of k and p[0] = a, with ranks
    independent, this is a + a^2 + ... + a^k.
    expected_accepted(Tree.from_paths([[0], [1], [0, 0]]), [0.5, 0.25]) -> 1.0"""
    score = likelihood(profile_or_frequencies)
    return sum(score(path) for path in tree.paths)


def grown_tree(profile_or_frequencies, nodes: int, max_depth: int, max_rank: int = 8) -> Tree:
    """The tree of at most `nodes` rank paths (depth <= max_depth, ranks < max_rank) grown best-first
    from the root: each step adds the likeliest child (`likelihood`) of the root or of a node in the
    tree; paths never seen (likelihood 0) are not added. These are the likeliest paths, since no
    node is likelier than its parent. grown_tree([0.6, 0.3], nodes=3, max_depth=2).paths ->
    ((0,), (1,), (0, 0))"""
    if nodes < 1 or max_depth < 1:
        raise ValueError(f"a tree needs nodes >= 1 and max_depth >= 1, got nodes={nodes}, max_depth={max_depth}.")
    score = likelihood(profile_or_frequencies)
    frontier, paths = [], []

    def push_children(parent: tuple[int, ...]) -> None:
        if len(parent) < max_depth:
            for rank in range(max_rank):
                child = parent + (rank,)
                if score(child) > 0:
                    heapq.heappush(frontier, (-score(child), child))

    push_children(())
    while frontier and len(paths) < nodes:
        _, path = heapq.heappop(frontier)
        paths.append(path)
        push_children(path)
    if not paths:
        raise ValueError("no path has a likelihood above 0: nothing to grow a tree from.")
    return Tree.from_paths(paths)


def replay(ranks: Sequence[int], tree: Tree) -> list[int]:
    """Accepted drafts per round when `tree` drafts the answer whose ranks are `ranks` (one per token
    after the first, `draft_ranks`): greedy tree decoding round by round, without a model. A round
    starting at token t accepts the longest tree path that (ranks[t], ranks[t+1], ...) begins with,
    then the bonus token, so the next round starts after both. (Rounds near a length limit, where
    decoding shortens its tree, are not modelled: the answer is taken to end at its EOS.)
    replay([0, 0, 1, 0], chain(2)) -> [2, 1]"""
    in_tree = set(tree.paths)
    ranks = [int(r) for r in ranks]
    accepted, t = [], 0
    while t < len(ranks):
        depth = 0
        while depth < tree.depth and t + depth < len(ranks) and tuple(ranks[t:t + depth + 1]) in in_tree:
            depth += 1
        accepted.append(depth)
        t += depth + 1
    return accepted


def best_tree(profile_or_frequencies, round_ms: Callable[[Tree], float], sizes: Sequence[int],
              depths: Sequence[int], max_rank: int = 8) -> tuple[Tree, list[dict]]:
    """The grown tree with the most expected tokens per ms of round over `sizes` x `depths`, and
    every candidate as a dict (tree, nodes, depth, expected_accepted, round_ms, tokens_per_ms), best
    first. `round_ms(tree)` is the caller's cost model, e.g. `round_model` of a benchmark row."""
    candidates = {grown_tree(profile_or_frequencies, size, depth, max_rank): None for depth in depths for size in sizes}
    table = []
    for tree in candidates:  # one entry per distinct tree
        accepted = expected_accepted(tree, profile_or_frequencies)
        ms = round_ms(tree)
        table.append(dict(tree=tree, nodes=len(tree.paths), depth=tree.depth, expected_accepted=accepted,
                          round_ms=ms, tokens_per_ms=(1 + accepted) / ms))
    table.sort(key=lambda row: -row["tokens_per_ms"])
    return table[0]["tree"], table


def read_tree(path) -> Tree:
    """The tree saved in a JSON file under "paths" (as `main` writes it)."""
    saved = json.loads(Path(path).read_text())
    if not isinstance(saved, dict) or not isinstance(saved.get("paths"), list):
        raise ValueError('no "paths" list of rank paths in it (expected {"paths": [[0], [1], [0, 0], ...]}).')
    return Tree.from_paths(saved["paths"])


def round_model(row: dict, ar_row: dict, reference: Tree | None = None) -> Callable[[Tree], float]:
    """round_ms(tree) from a fast-path bench row that drafted `reference` (None: the tree the row
    records, `cost_model.row_tree`) and its AR row: the
    catch-up feed ("draft_feed") and one "draft_level" per further pass, the picks ("draft_picks")
    scaled by passes, the acceptance and the KV move as timed, and a verification on a line
    through the AR step (1 token) and the row's "verify" (the reference's tokens), extrapolated
    beyond them. Every round is costed as if it fed wide and moved KV; the launch on an idle
    device (`cost_model.launch_ms`) is left out, the same for every tree."""
    steps, t_ar = row["step_ms"], ar_row["step_ms"]["target_step"]
    needed = ("draft_feed", "draft_level", "verify")
    if any(name not in steps for name in needed):
        raise ValueError(f"round_model needs a fast-path tree row with step timings {needed}; got {sorted(steps)}.")
    reference = reference or row_tree(row)
    if reference is None:
        raise ValueError("round_model needs a tree row (its \"draft\" is \"tree\") or the tree it drafted, as `reference`.")
    reference_passes = len(draft_passes(reference))
    slope = (steps["verify"] - t_ar) / (reference.num_nodes - 1)

    def round_ms(tree: Tree) -> float:
        glue = (steps.get("draft_picks", 0.0) * len(draft_passes(tree)) / reference_passes
                + steps.get("accept_synced", 0.0) + steps.get("target_move", 0.0))
        return tree_round_ms(tree, steps["draft_level"], t_ar + slope * (tree.num_nodes - 1), extra_ms=glue,
                             t_feed=steps["draft_feed"], t_level=steps["draft_level"], wide_feed=1.0)

    return round_ms


def replayed(ranks, tree: Tree) -> dict:
    """What `replay` gives for a tree over several answers' ranks: {"rounds", "tokens" (each answer's
    first token, from the prefill, not counted), "tokens_per_round", "accepted_hist"}."""
    from .cost_model import histogram

    accepted = [a for answer in ranks for a in replay(answer, tree)]
    tokens = sum(len(answer) for answer in ranks)
    return {"rounds": len(accepted), "tokens": tokens, "tokens_per_round": tokens / len(accepted) if accepted else 0.0,
            "accepted_hist": histogram(accepted) if accepted else []}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Grow a draft tree for the embedded pair from its measured ranks, "
                                                 "sized by a fast-path bench run's step timings.")
    parser.add_argument("--bench", type=Path, required=True, help="a bench JSON with a fast-path tree row and its AR")
    parser.add_argument("--bench-tree", default=DEFAULT_TREE_NAME, metavar="NAME",
                        help="the tree of the --bench row the round costs come from (a tree row records its tree's "
                             "name; default %(default)s)")
    parser.add_argument("--method", default="specvlm")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--frames", type=int, default=192)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(100, 112)),
                        help="held-out synthetic clips (seeds below 10**5) the tree is grown from")
    parser.add_argument("--check-seeds", type=int, nargs="*", default=[],
                        help="more clips, only replayed with the trees (e.g. the benchmark's), never used to choose")
    parser.add_argument("--estimate", choices=("frequencies", "independent"), default="frequencies",
                        help="how likely a node is: measured path frequencies, or a rank profile with ranks independent")
    parser.add_argument("--max-rank", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(range(4, 32)),
                        help="drafted nodes to try (up to 31 + root = 32 tokens by default, near the 26 of the "
                             "verification the costs come from)")
    parser.add_argument("--depths", type=int, nargs="+", default=list(range(2, 9)))
    parser.add_argument("--ranks", default=None, metavar="FILE:DRAFT",
                        help="take the ranks of --seeds and --check-seeds from a benchmarks/draft_ranks.py JSON (the "
                             "entry of DRAFT in it) instead of measuring the embedded pair's here")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from . import synthetic
    from .models import DEFAULT_QUESTION, load_pair
    from .video import from_array

    bench = json.loads(args.bench.read_text())
    rows = [r for r in bench["rows"] if r.get("path") == "fast"]
    row = next((r for r in rows if r["method"] == args.method and r.get("draft") == "tree"
                and r.get("drafter", "draft") == "draft" and r["frames"] == args.frames and r.get("ratio") == args.ratio
                and tree_name(r) == args.bench_tree), None)
    ar_row = next((r for r in rows if r["method"] == "ar" and r["frames"] == args.frames), None)
    if row is None or ar_row is None:
        parser.error(f"--bench {args.bench}: no fast-path {args.bench_tree} tree row of {args.method} drafted by the draft "
                     f"at ratio {args.ratio} and {args.frames} frames, with its AR row.")
    round_ms = round_model(row, ar_row)
    if args.ranks:
        file, _, name = args.ranks.rpartition(":")
        if not file or not name:
            parser.error(f"--ranks {args.ranks}: give FILE:DRAFT, a benchmarks/draft_ranks.py JSON and a draft in it.")
        try:
            measured = json.loads(Path(file).read_text())
            held = (measured["frames"], measured["method"], measured["ratio"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            parser.error(f"--ranks {args.ranks}: cannot read a benchmarks/draft_ranks.py JSON there ({error!r}).")
        if held != (args.frames, args.method, args.ratio):
            parser.error(f"--ranks {args.ranks}: the file holds {held[0]} frames, {held[1]} {held[2]}; "
                         f"asked for {args.frames} frames, {args.method} {args.ratio}.")
        entry = measured.get("drafts", {}).get(name)
        if entry is None:
            parser.error(f"--ranks {args.ranks}: no draft {name!r} in the file (it has {sorted(measured.get('drafts', {}))}).")
        missing = [s for s in args.seeds + args.check_seeds if str(s) not in entry["ranks"]]
        if missing:
            parser.error(f"--ranks {args.ranks}: draft {name!r} was not ranked on every clip asked (missing: {missing}).")
        pair_name = f"embedded target, draft {name} ({entry['folder'] or name}), ranked on {measured['device']}"
    else:
        pair = load_pair("tiny")
        pair_name = pair.name

    def ranks_of(seeds):
        if args.ranks:
            return [entry["ranks"][str(seed)] for seed in seeds]
        out = []
        for seed in seeds:
            clip = synthetic.make_clip(seed, num_frames=args.frames)
            prompt = pair.target.prepare(from_array(clip.frames, fps=8.0), DEFAULT_QUESTION)
            out.append(draft_ranks(pair, prompt, args.method, args.ratio).tolist())
            print(f"clip {seed}: {len(out[-1])} ranked tokens", flush=True)
        return out

    ranks, check_ranks = ranks_of(args.seeds), ranks_of(args.check_seeds)
    profile = rank_profile([torch.tensor(r) for r in ranks], args.max_rank)
    estimates = {"independent": profile, "frequencies": path_frequencies(ranks, max(args.depths))}
    t_ar = ar_row["step_ms"]["target_step"]

    def described(tree: Tree) -> dict:
        accepted = expected_accepted(tree, estimates[args.estimate])
        grown_from = replayed(ranks, tree)  # the answers the tree was chosen on: in-sample
        return {"nodes": len(tree.paths), "depth": tree.depth, "expected_accepted": accepted,
                "round_ms": round_ms(tree), "predicted_speedup": (1 + accepted) * t_ar / round_ms(tree),
                "replayed": grown_from, "replayed_speedup": grown_from["tokens_per_round"] * t_ar / round_ms(tree),
                "check_replayed": replayed(check_ranks, tree) if check_ranks else None}

    best, table = best_tree(estimates[args.estimate], round_ms, args.sizes, args.depths, args.max_rank)
    other = "independent" if args.estimate == "frequencies" else "frequencies"
    other_best, _ = best_tree(estimates[other], round_ms, args.sizes, args.depths, args.max_rank)
    out = {"paths": [list(path) for path in best.paths], "estimate": args.estimate, **described(best),
           "mc_sim_7b_63": described(MC_SIM_7B_63),
           other: {"paths": [list(path) for path in other_best.paths], **described(other_best)},
           "candidates": [{k: v for k, v in entry.items() if k != "tree"} for entry in table[:10]],
           "profile": profile, "ranked_tokens": int(sum(len(r) for r in ranks)),
           "rank_counts": [sum(r.count(rank) for r in ranks) for rank in range(args.max_rank)],
           "ranks": dict(zip(map(str, args.seeds), ranks)), "check_ranks": dict(zip(map(str, args.check_seeds), check_ranks)),
           "pair": pair_name, "method": args.method, "ratio": args.ratio, "frames": args.frames, "seeds": args.seeds,
           "check_seeds": args.check_seeds,
           "costs_from": {"bench": args.bench.name, "tree": args.bench_tree, "card": bench.get("card"),
                          "code": bench.get("code")},
           "assumptions": (f"ranks measured in {measured.get('dtype', 'float32') if args.ranks else 'float32'} on the "
                           f"{pair_name if args.ranks else 'embedded pair'} (the "
                           "widened pair's in bfloat16 can differ at near-ties); " + ("ranks independent across depths; " if args.estimate == "independent"
                                                else "path frequencies as measured on these clips; ")
                           + "verification linear in tokens through the AR step and the bench row's "
                           + f"{args.bench_tree} verification; every round feeds wide and moves KV"),
           "command": "python -m specvlm.tree_search " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for name, entry in (("chosen", out), ("mc_sim_7b_63", out["mc_sim_7b_63"]), (other, out[other])):
        print(name, json.dumps({k: entry[k] for k in ("nodes", "depth", "expected_accepted", "round_ms",
                                                      "predicted_speedup", "replayed_speedup")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
