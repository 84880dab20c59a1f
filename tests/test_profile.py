"""The step profiler: kernel categories and per-step arithmetic on hand-made records, and a CPU
smoke run of the whole harness at the tiny shape (structure, never timings)."""

import json

import pytest
import torch

from specvlm import costs, profile
from specvlm.trees import MC_SIM_7B_63


@pytest.mark.parametrize("name, expected", [
    ("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("triton_tem_fused_flex_decoding_0", "attention"),
    ("triton_tem_fused_0", "attention"),  # an inductor template without mm: FlexAttention
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    # seen in a reduce-overhead 0.5B step on an H200 (torch 2.11): cudnn sdpa, its reduction, its fused inputs
    ("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_35_16x128x64_1x4", "attention"),
    ("void cudnn::fusion::lean_reduction_kernel<false, false, false>(void*, float*, fl", "attention"),
    ("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy__unsafe_view_add_a", "attention"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>", "matmul"),
    ("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_splitK_TNT", "matmul"),
    ("nvjet_tst_192x8_64x8_2x1_v_bz_TNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "matmul"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16>", "matmul"),
    ("triton_tem_fused_mm_3", "matmul"),
    ("aten::addmm", "matmul"),
    ("aten::mm", "matmul"),
    ("triton_poi_fused_index_copy_2", "copy"),
    ("Memcpy HtoD (Pageable -> Device)", "copy"),
    ("void at::native::index_elementwise_kernel<128, 4, index_put_kernel_impl>", "copy"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "elementwise"),  # an RMS norm with a cast
    ("triton_poi_fused_add_cat_index_copy_mul_neg_3", "copy"),  # rotary fused into the cache write
    ("triton_per_fused_add_mean_mul_pow_rsqrt_1", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor>", "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "elementwise"),
    ("aten::as_strided", "other"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy_contig<...>", "copy"),
    ("void at::native::elementwise_kernel<128, 4, gpu_kernel_impl_nocast<direct_copy_kernel_cuda>>", "copy"),
    ("aten::copy_", "copy"),
    ("_split_attention_merge", "attention"),  # `split_merge`'s kernel: a tree verification's own slots and merge
    ("_flash_decode_partials", "attention"),
])
def test_categories_by_kernel_name(name, expected):
    assert profile.category(name) == expected


def test_breakdown_divides_by_steps_and_sums_to_busy():
    events = [("nvjet_a", 60.0, 4), ("flash_fwd_kernel", 30.0, 2), ("triton_poi_fused_mul_silu_0", 10.0, 2),
              ("nvjet_a", 20.0, 2), ("mystery", 4.0, 2)]  # a name seen twice is merged
    b = profile.kernel_breakdown(events, steps=2, wall_us_per_step=124.0, floor_us=31.0)
    cats = b["categories"]
    assert set(cats) == set(profile.CATEGORY_NAMES)
    assert cats["matmul"] == {"us_per_step": 40.0, "kernels_per_step": 3.0, "share": pytest.approx(40 / 62)}
    assert cats["attention"]["us_per_step"] == 15.0 and cats["attention"]["kernels_per_step"] == 1.0
    assert cats["elementwise"]["us_per_step"] == 5.0 and cats["other"]["us_per_step"] == 2.0
    assert cats["copy"] == {"us_per_step": 0.0, "kernels_per_step": 0.0, "share": 0.0}
    assert b["gpu_busy_us_per_step"] == 62.0 == sum(c["us_per_step"] for c in cats.values())
    assert b["kernels_per_step"] == 6.0
    assert b["idle_share"] == pytest.approx(0.5) and b["wall_x_floor"] == pytest.approx(4.0)
    assert [t["name"] for t in b["top"]] == ["nvjet_a", "flash_fwd_kernel", "triton_poi_fused_mul_silu_0", "mystery"]
    assert b["top"][0] == {"name": "nvjet_a", "category": "matmul", "us_per_step": 40.0, "calls_per_step": 3.0}


def test_breakdown_top_is_capped_and_names_truncated():
    events = [(f"kernel_{i:02d}_" + "x" * 100, float(i), 1) for i in range(15)]
    b = profile.kernel_breakdown(events, steps=1)
    assert len(b["top"]) == profile.TOP
    assert [t["us_per_step"] for t in b["top"]] == [float(i) for i in range(14, 4, -1)]
    assert all(len(t["name"]) == 80 for t in b["top"])
    assert b["idle_share"] is None and b["wall_x_floor"] is None  # no wall time given
    with pytest.raises(ValueError, match="steps"):
        profile.kernel_breakdown(events, steps=0)


def test_graph_visibility_rule():
    assert profile.graph_kernels_visible(3.0, 24, graphs=True) is False
    assert profile.graph_kernels_visible(310.0, 24, graphs=True) is True
    assert profile.graph_kernels_visible(3.0, 24, graphs=False) is None


def test_bad_input_is_refused_before_any_work():
    with pytest.raises(ValueError, match="unknown path"):
        profile.profile_step("tiny", 64, path="fast-flex", device="cpu")
    with pytest.raises(ValueError, match="unknown shape"):
        profile.profile_step("llava-ov-8b", 64, device="cpu")
    with pytest.raises(ValueError, match="context_len"):
        profile.profile_step("tiny", 0, device="cpu")
    with pytest.raises(ValueError, match="unknown kind"):
        profile.profile_shapes(["tiny"], [64], kinds=["verify"], device="cpu")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profile")
    code = profile.main(["--shapes", "tiny", "--contexts", "64", "--kinds", "step", "tree", "--repeats", "3",
                         "--device", "cpu", "--out", str(folder / "p_{card}.json"), "--png", str(folder / "p.png")])
    assert code == 0
    [path] = folder.glob("p_*.json")
    return json.loads(path.read_text()), folder


def test_cli_writes_json_and_plot(cli_run):
    result, folder = cli_run
    assert {"card", "dtype", "torch", "transformers", "date", "bandwidth_GBps", "attention", "rows"} <= set(result)
    assert result["card_id"] is None  # a CPU has no card UUID
    assert (folder / "p.png").stat().st_size > 0
    assert [(r["kind"], r["query_len"]) for r in result["rows"]] == [("step", 1), ("tree", MC_SIM_7B_63.num_nodes)]
    table = profile.table(result)
    assert table.count("| tiny | 64 |") == 2


def test_combined_profiles_keep_each_run_and_refuse_two_cards(cli_run, tmp_path):
    result = cli_run[0]
    other = {**result, "attention": "flex", "date": "2026-01-02", "bandwidth_GBps": result["bandwidth_GBps"] / 2,
             "card_id": "another card of the same model"}
    both = profile.combine({"before": result, "after": other}, note="two runs")
    assert [row["card_id"] for row in both["rows"]] == [None] * 2 + ["another card of the same model"] * 2
    assert [row["label"] for row in both["rows"]] == ["before"] * 2 + ["after"] * 2
    assert [row["attention"] for row in both["rows"]] == [result["attention"]] * 2 + ["flex"] * 2
    assert both["attention"] == "per row" and both["bandwidth_GBps"] == other["bandwidth_GBps"]
    assert both["date"] == max(result["date"], "2026-01-02") and both["note"] == "two runs"
    assert profile.table(both).count("| tiny (after) | 64 |") == 2
    profile.save(both, tmp_path / "both.json")
    assert profile.plot_profile(tmp_path / "both.json", tmp_path / "both.png") and (tmp_path / "both.png").stat().st_size
    with pytest.raises(ValueError, match="one card, dtype and settings only"):
        profile.combine({"a": result, "b": {**result, "card": "NVIDIA H200"}})


def test_profile_step_on_a_cpu_returns_the_documented_keys(cli_run):
    row = cli_run[0]["rows"][0]
    keys = {"shape", "context", "query_len", "path", "attention", "compile", "device", "dtype", "bandwidth_GBps",
            "weight_bytes", "kv_bytes", "setup_s", "categories", "kernels_per_step", "gpu_busy_us_per_step",
            "wall_us_per_step", "idle_share", "floor_us", "wall_x_floor", "top", "graph_kernels_visible",
            "without_graphs", "queued_us_per_step", "queued_x_floor", "host"}
    assert keys <= set(row)
    assert row["graph_kernels_visible"] is None and row["without_graphs"] is None  # no CUDA graphs on a CPU
    config = costs.lm_config("tiny")
    assert row["weight_bytes"] == costs.weight_bytes(config, torch.float32)
    assert row["kv_bytes"] == costs.kv_bytes(config, 64 + 1, torch.float32)
    floor = 1e6 * (row["weight_bytes"] + row["kv_bytes"]) / (row["bandwidth_GBps"] * 1e9)
    assert row["floor_us"] == pytest.approx(floor)
    # a forward pass runs matmuls and an attention in every layer, each call counted per step
    assert row["categories"]["matmul"]["kernels_per_step"] >= 4 * config.num_hidden_layers
    assert row["categories"]["attention"]["kernels_per_step"] >= config.num_hidden_layers
    assert row["kernels_per_step"] == pytest.approx(sum(c["kernels_per_step"] for c in row["categories"].values()))
    assert 0 < row["gpu_busy_us_per_step"] and 0 < row["wall_us_per_step"] and 0 < row["queued_us_per_step"]
    assert row["queued_x_floor"] == pytest.approx(row["queued_us_per_step"] / row["floor_us"])
    assert row["top"] == sorted(row["top"], key=lambda t: -t["us_per_step"])
    assert 0 < row["host"]["host_us_per_step"] <= row["host"]["queued_us_per_step"] and row["host"]["top"]
    assert row["host"]["replay_us_per_step"] is None  # no CUDA graph to replay alone on a CPU


def test_transformers_path_is_profiled_too():
    model = costs.build_lm("tiny", "cpu", torch.float32)
    row = profile.profile_step("tiny", 32, path="sdpa", device="cpu", repeats=2, warmup=1, model=model, bandwidth=1e10)
    assert row["attention"] == "sdpa" and row["compile"] == "None" and row["kernels_per_step"] > 0
    with pytest.raises(ValueError, match="fast path only"):
        profile.profile_step("tiny", 32, path="eager", attention="flex", device="cpu", model=model, bandwidth=1e10)


def test_invisible_graph_kernels_bring_a_profile_without_graphs(monkeypatch, tmp_path):
    # on a GPU the decision comes from the trace; here it is forced to exercise the second profile
    monkeypatch.setattr(profile, "graph_kernels_visible", lambda kernels, layers, graphs: False)
    row = profile.profile_step("tiny", 32, device="cpu", repeats=2, warmup=1, bandwidth=1e10)
    other = row["without_graphs"]
    assert other["label"] == "eager fast path" and other["kernels_per_step"] > 0
    assert profile.breakdown_of(row) is other
    result = {"card": "cpu", "dtype": "float32", "bandwidth_GBps": 10.0, "attention": "sdpa", "date": "today",
              "rows": [{"kind": "step", **row}]}
    assert "| eager fast path |" in profile.table(result)
    (tmp_path / "r.json").write_text(json.dumps(result))
    fig = profile.plot_profile(tmp_path / "r.json", tmp_path / "r.png")
    assert "without CUDA graphs" in fig.axes[0].get_title() and (tmp_path / "r.png").exists()


def test_a_draft_vocabulary_cuts_the_steps_logits_and_the_floors_output_layer():
    """`--draft-vocab N`: the fast path's step returns logits over the first N ids (the whole layer's,
    up to rounding), and the floor counts N rows of the output layer, tied to the input table or not."""
    config = costs.lm_config("tiny")
    model = costs.build_lm("tiny", "cpu", torch.float32)
    rows = 40
    whole = costs.fast_step("sdpa", compile=False)(model, 32, 1)()
    cut = costs.fast_step("sdpa", compile=False, vocabulary=rows)(model, 32, 1)()
    assert whole.shape[-1] == config.vocab_size and cut.shape[-1] == rows
    torch.testing.assert_close(cut, whole[..., :rows], rtol=1e-5, atol=1e-5)
    row = profile.profile_step("tiny", 32, device="cpu", repeats=2, warmup=1, model=model, bandwidth=1e10,
                               vocabulary=rows)
    assert row["vocabulary"] == rows
    unread = (config.vocab_size - rows) * config.hidden_size * 4  # float32
    assert row["weight_bytes"] == costs.weight_bytes(config, torch.float32) - unread
    for tie in (False, True):  # what a cut pass reads: the layers, the final norm and the kept rows, tied or not
        other = config.__class__(**{**config.to_dict(), "tie_word_embeddings": tie})
        built = costs.build_lm(other, "cpu", torch.float32)
        read = sum(p.numel() for p in (*built.model.layers.parameters(), *built.model.norm.parameters()))
        assert costs.weight_bytes(other, torch.float32, rows) == 4 * (read + rows * config.hidden_size)
    for bad in (0, config.vocab_size + 1):
        with pytest.raises(ValueError, match=f"output_rows must lie in 1..{config.vocab_size}"):
            costs.weight_bytes(config, torch.float32, bad)
    with pytest.raises(ValueError, match="transformers' paths keep theirs whole"):
        profile.profile_step("tiny", 32, path="sdpa", device="cpu", model=model, bandwidth=1e10, vocabulary=rows)


def test_a_fast_step_replays_its_graph_alone_for_the_host_timing():
    from types import SimpleNamespace

    from specvlm.bench import QUEUED, STEP_WARMUP

    replays = []
    engine = SimpleNamespace(last_graph=SimpleNamespace(replay=lambda: replays.append(1)))
    x = torch.ones(4)

    def make_step():
        def step():
            return x * 2

        step.engine = engine
        return step

    *_, host = profile._profiled(make_step, torch.device("cpu"), repeats=3, warmup=1)
    assert len(replays) == (STEP_WARMUP + 3) * QUEUED and host["replay_us_per_step"] > 0


def test_a_fast_step_carries_the_engine_whose_graph_it_replays():
    from specvlm import fast

    model = costs.build_lm("tiny", torch.device("cpu"), torch.float32)
    step = costs.fast_step("sdpa", False)(model, 8, 1)
    step()
    assert isinstance(step.engine, fast.StaticLM) and step.engine.cache.capacity >= 8
    assert step.engine.last_graph is None  # nothing captured on a CPU
