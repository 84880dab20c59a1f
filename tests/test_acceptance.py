import math
import random
from statistics import NormalDist

import pytest
import torch

from specvlm.acceptance import (
    accepted_prefix_length,
    greedy_chain,
    greedy_tree,
    probs_from_logits,
    residual,
    sample_chain,
    sample_tree,
)
from specvlm.trees import MC_SIM_7B_63, Tree, chain

V = 6  # vocabulary of the statistical tests
TRIALS = 20_000


def hand_logits(argmaxes, vocab=10) -> torch.Tensor:
    """+10 at each row's chosen token, -inf elsewhere: [len(argmaxes), vocab]."""
    logits = torch.full((len(argmaxes), vocab), float("-inf"))
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 10.0
    return logits


def one_hot(tokens, vocab=10) -> torch.Tensor:
    return probs_from_logits(hand_logits(tokens, vocab), temperature=1.0)


def critical_value(df: int, alpha: float = 1e-3) -> float:
    """Upper alpha quantile of chi-square(df) by Wilson-Hilferty: (X/df)^(1/3) is close to
    normal with mean 1 - 2/(9 df) and variance 2/(9 df), so the quantile is
    df * (1 - 2/(9 df) + z * sqrt(2/(9 df)))^3 with z the normal's upper alpha quantile
    (3.090 for 1e-3). For df = 5 that is 20.75 (tables: 20.52), slightly conservative."""
    z = NormalDist().inv_cdf(1 - alpha)
    c = 2 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of observed counts against probs, and its degrees of freedom.
    A count on a token of probability 0 makes the statistic infinite."""
    expected = probs.double() * counts.sum()
    if counts[expected == 0].sum() > 0:
        return math.inf, 1
    cells = expected > 0
    statistic = ((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum()
    return float(statistic), int(cells.sum()) - 1


def looks_like(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    statistic, df = chi_square(counts, probs)
    return statistic < critical_value(df)


def random_probs(generator, rows, zeros=0) -> torch.Tensor:
    """Random distributions over V tokens, the last `zeros` tokens of each row impossible."""
    probs = torch.softmax(1.5 * torch.randn(rows, V, generator=generator), -1)
    if zeros:
        probs[:, V - zeros:] = 0.0
    return probs / probs.sum(-1, keepdim=True)


def draw_children(tree: Tree, q_probs: torch.Tensor, trials: int, generator, how="without") -> torch.Tensor:
    """Node tokens for `trials` rounds: [trials, N+1], the children of each node drawn from its
    q row without replacement (the precondition of sample_tree), or taken as q's top-k."""
    tokens = torch.zeros(trials, tree.num_nodes, dtype=torch.long)
    for node in range(tree.num_nodes):
        kids = tree.children(node)
        if len(kids) and how == "without":
            q = q_probs[node].expand(trials, -1)
            tokens[:, kids] = torch.multinomial(q, len(kids), replacement=False, generator=generator)
        elif len(kids):
            tokens[:, kids] = q_probs[node].topk(len(kids)).indices
    return tokens


# --- the shared helper and greedy rules ---------------------------------------------------

@pytest.mark.parametrize("matches, expected", [
    ([], 0), ([True], 1), ([False, True], 0), ([True, True, False, True], 2), ([True] * 4, 4),
])
def test_accepted_prefix_length(matches, expected):
    assert accepted_prefix_length(torch.tensor(matches, dtype=torch.bool)) == expected


@pytest.mark.parametrize("draft, argmaxes, expected", [
    ([5, 7, 3], [5, 7, 2, 9], (2, 2)),
    ([5, 7, 2], [5, 7, 2, 9], (3, 9)),  # all accepted: the bonus follows the last draft
    ([1, 7, 2], [5, 7, 2, 9], (0, 5)),  # later matches do not count after a mismatch
    ([], [4], (0, 4)),
])
def test_greedy_chain_by_hand(draft, argmaxes, expected):
    assert greedy_chain(torch.tensor(draft, dtype=torch.long), hand_logits(argmaxes)) == expected


# tree [[0], [1], [1, 0]]: nodes 1=[0], 2=[1], 3=[1,0]; retrieval order [0,1], [0,2,3]
SMALL = Tree.from_paths([[0], [1], [1, 0]])


@pytest.mark.parametrize("node_tokens, argmaxes, expected", [
    ([0, 4, 5, 6], [5, 1, 6, 2], ([2, 3], 2)),  # [1] then [1,0]: bonus from node 3
    ([0, 4, 5, 6], [7, 1, 6, 2], ([], 7)),  # nothing accepted: bonus from the root
    ([0, 4, 5, 6], [4, 1, 6, 2], ([1], 1)),
    ([0, 5, 5, 6], [5, 1, 9, 2], ([1], 1)),  # duplicate siblings, tie: the first path wins
    ([0, 5, 5, 6], [5, 1, 6, 2], ([2, 3], 2)),  # ... unless the later one is longer
])
def test_greedy_tree_by_hand(node_tokens, argmaxes, expected):
    assert greedy_tree(SMALL, torch.tensor(node_tokens), hand_logits(argmaxes)) == expected


def test_greedy_tree_accepts_the_whole_top_path_of_mc_sim():
    argmaxes = torch.arange(26) + 100  # the target predicts token 100 + i after node i
    tokens = torch.zeros(26, dtype=torch.long)
    tokens[1:] = MC_SIM_7B_63.parents[1:] + 100  # every node is what the target predicts
    accepted, bonus = greedy_tree(MC_SIM_7B_63, tokens, hand_logits(argmaxes.tolist(), vocab=200))
    assert accepted == [1, 5, 13, 21, 24] and bonus == 124


def brute_force_greedy_tree(tree: Tree, node_tokens: list[int], argmaxes: list[int]):
    """Independent reference: check every node's whole path; keep the deepest accepted node,
    the smallest rank path on ties (= first in retrieval order)."""
    best = ()
    for path in tree.paths:
        nodes = [tree.paths.index(path[:d]) + 1 for d in range(1, len(path) + 1)]
        parents = [0] + nodes[:-1]
        if all(node_tokens[n] == argmaxes[p] for n, p in zip(nodes, parents)):
            if len(path) > len(best) or (len(path) == len(best) and path < best):
                best = path
    nodes = [tree.paths.index(best[:d]) + 1 for d in range(1, len(best) + 1)]
    return nodes, argmaxes[nodes[-1] if nodes else 0]


@pytest.mark.parametrize("tree", [SMALL, chain(4), MC_SIM_7B_63], ids=["small", "chain", "mc_sim"])
def test_greedy_tree_against_brute_force(tree):
    rng = random.Random(0)
    for _ in range(300):  # a vocabulary of 3 makes matches, duplicate siblings and ties common
        node_tokens = [rng.randrange(3) for _ in range(tree.num_nodes)]
        argmaxes = [rng.randrange(3) for _ in range(tree.num_nodes)]
        got = greedy_tree(tree, torch.tensor(node_tokens), hand_logits(argmaxes, vocab=3))
        assert got == brute_force_greedy_tree(tree, node_tokens, argmaxes)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_tree_on_a_chain_is_greedy_chain(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 3, generator=generator)
    draft = logits.argmax(-1)[:4].clone()
    draft[torch.randint(4, (1,), generator=generator)] = 9  # one mismatch somewhere
    accepted, bonus = greedy_tree(chain(4), torch.cat([torch.tensor([0]), draft]), logits)
    assert (len(accepted), bonus) == greedy_chain(draft, logits)
    assert accepted == list(range(1, len(accepted) + 1))


# --- probabilities ---------------------------------------------------------------------------

def test_probs_from_logits_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    torch.testing.assert_close(probs_from_logits(logits, 0.5), torch.softmax(logits / 0.5, -1))


@pytest.mark.parametrize("top_p, expected", [
    (1.0, [0.5, 0.3, 0.2]),
    (0.7, [0.625, 0.375, 0.0]),  # 0.5 + 0.3 reaches 0.7
    (0.75, [0.625, 0.375, 0.0]),
    (0.45, [1.0, 0.0, 0.0]),  # the most likely token alone reaches 0.45
    (0.01, [1.0, 0.0, 0.0]),
])
def test_probs_from_logits_top_p(top_p, expected):
    logits = torch.tensor([0.3, 0.5, 0.2]).log()  # expected lists these sorted: 0.5, 0.3, 0.2
    got = probs_from_logits(logits, 1.0, top_p=top_p)
    torch.testing.assert_close(got, torch.tensor(expected)[[1, 0, 2]])


@pytest.mark.parametrize("temperature, top_p, message", [
    (0.0, None, "temperature"), (-1.0, None, "temperature"), (1.0, 0.0, "top_p"), (1.0, 1.5, "top_p"),
])
def test_probs_from_logits_validates(temperature, top_p, message):
    with pytest.raises(ValueError, match=message):
        probs_from_logits(torch.zeros(3), temperature, top_p=top_p)


def test_residual():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2])
    torch.testing.assert_close(residual(p, q), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(residual(p, p), p)  # nothing left: fall back to p


# --- sampling rules, deterministic cases -------------------------------------------------------

def test_sample_chain_by_hand():
    generator = torch.Generator().manual_seed(0)
    draft = torch.tensor([1, 2, 3])
    q = one_hot([1, 2, 3])
    p = one_hot([1, 2, 4, 5])  # the target agrees twice, then wants 4
    assert sample_chain(draft, q, p, generator) == (2, 4)
    p = one_hot([1, 2, 3, 5])  # agrees everywhere: bonus from the last row
    assert sample_chain(draft, q, p, generator) == (3, 5)
    q = torch.softmax(torch.randn(3, 10, generator=generator), -1)
    p = torch.cat([q, one_hot([7])])  # p == q: always accepted
    assert sample_chain(draft, q, p, generator) == (3, 7)


def test_sample_tree_by_hand():
    generator = torch.Generator().manual_seed(0)
    tree = Tree.from_paths([[0], [1], [0, 0]])  # nodes 1=[0], 2=[1], 3=[0,0]
    node_tokens = torch.tensor([0, 4, 5, 6])
    q = torch.softmax(torch.randn(4, 10, generator=generator), -1)
    # the target wants 5 at the root: node 1 (token 4) is rejected, node 2 (token 5) accepted
    # with certainty (the residual is all on 5), then node 2 is a leaf: the next token is p[2]'s
    p = one_hot([5, 0, 8, 0])
    assert sample_tree(tree, node_tokens, q, p, generator) == ([2], 8)
    p = one_hot([4, 6, 0, 9])  # both levels agree: [1] then [0,0], the bonus from node 3
    assert sample_tree(tree, node_tokens, q, p, generator) == ([1, 3], 9)
    p = one_hot([7, 0, 0, 0])  # no child is 7: everything rejected, 7 drawn from the residual
    assert sample_tree(tree, node_tokens, q, p, generator) == ([], 7)


# --- sampling rules, distributions -------------------------------------------------------------

def test_critical_value_matches_tables():
    assert critical_value(5) == pytest.approx(20.515, rel=0.02)
    assert critical_value(10) == pytest.approx(29.588, rel=0.02)


def test_sample_chain_emits_samples_of_p():
    """20000 rounds, k = 3, q blind to two tokens the target likes: the first emitted token
    follows p[0], and the second, in rounds that accepted the first, follows p[1]."""
    generator = torch.Generator().manual_seed(1)
    k = 3
    p, q = random_probs(generator, k + 1), random_probs(generator, k, zeros=2)
    drafts = torch.multinomial(q, TRIALS, replacement=True, generator=generator).T  # [trials, k]
    first, second = torch.zeros(V), torch.zeros(V)
    for draft in drafts:
        n, token = sample_chain(draft, q, p, generator)
        emitted = draft[:n].tolist() + [token]
        first[emitted[0]] += 1
        if n >= 1:
            second[emitted[1]] += 1
    assert looks_like(first, p[0]), chi_square(first, p[0])
    assert looks_like(second, p[1]), chi_square(second, p[1])


def test_sample_tree_emits_samples_of_p():
    """10000 rounds on a 5-node tree with children drawn from q without replacement: the first
    emitted token follows p at the root, and after accepting node 1 the next follows p[1].
    (With this seed, keeping q unchanged after a rejection, or not renormalising it, gives
    statistics in the thousands: the test can see the details of the rule.)"""
    generator = torch.Generator().manual_seed(2)
    tree = Tree.from_paths([[0], [1], [2], [0, 0], [1, 0]])
    q, p = random_probs(generator, tree.num_nodes), random_probs(generator, tree.num_nodes)
    node_tokens = draw_children(tree, q, TRIALS // 2, generator)
    first, after_node_1 = torch.zeros(V), torch.zeros(V)
    for tokens in node_tokens:
        accepted, token = sample_tree(tree, tokens, q, p, generator)
        emitted = tokens[accepted].tolist() + [token]
        first[emitted[0]] += 1
        if accepted[:1] == [1]:
            after_node_1[emitted[1]] += 1
    assert looks_like(first, p[0]), chi_square(first, p[0])
    assert looks_like(after_node_1, p[1]), chi_square(after_node_1, p[1])


def test_the_statistical_test_detects_a_wrong_rule():
    """Negative control: 'always accept the draft' emits samples of q, not p, and is caught."""
    generator = torch.Generator().manual_seed(1)
    p, q = random_probs(generator, 1), random_probs(generator, 1)
    first = torch.multinomial(q[0], TRIALS, replacement=True, generator=generator).bincount(minlength=V)
    assert not looks_like(first, p[0])
    assert looks_like(first, q[0])


def test_sample_tree_needs_sampled_children():
    """Negative control for the precondition: with the draft's top-k as children (as greedy
    tree drafting makes them) the tree rule no longer emits samples of p."""
    generator = torch.Generator().manual_seed(2)
    tree = Tree.from_paths([[0], [1], [2]])
    p, q = random_probs(generator, tree.num_nodes), random_probs(generator, tree.num_nodes)
    node_tokens = draw_children(tree, q, 2000, generator, how="top-k")
    first = torch.zeros(V)
    for tokens in node_tokens:
        accepted, token = sample_tree(tree, tokens, q, p, generator)
        first[(tokens[accepted].tolist() + [token])[0]] += 1
    assert not looks_like(first, p[0])
