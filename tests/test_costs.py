"""The step-cost harness on the tiny shape, on a CPU: structure, bytes and floors (never timings)."""

import json

import pytest
import torch
from transformers import Qwen2Config

from specvlm import costs
from specvlm.__main__ import main
from specvlm.trees import MC_SIM_7B_63

CONTEXTS = [32, 96]


@pytest.fixture(scope="module")
def result():
    return costs.measure_costs(["tiny"], CONTEXTS, ["eager", "sdpa"], device="cpu", repeats=2, warmup=1)


def test_shapes_match_the_checkpoints():
    # config.json fields: hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    shape = lambda name: tuple(getattr(costs.lm_config(name), f) for f in fields)
    assert shape("llava-ov-7b") == shape("qwen2.5-vl-7b") == (3584, 28, 28, 4, 18944)
    assert shape("llava-ov-0.5b") == (896, 24, 14, 2, 4864)
    assert shape("qwen2.5-vl-32b") == (5120, 64, 40, 8, 27648)
    # published sizes: Qwen2-7B 7.62B parameters, Qwen2-0.5B 0.49B (its vocabulary is 64 smaller)
    assert costs.num_params(costs.lm_config("qwen2.5-vl-7b")) / 1e9 == pytest.approx(7.62, abs=0.005)
    assert (costs.num_params(costs.lm_config("llava-ov-0.5b")) - 64 * 896) / 1e9 == pytest.approx(0.494, abs=0.0005)
    with pytest.raises(ValueError, match="unknown shape"):
        costs.lm_config("llava-ov-8b")


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_and_weight_bytes_match_a_built_model(tied):
    config = Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=48, vocab_size=100, tie_word_embeddings=tied)
    model = costs.build_lm(config, "cpu", torch.float32)
    assert sum(p.numel() for p in model.parameters()) == costs.num_params(config)
    read = sum(p.numel() for n, p in model.named_parameters() if tied or "embed_tokens" not in n) * 4
    assert costs.weight_bytes(config, torch.float32) == read
    assert costs.weight_bytes(config, torch.bfloat16) * 2 == read


def test_random_model_is_random_and_finite():
    model = costs.build_lm("tiny", "cpu", torch.float32, seed=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the 0.5B
    matrices = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    assert all(p.std() > 0.01 for p in matrices)
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if n.endswith("norm.weight"))
    fresh = type(model.model.rotary_emb)(model.config)
    assert torch.equal(model.model.rotary_emb.inv_freq, fresh.inv_freq)
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_steps_restore_the_cache_and_paths_agree():
    model = costs.build_lm("tiny", "cpu", torch.float32)
    for query_len, tree in [(1, None), (6, None), (MC_SIM_7B_63.num_nodes, MC_SIM_7B_63)]:
        eager = costs.PATHS["eager"](model, 40, query_len, tree)
        first = eager()
        assert first.shape == (1, query_len, model.config.vocab_size)
        assert torch.equal(eager(), first)  # the cache is back at 40 tokens after each call
        sdpa = costs.PATHS["sdpa"](model, 40, query_len, tree)
        torch.testing.assert_close(sdpa(), first, rtol=1e-4, atol=1e-5)


def test_rows_have_the_fields_and_growing_bytes(result):
    assert {"device", "dtype", "torch", "transformers", "date", "bandwidth_GBps", "k", "rows", "shapes"} <= set(result)
    assert result["bandwidth_GBps"] > 0
    assert len(result["rows"]) == len(CONTEXTS) * 2 * len(costs.KINDS)
    assert json.loads(json.dumps(result)) == result
    for row in result["rows"]:
        assert {"shape", "path", "kind", "context", "query_len", "ms", "floor_ms"} <= set(row)
        assert row["skipped"] is None and row["ms"] > 0 and row["floor_ms"] > 0
    queries = {r["kind"]: r["query_len"] for r in result["rows"]}
    assert queries == {"step": 1, "chain": result["k"] + 1, "tree": 26}
    for path in ("eager", "sdpa"):
        for kind in costs.KINDS:
            rows = sorted((r for r in result["rows"] if r["path"] == path and r["kind"] == kind),
                          key=lambda r: r["context"])
            assert [r["context"] for r in rows] == CONTEXTS
            assert rows[0]["kv_bytes"] < rows[1]["kv_bytes"] and rows[0]["floor_ms"] < rows[1]["floor_ms"]
    config = costs.lm_config("tiny")
    row = next(r for r in result["rows"] if r["kind"] == "step" and r["context"] == CONTEXTS[0])
    assert row["kv_bytes"] == costs.kv_bytes(config, CONTEXTS[0] + 1, torch.float32)
    assert row["floor_ms"] == pytest.approx(1000 * (row["weight_bytes"] + row["kv_bytes"]) / (result["bandwidth_GBps"] * 1e9))


def test_a_path_is_a_factory_and_out_of_memory_is_skipped():
    calls = []

    def counting(model, context_len, query_len, tree=None):
        calls.append((context_len, query_len, tree is not None))
        return lambda: None

    def too_big(model, context_len, query_len, tree=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    result = costs.measure_costs(["tiny"], [16], ["counting", "too_big"], device="cpu", repeats=1, warmup=0,
                                 factories={"counting": counting, "too_big": too_big})
    assert calls == [(16, 1, False), (16, 6, False), (16, 26, True)]
    skipped = [r for r in result["rows"] if r["path"] == "too_big"]
    assert all(r["ms"] is None and r["skipped"].startswith("out of memory") and r["floor_ms"] > 0 for r in skipped)
    with pytest.raises(ValueError, match="unknown path"):
        costs.measure_costs(["tiny"], [16], ["fast"], device="cpu")


def test_plot_has_one_panel_per_shape(result, tmp_path):
    costs.save(result, tmp_path / "costs.json")
    fig = costs.plot_costs(tmp_path / "costs.json")
    assert len(fig.axes) == 1
    assert "random weights at tiny LM shapes" in fig._suptitle.get_text()
    assert fig.axes[0].get_xscale() == "log"


def test_command_line_writes_json_named_after_the_card(tmp_path):
    out = tmp_path / "costs_{card}.json"
    assert main(["costs", "--shapes", "tiny", "--contexts", "16", "--paths", "sdpa", "--repeats", "1",
                 "--warmup", "0", "--device", "cpu", "--out", str(out)]) == 0
    (written,) = tmp_path.glob("costs_*.json")
    result = json.loads(written.read_text())
    assert written.name == f"costs_{costs.card_slug(result['device'])}.json"
    assert {r["path"] for r in result["rows"]} == {"sdpa"}
