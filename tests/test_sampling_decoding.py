"""Speculative sampling keeps the target's distribution: chi-square tests on real models.

Each trial restarts one speculative round from the same committed text with a new seed and
records the first token the round emits, whose exact distribution is the target's softmax
after that text. Pearson's statistic is compared with the chi-square quantile at alpha=1e-3
(critical_value, from test_acceptance), tokens of small expected count lumped together.
"""

import copy

import pytest
import torch

import specvlm as sv
from specvlm.decoding import Speculation, chain_round, prefill_pruned, prefill_target, tree_round
from specvlm.sampling import Picker
from specvlm.trees import Tree

from .test_acceptance import critical_value

TEMPERATURE = 1.5
TRIALS = 1500
BRANCHY = Tree.from_paths([[0], [1], [2], [0, 0], [1, 0], [0, 0, 0]])


def lumped_chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0):
    expected = probs.double() * counts.sum()
    big = expected >= min_expected
    observed = torch.cat([counts[big].double(), counts[~big].sum(0, keepdim=True).double()])
    expect = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    cells = expect > 0
    statistic = float(((observed[cells] - expect[cells]) ** 2 / expect[cells]).sum())
    return statistic, int(cells.sum()) - 1


def first_round_tokens(pair, run_round, trials=TRIALS, temperature=TEMPERATURE, top_p=None):
    """Counts [V] of the first emitted token over seeded rounds, and the exact target distribution."""
    prompt = pair.target.prepare(sv.sample_video("bikes", 1), "what colour is the square?")
    logits, target_cache, _ = prefill_target(pair.target, prompt, with_scores=False)
    root = int(logits.argmax())
    _, draft_cache = prefill_pruned(pair.draft, prompt, sv.keep_uniform(prompt.num_video_tokens, 0.5))
    exact_logits = pair.target.step([root], torch.tensor([prompt.next_position]), copy.deepcopy(target_cache))
    exact = Picker(temperature, top_p).probs(exact_logits[0, -1])
    counts = torch.zeros_like(exact)
    for seed in range(trials):
        state = Speculation(pair.target, pair.draft, prompt, copy.deepcopy(target_cache),
                            copy.deepcopy(draft_cache), [root], Picker(temperature, top_p, seed))
        run_round(state)
        counts[state.out[1]] += 1
    return counts, exact


ROUNDS = {
    "chain": lambda state: chain_round(state, 3),
    "tree": lambda state: tree_round(state, BRANCHY),
}


@pytest.mark.parametrize("shape", ROUNDS)
@pytest.mark.parametrize("pair_name", ["tiny_pair", "noisy_pair"])
def test_speculative_sampling_emits_the_targets_distribution(request, pair_name, shape):
    pair = request.getfixturevalue(pair_name)
    counts, exact = first_round_tokens(pair, ROUNDS[shape])
    statistic, df = lumped_chi_square(counts, exact)
    assert statistic < critical_value(df), (statistic, df)
    # and against the target's own sampling (two-sample chi-square on the same cells)
    own = torch.zeros_like(exact)
    picker = Picker(TEMPERATURE, seed=10**6)
    for _ in range(TRIALS):
        own[torch.multinomial(exact, 1, generator=picker.generator)] += 1
    cells = (counts + own) >= 10
    observed = torch.stack([torch.cat([counts[cells], counts[~cells].sum(0, keepdim=True)]),
                            torch.cat([own[cells], own[~cells].sum(0, keepdim=True)])]).double()
    expected = observed.sum(0, keepdim=True) * observed.sum(1, keepdim=True) / observed.sum()
    used = expected[0] > 0
    two_sample = float(((observed[:, used] - expected[:, used]) ** 2 / expected[:, used]).sum())
    assert two_sample < critical_value(int(used.sum()) - 1), two_sample


def test_top_p_sampling_never_leaves_the_nucleus(noisy_pair):
    counts, exact = first_round_tokens(noisy_pair, ROUNDS["chain"], trials=400, top_p=0.5)
    assert counts[exact == 0].sum() == 0
    statistic, df = lumped_chi_square(counts, exact)
    assert statistic < critical_value(df)


def test_the_check_detects_a_biased_sampler(noisy_pair):
    """Negative control: greedy drafts accepted as if sampled are not the target's distribution."""
    def always_accept(state):
        state.picker = Picker()  # greedy proposals and greedy verification: deterministic
        chain_round(state, 3)

    counts, exact = first_round_tokens(noisy_pair, always_accept, trials=300)
    statistic, df = lumped_chi_square(counts, exact)
    assert statistic > critical_value(df)


def test_sampled_generation_is_seeded_and_never_overshoots(noisy_pair):
    video = sv.sample_video("bikes", 1)
    a = sv.generate(noisy_pair, video, method="specvlm", ratio=0.5, temperature=1.0, seed=3, max_new_tokens=8)
    b = sv.generate(noisy_pair, video, method="specvlm", ratio=0.5, temperature=1.0, seed=3, max_new_tokens=8)
    assert a.tokens == b.tokens and len(a.tokens) <= 8
    tree = sv.generate(noisy_pair, video, method="specvlm", ratio=0.5, temperature=1.0, seed=3, tree=BRANCHY,
                       max_new_tokens=8)
    assert len(tree.tokens) <= 8


def with_fewer_output_rows(lm, missing: int = 40):
    """A copy of `lm` whose output layer lacks its last `missing` rows (as LLaVA-OneVision's 0.5B has fewer
    padded rows than its 7B); its input embedding still reads every token."""
    lm = copy.deepcopy(lm)
    head = lm.model.get_output_embeddings()
    narrow = torch.nn.Linear(head.in_features, head.out_features - missing, bias=False, dtype=head.weight.dtype)
    narrow.weight.data.copy_(head.weight.data[:-missing])
    lm.model.lm_head = narrow
    return lm


def output_rows(lm) -> int:
    return lm.model.get_output_embeddings().weight.shape[0]


@pytest.mark.parametrize("shape", ROUNDS)
def test_a_draft_with_fewer_output_rows_still_samples_the_targets_distribution(tiny_pair, shape):
    pair = sv.Pair(tiny_pair.target, with_fewer_output_rows(tiny_pair.draft), name="narrow draft")
    assert output_rows(pair.draft) < output_rows(pair.target)
    counts, exact = first_round_tokens(pair, ROUNDS[shape], trials=600)
    statistic, df = lumped_chi_square(counts, exact)
    assert statistic < critical_value(df), (statistic, df)


def test_a_draft_with_more_output_rows_than_its_target_is_refused(tiny_pair):
    target = with_fewer_output_rows(tiny_pair.target)
    with pytest.raises(ValueError, match="more than the target's"):
        sv.Pair(target, tiny_pair.draft)
