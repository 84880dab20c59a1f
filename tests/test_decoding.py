"""The core promise: every speculative path returns the target's own greedy tokens."""

import pytest
import torch

import specvlm as sv
from specvlm.decoding import truncate

from .conftest import random_video

METHODS = ("sd",) + tuple(sv.pruning.METHODS)
RATIOS = (0.0, 0.5, 0.9, 0.99)


def clips():
    yield "bigbuckbunny", 1, sv.sample_video("bigbuckbunny", 1)
    yield "bikes", 5, sv.sample_video("bikes", 5)
    yield "carphone", 16, sv.sample_video("carphone_pristine", 16)
    yield "noise", 3, random_video(0, 3)


@pytest.fixture(scope="module", params=["tiny_pair", "self_pair", "noisy_pair"])
def pair(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("name,frames,video", list(clips()), ids=lambda v: str(v) if not hasattr(v, "frames") else "")
def test_every_method_and_ratio_equals_greedy(pair, name, frames, video):
    reference = sv.generate(pair, video, method="ar", max_new_tokens=20)
    assert len(reference.tokens) == 20 or reference.tokens[-1] in pair.target.eos_token_ids
    for method in METHODS:
        for ratio in RATIOS if method != "sd" else (0.0,):
            for seed in (0, 1) if method == "random" else (0,):
                result = sv.generate(pair, video, method=method, ratio=ratio, k=4, max_new_tokens=20, seed=seed)
                assert result.tokens == reference.tokens, (pair.name, name, method, ratio, seed)
                assert result.draft_video_tokens == sv.keep_budget(result.video_tokens, ratio)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("max_new_tokens", [1, 2, 7, 30])
def test_self_speculation_accepts_everything_and_never_overshoots(self_pair, k, max_new_tokens):
    video = sv.sample_video("bikes", 4)
    reference = sv.generate(self_pair, video, method="ar", max_new_tokens=max_new_tokens)
    result = sv.generate(self_pair, video, method="sd", k=k, max_new_tokens=max_new_tokens)
    assert result.tokens == reference.tokens
    assert len(result.tokens) <= max_new_tokens
    # the draft is the target with the full video: every proposal is accepted
    full_rounds = result.accepted[:-1]
    assert all(n == k for n in full_rounds)
    assert sum(result.accepted) + result.rounds + 1 >= len(result.tokens)


def test_caches_hold_exactly_the_committed_text(noisy_pair):
    video = sv.sample_video("bigbuckbunny", 4)
    result = sv.generate(noisy_pair, video, method="specvlm", ratio=0.75, k=3, max_new_tokens=25)
    prompt = noisy_pair.target.prepare(video)
    assert result.target_cache_len == prompt.input_ids.shape[1] + len(result.tokens) - 1
    pruned = result.video_tokens - result.draft_video_tokens
    assert result.draft_cache_len <= result.target_cache_len - pruned
    assert 0 < result.mean_accepted < 3  # partial acceptance: the rewind paths ran


def test_pruned_draft_sees_fewer_tokens_but_same_positions(tiny_pair):
    video = sv.sample_video("bikes", 8)
    prompt = tiny_pair.target.prepare(video)
    keep = sv.keep_uniform(prompt.num_video_tokens, 0.9)
    rows = prompt.rows(keep)
    assert len(rows) == prompt.input_ids.shape[1] - prompt.num_video_tokens + len(keep)
    assert torch.equal(prompt.position_ids[0, rows], rows)  # original positions kept
    assert set(prompt.video_index[keep].tolist()) <= set(rows.tolist())


def test_truncate_stops_after_first_eos():
    assert truncate([5, 2, 7], frozenset({2}), 10) == [5, 2]
    assert truncate([5, 6, 7], frozenset({2}), 2) == [5, 6]


@pytest.mark.parametrize("bad,match", [
    (dict(ratio=1.0), "ratio"),
    (dict(ratio=-0.1), "ratio"),
    (dict(method="nope"), "unknown method"),
    (dict(k=0), "k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(mass=0.0), "mass"),
])
def test_bad_arguments_raise_clear_errors(tiny_pair, bad, match):
    video = sv.sample_video("bikes", 2)
    with pytest.raises(ValueError, match=match):
        sv.generate(tiny_pair, video, **{"method": "specvlm", **bad})


def test_a_prompt_without_video_is_refused(tiny_pair):
    with pytest.raises(ValueError, match="needs a video"):
        sv.generate(tiny_pair, None, "Describe.")


def test_every_decoding_entry_point_refuses_a_bad_length_or_question_before_any_prefill(tiny_pair, monkeypatch):
    prompt = tiny_pair.target.prepare(sv.sample_video("bikes", 2))
    monkeypatch.setattr(sv.decoding, "prefill_pruned", lambda *args: pytest.fail("prefilled"))
    monkeypatch.setattr(sv.decoding, "prefill_target", lambda *args, **kwargs: pytest.fail("prefilled"))
    for tokens in (0, -3, 2.5):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
            sv.decoding.generate_ar(tiny_pair.target, prompt, tokens)
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
            sv.decoding.generate_sd(tiny_pair, prompt, "specvlm", 0.9, max_new_tokens=tokens)
    for question in (None, "", "   "):
        with pytest.raises(ValueError, match="question must be a non-empty string"):
            sv.generate(tiny_pair, sv.sample_video("bikes", 2), question)


def test_a_numpy_integer_is_a_token_count(tiny_pair):
    import numpy as np

    prompt = tiny_pair.target.prepare(sv.sample_video("bikes", 2))
    assert len(sv.decoding.generate_ar(tiny_pair.target, prompt, np.int64(3)).tokens) <= 3
