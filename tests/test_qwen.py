"""The Qwen2.5-VL adapter: transformers' own greedy output, lossless pruning with the real
3-D rotary positions, frame timing in the temporal positions, verifier scores."""

import numpy as np
import pytest
import torch

import specvlm as sv
from specvlm import builders

from .test_attention import ours_and_eager

METHODS = ("sd",) + tuple(sv.pruning.METHODS)
RATIOS = (0.0, 0.5, 0.9, 0.99)


@pytest.fixture(scope="module")
def qwen_paths(tmp_path_factory):
    return sv.make_tiny_pair(tmp_path_factory.mktemp("tiny_qwen"), seed=0, family="qwen2_5_vl")


@pytest.fixture(scope="module")
def qwen_pair(qwen_paths):
    return sv.load_pair(str(qwen_paths[0]), str(qwen_paths[1]), device="cpu")


def frames(seed: int, count: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_load_picks_the_qwen_adapter(qwen_pair):
    assert isinstance(qwen_pair.target, sv.models.Qwen25VLLM) and isinstance(qwen_pair.draft, sv.models.Qwen25VLLM)
    assert qwen_pair.target.video_token_id == qwen_pair.target.processor.video_token_id


@pytest.mark.parametrize("frame_count", [2, 5, 6, 16])
@pytest.mark.parametrize("clip", ["bigbuckbunny", "bikes", "carphone_pristine"])
def test_greedy_equals_transformers_generate(qwen_pair, clip, frame_count):
    lm = qwen_pair.target
    video = sv.sample_video(clip, frame_count)
    prompt = lm.prepare(video)
    t, h, w = prompt.grid
    assert t == (frame_count + 1) // 2 and prompt.num_video_tokens == t * h * w
    ours = sv.generate(qwen_pair, video, method="ar", max_new_tokens=8).tokens
    with torch.no_grad():
        theirs = lm.model.generate(**prompt.inputs, do_sample=False, max_new_tokens=8)
    assert ours == theirs[0, prompt.input_ids.shape[1]:].tolist()
    assert len(ours) == 8 or ours[-1] in lm.eos_token_ids


def test_generation_continues_after_the_last_prompt_token(qwen_pair):
    """Sixteen 64x64 frames at 1 fps: 8 temporal steps 4 apart reach s + 28, beyond the
    question, which transformers 5.24 places from s + max(h, w) = s + 8 on. `generate`
    continues one past the last prompt token, not one past the largest position."""
    lm = qwen_pair.target
    video = sv.from_array(frames(2, 16), fps=1.0)
    prompt = lm.prepare(video)
    s, last = int(prompt.video_index[0]), int(prompt.position_ids[0, 0, -1])
    assert prompt.next_position == last + 1
    assert int(prompt.position_ids.max()) == s + 28 > last, "transformers' layout changed: re-check next_position"
    ours = sv.generate(qwen_pair, video, method="ar", max_new_tokens=8).tokens
    with torch.no_grad():
        theirs = lm.model.generate(**prompt.inputs, do_sample=False, max_new_tokens=8)
    assert ours == theirs[0, prompt.input_ids.shape[1]:].tolist()


def test_an_odd_frame_count_repeats_the_last_frame(qwen_pair):
    lm = qwen_pair.target
    five = frames(0, 5)
    odd = lm.prepare(sv.from_array(five, fps=4.0))
    even = lm.prepare(sv.from_array(np.concatenate([five, five[-1:]]), fps=4.0))
    assert odd.grid == even.grid == (3, 8, 8)
    for key in ("input_ids", "pixel_values_videos", "second_per_grid_ts"):
        assert torch.equal(odd.inputs[key], even.inputs[key]), key
    assert torch.equal(odd.position_ids, even.position_ids)


def test_positions_are_3d_and_follow_the_frame_rate(qwen_pair):
    """Six 64x64 frames -> grid (3, 8, 8); tokens_per_second=2, two frames per temporal patch,
    so time steps are 2*2/fps: 2 at 2 fps, 0.5 at 8 fps (floored after multiplying)."""
    lm = qwen_pair.target
    clip = frames(1, 6)
    slow, fast = (lm.prepare(sv.from_array(clip, fps=fps)) for fps in (2.0, 8.0))
    assert torch.equal(slow.input_ids, fast.input_ids)
    s = int(slow.video_index[0])  # position of the first video token = text tokens before it
    assert slow.position_ids.shape == (3, 1, slow.input_ids.shape[1])
    t, i, j = torch.meshgrid(torch.arange(3), torch.arange(8), torch.arange(8), indexing="ij")
    for prompt, step in ((slow, 2.0), (fast, 0.5)):
        video = prompt.position_ids[:, 0, prompt.video_index]
        assert torch.equal(video[0], s + (t.flatten() * step).long())
        assert torch.equal(video[1], s + i.flatten()) and torch.equal(video[2], s + j.flatten())
        assert prompt.next_position == int(prompt.position_ids.max()) + 1 == int(prompt.position_ids[0, 0, -1]) + 1
    assert not torch.equal(slow.position_ids, fast.position_ids)
    # text: one position per token, equal in all three rows
    text = slow.position_ids[:, 0, slow.text_index]
    assert (text == text[0]).all() and text[0, : s].tolist() == list(range(s))


def test_pruned_prefill_keeps_original_positions(qwen_pair):
    """Prefilling only the kept rows at their original 3-D positions equals a full prefill in
    which nothing attends to the pruned video tokens; renumbering the kept tokens does not."""
    lm = qwen_pair.target
    prompt = lm.prepare(sv.sample_video("bikes", 6), "what colour is the square?")
    keep = sv.keep_uniform(prompt.num_video_tokens, 0.75)
    rows = prompt.rows(keep)
    kept = prompt.position_ids[..., rows]  # [3, 1, len(rows)]: the draft's positions
    is_video = prompt.input_ids[0, rows] == lm.video_token_id
    assert torch.equal(kept[:, 0, is_video], prompt.position_ids[:, 0, prompt.video_index[keep]])
    assert torch.equal(kept[:, 0, ~is_video], prompt.position_ids[:, 0, prompt.text_index])
    embeds = lm.embed(prompt)
    pruned = lm.forward(embeds[:, rows], prompt.position_ids[..., rows], lm.new_cache())

    length = prompt.input_ids.shape[1]
    visible = torch.ones(length, length).tril().bool()
    visible[:, prompt.video_index] &= torch.isin(prompt.video_index, prompt.video_index[keep])
    visible |= torch.eye(length, dtype=torch.bool)
    mask = torch.zeros(1, 1, length, length).masked_fill(~visible, torch.finfo(torch.float32).min)
    masked = lm.forward(embeds, prompt.position_ids, lm.new_cache(), attention_mask=mask)
    torch.testing.assert_close(pruned, masked[:, rows], atol=1e-5, rtol=1e-5)

    renumbered = lm.forward(embeds[:, rows], lm.position_ids_for(torch.arange(len(rows))), lm.new_cache())
    assert (renumbered[:, -1] - masked[:, -1]).abs().max() > 1e-2


def test_steps_continue_after_a_pruned_prefill(qwen_pair):
    """Verification of several tokens after a pruned prefill equals one token at a time."""
    lm = qwen_pair.target
    prompt = lm.prepare(sv.sample_video("carphone_pristine", 4))
    rows = prompt.rows(sv.keep_uniform(prompt.num_video_tokens, 0.9))
    new = [7, 8, 9, 10]
    positions = torch.arange(prompt.next_position, prompt.next_position + len(new))
    caches = lm.new_cache(), lm.new_cache()
    for cache in caches:
        lm.forward(lm.embed(prompt)[:, rows], prompt.position_ids[..., rows], cache)
    together = lm.step(new, positions, caches[0])
    apart = torch.cat([lm.step([token], positions[i:i + 1], caches[1]) for i, token in enumerate(new)], dim=1)
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)
    assert caches[0].get_seq_length() == len(rows) + len(new)


@pytest.mark.parametrize("which,clip,frame_count", [("tiny", "carphone_pristine", 5), ("self", "bikes", 6)])
def test_every_method_and_ratio_equals_greedy(qwen_pair, which, clip, frame_count):
    """The random draft rejects nearly everything; the target drafting for itself accepts all
    with the full video and part of its proposals once pruned: both rewind paths run."""
    pair = qwen_pair if which == "tiny" else sv.Pair(qwen_pair.target, qwen_pair.target, name="self")
    video = sv.sample_video(clip, frame_count)
    reference = sv.generate(pair, video, method="ar", max_new_tokens=12)
    assert len(reference.tokens) == 12 or reference.tokens[-1] in pair.target.eos_token_ids
    for method in METHODS:
        for ratio in RATIOS if method != "sd" else (0.0,):
            result = sv.generate(pair, video, method=method, ratio=ratio, k=3, max_new_tokens=12)
            assert result.tokens == reference.tokens, (pair.name, clip, method, ratio)
            assert result.draft_video_tokens == sv.keep_budget(result.video_tokens, ratio)


@pytest.mark.parametrize("clip,frame_count", [("bikes", 6), ("bigbuckbunny", 2)])
def test_tree_drafts_equal_greedy(qwen_pair, clip, frame_count):
    """Tree verification gives every node the position root + depth, in all three rows."""
    video = sv.sample_video(clip, frame_count)
    for pair in (qwen_pair, sv.Pair(qwen_pair.target, qwen_pair.target, name="self")):
        reference = sv.generate(pair, video, method="ar", max_new_tokens=12)
        for method in METHODS:
            for ratio in (0.5, 0.9, 0.99) if method != "sd" else (0.0,):
                result = sv.generate(pair, video, method=method, ratio=ratio, max_new_tokens=12,
                                     tree=sv.trees.MC_SIM_7B_63)
                assert result.tokens == reference.tokens, (pair.name, method, ratio)


@pytest.mark.parametrize("frame_count,question", [(2, "Describe the video."), (6, "what colour is the square?")])
def test_scores_equal_eager_attentions(qwen_paths, frame_count, question):
    logits, scores, out, expected, lm = ours_and_eager(qwen_paths[0], frame_count, question)
    assert len(out.attentions) == lm.language_model.config.num_hidden_layers
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits, out.logits[:, -1:], atol=1e-5, rtol=1e-5)


def test_families_cannot_be_mixed(tiny_pair, qwen_pair):
    with pytest.raises(ValueError, match="target is llava_onevision but draft is qwen2_5_vl"):
        sv.Pair(tiny_pair.target, qwen_pair.draft)
    with pytest.raises(ValueError, match="target is qwen2_5_vl but draft is llava_onevision"):
        sv.Pair(qwen_pair.target, tiny_pair.draft)


def test_a_draft_with_another_video_grid_is_refused(tmp_path, qwen_pair):
    tokenizer = qwen_pair.target.tokenizer
    vision = {**builders.QWEN_VISION_SIZES, "patch_size": 8}  # 8-pixel patches: a coarser grid
    folder = builders.save_checkpoint(
        tmp_path / "coarse", builders.qwen2_5_vl_config(tokenizer, builders.DRAFT_SIZES, vision),
        builders.qwen2_5_vl_processor(tokenizer, vision), seed=4,
    )
    with pytest.raises(ValueError, match="video-token grid"):
        sv.Pair(qwen_pair.target, sv.load_lm(str(folder), device="cpu"))


def test_a_draft_whose_processor_sizes_frames_differently_is_refused_before_any_prefill(tmp_path, qwen_pair,
                                                                                         monkeypatch):
    """Blank probe frames are small enough for both processors, so `Pair` accepts this draft; a larger
    frame gives it another grid, and decoding must refuse rather than prune the wrong tokens."""
    tokenizer = qwen_pair.target.tokenizer
    folder = builders.save_checkpoint(
        tmp_path / "larger_frames", builders.qwen2_5_vl_config(tokenizer, builders.DRAFT_SIZES),
        builders.qwen2_5_vl_processor(tokenizer, pixels=(256, 128 * 128)), seed=5,
    )
    pair = sv.Pair(qwen_pair.target, sv.load_lm(str(folder), device="cpu"))
    video = sv.from_array(frames(3, 4, size=128), fps=8.0)
    prompt, draft_prompt = pair.target.prepare(video), pair.draft.prepare(video)
    assert prompt.num_video_tokens != draft_prompt.num_video_tokens
    prefills = []
    monkeypatch.setattr(sv.decoding, "prefill_target", lambda *args, **kwargs: prefills.append(args))
    monkeypatch.setattr(sv.fast, "prefill_target", lambda *args, **kwargs: prefills.append(args))
    for decode in (lambda: sv.generate(pair, video, method="window-back", ratio=0.5),
                   lambda: sv.decoding.generate_sd(pair, prompt, "uniform", 0.5, draft_prompt=draft_prompt),
                   lambda: sv.fast.generate_fast(pair, prompt, "specvlm", 0.5, draft_prompt=draft_prompt,
                                                 compile=False)):
        with pytest.raises(ValueError, match="lays the video out differently"):
            decode()
    assert not prefills


def test_a_prompt_without_video_tokens_is_refused_by_every_speculative_path(qwen_pair):
    import dataclasses

    prompt = qwen_pair.target.prepare(sv.from_array(frames(0, 2), fps=8.0))
    textual = dataclasses.replace(prompt, video_index=prompt.video_index[:0])
    for decode in (lambda: sv.decoding.generate_sd(qwen_pair, textual, "specvlm", 0.9),
                   lambda: sv.fast.generate_fast(qwen_pair, textual, "specvlm", 0.9, compile=False)):
        with pytest.raises(ValueError, match="contains no video tokens"):
            decode()


def test_generate_names_the_loaders_when_given_a_path_or_frames(qwen_pair):
    for wrong in ("clip.mp4", frames(0, 2)):
        with pytest.raises(TypeError, match="sv.load_video"):
            sv.generate(qwen_pair, wrong)
