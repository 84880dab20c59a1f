"""Replayed greedy chain speculative decoding equals `generate_sd`, round for round."""

import pytest
import torch

import specvlm as sv
from specvlm import synthetic
from specvlm.replay import chain_rounds, draft_matches, replay_mat, target_tokens

from .conftest import random_video

METHODS = ("sd",) + tuple(sv.pruning.METHODS)
T, F = True, False


# --- chain_rounds on hand-made match vectors ------------------------------------------------

@pytest.mark.parametrize("matches,k,max_new_tokens,end,expected", [
    ([T, T, F, T, T, T, T, T], 2, 8, None, [1, 2, 1]),  # the last round may draft only 8 - 6 - 1 = 1
    ([T] * 10, 3, 10, None, [3, 3, 0]),                  # a round with no room left still commits the bonus
    ([F] * 6, 4, 6, None, [0, 0, 0, 0, 0]),              # all rejected: one token per round
    ([T] * 10, 4, 64, 6, [4, 4]),                        # the end token (6) is accepted, and 7, 8, 9 after it
    ([T, T, T, T, T, F], 4, 64, 3, [4]),                 # committed text runs past the end token: stop
    ([F, F, F], 2, 64, 2, [0, 0]),                       # the end token is a bonus token
    ([T], 5, 64, 0, []),                                 # the target's first token ends the text
    ([T], 5, 1, None, []),                               # one token: the target's prefill gives it
    ([T, F], 5, 3, None, [0, 0]),                        # entries after a mismatch are never read
])
def test_chain_rounds_by_hand(matches, k, max_new_tokens, end, expected):
    assert chain_rounds(matches, k, max_new_tokens, end) == expected
    assert chain_rounds(torch.tensor(matches), k, max_new_tokens, end) == expected


def test_chain_rounds_never_overshoots_max_new_tokens():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        max_new_tokens = int(torch.randint(1, 30, (1,), generator=generator))
        k = int(torch.randint(1, 8, (1,), generator=generator))
        matches = torch.rand(max_new_tokens, generator=generator) < 0.7
        accepted = chain_rounds(matches, k, max_new_tokens)
        assert 1 + sum(accepted) + len(accepted) == max_new_tokens
        assert all(0 <= n <= k for n in accepted)


@pytest.mark.parametrize("bad,match", [
    (dict(matches=[T, T, T], k=4, max_new_tokens=64), "past the end token"),
    (dict(matches=[T] * 5, k=0, max_new_tokens=64), "k"),
    (dict(matches=[T] * 5, k=2, max_new_tokens=0), "max_new_tokens"),
    (dict(matches=[T] * 5, k=2, max_new_tokens=5, end=-1), "end"),
])
def test_chain_rounds_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        chain_rounds(**bad)


# --- replay against generate_sd -------------------------------------------------------------

def assert_replay_equals_generate(pair, video, methods, ratios, k, max_new_tokens, seeds=(0,)):
    replay = replay_mat(pair, video, methods, ratios, k=k, max_new_tokens=max_new_tokens, seeds=seeds)
    assert len(replay.accepted) == sum(len(ratios) * (len(seeds) if m == "random" else 1) for m in methods)
    for (method, ratio, seed), accepted in replay.accepted.items():
        result = sv.generate(pair, video, method=method, ratio=ratio, k=k, max_new_tokens=max_new_tokens, seed=seed)
        assert result.tokens == replay.tokens, (pair.name, method, ratio, seed)
        assert result.accepted == accepted, (pair.name, method, ratio, seed, k, max_new_tokens)
        assert replay.kept[(method, ratio, seed)] == result.draft_video_tokens
    return replay


def overshoots(replay) -> bool:
    """Some run committed tokens past the end of the output (drafts accepted after the end token)."""
    return any(1 + sum(a) + len(a) > len(replay.tokens) for a in replay.accepted.values())


@pytest.fixture(scope="module")
def embedded():
    return sv.load_pair("tiny")


def synthetic_video(seed: int, frames: int = 4):
    return sv.from_array(synthetic.make_clip(seed, num_frames=frames).frames, fps=8.0)


@pytest.mark.parametrize("seed,k,max_new_tokens", [(0, 5, 64), (3, 3, 7), (5, 2, 40)])
def test_embedded_pair(embedded, seed, k, max_new_tokens):
    assert_replay_equals_generate(embedded, synthetic_video(seed), METHODS, (0.5, 0.9), k, max_new_tokens, seeds=(0, 1))


def test_embedded_self_speculation_accepts_past_the_end_token(embedded):
    """The target drafting for itself with the whole video accepts everything, also after the end
    token: the replay needs the target's tokens beyond it. Over k = 4, 5, 6 one run must cross it
    (all three align with the end only if its index is a multiple of 5, 6 and 7)."""
    pair = sv.Pair(embedded.target, embedded.target, name="embedded self")
    video = synthetic_video(1)
    replays = [assert_replay_equals_generate(pair, video, ("sd", "specvlm"), (0.9,), k, 64) for k in (4, 5, 6)]
    assert replays[0].tokens[-1] in pair.target.eos_token_ids, "the embedded pair no longer ends its captions"
    assert any(overshoots(r) for r in replays)


@pytest.fixture(scope="module", params=["tiny_pair", "self_pair", "noisy_pair"])
def random_pair(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("k,max_new_tokens", [(4, 20), (5, 9), (1, 6)])
def test_random_pairs(random_pair, k, max_new_tokens):
    assert_replay_equals_generate(random_pair, random_video(0, 3), METHODS, (0.5, 0.9), k, max_new_tokens,
                                  seeds=(0, 1))


def test_noisy_pair_accepts_partly(noisy_pair):
    replay = assert_replay_equals_generate(noisy_pair, random_video(2, 4), ("sd", "uniform"), (0.5,), 3, 30)
    rounds = [n for accepted in replay.accepted.values() for n in accepted]
    assert 0 in rounds and any(n > 0 for n in rounds)  # both the rejecting and the accepting paths ran


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    target, draft = sv.make_tiny_pair(tmp_path_factory.mktemp("tiny_qwen_replay"), seed=0, family="qwen2_5_vl")
    return sv.load_pair(str(target), str(draft), device="cpu")


@pytest.mark.parametrize("which", ["pair", "self"])
def test_qwen_pairs(qwen_pair, which):
    pair = qwen_pair if which == "pair" else sv.Pair(qwen_pair.target, qwen_pair.target, name="qwen self")
    video = sv.sample_video("bikes", 6)
    replay = assert_replay_equals_generate(pair, video, METHODS, (0.5, 0.9), 3, 12, seeds=(0, 1))
    if which == "self":  # the target drafting with its whole video: everything is accepted
        end = len(replay.tokens) - 1 if replay.tokens[-1] in pair.target.eos_token_ids else None
        assert replay.accepted[("sd", 0.5, 0)] == chain_rounds([T] * 15, 3, 12, end)


# --- the pieces -----------------------------------------------------------------------------

def test_target_tokens_continue_past_the_end_token(embedded):
    prompt = embedded.target.prepare(synthetic_video(2))
    ar = sv.generate_ar(embedded.target, prompt, 64).tokens
    assert ar[-1] in embedded.target.eos_token_ids, "the embedded pair no longer ends its captions"
    tokens, scores = target_tokens(embedded.target, prompt, 64, past_end=3, with_scores=True)
    assert tokens[: len(ar)] == ar and len(tokens) == min(64, len(ar) + 3)
    assert scores.shape == (prompt.num_video_tokens,)
    short, none = target_tokens(embedded.target, prompt, 4, past_end=3)
    assert short == ar[:4] and none is None


def test_a_draft_that_is_the_target_matches_every_token(self_pair):
    prompt = self_pair.target.prepare(random_video(1, 2))
    tokens, _ = target_tokens(self_pair.target, prompt, 15, past_end=5)
    assert draft_matches(self_pair, prompt, tokens, None).all()
    pruned = draft_matches(self_pair, prompt, tokens, sv.keep_uniform(prompt.num_video_tokens, 0.99))
    assert pruned.shape == (len(tokens),) and pruned.dtype == torch.bool


def test_replay_rejects_unknown_methods(tiny_pair):
    with pytest.raises(ValueError, match="unknown methods"):
        replay_mat(tiny_pair, random_video(0, 2), ["ar"], [0.5])


def test_replay_refuses_what_generate_sd_refuses_before_decoding(embedded, monkeypatch):
    import specvlm.replay as replay

    monkeypatch.setattr(replay, "target_tokens", lambda *args, **kwargs: pytest.fail("decoded before checking"))
    two = embedded.target.prepare(sv.sample_video("bikes", 2))
    four = embedded.draft.prepare(sv.sample_video("bikes", 4))
    for prompt, draft_prompt in ((two, four), (four, two)):
        with pytest.raises(ValueError, match="lays the video out differently"):
            replay_mat(embedded, prompt, ["uniform"], [0.5], draft_prompt=draft_prompt)
    with pytest.raises(ValueError, match="ratio"):
        replay_mat(embedded, two, ["uniform"], [1.0])
    with pytest.raises(ValueError, match="mass"):
        replay_mat(embedded, two, ["specvlm"], [0.5], mass=0.0)
