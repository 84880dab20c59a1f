"""Predicted speedups from step costs: hand-computed rounds, interpolation, pruning gain."""

import json
from pathlib import Path

import numpy as np
import pytest

from specvlm import cost_model as cm
from specvlm.trees import MC_SIM_7B_63, chain

FIGURES = Path(__file__).resolve().parents[1] / "figures"


def test_chain_speedup_hand_computed():
    # all 5 accepted: 6 tokens for 5 draft steps (1 ms) + one verification (10 ms), AR step 10 ms
    assert cm.chain_speedup([0, 0, 0, 0, 0, 1], k=5, t_draft=1, t_verify=10, t_ar=10) == pytest.approx(4.0)
    assert cm.chain_speedup(5.0, k=5, t_draft=1, t_verify=10, t_ar=10) == pytest.approx(4.0)
    # nothing accepted: one token for 15 ms, slower than AR
    assert cm.chain_speedup([7], k=5, t_draft=1, t_verify=10, t_ar=10) == pytest.approx(10 / 15)


def test_histogram_and_tokens_per_round():
    assert cm.histogram([2, 0, 2, 3]) == [1, 0, 2, 1]
    assert cm.tokens_per_round([1, 0, 2, 1]) == pytest.approx(2.75)
    assert cm.tokens_per_round(cm.histogram([2, 0, 2, 3])) == pytest.approx(sum([2, 0, 2, 3]) / 4 + 1)
    assert cm.tokens_per_round(2.5) == 3.5
    for bad in ([], [0, 0], [-1, 2]):
        with pytest.raises(ValueError):
            cm.tokens_per_round(bad)
    with pytest.raises(ValueError):
        cm.histogram([1, -1])


def test_tree_round_has_one_draft_pass_per_level():
    assert cm.draft_passes(MC_SIM_7B_63) == [1, 4, 4, 1, 1]
    assert cm.tree_round_ms(MC_SIM_7B_63, 1.0, 12.0) == pytest.approx(17.0)
    assert cm.tree_speedup(2.0, MC_SIM_7B_63, t_draft=1, t_verify=12, t_ar=10) == pytest.approx(30 / 17)
    # a chain drawn as a tree costs what the chain costs
    assert cm.draft_passes(chain(5)) == [1] * 5
    assert cm.tree_round_ms(chain(5), 1.5, 9.0) == cm.chain_round_ms(5, 1.5, 9.0)
    assert cm.tree_round_ms(MC_SIM_7B_63, 1.0, 12.0, t_feed=2.0, t_level=1.5, wide_feed=0.5) == pytest.approx(19.5)
    assert cm.tree_round_ms(MC_SIM_7B_63, 1.0, 12.0, t_feed=2.0, wide_feed=0.0) == pytest.approx(17.0)
    assert cm.wide_feed_share([1, 2, 1]) == 0.75 and cm.wide_feed_share(0.0) == 0.0 and cm.wide_feed_share(2.5) == 1.0
    assert cm.wide_feed_share(np.float32(2.5)) == 1.0  # a mean of numpy's, as tokens_per_round takes it


def test_interpolate_is_linear_and_extends_end_segments():
    assert cm.interpolate([1000, 3000], [2, 4], 2000) == pytest.approx(3.0)
    assert cm.interpolate([3000, 1000], [4, 2], 5000) == pytest.approx(6.0)
    assert cm.interpolate([1000, 3000], [2, 4], 0) == pytest.approx(1.0)
    assert cm.interpolate([1000, 2000, 4000], [1, 3, 4], 3000) == pytest.approx(3.5)
    with pytest.raises(ValueError):
        cm.interpolate([1000, 1000], [1, 2], 5)


def _result(draft_ms, target_ms=None, contexts=(1000, 10000), floor=0.1, k=5):
    """A costs result with step costs given as functions of context."""
    target_ms = target_ms or {"step": lambda c: 10.0, "chain": lambda c: 12.0, "tree": lambda c: 14.0}
    rows = []
    for c in contexts:
        for kind, f in target_ms.items():
            rows.append({"shape": "t", "path": "sdpa", "kind": kind, "context": c, "ms": f(c), "floor_ms": floor})
        rows.append({"shape": "d", "path": "sdpa", "kind": "step", "context": c, "ms": draft_ms(c), "floor_ms": floor})
    return {"device": "test card", "k": k, "rows": rows}


def test_cost_table_interpolates_and_respects_the_floor():
    table = cm.CostTable(_result(lambda c: 1 + c / 1000))
    assert table.ms("d", "step", 5500) == pytest.approx(6.5)
    assert table.ms("d", "step", 0) == pytest.approx(1.0)
    steep = cm.CostTable(_result(lambda c: 2 * c / 1000 - 1.9, floor=0.5))  # extrapolates to -1.9 at 0
    assert steep.ms("d", "step", 0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="eager"):
        cm.CostTable(_result(lambda c: 1.0), path="eager")
    with pytest.raises(ValueError, match="shape 'x'"):
        table.ms("x", "step", 10)


def test_pruning_gain_hand_computed():
    table = cm.CostTable(_result(lambda c: 1 + c / 1000))
    # SD draft at 10000 tokens: 11 ms; SpecVLM keeps 2500: 3.5 ms; chain verification 12 ms
    gain = cm.pruning_gain(table, "t", "d", video_tokens=10000, ratio=0.75, acceptance_sd=3.0)
    assert gain == pytest.approx((5 * 11 + 12) / (5 * 3.5 + 12))
    sd = cm.predict(table, "t", "d", 10000, 10000, 3.0)
    assert sd["speedup"] == pytest.approx(4 * 10 / 67)
    assert sd["draft_share"] == pytest.approx(55 / 67)
    # lower acceptance under pruning scales the gain by the ratio of tokens per round
    lower = cm.pruning_gain(table, "t", "d", 10000, 0.75, acceptance_sd=3.0, acceptance_specvlm=2.0)
    assert lower == pytest.approx(gain * 3 / 4)
    # a tree drafts `depth` passes: 5 * 11 + 14 vs 5 * 3.5 + 14
    tree_gain = cm.pruning_gain(table, "t", "d", 10000, 0.75, 3.0, tree=MC_SIM_7B_63)
    assert tree_gain == pytest.approx((55 + 14) / (17.5 + 14))


def test_pruning_gain_is_one_when_draft_steps_ignore_context():
    table = cm.CostTable(_result(lambda c: 2.0))
    assert cm.pruning_gain(table, "t", "d", 50000, 0.9, [1, 2, 3]) == pytest.approx(1.0)


def test_sweep_gain_grows_with_video_length():
    table = cm.CostTable(_result(lambda c: 1 + c / 1000))
    rows = cm.sweep_video_length(table, "t", "d", [1000, 4000, 16000, 64000], 0.9, acceptance_sd=3.0, text_tokens=50)
    gains = [r["gain"] for r in rows]
    assert all(a < b for a, b in zip(gains, gains[1:]))
    assert all(r["draft_share_specvlm"] < r["draft_share_sd"] for r in rows)
    assert [r["draft_video_tokens"] for r in rows] == [99, 399, 1599, 6399]  # int(n * (1 - 0.9)): float rounding


def test_predict_refuses_a_chain_of_another_length():
    table = cm.CostTable(_result(lambda c: 1.0))
    with pytest.raises(ValueError, match="k=5"):
        cm.predict(table, "t", "d", 1000, 1000, 2.0, k=3)


def _bench(step_ms=True):
    ar = {"frames": 8, "method": "ar", "draft": None, "ratio": 0.0, "mean_accepted": 0.0, "speedup_vs_ar": 1.0,
          "decode_s": 1.0, "rounds": 0, "new_tokens": 101, "video_tokens": 1000, "draft_video_tokens": None}
    sd = {"frames": 8, "method": "sd", "draft": "chain", "ratio": 0.0, "mean_accepted": 5.0, "speedup_vs_ar": 3.5,
          "decode_s": 0.3, "rounds": 20, "new_tokens": 101, "video_tokens": 1000, "draft_video_tokens": 1000}
    if step_ms:
        ar["step_ms"] = {"target_step": 10.0}
        sd["step_ms"] = {"draft_step": 1.0, "verify": 10.0}
    return {"k": 5, "rows": [ar, sd]}


def test_predicted_vs_measured_uses_the_runs_step_timings():
    (row,) = cm.predicted_vs_measured(_bench())
    assert row["source"] == "run"
    assert row["predicted"] == pytest.approx(4.0)
    assert row["measured"] == 3.5
    assert row["measured_round_ms"] == pytest.approx(15.0)
    assert row["predicted_round_ms"] == pytest.approx(15.0)


def test_tree_rows_use_their_wider_draft_passes():
    bench = _bench()
    tree = {**bench["rows"][1], "draft": "tree", "accepted_hist": [5, 5, 10], "mean_accepted": 1.25,
            "step_ms": {"draft_step": 1.0, "verify": 12.0, "draft_feed": 3.0, "draft_level": 2.0}}
    (row,) = cm.predicted_vs_measured({"k": 5, "rows": [bench["rows"][0], tree]})
    assert row["predicted_round_ms"] == pytest.approx(0.75 * 3.0 + 0.25 * 1.0 + 4 * 2.0 + 12.0)
    del tree["step_ms"]["draft_feed"], tree["step_ms"]["draft_level"]
    (row,) = cm.predicted_vs_measured({"k": 5, "rows": [bench["rows"][0], tree]})
    assert row["predicted_round_ms"] == pytest.approx(5 * 1.0 + 12.0)


def test_a_tree_row_is_costed_with_the_tree_it_records():
    bench = _bench()
    tree = {**bench["rows"][1], "draft": "tree", "accepted_hist": [0, 1], "mean_accepted": 1.0,
            "step_ms": {"draft_step": 1.0, "verify": 12.0}}
    deep = {**tree, "tree": {"name": "deep", "paths": [[0] * d for d in range(1, 9)]}}
    assert cm.row_tree(tree) == MC_SIM_7B_63 and cm.row_tree(deep) == chain(8)
    assert cm.row_tree(bench["rows"][0]) is None and cm.row_tree(bench["rows"][1]) is None  # AR, a chain
    default, eight = cm.predicted_vs_measured({"k": 5, "rows": [bench["rows"][0], tree, deep]})
    assert default["predicted_round_ms"] == pytest.approx(5 * 1.0 + 12.0)
    assert eight["predicted_round_ms"] == pytest.approx(8 * 1.0 + 12.0)  # one pass per level of its own tree
    assert (default["tree_name"], eight["tree_name"]) == ("mc_sim_7b_63", "deep")
    # a costs table's "tree" verification was timed for its own tree: it predicts only trees of that size
    table = cm.CostTable(_result(lambda c: 1.0))
    assert table.tree_nodes == MC_SIM_7B_63.num_nodes
    no_steps = [{**r, "step_ms": {}, "video_tokens": 1000} for r in (tree, deep)]
    default, eight = cm.predicted_vs_measured({"k": 5, "rows": no_steps}, table, "t", "d")
    assert default["source"] == "table" and default["predicted_round_ms"] == pytest.approx(5 * 1.0 + 14.0)
    assert eight["source"] is None and eight["predicted"] is None


def test_a_fast_runs_rounds_pay_one_launch_on_an_idle_device():
    assert cm.launch_ms({"draft_step": 1.5, "draft_step_synced": 2.25}) == pytest.approx(0.75)
    assert cm.launch_ms({"draft_step": 1.5}) == 0.0
    assert cm.launch_ms({"draft_step": 1.5, "draft_step_synced": 1.0}) == 0.0  # noise never subtracts
    bench = _bench()
    bench["rows"][1]["step_ms"]["draft_step_synced"] = 2.0
    (chain,) = cm.predicted_vs_measured(bench)
    assert chain["predicted_round_ms"] == pytest.approx(5 * 1.0 + 10.0 + 1.0)
    tree = {**bench["rows"][1], "draft": "tree", "accepted_hist": [0, 1]}
    (row,) = cm.predicted_vs_measured({"k": 5, "rows": [bench["rows"][0], tree]})
    assert row["predicted_round_ms"] == pytest.approx(5 * 1.0 + 10.0 + 1.0)


def test_a_fast_tree_round_adds_its_picks_acceptance_and_move():
    assert cm.glue_ms({"draft_picks": 0.2, "accept_synced": 0.3, "target_move": 0.1}, move_share=0.5) == \
        pytest.approx(0.55)
    assert cm.glue_ms({"draft_picks": 0.2, "accept_synced": 0.3, "target_move": 0.1}) == pytest.approx(0.6)
    assert cm.glue_ms({"draft_step": 1.0}) == 0.0
    bench = _bench()
    glue = {"draft_picks": 0.25, "accept_synced": 0.5, "target_move": 0.125}
    tree = {**bench["rows"][1], "draft": "tree", "accepted_hist": [0, 1],
            "step_ms": {**bench["rows"][1]["step_ms"], **glue}}
    (row,) = cm.predicted_vs_measured({"k": 5, "rows": [bench["rows"][0], tree]})
    assert row["predicted_round_ms"] == pytest.approx(5 * 1.0 + 10.0 + 0.875)
    tree["accepted_hist"] = [1, 1]  # half the rounds accepted nothing: no move after them
    (row,) = cm.predicted_vs_measured({"k": 5, "rows": [bench["rows"][0], tree]})
    assert row["predicted_round_ms"] == pytest.approx(5 * 1.0 + 10.0 + 0.75 + 0.5 * 0.125)
    chain = {**bench["rows"][1], "step_ms": {**bench["rows"][1]["step_ms"], **glue}}
    (row,) = cm.predicted_vs_measured({"k": 5, "rows": [bench["rows"][0], chain]})
    assert row["predicted_round_ms"] == pytest.approx(5 * 1.0 + 10.0)  # a chain round has no tree glue


def test_ar_passes_of_each_path():
    assert cm.ar_passes(33, 64, queued_ahead=True) == 33  # the step queued after the end token runs too
    assert cm.ar_passes(33, 64, queued_ahead=False) == 32
    assert cm.ar_passes(64, 64, queued_ahead=True) == 63  # the limit kept the last step from being queued
    assert cm.ar_passes(63, 64, queued_ahead=True) == 63
    assert cm.ar_passes(1, 64, queued_ahead=True) == 0  # the prefill's token was the end
    with pytest.raises(ValueError, match="1..max_new_tokens"):
        cm.ar_passes(65, 64, queued_ahead=True)
    assert cm.ar_queued_ahead({"path": "fast", "step_ms": {"target_step": 7.0, "target_step_synced": 7.1}})
    assert not cm.ar_queued_ahead({"path": "fast", "step_ms": {"target_step": 7.0}})  # a run from before the queued AR
    assert not cm.ar_queued_ahead({"path": "plain", "step_ms": {"target_step": 7.0, "target_step_synced": 7.1}})


def test_a_finished_run_is_predicted_from_the_passes_both_sides_paid_for():
    """6 rounds commit 5 + 5 * 6 = 35 tokens by their histogram, but the answer has 33, the first
    from the prefill: the fast AR ran 33 passes, the speculative side 6 rounds."""
    ar = {"path": "fast", "frames": 8, "method": "ar", "draft": None, "ratio": 0.0, "mean_accepted": 0.0,
          "speedup_vs_ar": 1.0, "decode_s": 0.33, "rounds": 0, "new_tokens": 33, "video_tokens": 1000,
          "step_ms": {"target_step": 10.0, "target_step_synced": 10.5}}
    tree = {**ar, "method": "specvlm", "draft": "tree", "ratio": 0.5, "speedup_vs_ar": 2.75, "decode_s": 0.12,
            "rounds": 6, "accepted_hist": [0, 0, 0, 0, 1, 5], "mean_accepted": 29 / 6,
            "step_ms": {"draft_step": 1.0, "verify": 15.0}}
    (rate,) = cm.predicted_vs_measured({"k": 5, "rows": [ar, tree]})
    assert rate["finished_share"] == 1.0 and rate["predicted"] == pytest.approx(35 / 6 * 10 / 20)
    (row,) = cm.predicted_vs_measured({"k": 5, "max_new_tokens": 64, "rows": [ar, tree]})
    assert row["predicted_round_ms"] == pytest.approx(5 * 1.0 + 15.0)
    assert row["finished_share"] == pytest.approx(33 / 35)
    assert row["predicted"] == pytest.approx(33 * 10 / (6 * 20))
    plain = [{**r, "path": "plain"} for r in (ar, tree)]
    (row,) = cm.predicted_vs_measured({"k": 5, "max_new_tokens": 64, "rows": plain})
    assert row["predicted"] == pytest.approx(32 * 10 / (6 * 20))
    waited = {**ar, "step_ms": {"target_step": 10.0}}  # a fast AR that waited for each token: no step past the end
    (row,) = cm.predicted_vs_measured({"k": 5, "max_new_tokens": 64, "rows": [waited, tree]})
    assert row["predicted"] == pytest.approx(32 * 10 / (6 * 20))
    (row,) = cm.predicted_vs_measured({"k": 5, "max_new_tokens": 32, "rows": [ar, tree]})  # contradicts the answer
    assert row["finished_share"] is None and row["predicted"] is None and row["measured"] == 2.75
    mean_only = {**tree, "accepted_hist": None}
    (row,) = cm.predicted_vs_measured({"k": 5, "max_new_tokens": 64, "rows": [ar, mean_only]})
    assert row["finished_share"] == 1.0


def test_predicted_vs_measured_degrades_without_step_timings():
    (row,) = cm.predicted_vs_measured(_bench(step_ms=False))
    assert row["source"] is None and row["predicted"] is None and row["measured"] == 3.5
    table = cm.CostTable(_result(lambda c: 1.0))
    (row,) = cm.predicted_vs_measured(_bench(step_ms=False), table, target="t", draft="d")
    assert row["source"] == "table"
    assert row["predicted"] == pytest.approx(6 * 10 / (5 * 1 + 12))


def test_predicted_vs_measured_reads_the_committed_bench_json():
    path = sorted(FIGURES.glob("bench_tiny_*.json"))[0]
    bench = json.loads(path.read_text())
    rows = cm.predicted_vs_measured(path)
    assert len(rows) == sum(r["method"] != "ar" for r in bench["rows"])
    assert all(r["tokens_per_round"] >= 1 and r["measured_round_ms"] > 0 for r in rows)


def test_predicted_vs_measured_takes_the_ar_step_of_the_same_path_and_skips_transformers_rows():
    plain = _bench()
    fast = _bench()
    for row in plain["rows"]:
        row["path"] = "plain"
    for row in fast["rows"]:
        row["path"] = "fast"
    fast["rows"][0]["step_ms"] = {"target_step": 5.0}
    hf = {"path": "transformers", "frames": 8, "method": "hf-generate", "total_s": 2.0, "equal_to_ar": True}
    rows = cm.predicted_vs_measured({"k": 5, "rows": plain["rows"] + fast["rows"] + [hf]})
    assert [(r["path"], r["method"]) for r in rows] == [("plain", "sd"), ("fast", "sd")]
    assert rows[0]["predicted"] == pytest.approx(4.0)  # t_ar 10 ms from the plain AR row
    assert rows[1]["predicted"] == pytest.approx(2.0)  # t_ar 5 ms from the fast AR row
