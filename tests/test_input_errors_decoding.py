"""Bad input to the decoding entry points and the acceptance rules: a clear error before any
prefill (or a warning for an argument that has no effect), never a deep AttributeError or a
silently wrong answer."""

import warnings

import numpy as np
import pytest
import torch

import specvlm as sv
from specvlm import acceptance, decoding, fast
from specvlm.sampling import Picker

from .conftest import random_video


@pytest.fixture
def video():
    return random_video(0, 1)


@pytest.fixture
def prompt(tiny_pair, video):
    return tiny_pair.target.prepare(video)


@pytest.fixture
def no_prefill(monkeypatch):
    """Every check must run before the models do any work."""
    monkeypatch.setattr(decoding, "prefill_pruned", lambda *args, **kwargs: pytest.fail("prefilled"))
    monkeypatch.setattr(decoding, "prefill_target", lambda *args, **kwargs: pytest.fail("prefilled"))
    monkeypatch.setattr(fast, "prefill_pruned", lambda *args, **kwargs: pytest.fail("prefilled"))
    monkeypatch.setattr(fast, "prefill_target", lambda *args, **kwargs: pytest.fail("prefilled"))
    monkeypatch.setattr(fast, "_generate_ar", lambda *args, **kwargs: pytest.fail("decoded"))


# 1. a Video where generate_fast takes a Prompt

@pytest.mark.parametrize("method", ["specvlm", "sd", "ar"])
def test_generate_fast_refuses_a_video_and_says_how_to_prepare_a_prompt(tiny_pair, video, method, no_prefill):
    with pytest.raises(TypeError, match=r"takes a Prompt .* got Video .*pair\.target\.prepare\(video, question\)"):
        fast.generate_fast(tiny_pair, video, method=method, compile=False)


def test_a_video_as_draft_prompt_is_refused(tiny_pair, video, prompt, no_prefill):
    with pytest.raises(TypeError, match="Prompt as draft_prompt, got Video"):
        fast.generate_fast(tiny_pair, prompt, draft_prompt=video, compile=False)
    with pytest.raises(TypeError, match="Prompt as draft_prompt, got Video"):
        decoding.generate_sd(tiny_pair, prompt, draft_prompt=video)
    with pytest.raises(TypeError, match="Prompt as prompt, got Video"):
        decoding.generate_ar(tiny_pair.target, video)


# 2. k, temperature, top_p and seed of the wrong kind

@pytest.mark.parametrize("bad,match", [
    (dict(k=2.5), "k \\(draft tokens per round\\) must be an int"),
    (dict(k="5"), "k \\(draft tokens per round\\) must be an int"),
    (dict(k=True), "k \\(draft tokens per round\\) must be an int"),
    (dict(temperature="0.5"), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=True), "temperature must be a finite number >= 0"),
    (dict(temperature=0.7, top_p="0.5"), "top_p must be None .* in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p must be None .* in \\(0, 1\\]"),
    (dict(method="random", seed="a"), "seed must be an integer"),
    (dict(method="random", seed=1.5), "seed must be an integer"),
    (dict(method="ar", seed=1.5), "seed must be an integer"),
    (dict(method="random", seed=2 ** 70), "seed must be an integer"),
])
def test_generate_refuses_numbers_of_the_wrong_kind(tiny_pair, video, bad, match, no_prefill):
    with pytest.raises(ValueError, match=match):
        sv.generate(tiny_pair, video, **bad)


@pytest.mark.parametrize("bad,match", [
    (dict(k=2.5), "k \\(draft tokens per round\\) must be an int"),
    (dict(k="5"), "k \\(draft tokens per round\\) must be an int"),
    (dict(k=False), "k \\(draft tokens per round\\) must be an int"),
    (dict(temperature="0.5"), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(method="random", seed="a"), "seed must be an integer"),
    (dict(method="random", seed=1.5), "seed must be an integer"),
])
def test_generate_fast_refuses_numbers_of_the_wrong_kind(tiny_pair, prompt, bad, match, no_prefill):
    with pytest.raises(ValueError, match=match):
        fast.generate_fast(tiny_pair, prompt, compile=False, **bad)


@pytest.mark.parametrize("temperature", [float("inf"), -0.1, "1", None])
def test_picker_refuses_a_temperature_that_is_not_a_finite_number(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        Picker(temperature)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        acceptance.probs_from_logits(torch.zeros(3), temperature)


def test_numpy_integers_are_accepted_and_change_nothing(tiny_pair, video, prompt):
    expected = sv.generate(tiny_pair, video, method="random", ratio=0.5, k=3, seed=1, max_new_tokens=8)
    got = sv.generate(tiny_pair, video, method="random", ratio=0.5, k=np.int64(3), seed=np.int64(1),
                      max_new_tokens=8)
    assert got.tokens == expected.tokens and got.accepted == expected.accepted
    got = fast.generate_fast(tiny_pair, prompt, method="random", ratio=0.5, k=np.int32(3), seed=np.int64(1),
                             max_new_tokens=8, compile=False)
    assert got.tokens == expected.tokens and got.accepted == expected.accepted
    sampled = sv.generate(tiny_pair, video, k=3, temperature=0.8, seed=5, max_new_tokens=8)
    assert sv.generate(tiny_pair, video, k=3, temperature=np.float32(0.8), seed=np.int64(5),
                       max_new_tokens=8).tokens == sampled.tokens


# 3. a tree that is not a Tree

@pytest.mark.parametrize("tree", [[[0], [1]], "MC_SIM_7B_63", ((0,), (0, 0))])
def test_a_tree_must_be_a_tree(tiny_pair, video, prompt, tree, no_prefill):
    with pytest.raises(TypeError, match=r"tree must be None .* or a Tree.*sv\.Tree\.from_paths"):
        sv.generate(tiny_pair, video, tree=tree)
    with pytest.raises(TypeError, match=r"tree must be None .* or a Tree.*sv\.Tree\.from_paths"):
        fast.generate_fast(tiny_pair, prompt, tree=tree, compile=False)


# 4. a first argument that is not a Pair

@pytest.mark.parametrize("make", [lambda pair: (pair.target, pair.draft), lambda pair: pair.target,
                                  lambda pair: "tiny"])
def test_the_first_argument_must_be_a_pair(tiny_pair, video, prompt, make, no_prefill):
    bad = make(tiny_pair)
    with pytest.raises(TypeError, match=r"generate takes a Pair .*sv\.load_pair"):
        sv.generate(bad, video)
    with pytest.raises(TypeError, match=r"generate_fast takes a Pair .*sv\.load_pair"):
        fast.generate_fast(bad, prompt, compile=False)
    with pytest.raises(TypeError, match=r"generate_sd takes a Pair .*sv\.load_pair"):
        decoding.generate_sd(bad, prompt)


# 5. arguments that would be silently ignored, and the ratio for every method

@pytest.mark.parametrize("method", ["specvlm", "ar"])
def test_top_p_without_temperature_warns(tiny_pair, video, method):
    with pytest.warns(UserWarning, match="top_p=0.5 is ignored: temperature 0 decodes greedily"):
        result = sv.generate(tiny_pair, video, method=method, top_p=0.5, max_new_tokens=4)
    assert result.tokens == sv.generate(tiny_pair, video, method="ar", max_new_tokens=4).tokens


def test_top_p_with_temperature_or_left_out_does_not_warn(tiny_pair, video):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sv.generate(tiny_pair, video, temperature=0.7, top_p=0.5, max_new_tokens=4)
        sv.generate(tiny_pair, video, max_new_tokens=4)
        sv.generate(tiny_pair, video, top_p=1.0, max_new_tokens=4)  # the whole distribution: nothing ignored


@pytest.mark.parametrize("method", ["ar", "sd", "specvlm", "uniform"])
@pytest.mark.parametrize("ratio", [5, 1.0, -0.1, "0.5", float("nan")])
def test_the_ratio_is_checked_for_every_method(tiny_pair, video, prompt, method, ratio, no_prefill):
    with pytest.raises(ValueError, match="ratio .* must be a float in \\[0, 1\\)"):
        sv.generate(tiny_pair, video, method=method, ratio=ratio)
    with pytest.raises(ValueError, match="ratio .* must be a float in \\[0, 1\\)"):
        fast.generate_fast(tiny_pair, prompt, method=method, ratio=ratio, compile=False)


# 6. the acceptance rules' shapes

def test_greedy_chain_refuses_k_rows_of_logits():
    with pytest.raises(ValueError, match=r"target_logits must be a tensor \[3, V\] \(k\+1 rows .*got shape \[2, 10\]"):
        sv.greedy_chain(torch.tensor([1, 2]), torch.randn(2, 10))
    with pytest.raises(ValueError, match=r"target_logits must be a tensor \[3, V\]"):
        sv.greedy_chain(torch.tensor([1, 2]), torch.randn(10))
    with pytest.raises(ValueError, match=r"predicted must be a tensor \[3\]"):
        acceptance.chain_accept(torch.tensor([1, 2]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"draft_tokens must be a tensor \[k\]"):
        sv.greedy_chain(torch.tensor(1), torch.randn(2, 10))
    assert sv.greedy_chain(torch.tensor([5, 7, 3]), torch.eye(10)[[5, 7, 2, 9]]) == (2, 2)  # still right


def test_tree_acceptance_refuses_rows_that_are_not_one_per_node():
    tree = sv.Tree.from_paths([[0], [1], [0, 0]])  # 4 nodes with the root
    tokens = torch.tensor([4, 8, 6, 1])
    with pytest.raises(ValueError, match=r"target_logits must be a tensor \[4, V\] \(one row per tree node"):
        sv.greedy_tree(tree, tokens, torch.randn(3, 10))
    with pytest.raises(ValueError, match=r"node_tokens must be a tensor \[4\]"):
        sv.greedy_tree(tree, tokens[:3], torch.randn(4, 10))
    with pytest.raises(ValueError, match=r"predicted must be a tensor \[4\]"):
        acceptance.tree_accept(tree, tokens, torch.tensor([6, 2, 3]))
    assert sv.greedy_tree(tree, tokens, torch.eye(10)[[6, 2, 3, 5]]) == ([2], 3)  # still right


def test_sampling_acceptance_refuses_rows_of_the_wrong_count():
    q, p = torch.full((2, 4), 0.25), torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match=r"p_probs must be a tensor \[3, V\]"):
        sv.sample_chain(torch.tensor([1, 2]), q, p[:2])
    with pytest.raises(ValueError, match=r"q_probs must be a tensor \[2, V\]"):
        sv.sample_chain(torch.tensor([1, 2]), q[:1], p)
    with pytest.raises(ValueError, match="q_probs covers 3 tokens but p_probs 4"):
        sv.sample_chain(torch.tensor([1, 2]), q[:, :3], p)
    tree = sv.Tree.from_paths([[0], [1]])
    with pytest.raises(ValueError, match=r"p_probs must be a tensor \[3, V\] \(one row per tree node"):
        sv.sample_tree(tree, torch.tensor([0, 1, 2]), torch.full((3, 4), 0.25), torch.full((2, 4), 0.25))
