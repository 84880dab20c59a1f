"""`few_rows`' Triton kernels (run on the CPU in Triton's interpreter, which conftest turns on)
against `F.linear` and the MLP's own gate, and the fused draft that runs them: lossless, and
the kernels really run."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import specvlm as sv
from specvlm import decoding, fast, few_rows, fusion, profile

pytestmark = pytest.mark.skipif(not few_rows.available(torch.device("cpu"), torch.float32),
                                reason="needs Triton's interpreter")


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("columns, inner", [(40, 96), (33, 300), (16, 16)])
@pytest.mark.parametrize("launch", [None, few_rows.Launch(16, 32, 3), few_rows.Launch(32, 16, 8, 2)])
def test_linear_equals_f_linear(rows, columns, inner, launch):
    """Columns and inner sizes that fill no whole tile, splits that do not divide the inner axis;
    leading axes kept."""
    generator = torch.Generator().manual_seed(rows * columns + inner)
    x = torch.randn(1, rows, inner, generator=generator)
    weight, bias = torch.randn(columns, inner, generator=generator), torch.randn(columns, generator=generator)
    counters = few_rows.counters_for(columns, "cpu")
    for b in (bias, None):
        out = few_rows.linear(x, weight, b, launch, counters)
        assert out.shape == (1, rows, columns) and out.dtype == x.dtype
        torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-4)
        assert not counters.any()  # left zero for the next call
        assert torch.equal(few_rows.linear(x, weight, b, launch, counters), out)  # a second call, the same bits


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_gated_equals_the_mlps_gate(rows):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=generator)
    stacked = torch.randn(2 * 40, 64, generator=generator)  # 40 columns: no whole number of 32-column tiles
    expected = F.silu(F.linear(x, stacked[:40])) * F.linear(x, stacked[40:])
    torch.testing.assert_close(few_rows.gated(x, stacked), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(few_rows.reference_gated(x, stacked), expected)
    assert expected.abs().max() > 1  # not a vacuous comparison


def test_bad_inputs_are_refused_with_what_to_do():
    x, weight = torch.randn(17, 32), torch.randn(8, 32)
    with pytest.raises(ValueError, match="needs int32 counters for its 1 column tiles"):
        few_rows._launch(x[:2], weight, None, torch.empty(2, 8), 8, few_rows.Launch(16, 16, 2), False, None)
    with pytest.raises(ValueError, match=r"takes 1 to 16 rows of a non-empty axis, got input \(17, 32\)"):
        few_rows.linear(x, weight)
    with pytest.raises(ValueError, match="non-empty axis"):
        few_rows.linear(torch.randn(2, 0), torch.randn(8, 0))
    with pytest.raises(ValueError, match="one dtype on one device"):
        few_rows.linear(x[:2], weight.double())
    with pytest.raises(ValueError, match=r"contiguous bias \[8\]"):
        few_rows.linear(x[:2], weight, torch.randn(9))
    with pytest.raises(ValueError, match=r"needs a weight \[N, 32\]"):
        few_rows.linear(x[:2], torch.randn(8, 31))
    with pytest.raises(ValueError, match="gate and up rows stacked"):
        few_rows.gated(x[:2], torch.randn(7, 32))
    with pytest.raises(ValueError, match="not split"):
        few_rows.gated(x[:2], torch.randn(8, 32), few_rows.Launch(16, 16, 2))
    with pytest.raises(ValueError, match="multiples of 16"):
        few_rows.Launch(8, 128, 1)
    with pytest.raises(ValueError, match="power of two of warps"):
        few_rows.Launch(16, 128, 1, 3)
    with pytest.raises(ValueError, match="columns-inner-splits-warps"):
        few_rows.Launch.parse("16-128-4")
    assert few_rows.Launch.parse("32-128-8-4") == few_rows.Launch(32, 128, 8, 4)
    assert few_rows.Launch(32, 128, 8, 4).name == "32-128-8-4"


def test_the_launch_arithmetic_in_the_docstrings():
    assert few_rows.split_axis(4864, few_rows.Launch(16, 128, 5)) == (1024, 5)
    assert few_rows.split_axis(896, few_rows.Launch(16, 128, 8)) == (128, 7)
    assert few_rows.split_axis(100, few_rows.Launch(16, 128, 8)) == (128, 1)
    # the 0.5B draft's products (notebook 05): q/k/v, output, down, gate/up
    assert few_rows.default_launch(1152, 896) == few_rows.Launch(32, 128, 8, 4)
    assert few_rows.split_axis(896, few_rows.default_launch(1152, 896)) == (128, 7)
    assert few_rows.split_axis(4864, few_rows.default_launch(896, 4864)) == (640, 8)
    assert few_rows.default_launch(4864, 896, gated=True) == few_rows.Launch(32, 128, 1, 2)


def test_only_cuda_half_precision_or_the_interpreter():
    assert few_rows.available(torch.device("cpu"), torch.float32)
    assert not few_rows.available(torch.device("cpu"), torch.bfloat16)
    assert profile.category("_few_rows_kernel") == "matmul"


@pytest.fixture(scope="module")
def embedded():
    return sv.load_pair("tiny", device="cpu")


def test_few_rows_mode_switches_on_and_off_and_keeps_the_weights(embedded):
    draft = copy.deepcopy(embedded.draft)
    before = {name: tensor.clone() for name, tensor in draft.model.state_dict().items()}
    layers = len(draft.language_model.layers)
    assert fusion.fuse_projections(draft, few_rows=True) == 2 * layers and fusion.uses_few_rows(draft)
    layer = draft.language_model.layers[0]
    assert type(layer.self_attn.o_proj) is fusion.FewRowsLinear and type(layer.mlp.down_proj) is fusion.FewRowsLinear
    assert "forward" in vars(layer.mlp)  # the gated forward
    assert fusion.fuse_projections(draft, few_rows=True) == 0  # already so
    assert fusion.fuse_projections(draft) == 2 * layers and not fusion.uses_few_rows(draft) and fusion.is_fused(draft)
    assert type(layer.self_attn.o_proj) is nn.Linear and "forward" not in vars(layer.mlp)
    fusion.fuse_projections(draft, few_rows=True)
    assert fusion.unfuse_projections(draft) == 2 * layers
    assert not fusion.is_fused(draft) and not fusion.uses_few_rows(draft)
    assert type(layer.mlp.down_proj) is nn.Linear and "forward" not in vars(layer.mlp)
    assert not layer.mlp._forward_pre_hooks and not layer.self_attn._forward_pre_hooks
    after = draft.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 before importing specvlm"):
        half = copy.deepcopy(embedded.draft)
        half.model.to(torch.bfloat16)
        fusion.fuse_projections(half, few_rows=True)


@pytest.mark.parametrize("clip, method, ratio, tree, seed", [
    ("bikes", "specvlm", 0.5, "mc_sim", 0),
    ("bigbuckbunny", "specvlm", 0.9, None, 1),
    ("bikes", "sd", 0.0, "mc_sim", 2),
])
def test_a_few_rows_draft_is_lossless_and_runs_the_kernels(embedded, monkeypatch, clip, method, ratio, tree, seed):
    """The fast path with $SPECVLM_FEW_ROWS=1 (and a fused draft): the target's own greedy tokens,
    the same accepted counts as with cuBLAS's products (the kernels agree to float32 rounding
    here), and every decoder layer's four products of the draft's passes ran as kernels."""
    from specvlm.trees import MC_SIM_7B_63

    pair = sv.models.Pair(embedded.target, copy.deepcopy(embedded.draft), name="embedded copy")
    prompt = embedded.target.prepare(sv.sample_video(clip, 4))
    reference = decoding.generate_ar(embedded.target, prompt, 16).tokens
    options = dict(method=method, ratio=ratio, seed=seed, max_new_tokens=16, compile=False,
                   **({"tree": MC_SIM_7B_63} if tree else {"k": 4}))
    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "1")
    monkeypatch.setenv("SPECVLM_FEW_ROWS", "0")
    cublas = fast.generate_fast(pair, prompt, **options)
    calls = {"linear": 0, "gated": 0}
    for name in calls:
        def counted(*args, name=name, original=getattr(few_rows, name), **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(few_rows, name, counted)
    monkeypatch.setenv("SPECVLM_FEW_ROWS", "1")
    kernels = fast.generate_fast(pair, prompt, **options)
    assert fusion.uses_few_rows(pair.draft) and not fusion.uses_few_rows(pair.target)
    assert fast.capture_report(pair)["models"]["draft"]["few_rows"]
    assert kernels.tokens == cublas.tokens == reference
    assert kernels.accepted == cublas.accepted
    layers = len(pair.draft.language_model.layers)
    assert calls["gated"] >= layers and calls["linear"] == 3 * calls["gated"]  # q/k/v, output and down per gate
    counters = [b for name, b in pair.draft.model.named_buffers() if name.endswith("few_rows_counters")]
    assert len(counters) == 3 * layers and not any(c.any() for c in counters)


def test_few_rows_setting_is_checked(embedded, monkeypatch):
    monkeypatch.delenv("SPECVLM_FEW_ROWS", raising=False)
    assert not fast.few_rows_draft()  # off by default
    monkeypatch.setenv("SPECVLM_FEW_ROWS", "yes")
    with pytest.raises(ValueError, match="SPECVLM_FEW_ROWS must be '0' or '1'"):
        fast.few_rows_draft()


def test_a_few_rows_model_copies_pickles_and_computes_as_before(embedded, tmp_path):
    """deepcopy and torch.save/load keep the mode and give the same logits for a step of a few rows
    (the MLP's gated forward is rebound to the copy, not to the original)."""
    draft = copy.deepcopy(embedded.draft)
    fusion.fuse_projections(draft, few_rows=True)
    layer = draft.language_model.layers[0]
    x = torch.randn(1, 3, layer.mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    expected = layer.mlp(x)
    torch.testing.assert_close(expected, layer.mlp.down_proj(few_rows.reference_gated(x, layer.mlp.fused_weight)))
    copied = copy.deepcopy(layer.mlp)
    assert copied.forward.args[0] is copied
    torch.save(layer.mlp, tmp_path / "mlp.pt")
    loaded = torch.load(tmp_path / "mlp.pt", weights_only=False)
    for other in (copied, loaded):
        assert other.few_rows and type(other.down_proj) is fusion.FewRowsLinear
        assert torch.equal(other(x), expected)


def test_an_mlp_with_biases_keeps_cublas(embedded):
    """The gated kernel has no bias: an MLP whose gate/up have one is fused, but left out of few-rows
    mode (its forward stays transformers' own), so its outputs stay right."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48, mlp_bias=True)).eval()
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = mlp(x)
        assert fusion.fuse_module(mlp, fusion.GROUPS["mlp"]) and mlp.fused_bias is not None
        assert not fusion.set_few_rows(mlp, True) and "forward" not in vars(mlp)
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)
