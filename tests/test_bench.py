"""The benchmark's bookkeeping (timings themselves are measured on a GPU, never asserted)."""

import json

import specvlm as sv
from specvlm.bench import RUNS, bench, save, table


def test_bench_rows_compare_every_method_with_ar(tiny_pair, tmp_path):
    result = bench(tiny_pair, lambda frames: sv.sample_video("bikes", frames), [1], max_new_tokens=6, repeats=1)
    assert len(result["rows"]) == len(RUNS)
    assert all(row["equal_to_ar"] for row in result["rows"])
    assert all(row["speedup_vs_ar"] is not None and row["new_tokens"] <= 6 for row in result["rows"])
    assert {"device", "torch", "transformers", "date", "pair"} <= set(result)
    save(result, tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["method"] == "ar"
    assert "specvlm" in table(result)


def test_bench_fast_path_rows_match_plain_ar_and_report_the_capture(tiny_pair):
    result = bench(tiny_pair, lambda frames: sv.sample_video("bikes", frames), [1], max_new_tokens=6, repeats=1,
                   paths=("plain", "fast"))
    assert [row["path"] for row in result["rows"]] == ["plain"] * len(RUNS) + ["fast"] * len(RUNS)
    assert all(row["equal_to_ar"] and row["speedup_vs_plain_ar"] is not None for row in result["rows"])
    plain = [row["mean_accepted"] for row in result["rows"] if row["path"] == "plain"]
    fast = [row["mean_accepted"] for row in result["rows"] if row["path"] == "fast"]
    assert plain == fast
    assert result["fast_path"]["models"]["target"]["cuda_graphs"] is False  # CPU: eager static steps


def test_bench_times_transformers_generate_and_assisted_generation_against_ar(tiny_pair):
    result = bench(tiny_pair, lambda frames: sv.sample_video("bikes", frames), [1], max_new_tokens=6, repeats=1,
                   transformers_baselines=True)
    hf = [row for row in result["rows"] if row["path"] == "transformers"]
    assert [row["method"] for row in hf] == ["hf-generate", "hf-assisted"]
    assert all(row["equal_to_ar"] and row["speedup_vs_ar_total"] > 0 for row in hf)
    assert hf[1]["draft_video_tokens"] == hf[1]["video_tokens"]  # the assistant sees the whole video
    assert all(row["total_s"] > 0 for row in result["rows"])
    assert "hf-assisted" in table(result)
