"""Verifier scores equal eager `output_attentions`, without materialising full matrices."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

import specvlm as sv
from specvlm.attention import ScoreRecorder, enable_scores, prefill_with_scores, query_rows


def ours_and_eager(path, frames: int, question: str):
    """(our last-row logits, our scores [n], eager outputs with attentions, eager-averaged scores [n], lm)."""
    lm = sv.load_lm(str(path), device="cpu")
    enable_scores(lm)
    prompt = lm.prepare(sv.sample_video("bigbuckbunny", frames), question)
    logits, scores = prefill_with_scores(lm, prompt, lm.embed(prompt), lm.new_cache())
    eager = AutoModelForImageTextToText.from_pretrained(str(path), attn_implementation="eager")
    with torch.no_grad():
        out = eager(**prompt.inputs, output_attentions=True)
    rows = query_rows(prompt)
    expected = torch.stack([a[0].mean(0)[rows].mean(0) for a in out.attentions]).mean(0)[prompt.video_index]
    return logits, scores, out, expected, lm


@pytest.mark.parametrize("frames,question", [(1, "Describe the video."), (4, "what colour is the square?")])
def test_scores_equal_eager_attentions(tiny_paths, frames, question):
    logits, scores, out, expected, _ = ours_and_eager(tiny_paths[0], frames, question)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits, out.logits[:, -1:], atol=1e-5, rtol=1e-5)
    assert scores.shape == expected.shape and (scores > 0).all()


def test_query_rows_are_the_text_after_the_video(tiny_pair):
    prompt = tiny_pair.target.prepare(sv.sample_video("bikes", 2), "how many objects are there?")
    rows = query_rows(prompt)
    assert rows[0] == prompt.video_index[-1] + 1 and rows[-1] == prompt.input_ids.shape[1] - 1


def test_scores_need_the_recording_attention(tiny_paths):
    lm = sv.load_lm(str(tiny_paths[0]), device="cpu")  # plain sdpa: nothing records
    prompt = lm.prepare(sv.sample_video("bikes", 1))
    recorder = ScoreRecorder(query_rows(prompt), prompt.video_index)
    lm.forward(lm.embed(prompt), prompt.position_ids, lm.new_cache(), recorder=recorder)
    with pytest.raises(RuntimeError, match="attn_implementation"):
        recorder.scores


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_scores_read_a_given_mask_as_the_softmax_does(kind):
    """The recorder's bool and additive mask branches (sdpa passes its mask when it builds one), with
    grouped KV heads and keys cached before the query: the exact softmax over the visible keys."""
    generator = torch.Generator().manual_seed(0)
    batch, kv_heads, groups, queries, cached, dim = 1, 2, 3, 5, 3, 8
    query = torch.randn(batch, kv_heads * groups, queries, dim, generator=generator)
    key = torch.randn(batch, kv_heads, cached + queries, dim, generator=generator)
    visible = torch.ones(queries, cached + queries, dtype=torch.bool).tril(cached)
    visible[:, 1] = False  # a key hidden from every row, e.g. padding
    mask = visible[None, None] if kind == "bool" else torch.zeros(visible.shape).masked_fill(~visible, -1e9)[None, None]
    rows, keys = torch.tensor([3, 4]), torch.tensor([0, 2, 5])
    recorder = ScoreRecorder(rows, keys)
    recorder.add(query, key, mask, dim ** -0.5, groups)
    logits = (query[:, :, rows] @ key.repeat_interleave(groups, 1).transpose(-1, -2)) * dim ** -0.5
    exact = logits.masked_fill(~visible[rows], float("-inf")).softmax(-1)[..., keys].mean(dim=(1, 2))
    torch.testing.assert_close(recorder.scores, exact)
