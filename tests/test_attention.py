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
