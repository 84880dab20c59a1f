"""The step-cost harness on the tiny shape, on a CPU: structure, bytes and floors (never timings)."""

import json

import pytest
import torch
from transformers import Qwen2Config

import specvlm as sv
from specvlm import costs, decoding, fast, step_attention
from specvlm.__main__ import main
from specvlm.trees import MC_SIM_7B_63

CONTEXTS = [32, 96]


PATHS = ["eager", "sdpa", "fast", "fast-flex", "fast-grouped"]


@pytest.fixture(scope="module")
def result():
    return costs.measure_costs(["tiny"], CONTEXTS, PATHS, device="cpu", repeats=2, warmup=1)


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
    assert len(result["rows"]) == len(CONTEXTS) * len(PATHS) * len(costs.KINDS)
    assert [r["context"] for r in result["rows"]] == sorted(r["context"] for r in result["rows"])
    assert json.loads(json.dumps(result)) == result
    for row in result["rows"]:
        assert {"shape", "path", "kind", "context", "query_len", "ms", "floor_ms"} <= set(row)
        assert row["skipped"] is None and row["ms"] > 0 and row["floor_ms"] > 0 and row["setup_s"] >= 0
    queries = {r["kind"]: r["query_len"] for r in result["rows"]}
    assert queries == {"step": 1, "chain": result["k"] + 1, "tree": 26}
    for path in PATHS:
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
        costs.measure_costs(["tiny"], [16], ["faster"], device="cpu")


def test_a_model_larger_than_the_hosts_memory_is_skipped_before_it_is_built(monkeypatch):
    """On a CPU, a shape whose weights exceed the memory the machine can give is not built (the
    allocator would fail deep inside torch, or the system would kill the process): every row says why."""
    monkeypatch.setattr(costs, "available_host_memory", lambda: 1024)
    monkeypatch.setattr(costs, "build_lm", lambda *args, **kwargs: pytest.fail("built a model that cannot fit"))
    result = costs.measure_costs(["tiny"], [16], ["sdpa"], device="cpu", repeats=1, warmup=0)
    assert result["rows"] and all(r["ms"] is None and "this machine can give 0.0 GiB" in r["skipped"]
                                  for r in result["rows"])
    assert costs.too_big_for_host(10 * 2**30, [torch.device("cpu")], available=8 * 2**30).startswith("model does not fit")
    assert costs.too_big_for_host(10 * 2**30, [torch.device("cpu")], available=16 * 2**30) is None
    assert costs.too_big_for_host(10 * 2**30, [torch.device("cuda", 0)], available=1) is None  # a GPU says so itself


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


# --- the project's fast path and its FlexAttention ------------------------------------------

KINDS = [(1, None), (6, None), (MC_SIM_7B_63.num_nodes, MC_SIM_7B_63)]
GROUPED_7 = Qwen2Config(hidden_size=56, num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2,
                        intermediate_size=64, vocab_size=300, tie_word_embeddings=True)  # 7 heads per KV head


@pytest.mark.parametrize("shape", ["tiny", GROUPED_7], ids=["2-per-kv", "7-per-kv"])
def test_fast_steps_repeat_and_equal_the_sdpa_path(shape):
    model = costs.build_lm(shape, "cpu", torch.float32)
    for query_len, tree in KINDS:
        reference = costs.PATHS["sdpa"](model, 40, query_len, tree)()
        for path in ("fast", "fast-flex", "fast-grouped"):
            step = costs.PATHS[path](model, 40, query_len, tree)
            first = step().clone()
            assert first.shape == (1, query_len, model.config.vocab_size)
            assert torch.equal(step(), first)  # the write position is back at 40 after each call
            torch.testing.assert_close(first, reference, rtol=1e-4, atol=1e-5)


def test_the_flex_engine_serves_every_context_and_the_sdpa_engine_fits_each():
    model = costs.build_lm("tiny", "cpu", torch.float32)
    engines = lambda: model.__dict__["_specvlm_fast_engines"]
    costs.PATHS["fast-flex"](model, 300, 1)()
    flex = engines()[("flex", "None", False, fast.split_min_slots(), None)]
    address = flex.cache.keys[0].data_ptr()
    for context in (300, 40):  # largest first, as measure_costs times them
        step = costs.PATHS["fast-flex"](model, context, 6)
        torch.testing.assert_close(step(), costs.PATHS["sdpa"](model, context, 6)(), rtol=1e-4, atol=1e-5)
        costs.PATHS["fast"](model, context, 6)()
        sdpa = engines()[("sdpa", "None", True, fast.split_min_slots(), None)]
        assert sdpa.cache.capacity == costs.fast.round_up(context + costs.SLACK, 128)
        # a tree verification takes the grouped masked attention under flex: an engine sized for this context
        costs.PATHS["fast-flex"](model, context, MC_SIM_7B_63.num_nodes, MC_SIM_7B_63)()
        wide = engines()[("flex", "None", True, fast.split_min_slots(), None)]
        assert wide.cache.capacity == costs.fast.round_up(context + max(MC_SIM_7B_63.num_nodes, costs.SLACK), 128)
    assert engines()[("flex", "None", False, fast.split_min_slots(), None)] is flex
    assert flex.cache.keys[0].data_ptr() == address
    assert flex.cache.capacity == 384


def _visibility_case(query_len, start, capacity, seed):
    generator = torch.Generator().manual_seed(seed)
    pattern = torch.rand(query_len, query_len, generator=generator) < 0.4
    pattern |= torch.eye(query_len, dtype=torch.bool)  # every row sees itself, as in every step
    return torch.tensor(start), pattern


def _visibility_from_blocks(mask, capacity: int) -> torch.Tensor:
    """[q, capacity] bool: what the kernel reads, from the BlockMask's structure alone: every slot
    of a full block, mask_mod's answer in a partial block, nothing elsewhere (one tile of rows)."""
    q, block = mask.seq_lengths[0], mask.BLOCK_SIZE[1]
    seen = torch.zeros(q, capacity, dtype=torch.bool)
    rows = torch.arange(q)
    for count, indices, full in ((mask.full_kv_num_blocks, mask.full_kv_indices, True),
                                 (mask.kv_num_blocks, mask.kv_indices, False)):
        for b in indices[0, 0, 0, :int(count[0, 0, 0])].tolist():
            slots = torch.arange(b * block, (b + 1) * block)
            seen[:, slots] = True if full else mask.mask_mod(0, 0, rows[:, None], slots[None, :])
    return seen


@pytest.mark.parametrize("query_len", [1, 6, 26, 40])
@pytest.mark.parametrize("start", [0, 100, 127, 250, 358])
def test_flex_attention_equals_sdpa_with_the_additive_mask(query_len, start):
    """Grouped heads 7 per KV head (padded to 8 and split: 26 rows -> 2 calls of 4 heads),
    blocks of 128 slots, the visible span crossing block boundaries."""
    capacity = 384
    start = min(start, capacity - query_len)  # the step must fit in the cache
    start, pattern = _visibility_case(query_len, start, capacity, seed=query_len)
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 14, query_len, 8, generator=generator)
    key, value = (torch.randn(1, 2, capacity, 8, generator=generator) for _ in range(2))
    mask = fast.flex_block_mask(start, pattern, capacity)
    visited = -(-(int(start) + query_len) // fast.FLEX_BLOCK)
    full = int(start) // fast.FLEX_BLOCK  # blocks wholly before start: every row sees them
    assert mask.full_kv_num_blocks.flatten().tolist() == [full]
    assert mask.kv_num_blocks.flatten().tolist() == [visited - full]  # blocks past the last visible slot are skipped
    assert torch.equal(_visibility_from_blocks(mask, capacity), fast.visibility_bias(start, pattern, capacity,
                                                                                     torch.float32)[0, 0] == 0)
    got = fast.grouped_flex(query, key, value, mask, scale=0.3)
    bias = fast.visibility_bias(start, pattern, capacity, torch.float32)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=0.3,
                                                                enable_gqa=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,query_len", [(14, 2, 26), (28, 4, 26), (4, 4, 17), (6, 2, 40)])
def test_grouped_attention_equals_sdpa_with_the_kv_heads_repeated(heads, kv_heads, query_len):
    """The wide steps' attention: query heads stacked per KV head, the mask shared by the group."""
    capacity = 384
    start, pattern = _visibility_case(query_len, 300, capacity, seed=heads)
    generator = torch.Generator().manual_seed(heads + query_len)
    query = torch.randn(1, heads, query_len, 8, generator=generator)
    key, value = (torch.randn(1, kv_heads, capacity, 8, generator=generator) for _ in range(2))
    bias = fast.visibility_bias(start, pattern, capacity, torch.float32)
    got = fast.grouped_attention(query, key, value, bias, scale=0.3)
    groups = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=bias, scale=0.3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    half = fast.grouped_attention(query.bfloat16(), key.bfloat16(), value.bfloat16(), bias.bfloat16(), scale=0.3)
    torch.testing.assert_close(half.float(), expected, rtol=0.02, atol=0.02)
    # a row must not depend on the slots it does not see
    garbage = key.clone()
    garbage[:, :, int(start) + query_len:] = 1e4
    torch.testing.assert_close(fast.grouped_attention(query, garbage, value, bias, scale=0.3), got)


@pytest.mark.parametrize("chunk", [64, 100, 128, 4096])
@pytest.mark.parametrize("start", [0, 1, 63, 64, 200, 300, 358])
def test_split_attention_equals_the_grouped_attention(start, chunk):
    """The committed slots in chunks (the last taking the rest; chunks past `start` unused), the
    step's own slots apart, merged through the log-sum-exp: the whole softmax's result."""
    heads, kv_heads, query_len, capacity = 28, 4, 26, 384
    generator = torch.Generator().manual_seed(start + chunk)
    pattern = (torch.rand(query_len, query_len, generator=generator) < 0.4) | torch.eye(query_len, dtype=torch.bool)
    query = torch.randn(1, heads, query_len, 8, generator=generator)
    key, value = (torch.randn(1, kv_heads, capacity, 8, generator=generator) for _ in range(2))
    start = torch.tensor(start)
    bias = fast.visibility_bias(start, pattern, capacity, torch.float32)
    expected = fast.grouped_attention(query, key, value, bias, scale=0.3)
    got = fast.split_attention(query, key, value, bias, start, query_len, scale=0.3, chunk=chunk)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # a row must not depend on the slots it does not see
    garbage = key.clone()
    garbage[:, :, int(start) + query_len:] = 1e4
    torch.testing.assert_close(fast.split_attention(query, garbage, value, bias, start, query_len, 0.3, chunk), got)
    with pytest.raises(ValueError, match="one sequence"):
        fast.split_attention(query.expand(2, -1, -1, -1), key, value, bias, start, query_len, 0.3, chunk)


def test_float32_scores_of_half_precision_inputs_keep_their_shape_and_dtype():
    """bf16 on CUDA takes torch.bmm(out_dtype=float32) (its shapes checked here on the meta device,
    which has that kernel; on the GPU every benchmark run checks the tokens it leads to)."""
    rows = torch.empty(1, 4, 182, 128, dtype=torch.bfloat16, device="meta")
    key = torch.empty(1, 4, 16512, 128, dtype=torch.bfloat16, device="meta")
    scores = fast.float32_scores(rows, key)
    assert scores.shape == (1, 4, 182, 16512) and scores.dtype == torch.float32
    cpu = fast.float32_scores(torch.ones(1, 2, 3, 4, dtype=torch.bfloat16), torch.ones(1, 2, 5, 4, dtype=torch.bfloat16))
    assert cpu.dtype == torch.float32 and torch.equal(cpu, torch.full((1, 2, 3, 5), 4.0))


def test_flex_needs_whole_blocks_and_a_known_attention(monkeypatch):
    with pytest.raises(ValueError, match="multiple of 128"):
        fast.flex_block_mask(torch.tensor(0), torch.ones(1, 1, dtype=torch.bool), 200)
    with pytest.raises(ValueError, match="unknown attention"):
        costs.fast_step("xformers")
    monkeypatch.setenv("SPECVLM_FAST_ATTENTION", "flex")
    assert fast.fast_attention(None) == "flex" and fast.fast_attention("sdpa") == "sdpa"
    monkeypatch.setenv("SPECVLM_FAST_ATTENTION", "flex/grouped")
    assert [fast.fast_attention(None, role) for role in (None, "target", "draft")] == ["flex/grouped", "flex", "grouped"]
    with pytest.raises(ValueError, match="one for the target and one for the draft"):
        fast.fast_attention("flex/grouped/sdpa")
    with pytest.raises(ValueError, match="role must be"):
        fast.fast_attention("flex", "verifier")
    monkeypatch.setenv("SPECVLM_FAST_ATTENTION", "flex/flash")
    assert [fast.fast_attention(None, role) for role in ("target", "draft")] == ["flex", "flash"]
    monkeypatch.setenv("SPECVLM_FAST_ATTENTION", "xformers")
    with pytest.raises(ValueError, match="unknown fast-path attention 'xformers'"):
        fast.fast_attention(None)


@pytest.fixture(scope="module")
def embedded():
    return sv.load_pair("tiny", device="cpu")


@pytest.mark.parametrize("kwargs", [{"k": 3}, {"tree": MC_SIM_7B_63}], ids=["chain", "tree"])
@pytest.mark.parametrize("min_slots", ["0", ""], ids=["draft-flex", "draft-grouped"])
def test_the_decoding_fast_path_with_flex_gives_the_plain_tokens(embedded, kwargs, min_slots, monkeypatch):
    """The embedded pair has 7 query heads per KV head, like the real checkpoints. Traced by
    dynamo (backend "eager": no code generation) in one graph per step shape; the draft's short
    cache through FlexAttention too ($SPECVLM_FLEX_MIN_SLOTS=0) or, by default, `grouped_attention`."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("SPECVLM_FLEX_MIN_SLOTS", min_slots)
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    reference = decoding.generate_sd(embedded, prompt, method="specvlm", ratio=0.9, max_new_tokens=16, **kwargs)
    torch._dynamo.reset()
    counters.clear()
    result = fast.generate_fast(embedded, prompt, method="specvlm", ratio=0.9, max_new_tokens=16,
                                compile={"backend": "eager"}, attention="flex", **kwargs)
    assert result.tokens == reference.tokens and result.accepted == reference.accepted
    report = fast.capture_report(embedded)
    assert report["models"]["target"]["attention"] == report["models"]["draft"]["attention"] == "flex"
    assert report["models"]["target"]["step_attention"] == "flex"
    assert report["models"]["draft"]["step_attention"] == ("flex" if min_slots == "0" else "grouped")
    assert report["graph_breaks"] == 0
    ar = fast.generate_fast(embedded, prompt, method="ar", max_new_tokens=16, compile=False, attention="flex")
    assert ar.tokens == decoding.generate_ar(embedded.target, prompt, 16).tokens


def test_flex_serves_only_short_steps_and_wider_ones_take_the_grouped_attention(embedded, monkeypatch):
    """A tree verification (26 nodes) is wider than FLEX_MAX_QUERY: it gets the additive bias and
    `grouped_attention`, in every layer; the shorter steps get a BlockMask (the draft's too: its
    short cache would otherwise take `grouped_attention`, `fast.flex_min_slots`)."""
    monkeypatch.setenv("SPECVLM_FLEX_MIN_SLOTS", "0")
    widths, grouped = [], []
    real_mask, real_grouped = fast.flex_block_mask, fast.grouped_attention
    monkeypatch.setattr(fast, "flex_block_mask", lambda start, pattern, capacity: widths.append(pattern.shape[0])
                        or real_mask(start, pattern, capacity))
    monkeypatch.setattr(step_attention, "grouped_attention", lambda query, *args: grouped.append(query.shape[2])
                        or real_grouped(query, *args))
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    result = fast.generate_fast(embedded, prompt, method="specvlm", ratio=0.9, max_new_tokens=8, tree=MC_SIM_7B_63,
                                compile=False, attention="flex")
    assert result.tokens == decoding.generate_ar(embedded.target, prompt, 8).tokens
    assert widths and max(widths) <= fast.FLEX_MAX_QUERY < MC_SIM_7B_63.num_nodes
    layers = embedded.target.language_model.config.num_hidden_layers
    # (near the end, with fewer tokens left than the tree is deep, a round drafts a chain)
    assert set(grouped) == {MC_SIM_7B_63.num_nodes} and len(grouped) % layers == 0 and grouped


def test_time_ms_queues_calls_between_synchronisations():
    calls = []
    costs.time_ms(lambda: calls.append(1), "cpu", repeats=2, warmup=1, queued=3)
    assert len(calls) == 1 + 2 * 3
    with pytest.raises(ValueError, match="queued"):
        costs.time_ms(lambda: None, "cpu", queued=0)
