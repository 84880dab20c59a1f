"""widen.py: the embedded pair widened into bigger shapes decodes exactly what it decodes.

The shapes here are small made-up ones grown from the tiny configs, so that every rule runs
on a CPU in seconds: wider residual (with lone and paired wide dims), more layers, more MLP
units, bigger vocabulary, dead kv heads, kv heads copied with q heads duplicated, tied and
untied output layers. The real 7B / 0.5B shapes are checked on configs only (meta device).
"""

import json
import math

import pytest
import torch
from transformers import Qwen2Config

import specvlm as sv
from specvlm import models, synthetic, widen
from specvlm.trees import MC_SIM_7B_63

CLIP_FRAMES = (4, 4, 5, 4, 6, 4, 8, 16)  # 8 clips, seeds 0..7
ZERO_BOUND = 1e-3  # zero share allowed at the real shapes (see test_real_shapes_have_few_exact_zeros)


def grown(text, group: int, dead_kv: int = 1, tie: bool = False) -> Qwen2Config:
    """A shape bigger than `text` in every field, with `group` q heads per kv head: each tiny kv
    head gets ceil(tiny group / group) copies, plus `dead_kv` kv heads that output 0."""
    copies = math.ceil(text.num_attention_heads // text.num_key_value_heads / group)
    kv = copies * text.num_key_value_heads + dead_kv
    return Qwen2Config(hidden_size=text.hidden_size + 32, num_hidden_layers=text.num_hidden_layers + 1,
                       num_attention_heads=kv * group, num_key_value_heads=kv, head_dim=models.head_dim(text),
                       intermediate_size=text.intermediate_size + 64, vocab_size=text.vocab_size + 24,
                       tie_word_embeddings=tie)


def tiny_group(text) -> int:
    return text.num_attention_heads // text.num_key_value_heads


@pytest.fixture(scope="module")
def embedded():
    return sv.load_pair("tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def shapes(embedded):
    target, draft = embedded.target.config.text_config, embedded.draft.config.text_config
    # the target keeps its group size (like 7B: 14/2 -> 28/4); the draft's kv heads are copied
    return grown(target, tiny_group(target)), grown(draft, max(1, tiny_group(draft) // 3), tie=True)


@pytest.fixture(scope="module")
def widened(embedded, shapes):
    return widen.widen_pair(embedded, *shapes, device="cpu", dtype=torch.float32, seed=3)


def test_widened_pair_decodes_the_same_tokens(embedded, widened):
    clips = [synthetic.make_clip(seed, num_frames=frames) for seed, frames in enumerate(CLIP_FRAMES)]
    check = widen.check_widening(embedded, widened, clips, max_new_tokens=20, logits=False)
    n = len(clips)
    assert check == {"clips": n, "ar_equal": n, "sd_equal": n, "sd_equals_ar": n, "accepted_equal": n}


@pytest.mark.parametrize("frames", [3, 16])
def test_widened_logits_equal_the_tiny_ones(embedded, widened, frames):
    """Every prompt row, target and draft: real-token logits within 1e-4 of the largest tiny
    logit, and the argmax over the whole wide vocabulary unchanged."""
    video = sv.from_array(synthetic.make_clip(20 + frames, num_frames=frames).frames, fps=8.0)
    for role in ("target", "draft"):
        tiny_lm, wide_lm = getattr(embedded, role), getattr(widened, role)
        small = widen.prompt_logits(tiny_lm, tiny_lm.prepare(video))
        big = widen.prompt_logits(wide_lm, wide_lm.prepare(video))
        assert (big[:, : small.shape[1]] - small).abs().max() / small.abs().max() < 1e-4
        assert torch.equal(big.argmax(-1), small.argmax(-1))
        extra, image = big[:, small.shape[1]:], big[:, [tiny_lm.config.image_token_id]]
        assert extra.shape[1] > 0 and torch.allclose(extra, image.expand_as(extra))


def test_widened_pair_keeps_layout_and_runs_the_fast_path(embedded, widened, shapes):
    assert "stand-in" in widened.name and widened.target.tokenizer is embedded.target.tokenizer
    assert widened.target.language_model.config.hidden_size == shapes[0].hidden_size
    assert widened.draft.model.lm_head.weight.shape == (shapes[1].vocab_size, shapes[1].hidden_size)
    video = sv.from_array(synthetic.make_clip(9, num_frames=4).frames, fps=8.0)
    prompt, wide_prompt = embedded.target.prepare(video), widened.target.prepare(video)
    assert torch.equal(prompt.input_ids, wide_prompt.input_ids) and prompt.grid == wide_prompt.grid
    reference = sv.generate_sd(embedded, prompt, "specvlm", 0.9, max_new_tokens=12, tree=MC_SIM_7B_63)
    fast = sv.generate_fast(widened, wide_prompt, "specvlm", 0.9, max_new_tokens=12, tree=MC_SIM_7B_63, compile=False)
    assert fast.tokens == reference.tokens and fast.accepted == reference.accepted


def test_extra_layers_add_exactly_zero(embedded, widened):
    lm = widened.target
    prompt = lm.prepare(sv.from_array(synthetic.make_clip(0, num_frames=4).frames, fps=8.0))
    states = []  # the residual stream after each layer
    hooks = [layer.register_forward_hook(lambda module, args, out: states.append(out[0] if isinstance(out, tuple) else out))
             for layer in lm.language_model.layers]
    lm.language_model(inputs_embeds=lm.embed(prompt))
    for hook in hooks:
        hook.remove()
    tiny_layers = embedded.target.config.text_config.num_hidden_layers
    assert len(states) > tiny_layers and not torch.equal(states[tiny_layers - 2], states[tiny_layers - 1])
    assert all(torch.equal(states[tiny_layers - 1], s) for s in states[tiny_layers:])


def test_untied_tiny_gives_an_untied_output_layer_even_for_a_tied_shape(widened, shapes):
    assert shapes[1].tie_word_embeddings and not widened.draft.config.text_config.tie_word_embeddings
    head, embed = widened.draft.model.lm_head.weight, widened.draft.model.get_input_embeddings().weight
    assert head.data_ptr() != embed.data_ptr()


def test_tied_tiny_widens_into_a_tied_shape(embedded):
    """A tied tiny model (the draft with its output layer tied to its input table) stays tied."""
    tiny = sv.load_pair("tiny", device="cpu").draft.model
    tiny.config.tie_word_embeddings = tiny.config.text_config.tie_word_embeddings = True
    tiny.lm_head.weight = tiny.get_input_embeddings().weight
    text = tiny.config.text_config
    wide = widen.widen_model(tiny, grown(text, 2 * tiny_group(text), dead_kv=0, tie=True), device="cpu", seed=5)
    assert wide.lm_head.weight.data_ptr() == wide.get_input_embeddings().weight.data_ptr()
    tiny_lm, wide_lm = sv.models.LlavaOnevisionLM(tiny, embedded.draft.processor), sv.models.LlavaOnevisionLM(
        wide, embedded.draft.processor)
    prompt = tiny_lm.prepare(sv.from_array(synthetic.make_clip(4, num_frames=4).frames, fps=8.0))
    small, big = widen.prompt_logits(tiny_lm, prompt), widen.prompt_logits(wide_lm, prompt)
    assert (big[:, : small.shape[1]] - small).abs().max() / small.abs().max() < 1e-4
    assert torch.equal(big.argmax(-1), small.argmax(-1))
    # every extra logit equals the image token's, which greedy decoding never picks first
    assert torch.allclose(big[:, small.shape[1]:], big[:, [tiny.config.image_token_id]].expand_as(big[:, small.shape[1]:]))


@pytest.mark.parametrize("tiny_heads, wide_heads, q_source, kv_source", [
    ((4, 2), (4, 2), [0, 1, 2, 3], [0, 1]),
    ((4, 2), (8, 4), [0, 1, 2, 3, None, None, None, None], [0, 1, None, None]),  # dead kv heads
    ((4, 2), (4, 4), [0, 1, 2, 3], [0, 0, 1, 1]),  # smaller groups: kv heads copied
    ((4, 2), (8, 2), [0, 1, 0, 1, 2, 3, 2, 3], [0, 1]),  # bigger groups: q heads duplicated
    ((6, 2), (8, 4), [0, 1, 2, 0, 3, 4, 5, 3], [0, 0, 1, 1]),  # 3 heads over 2 kv copies of 2 slots
])
def test_head_plan(tiny_heads, wide_heads, q_source, kv_source):
    config = lambda q, kv: Qwen2Config(hidden_size=8 * q, num_attention_heads=q, num_key_value_heads=kv, head_dim=8)
    got_q, got_kv, share = widen.head_plan(config(*tiny_heads), config(*wide_heads))
    assert (got_q, got_kv) == (q_source, kv_source)
    for h in set(q_source) - {None}:  # a tiny head's o_proj shares add up to 1
        assert sum(s for s, source in zip(share, got_q) if source == h) == pytest.approx(1.0)


def test_zero_fraction_is_what_the_construction_plans(embedded, widened):
    """Measured zeros = planned zeros + zeros inherited from the tiny weights (each tiny entry
    lands on at most ceil(D / d) wide entries)."""
    for tiny_lm, wide_lm in ((embedded.target, widened.target), (embedded.draft, widened.draft)):
        tiny, wide = tiny_lm.model, wide_lm.model
        tiny_zeros = sum(int((p == 0).sum()) for p in tiny.parameters())
        wide_zeros = sum(int((p == 0).sum()) for p in wide.parameters())
        spread = math.ceil(wide.config.text_config.hidden_size / tiny.config.text_config.hidden_size)
        report = widen.widening_report(wide)
        planned = report["planned_zeros"]
        assert planned <= wide_zeros <= planned + spread * tiny_zeros
        assert report["zero_fraction"] == wide_zeros / report["params"] == widen.zero_fraction(wide)
        assert report["params"] == widen.planned_params(tiny.config, wide.config.text_config)


@pytest.mark.parametrize("role, shape", [("target", "llava-ov-7b"), ("draft", "llava-ov-0.5b")])
def test_real_shapes_have_few_exact_zeros(embedded, role, shape):
    """At the real shapes the planned zeros (dead v rows in 4 of 28 layers, norms of extra
    layers, extra projector units) are a few millionths of a row each: far below 0.1%."""
    tiny = getattr(embedded, role).model
    text = widen.wide_text_config(tiny.config.text_config, shape)
    assert (text.hidden_size, text.rms_norm_eps) == (sv.costs.SHAPES[shape]["hidden_size"],
                                                    tiny.config.text_config.rms_norm_eps * tiny.config.text_config.hidden_size / text.hidden_size)
    params = widen.planned_params(tiny.config, text)
    assert 0 < widen.planned_zeros(tiny.config, text) / params < ZERO_BOUND


def test_bad_shapes_get_clear_errors(embedded):
    text = embedded.target.config.text_config
    with pytest.raises(ValueError, match="unknown shape"):
        widen.wide_text_config(text, "llava-ov-8b")
    with pytest.raises(ValueError, match="smaller than the tiny model.*hidden_size"):
        widen.wide_text_config(text, Qwen2Config(**{**grown(text, tiny_group(text)).to_dict(), "hidden_size": 64}))
    with pytest.raises(ValueError, match="head_dim"):
        widen.wide_text_config(text, "llava-ov-0.5b")  # 64-wide heads for the 128-wide tiny target
    group, kv = tiny_group(text) - 1, 2 * text.num_key_value_heads - 1  # each tiny kv head needs 2 copies
    few_kv = {**grown(text, group).to_dict(), "num_attention_heads": kv * group, "num_key_value_heads": kv}
    with pytest.raises(ValueError, match="kv heads"):
        widen.wide_text_config(text, Qwen2Config(**few_kv))
    with pytest.raises(ValueError, match="tie=True"):
        widen.wide_text_config(text, grown(text, tiny_group(text)), tie=True)
    with pytest.raises(ValueError, match="LLaVA-OneVision"):
        widen.widen_model(torch.nn.Linear(2, 2), "llava-ov-7b")


def test_the_widen_command_writes_a_passing_check(tmp_path, monkeypatch):
    from specvlm import costs, widen

    monkeypatch.setitem(costs.SHAPES, "test-target", dict(source="test", hidden_size=384, num_hidden_layers=5,
                        num_attention_heads=14, num_key_value_heads=2, intermediate_size=1024, vocab_size=600, head_dim=128,
                        tie_word_embeddings=False))
    monkeypatch.setitem(costs.SHAPES, "test-draft", dict(source="test", hidden_size=192, num_hidden_layers=3,
                        num_attention_heads=14, num_key_value_heads=2, intermediate_size=512, vocab_size=600, head_dim=64,
                        tie_word_embeddings=False))
    out = tmp_path / "check_{card}.json"
    widen.main(["--target-shape", "test-target", "--draft-shape", "test-draft", "--clips", "2", "--frames", "4",
                "--device", "cpu", "--out", str(out)])
    (written,) = tmp_path.glob("check_*.json")
    result = json.loads(written.read_text())
    assert result["check"]["clips"] == 2 and result["check"]["ar_equal"] == 2 and result["check"]["sd_equal"] == 2
    assert result["reports"]["target"]["wide"]["hidden_size"] == 384
    assert 0 < result["reports"]["draft"]["zero_fraction"] < 0.05
