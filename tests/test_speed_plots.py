"""Speed figures: drawn from hand-made results, one bar or line per row, titles naming the source."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from specvlm import cost_model, speed_plots


def bench_row(path, frames, method, draft=None, ratio=0.0, decode_s=0.1, new_tokens=20, speedup=1.0, equal=True):
    return {"path": path, "frames": frames, "video_tokens": 64 * frames + 1, "method": method, "draft": draft,
            "ratio": ratio, "new_tokens": new_tokens, "equal_to_ar": equal, "mean_accepted": 2.0, "rounds": 5,
            "decode_s": decode_s, "speedup_vs_ar": speedup if equal else None, "draft_video_tokens": None}


@pytest.fixture
def bench():
    rows = []
    for path, ar_s in (("plain", 0.2), ("fast", 0.05)):
        for frames in (16, 64):
            rows += [bench_row(path, frames, "ar", decode_s=ar_s),
                     bench_row(path, frames, "sd", "chain", speedup=0.8),
                     bench_row(path, frames, "specvlm", "tree", 0.9, speedup=1.3)]
    rows[-1] = bench_row("fast", 64, "specvlm", "tree", 0.9, equal=False)  # a run that differs from AR
    return {"pair": "test pair (stand-in)", "device": "Test GPU", "dtype": "torch.float32", "k": 5, "rows": rows}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_run_label():
    assert speed_plots.run_label({"method": "specvlm", "draft": "tree", "ratio": 0.9}) == "SpecVLM tree 90%"
    assert speed_plots.run_label({"method": "specvlm", "draft": "tree", "ratio": 0.5,
                                  "tree": {"name": "grown"}}) == "SpecVLM tree (grown) 50%"
    assert speed_plots.run_label({"method": "sd", "draft": "tree", "tree": {"name": "mc_sim_7b_63"}}) == "SD tree"
    assert speed_plots.run_label({"method": "sd", "draft": "chain", "ratio": 0.0}) == "SD chain"
    assert speed_plots.run_label({"method": "ar", "draft": None, "ratio": 0.0}) == "AR"
    assert speed_plots.run_label({"method": "uniform", "draft": "tree", "ratio": 0.5}) == "uniform tree 50%"
    # the target drafting for itself is another run than the draft model drafting: labels must differ
    assert speed_plots.run_label({"method": "specvlm", "draft": "tree", "ratio": 0.5, "drafter": "self"}) == \
        "self SpecVLM tree 50%"


def test_rows_without_a_path_are_plain(bench):
    old = {**bench, "rows": [{k: v for k, v in r.items() if k != "path"} for r in bench["rows"][:3]]}
    assert {r["path"] for r in speed_plots.bench_rows(old)} == {"plain"}
    assert len(speed_plots.bench_rows(bench, "fast", 64)) == 3


def test_speedup_bars_one_per_equal_run(bench, tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    fig = speed_plots.plot_speedups(tmp_path / "bench.json")
    assert len(fig.axes) == 2  # 16 and 64 frames
    heights = sorted(round(p.get_height(), 3) for ax in fig.axes for p in ax.patches)
    # 2 paths x 2 frame counts x 2 runs, less the one that differs from AR
    assert heights == sorted([0.8] * 4 + [1.3] * 3)
    marked = [t.get_text() for t in fig.axes[1].texts]
    assert marked == ["not = AR"]
    assert "test pair (stand-in) on Test GPU (float32)" in fig._suptitle.get_text()


def test_speedups_leave_out_rows_timed_end_to_end_only(bench):
    """Older runs timed transformers' rows end to end only (no `speedup_vs_ar`): no bar, no crash."""
    hf = {k: v for k, v in bench["rows"][1].items() if k != "speedup_vs_ar"}
    hf.update(path="transformers", method="hf-generate", draft=None, speedup_vs_ar_total=0.4)
    fig = speed_plots.plot_speedups({**bench, "rows": bench["rows"] + [hf]})
    assert "hf-generate" not in [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(fig.axes[0].patches) == len(speed_plots.plot_speedups(bench).axes[0].patches) == 4


def test_speedups_mark_a_baseline_that_raised(bench):
    failed = {k: v for k, v in bench["rows"][1].items() if k not in ("speedup_vs_ar", "decode_s")}
    failed.update(path="transformers", method="hf-assisted", draft="assistant", equal_to_ar=False,
                  speedup_vs_ar_total=None, error="ValueError: refused")
    fig = speed_plots.plot_speedups({**bench, "rows": bench["rows"] + [failed]})
    assert "hf-assisted assistant" in [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert [t.get_text() for t in fig.axes[0].texts] == ["error"]


def test_every_path_is_in_the_legend_once_with_its_own_colour(bench):
    """A path whose first run is not the first label (transformers' rows come last) still gets its entry."""
    hf = {**bench["rows"][1], "path": "transformers", "method": "hf-generate", "draft": None, "ratio": 0.0,
          "speedup_vs_ar": 0.3}
    late = {**hf, "frames": 64, "video_tokens": bench["rows"][-1]["video_tokens"], "path": "only-in-64-frames"}
    fig = speed_plots.plot_speedups({**bench, "rows": bench["rows"] + [hf, late]})  # the last: only in the second panel
    legend = fig.axes[0].get_legend()
    labels = [text.get_text() for text in legend.get_texts()]
    assert sorted(labels) == sorted(set(labels)) == sorted({r.get("path", "plain") for r in bench["rows"]}
                                                           | {"transformers", "only-in-64-frames"})
    assert len({tuple(handle.get_facecolor()) for handle in legend.legend_handles}) == len(labels)


def test_ms_per_token_bars_and_ratio(bench):
    fig = speed_plots.plot_ms_per_token(bench, "ar")
    (ax,) = fig.axes
    assert sorted(round(p.get_height(), 6) for p in ax.patches) == [2.5, 2.5, 10.0, 10.0]  # 1000 * s / 20 tokens
    assert any("plain/fast: 4.0x" in t.get_text() for t in ax.texts)
    assert ax.get_ylabel() == "decode ms per new token"
    with pytest.raises(ValueError, match="no rows of method 'beam'"):
        speed_plots.plot_ms_per_token(bench, "beam")


def test_partial_runs_without_device_and_dtype_get_a_default_title(bench):
    partial = {k: v for k, v in bench.items() if k not in ("device", "dtype")} | {"card": "Test Card", "partial": True}
    assert "test pair (stand-in) on Test Card (dtype not recorded)" in speed_plots.plot_speedups(partial)._suptitle.get_text()
    assert "on Test Card" in speed_plots.plot_ms_per_token(partial).axes[0].get_title()


def test_two_rows_with_one_label_raise_instead_of_hiding_one(bench):
    other_k = {**bench["rows"][2], "speedup_vs_ar": 2.0}  # plain, 16 frames, SpecVLM tree 90%: another k, say
    with pytest.raises(ValueError, match="'SpecVLM tree 90%'"):
        speed_plots.plot_speedups({**bench, "rows": bench["rows"] + [other_k]})
    # a method with several runs: name one by its label
    assert speed_plots.plot_ms_per_token(bench, "SD chain").axes[0].containers
    with pytest.raises(ValueError, match="'sd' on path 'plain' at 16 frames .*SD chain, SD tree.*pass one run's label"):
        speed_plots.plot_ms_per_token({**bench, "rows": bench["rows"] + [bench_row("plain", 16, "sd", "tree")]}, "sd")
    second_ar = {**bench["rows"][0], "decode_s": 1.0}
    with pytest.raises(ValueError, match="'plain' at 16 frames .*AR, AR"):
        speed_plots.plot_ms_per_token({**bench, "rows": bench["rows"] + [second_ar]})


@pytest.mark.parametrize("zero", [{"decode_s": 0.0}, {"new_tokens": 0}])  # 0 ms bars, or no bars at all
@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_ms_per_token_with_nothing_above_zero_keeps_a_visible_axis(bench, zero):
    zeroed = {**bench, "rows": [{**r, **zero} for r in bench["rows"]]}
    bottom, top = speed_plots.plot_ms_per_token(zeroed).axes[0].get_ylim()
    assert bottom == 0 and top > 0


def test_speedups_need_speculative_rows(bench):
    only_ar = {**bench, "rows": [r for r in bench["rows"] if r["method"] == "ar"]}
    with pytest.raises(ValueError, match="no speculative rows"):
        speed_plots.plot_speedups(only_ar)


def costs_result():
    rows = []
    for shape, base in (("big", 10.0), ("small", 5.0)):
        for path, slope in (("eager", 2.0), ("sdpa", 1.0)):
            for kind in ("step", "chain", "tree"):
                for context in (1024, 4096):
                    rows.append({"shape": shape, "path": path, "kind": kind, "context": context, "query_len": 1,
                                 "ms": base + slope * context / 1024, "floor_ms": base / 10 + context / 4096})
    return {"device": "Test GPU", "dtype": "bfloat16", "transformers": "5.24.0", "date": "2026-01-01", "k": 5,
            "tree_nodes": 26, "shapes": {"big": {"params": 7e9}, "small": {"params": 5e8}}, "rows": rows}


def test_cost_curves_plot_time_and_ratio_to_floor():
    result = costs_result()
    fig = speed_plots.plot_cost_curves(result)
    assert len(fig.axes) == 4  # 2 rows x 2 shapes
    ms_ax, ratio_ax = fig.axes[0], fig.axes[2]
    assert ms_ax.get_title() == "big (7.00B params)"
    # 2 paths x 3 kinds + the floor; the ratio panel: 2 x 3 + the line at 1
    assert len(ms_ax.lines) == 7 and len(ratio_ax.lines) == 7
    eager_step = ratio_ax.lines[0].get_ydata()
    assert list(eager_step) == pytest.approx([12.0 / 1.25, 18.0 / 2.0])
    assert "random weights" in fig._suptitle.get_text() and "Test GPU" in fig._suptitle.get_text()
    skipped = {**result, "rows": [{**r, "ms": None} for r in result["rows"]]}
    with pytest.raises(ValueError, match="no timed rows"):
        speed_plots.plot_cost_curves(skipped)


def test_predictions_plot_the_sweep():
    table = cost_model.CostTable(costs_result(), "eager")
    frames = (4, 16)
    rows = cost_model.sweep_video_length(table, "big", "small", [64 * f for f in frames], 0.9, 2.0)
    fig = speed_plots.plot_predictions(frames, {"eager": rows}, title="t")
    speed_ax, gain_ax = fig.axes
    assert len(speed_ax.lines) == 3 and len(gain_ax.lines) == 2  # SD, SpecVLM, 1x; gain, 1x
    assert list(gain_ax.lines[0].get_ydata()) == pytest.approx([r["gain"] for r in rows])
    assert all(r["gain"] > 1 for r in rows)  # the draft's cost grows with context here, so pruning pays
    with pytest.raises(ValueError, match="has 2 rows for 3 frame counts"):
        speed_plots.plot_predictions((4, 16, 64), {"eager": rows}, title="t")
    with pytest.raises(ValueError, match="no scenarios"):
        speed_plots.plot_predictions(frames, {}, title="t")
    with pytest.raises(TypeError, match="title"):  # a figure must say where its numbers come from
        speed_plots.plot_predictions(frames, {"eager": rows})


def test_round_parts_add_up_to_the_decode_per_round_and_the_plot_needs_timelines(bench):
    timeline = {"rounds": 4, "new_tokens": 13, "decode_ms": 100.0, "busy_ms": 70.0, "idle_ms": 30.0,
                "phases": {"draft": {"busy_ms": 30.0}, "verify": {"busy_ms": 38.0}},
                "idle_by_transition": {"draft>draft": {"ms": 12.0, "gaps": 9}, "accept>draft": {"ms": 6.0, "gaps": 3},
                                       "start>draft": {"ms": 1.0, "gaps": 1}, "verify>verify": {"ms": 2.0, "gaps": 5}}}
    parts = speed_plots.round_parts(timeline)
    assert list(parts) == [label for label, _ in speed_plots.ROUND_PARTS]
    assert sum(parts.values()) == pytest.approx(25.0)  # 100 ms over 4 rounds
    assert parts["idle inside the draft"] == pytest.approx(3.0) and parts["idle between rounds"] == pytest.approx(1.75)
    assert parts["other kernels"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="--timeline"):
        speed_plots.plot_round_timeline(bench)
    bench["rows"][8]["timeline"] = timeline  # fast path, 16 frames, SpecVLM tree 90%
    fig = speed_plots.plot_round_timeline(bench)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["SpecVLM tree 90%"]
    assert "test pair (stand-in)" in fig.axes[0].get_title()
    plt.close(fig)


def _timed_tree(bench):
    """The fast path's 16-frame SpecVLM tree row of `bench`, with step timings; its AR row; the
    64-frame AR row made slower, so an AR row of the wrong frame count would show."""
    ar, tree = bench["rows"][6], bench["rows"][8]  # fast path, 16 frames: AR (0.05 s, 20 tokens), SpecVLM tree 90%
    bench["rows"][9]["decode_s"] = 0.5
    tree.update(accepted_hist=[1, 1, 2], rounds=4, decode_s=0.07,
                step_ms={"draft_step": 1.0, "draft_step_synced": 1.5, "verify": 8.0, "draft_feed": 2.0,
                         "draft_level": 1.5, "draft_picks": 0.5, "accept_synced": 0.25, "target_move": 0.125})
    return ar, tree


def test_round_budget_splits_the_round_and_sets_the_draft_at_its_floor(bench):
    ar, tree = _timed_tree(bench)
    budget = speed_plots.round_budget(bench, draft_floor_ms=0.25, target=2.5)
    parts = budget["measured"]
    share = 0.75  # three of four rounds accepted a token
    assert parts["draft passes"] == pytest.approx(share * 2.0 + (1 - share) * 1.0 + 4 * 1.5)
    assert parts["KV move"] == pytest.approx(share * 0.125) and parts["launch"] == pytest.approx(0.5)
    assert sum(parts.values()) == pytest.approx(1000 * 0.07 / 4) and parts["unexplained"] > 0
    [predicted] = cost_model.predicted_vs_measured({"k": 5, "rows": [{**ar, "step_ms": {"target_step": 2.5}}, tree]})
    assert sum(v for k, v in parts.items() if k != "unexplained") == pytest.approx(predicted["predicted_round_ms"])
    assert budget["at floor"] == {**parts, "draft passes": 5 * 0.25}
    # the round that makes the row `target` times as fast as its AR: the inverse of speedup_vs_ar
    assert budget["allowed_ms"] == pytest.approx(1000 * 0.05 / (2.5 * 4))
    fig = speed_plots.plot_round_budget(bench, draft_floor_ms=0.25, target=2.5, floor_source="a test profile")
    ax = fig.axes[0]
    assert [line.get_xdata()[0] for line in ax.lines] == [pytest.approx(budget["allowed_ms"])]
    assert len(ax.get_legend().get_texts()) == len(parts) and "test pair (stand-in)" in ax.get_title()
    widths = [patch.get_width() for patch in ax.patches]  # per part: the measured bar, then the floor's
    assert widths[0::2] == pytest.approx(list(parts.values()))
    assert widths[1::2] == pytest.approx(list(budget["at floor"].values()))
    assert "a test profile" in ax.get_yticklabels()[1].get_text()


def test_round_budget_marks_timings_that_exceed_the_measured_round(bench):
    _, tree = _timed_tree(bench)
    tree["step_ms"]["verify"] = 20.0  # more than the whole measured round
    budget = speed_plots.round_budget(bench, draft_floor_ms=0.25)
    assert budget["measured"]["unexplained"] < 0
    fig = speed_plots.plot_round_budget(bench, draft_floor_ms=0.25)
    assert min(patch.get_width() for patch in fig.axes[0].patches) >= 0
    over = f"{-budget['measured']['unexplained']:.2f} ms"
    assert sum(over in text.get_text() for text in fig.axes[0].texts) == 2


def test_round_budget_takes_a_tree_row_equal_to_ar_at_the_ratio_asked(bench):
    _, tree = _timed_tree(bench)
    assert speed_plots.round_budget(bench, 0.25, ratio=0.9)["row"] == tree
    with pytest.raises(ValueError, match="at ratio 0.5"):
        speed_plots.round_budget(bench, 0.25, ratio=0.5)
    tree["speedup_vs_ar"] = None  # a row whose tokens differ from AR's has no speedup to budget
    with pytest.raises(ValueError, match="equals AR"):
        speed_plots.round_budget(bench, 0.25)


def test_round_budget_needs_a_timed_tree_row(bench):
    with pytest.raises(ValueError, match="step timings"):
        speed_plots.round_budget(bench, draft_floor_ms=0.25)  # the rows carry no step_ms
    with pytest.raises(ValueError, match="no fast-path tree row"):
        speed_plots.round_budget(bench, draft_floor_ms=0.25, method="sd")  # SD rows here draft chains
