"""The draft cut from the target (`specvlm.tiny.cut`): exact where the target lives in what the cut keeps."""
import pytest
import torch
from transformers import AutoModelForImageTextToText

from specvlm.models import LlavaOnevisionLM, Pair, embedded_paths, load_lm
from specvlm.tiny.cut import cut_draft, kept_rotary_dims, value_basis
from specvlm import synthetic
from specvlm.decoding import generate_ar, generate_sd
from specvlm.video import from_array


@pytest.fixture(scope="module")
def target():
    return AutoModelForImageTextToText.from_pretrained(embedded_paths()[0], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor():
    return load_lm(embedded_paths()[0]).processor


def test_kept_rotary_dims_pair_each_kept_frequency_with_its_partner():
    assert kept_rotary_dims(8, 4).tolist() == [0, 2, 4, 6]
    assert kept_rotary_dims(128, 64)[:3].tolist() == [0, 2, 4] and kept_rotary_dims(128, 64)[32:35].tolist() == [64, 66, 68]
    assert kept_rotary_dims(12, 4).tolist() == [0, 3, 6, 9]
    theta, d, cut = 10000.0, 128, 64
    full = theta ** (-torch.arange(0, d, 2).double() / d)
    small = theta ** (-torch.arange(0, cut, 2).double() / cut)
    assert torch.allclose(full[kept_rotary_dims(d, cut)[: cut // 2]], small)  # the cut head turns each pair as the target does
    for bad in (48, 63, 0, 256):
        with pytest.raises(ValueError, match="smaller even divisor"):
            kept_rotary_dims(128, bad)


def test_value_basis_spans_a_low_rank_projection_and_its_bias():
    """The basis covers the weight's directions and the bias's own one: the bias counts as a column."""
    torch.manual_seed(0)
    columns = torch.linalg.qr(torch.randn(8, 3))[0]
    weight, bias = columns[:, :2] @ torch.randn(2, 16), 2.0 * columns[:, 2]  # the bias lies outside the weight's span
    basis = value_basis(weight, bias, 3)
    assert basis.shape == (8, 3) and basis.dtype == torch.float64
    assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=torch.float64), atol=1e-8)
    project = lambda x: basis @ (basis.T @ x.double())
    assert torch.allclose(project(weight), weight.double(), atol=1e-5)
    assert torch.allclose(project(bias), bias.double(), atol=1e-5)
    assert not torch.allclose(value_basis(weight, None, 3) @ (value_basis(weight, None, 3).T @ bias.double()), bias.double(), atol=1e-2)
    with pytest.raises(ValueError, match="fewer than 9 directions"):
        value_basis(weight, bias, 9)


def test_cut_draft_has_the_draft_shape_and_leaves_the_target_alone(target):
    before = {k: v.clone() for k, v in target.state_dict().items()}
    draft = cut_draft(target)
    text = draft.config.text_config
    assert (text.head_dim, text.num_attention_heads, text.num_key_value_heads) == (64, 14, 2)
    assert target.config.text_config.head_dim == 128
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    layer = draft.model.language_model.layers[0].self_attn
    assert layer.q_proj.weight.shape == (14 * 64, 256) and layer.o_proj.weight.shape == (256, 14 * 64)
    # everything but attention is the target's
    for name, value in draft.state_dict().items():
        if "language_model" not in name or "self_attn" not in name:
            assert torch.equal(value, before[name]), name


def test_cut_draft_is_exact_for_a_target_inside_what_the_cut_keeps(target, processor):
    """Zero the target's query/key dimensions the cut drops and make each value projection rank 64:
    the cut with query_scale sqrt(1/2) then computes the target's function (the same logits)."""
    import copy

    inside = copy.deepcopy(target)
    text = inside.config.text_config
    d, kept = text.head_dim, kept_rotary_dims(128, 64)
    dropped = torch.ones(d, dtype=torch.bool)
    dropped[kept] = False
    with torch.no_grad():
        for layer in inside.model.language_model.layers:
            attention = layer.self_attn
            for projection, heads in ((attention.q_proj, text.num_attention_heads), (attention.k_proj, text.num_key_value_heads)):
                projection.weight.view(heads, d, -1)[:, dropped] = 0
                projection.bias.view(heads, d)[:, dropped] = 0
            v = attention.v_proj
            for g in range(text.num_key_value_heads):
                rows = slice(g * d, (g + 1) * d)
                stacked = torch.cat([v.weight[rows], v.bias[rows, None]], 1)
                u, s, vt = torch.linalg.svd(stacked, full_matrices=False)
                low = (u[:, :64] * s[:64]) @ vt[:64]
                v.weight[rows], v.bias[rows] = low[:, :-1], low[:, -1]
    draft = cut_draft(inside, query_scale=0.5 ** 0.5)
    clip = synthetic.make_clip(7, num_frames=4)
    prompt = LlavaOnevisionLM(inside, processor).prepare(from_array(clip.frames, fps=8.0), "Describe the video.")
    with torch.no_grad():
        want = inside(**prompt.inputs).logits
        got = draft(**prompt.inputs).logits
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()
    plain = cut_draft(inside)  # the default scale sharpens the logits: no longer the same function
    with torch.no_grad():
        assert not torch.allclose(plain(**prompt.inputs).logits, want, atol=1e-2)


def test_cut_draft_drafts_losslessly_and_agrees_with_its_target_more_than_the_shipped_draft(target, processor):
    shipped = load_lm(embedded_paths()[1])
    lm = LlavaOnevisionLM(target, processor)
    pairs = {"shipped": Pair(lm, shipped), "cut": Pair(lm, LlavaOnevisionLM(cut_draft(target), processor))}
    accepted = {name: 0.0 for name in pairs}
    for seed, ratio in ((11, 0.5), (12, 0.9), (13, 0.5), (14, 0.75)):
        clip = synthetic.make_clip(seed, num_frames=8)
        prompt = lm.prepare(from_array(clip.frames, fps=8.0), "Describe the video.")
        ar = generate_ar(lm, prompt, 24)
        for name, pair in pairs.items():
            sd = generate_sd(pair, prompt, "specvlm", ratio, k=5, max_new_tokens=24)
            assert sd.tokens == ar.tokens, (name, seed)
            accepted[name] += sd.mean_accepted
    assert accepted["cut"] > 1.1 * accepted["shipped"], accepted


def test_cut_draft_refuses_what_it_cannot_cut(target):
    with pytest.raises(ValueError, match="smaller than the target|smaller even divisor"):
        cut_draft(target, cut_head_dim=128)
    import copy

    other = copy.deepcopy(target)
    other.config.text_config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="default rotary"):
        cut_draft(other)
