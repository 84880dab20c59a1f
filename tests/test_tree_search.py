"""Growing a draft tree from the draft's measured ranks (`tree_search`)."""

import itertools
import json

import pytest
import torch

import specvlm as sv
from specvlm import tree_search as ts
from specvlm.decoding import generate_sd
from specvlm.trees import MC_SIM_7B_63

from .conftest import random_video


def test_rank_profile_counts_each_rank_share():
    assert ts.rank_profile(torch.tensor([0, 0, 1, 9]), max_rank=3) == [0.5, 0.25, 0.0]
    assert ts.rank_profile([torch.tensor([0]), torch.tensor([1, 1, 0])], max_rank=2) == [0.5, 0.5]
    with pytest.raises(ValueError, match="no ranks"):
        ts.rank_profile(torch.zeros(0, dtype=torch.long))


def test_expected_accepted_of_a_chain_is_the_geometric_sum():
    a = 0.7
    assert ts.expected_accepted(sv.chain(4), [a, 0.2]) == pytest.approx(a + a**2 + a**3 + a**4)
    assert ts.expected_accepted(sv.Tree.from_paths([[0], [1], [0, 0]]), [0.5, 0.25]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="probabilities"):
        ts.expected_accepted(sv.chain(2), [0.8, 0.5])


def all_paths(depth, ranks):
    return [p for d in range(1, depth + 1) for p in itertools.product(range(ranks), repeat=d)]


@pytest.mark.parametrize("nodes,depth", [(1, 1), (7, 3), (25, 5), (31, 4)])
def test_grown_tree_holds_the_most_likely_paths(nodes, depth):
    profile = [0.55, 0.2, 0.1, 0.05]
    tree = ts.grown_tree(profile, nodes, depth)
    assert len(tree.paths) == nodes and tree.depth <= depth
    probabilities = sorted((ts.path_probability(p, profile) for p in all_paths(depth, len(profile))), reverse=True)
    assert ts.expected_accepted(tree, profile) == pytest.approx(sum(probabilities[:nodes]))


def test_grown_tree_follows_the_profile_shape():
    assert ts.grown_tree([0.6, 0.3], nodes=3, max_depth=2).paths == ((0,), (1,), (0, 0))
    assert ts.grown_tree([0.95, 0.01], nodes=4, max_depth=8) == sv.chain(4)  # a confident draft: a chain
    assert ts.grown_tree([0.3, 0.3, 0.3], nodes=3, max_depth=8).depth == 1  # an unsure one: wide
    with pytest.raises(ValueError, match="nodes >= 1"):
        ts.grown_tree([0.5], nodes=0, max_depth=3)


def test_best_tree_maximises_tokens_per_ms():
    profile = [0.6, 0.25, 0.1]
    per_pass, verify_per_node = 1.0, 0.05
    cost = lambda tree: 10 + per_pass * tree.depth + verify_per_node * tree.num_nodes
    best, table = ts.best_tree(profile, cost, sizes=[4, 8, 16, 31], depths=[2, 4, 6])
    assert table[0]["tree"] == best
    assert all(table[i]["tokens_per_ms"] >= table[i + 1]["tokens_per_ms"] for i in range(len(table) - 1))
    assert table[0]["tokens_per_ms"] == pytest.approx((1 + ts.expected_accepted(best, profile)) / cost(best))
    # drafting for free, the deepest and largest tree wins; at a high price per pass, a shallower one
    free, _ = ts.best_tree(profile, lambda tree: 10.0, sizes=[4, 8, 16, 31], depths=[2, 4, 6])
    assert len(free.paths) == 31
    dear, _ = ts.best_tree(profile, lambda tree: 10 + 20 * tree.depth, sizes=[4, 8, 16, 31], depths=[2, 4, 6])
    assert dear.depth < free.depth


def test_round_model_reproduces_the_reference_tree_and_the_ar_step():
    row = {"draft": "tree", "step_ms": {"draft_feed": 1.3, "draft_level": 1.2, "verify": 8.0, "draft_picks": 0.5,
                                        "accept_synced": 0.1, "target_move": 0.05}}
    ar = {"step_ms": {"target_step": 7.0}}
    round_ms = ts.round_model(row, ar)  # a row without its tree drafted mc_sim_7b_63
    assert round_ms(MC_SIM_7B_63) == pytest.approx(1.3 + 4 * 1.2 + 8.0 + 0.5 + 0.1 + 0.05)
    assert round_ms(sv.chain(1)) == pytest.approx(1.3 + 7.0 + 0.04 + 0.5 / 5 + 0.15)  # 2 tokens: 1/25 of the way
    with pytest.raises(ValueError, match="draft_feed"):
        ts.round_model({"draft": "tree", "step_ms": {"verify": 8.0}}, ar)
    with pytest.raises(ValueError, match="needs a tree row"):
        ts.round_model({"draft": "chain", "step_ms": row["step_ms"]}, ar)


def test_round_model_takes_the_tree_a_row_records():
    """A row that drafted another tree (3 nodes, depth 2: the feed and one level) costs its verification
    at its own node count: the line through the AR step runs through it, not through mc_sim_7b_63's."""
    small = sv.Tree.from_paths([[0], [1], [0, 0]])
    row = {"draft": "tree", "tree": {"name": "small", "paths": [list(p) for p in small.paths]},
           "step_ms": {"draft_feed": 1.3, "draft_level": 1.2, "verify": 7.6, "draft_picks": 0.2}}
    round_ms = ts.round_model(row, {"step_ms": {"target_step": 7.0}})
    assert round_ms(small) == pytest.approx(1.3 + 1.2 + 7.6 + 0.2)
    assert round_ms(MC_SIM_7B_63) == pytest.approx(1.3 + 4 * 1.2 + (7.0 + 0.2 * 25) + 0.2 * 5 / 2)  # 0.6 ms over 3 nodes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_draft_ranks_predict_what_a_one_token_chain_accepts(noisy_pair, seed):
    """A chain of one drafted token tests the draft's top-1 at one position per round: it is accepted
    exactly where the measured rank there is 0 (a rank >= 1 would have been a rejection)."""
    prompt = noisy_pair.target.prepare(random_video(seed, 4), "Describe the video.")
    ranks = ts.draft_ranks(noisy_pair, prompt, "specvlm", 0.5, max_new_tokens=24)
    result = generate_sd(noisy_pair, prompt, "specvlm", 0.5, k=1, max_new_tokens=24)
    assert len(ranks) == len(result.tokens) - 1
    position, checked, limit = 1, 0, 24  # the answer's token the next round drafts (token 0 came from the prefill)
    for accepted in result.accepted:
        if position < min(len(result.tokens), limit - 1):  # at the limit's last token a round drafts nothing
            assert accepted == int(ranks[position - 1] == 0), (position, ranks.tolist(), result.accepted)
            checked += 1
        position += accepted + 1
    assert checked >= 5 and 0 < ranks.eq(0).float().mean() < 1  # the noisy draft is right sometimes, not always


def test_path_frequencies_count_where_the_ranks_begin_with_each_path():
    freq = ts.path_frequencies([[0, 0, 1]], 2)
    assert freq == pytest.approx({(0,): 2 / 3, (0, 0): 1 / 3, (0, 1): 1 / 3, (1,): 1 / 3})
    ranks = [[0, 0, 0, 1, 0, 2], [1, 0, 0]]
    tree = sv.Tree.from_paths([[0], [1], [0, 0], [0, 0, 0]])
    freq = ts.path_frequencies(ranks, tree.depth)
    # the expected acceptance over measured frequencies is the mean, over starting tokens, of what a round accepts
    starts = [(answer, t) for answer in ranks for t in range(len(answer))]
    in_tree = set(tree.paths)
    accepted = [max([d for d in range(1, min(tree.depth, len(a) - t) + 1) if tuple(a[t:t + d]) in in_tree], default=0)
                for a, t in starts]
    assert ts.expected_accepted(tree, freq) == pytest.approx(sum(accepted) / len(starts))
    grown = ts.grown_tree(freq, nodes=3, max_depth=3)
    assert all(freq[path] > 0 for path in grown.paths) and grown.paths == ((0,), (1,), (0, 0))


def test_replay_decodes_round_by_round_from_the_ranks():
    assert ts.replay([0, 0, 1, 0], sv.chain(2)) == [2, 1]
    assert ts.replay([1, 1, 1], sv.chain(3)) == [0, 0, 0]  # each rejection still commits the target's own token
    assert ts.replay([1, 0, 0, 0], MC_SIM_7B_63) == [3]  # (1,), (1, 0), (1, 0, 0) are in the tree; (1, 0, 0, 0) is not
    assert ts.replayed([[1, 0, 0, 0], [0]], MC_SIM_7B_63) == {"rounds": 2, "tokens": 5, "tokens_per_round": 2.5,
                                                               "accepted_hist": [0, 1, 0, 1]}


@pytest.mark.parametrize("seed", [0, 3])
def test_replay_of_the_measured_ranks_gives_the_rounds_tree_decoding_gives(noisy_pair, seed):
    """Greedy tree decoding tests the draft's ranks along the target's answer: replaying the
    teacher-forced ranks through a tree must give the accepted count of every round (the last few
    rounds before the token limit, which decoding drafts with a shorter chain, aside)."""
    tree, limit = sv.Tree.from_paths([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]), 40
    prompt = noisy_pair.target.prepare(random_video(seed, 4), "Describe the video.")
    ranks = ts.draft_ranks(noisy_pair, prompt, "specvlm", 0.5, max_new_tokens=limit)
    result = generate_sd(noisy_pair, prompt, "specvlm", 0.5, tree=tree, max_new_tokens=limit)
    replayed, start, compared = ts.replay(ranks, tree), 0, 0
    for got, want in zip(result.accepted, replayed):
        if limit - (start + 1) <= tree.depth:
            break
        assert got == want, (start, ranks.tolist())
        start, compared = start + got + 1, compared + 1
    assert compared >= 5 and len(set(result.accepted[:compared])) > 1


def test_read_tree_reads_the_paths_and_refuses_a_file_without_a_tree(tmp_path):
    good = tmp_path / "tree.json"
    good.write_text(json.dumps({"paths": [[0], [1], [0, 0]]}))
    assert ts.read_tree(good) == sv.Tree.from_paths([[0], [1], [0, 0]])
    for text, message in ((json.dumps({"paths": [[0, 0]]}), "has no parent"), (json.dumps({"nodes": 3}), '"paths" list'),
                          (json.dumps([[0], [1]]), '"paths" list')):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            ts.read_tree(bad)


def test_rank_profile_sums_to_one_whatever_the_counts():
    ranks = [torch.tensor(r) for r in ([0] * 145 + [1] * 42 + [2] * 8 + [3] * 7 + [4] * 3 + [5] * 3,)]
    profile = ts.rank_profile(ranks, max_rank=6)
    assert sum(profile) == pytest.approx(1.0) and ts.grown_tree(profile, 5, 3)  # accepted by check_profile


def test_a_tree_with_gaps_between_sibling_ranks_decodes_losslessly_on_both_paths():
    """A tree grown from measured frequencies can hold rank 5 without rank 4: both decoding paths must
    still equal AR, and their rounds must be the replay of the draft's ranks."""
    from specvlm import fast
    from specvlm.decoding import generate_ar

    tree = sv.Tree.from_paths([[0], [1], [5], [5, 0], [1, 3], [1, 3, 2], [0, 7], [0, 0], [0, 0, 0]])
    pair = sv.load_pair("tiny", device="cpu")
    for seed in (0, 4):
        prompt = pair.target.prepare(sv.from_array(sv.synthetic.make_clip(seed, num_frames=2).frames, fps=8.0),
                                     "Describe the video.")
        reference = generate_ar(pair.target, prompt, 64).tokens
        plain = generate_sd(pair, prompt, "specvlm", 0.5, tree=tree, max_new_tokens=64)
        quick = fast.generate_fast(pair, prompt, "specvlm", 0.5, tree=tree, max_new_tokens=64, compile=False)
        assert plain.tokens == quick.tokens == reference and plain.accepted == quick.accepted
        assert reference[-1] in pair.target.eos_token_ids  # the answer ends before the limit: every round is a tree round
        assert plain.accepted == ts.replay(ts.draft_ranks(pair, prompt, "specvlm", 0.5), tree)


def test_the_command_line_grows_a_tree_from_a_bench_runs_costs(tmp_path, capsys):
    steps = {"draft_step": 1.1, "draft_feed": 1.3, "draft_level": 1.2, "verify": 8.0, "draft_picks": 0.5,
             "accept_synced": 0.1, "target_move": 0.05}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"card": "a card", "rows": [
        {"path": "fast", "method": "ar", "frames": 2, "step_ms": {"target_step": 7.0}},
        {"path": "fast", "method": "specvlm", "draft": "tree", "drafter": "draft", "frames": 2, "ratio": 0.5,
         "step_ms": steps}]}))
    out = tmp_path / "tree.json"
    assert ts.main(["--bench", str(bench), "--frames", "2", "--seeds", "0", "1", "--check-seeds", "2",
                    "--sizes", "4", "8", "--depths", "2", "3", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    tree = ts.read_tree(out)
    assert len(tree.paths) in (4, 8) and tree.depth <= 3 and saved["estimate"] == "frequencies"
    ranks = list(saved["ranks"].values())
    assert saved["replayed"] == ts.replayed(ranks, tree) and len(saved["check_ranks"]["2"]) >= 1
    assert saved["expected_accepted"] == pytest.approx(ts.expected_accepted(tree, ts.path_frequencies(ranks, 3)))
    best = max(saved["candidates"], key=lambda c: c["tokens_per_ms"])
    assert (best["nodes"], best["depth"]) == (len(tree.paths), tree.depth)
    with pytest.raises(SystemExit):
        ts.main(["--bench", str(bench), "--frames", "4", "--out", str(out)])
    assert "no fast-path mc_sim_7b_63 tree row" in capsys.readouterr().err


def test_the_command_line_takes_round_costs_from_a_row_of_another_tree(tmp_path, capsys):
    """`--bench-tree NAME`: the costs come from the row that drafted the tree named NAME, its verification
    set against its own node count."""
    small = [[0], [1], [0, 0]]
    steps = {"draft_feed": 1.3, "draft_level": 1.2, "verify": 7.6, "draft_picks": 0.2}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"card": "a card", "rows": [
        {"path": "fast", "method": "ar", "frames": 2, "step_ms": {"target_step": 7.0}},
        {"path": "fast", "method": "specvlm", "draft": "tree", "drafter": "draft", "frames": 2, "ratio": 0.5,
         "tree": {"name": "small", "paths": small}, "step_ms": steps}]}))
    out = tmp_path / "tree.json"
    common = ["--bench", str(bench), "--frames", "2", "--seeds", "0", "1", "--sizes", "4", "--depths", "2",
              "--out", str(out)]
    with pytest.raises(SystemExit):  # the default asks for an mc_sim_7b_63 row, which this run lacks
        ts.main(common)
    assert "no fast-path mc_sim_7b_63 tree row" in capsys.readouterr().err
    assert ts.main([*common, "--bench-tree", "small"]) == 0
    saved = json.loads(out.read_text())
    row = json.loads(bench.read_text())["rows"][1]
    assert saved["costs_from"]["tree"] == "small" and "small verification" in saved["assumptions"]
    assert saved["round_ms"] == pytest.approx(ts.round_model(row, {"step_ms": {"target_step": 7.0}})(ts.read_tree(out)))


def test_the_command_line_grows_a_tree_from_ranks_measured_elsewhere(tmp_path, capsys):
    """`--ranks FILE:DRAFT` (benchmarks/draft_ranks.py's JSON): the tree is grown from that draft's ranks, with
    nothing measured here, and a draft or seed missing from the file is refused."""
    import subprocess
    import sys
    from pathlib import Path

    ranks_file = tmp_path / "ranks.json"
    script = Path(__file__).parents[1] / "benchmarks" / "draft_ranks.py"
    subprocess.run([sys.executable, str(script), "--frames", "2", "--seeds", "0-1", "--check-seeds", "2",
                    "--drafts", "shipped", "cut", "--device", "cpu", "--out", str(ranks_file)], check=True)
    measured = json.loads(ranks_file.read_text())
    assert set(measured["drafts"]) == {"shipped", "cut"} and measured["frames"] == 2
    for entry in measured["drafts"].values():
        ranks = [entry["ranks"][s] for s in ("0", "1")]
        assert entry["mc_sim_7b_63"] == ts.replayed(ranks, ts.MC_SIM_7B_63)
        assert entry["rank_profile"] == ts.rank_profile([torch.tensor(r) for r in ranks], 8)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"card": "a card", "rows": [
        {"path": "fast", "method": "ar", "frames": 2, "step_ms": {"target_step": 7.0}},
        {"path": "fast", "method": "specvlm", "draft": "tree", "drafter": "draft", "frames": 2, "ratio": 0.5,
         "step_ms": {"draft_step": 1.1, "draft_feed": 1.3, "draft_level": 1.2, "verify": 8.0}}]}))
    out = tmp_path / "tree.json"
    common = ["--bench", str(bench), "--frames", "2", "--seeds", "0", "1", "--sizes", "4", "6", "--depths", "2", "3",
              "--out", str(out)]
    assert ts.main([*common, "--check-seeds", "2", "--ranks", f"{ranks_file}:cut"]) == 0
    saved = json.loads(out.read_text())
    assert saved["ranks"] == {s: measured["drafts"]["cut"]["ranks"][s] for s in ("0", "1")}
    assert saved["check_ranks"] == {"2": measured["drafts"]["cut"]["ranks"]["2"]}
    assert "draft cut" in saved["pair"] and "draft cut" in saved["assumptions"]
    refused = {f"{ranks_file}:other": ("--check-seeds", "2", "no draft 'other'"),  # a draft the file lacks
               f"{ranks_file}:cut": ("--check-seeds", "3", "missing: [3]"),  # a seed it lacks
               str(ranks_file): ("--check-seeds", "2", "FILE:DRAFT"),  # no draft named
               f"{tmp_path / 'absent.json'}:cut": ("--check-seeds", "2", "cannot read")}
    for bad, (flag, seed, message) in refused.items():
        with pytest.raises(SystemExit):
            ts.main([*common, flag, seed, "--ranks", bad])
        assert message in capsys.readouterr().err, bad
    other_length = tmp_path / "ranks_3_frames.json"
    other_length.write_text(json.dumps({**measured, "frames": 3}))
    with pytest.raises(SystemExit):  # ranked at another length than asked
        ts.main([*common, "--check-seeds", "2", "--ranks", f"{other_length}:cut"])
    assert "holds 3 frames" in capsys.readouterr().err
