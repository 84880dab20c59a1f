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
