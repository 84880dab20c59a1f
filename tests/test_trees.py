import random

import pytest
import torch

from specvlm.trees import MC_SIM_7B_63, Tree, chain, draw_tree, tree_attention_bias


def random_paths(seed: int, size: int) -> list[list[int]]:
    """A random valid tree of `size` nodes below the root, ranks not necessarily contiguous."""
    rng = random.Random(seed)
    paths = [()]
    while len(paths) <= size:
        parent = rng.choice(paths)
        rank = rng.randrange(4)
        if parent + (rank,) not in paths:
            paths.append(parent + (rank,))
    paths = [list(path) for path in paths[1:]]
    rng.shuffle(paths)
    return paths


def node_path(tree: Tree, node: int) -> tuple[int, ...]:
    return tree.paths[node - 1] if node else ()


def test_mc_sim_7b_63_counts():
    assert MC_SIM_7B_63.num_nodes == 26  # tokens verified per round, root included
    assert MC_SIM_7B_63.depth == 5
    assert MC_SIM_7B_63.retrieve.shape == (15, 6)  # 15 root-to-leaf paths
    assert [len(MC_SIM_7B_63.level_nodes(d)) for d in range(6)] == [1, 4, 8, 8, 3, 2]
    assert MC_SIM_7B_63.retrieve[0].tolist() == [0, 1, 5, 13, 21, 24]  # the all-top-1 path


def test_small_tree_by_hand():
    tree = Tree.from_paths([[0, 0], [1], [0]])  # any order in, sorted by (depth, path)
    assert tree.paths == ((0,), (1,), (0, 0))
    assert tree.parents.tolist() == [-1, 0, 0, 1]
    assert tree.depths.tolist() == [0, 1, 1, 2]
    assert tree.ranks.tolist() == [-1, 0, 1, 0]
    assert tree.mask.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, False, True, False],
        [True, True, False, True],
    ]
    assert tree.retrieve.tolist() == [[0, 1, 3], [0, 2, -1]]
    assert tree.level_nodes(1).tolist() == [1, 2]
    assert tree.children(0).tolist() == [1, 2]
    assert tree.children(1).tolist() == [3]
    assert tree.children(3).tolist() == []


@pytest.mark.parametrize("k", [1, 2, 5])
def test_chain_is_causal(k):
    tree = chain(k)
    assert tree.num_nodes == k + 1 and tree.depth == k
    assert torch.equal(tree.mask, torch.ones(k + 1, k + 1, dtype=torch.bool).tril())
    assert tree.retrieve.tolist() == [list(range(k + 1))]


@pytest.mark.parametrize("seed", range(8))
def test_random_tree_against_brute_force(seed):
    paths = random_paths(seed, size=3 + 4 * seed)
    tree = Tree.from_paths(paths)
    assert tree == Tree.from_paths(list(reversed(paths)))
    assert list(tree.paths) == sorted(map(tuple, paths), key=lambda p: (len(p), p))
    n = tree.num_nodes
    for i in range(n):
        path = node_path(tree, i)
        assert tree.depths[i] == len(path)
        assert tree.ranks[i] == (path[-1] if path else -1)
        assert node_path(tree, int(tree.parents[i])) == path[:-1] if i else tree.parents[i] == -1
        for j in range(n):  # j is an ancestor of i (or i itself) iff its path is a prefix of i's
            assert tree.mask[i, j] == (node_path(tree, j) == path[: len(node_path(tree, j))])


@pytest.mark.parametrize("seed", range(8))
def test_retrieve_walks_every_leaf_once(seed):
    tree = Tree.from_paths(random_paths(seed, size=3 + 4 * seed))
    parents = tree.parents.tolist()
    leaves = {i for i in range(tree.num_nodes) if i not in parents}
    ends = []
    for row in tree.retrieve.tolist():
        nodes = [i for i in row if i >= 0]
        assert row == nodes + [-1] * (len(row) - len(nodes))  # padding only at the end
        assert nodes[0] == 0
        assert all(parents[child] == parent for parent, child in zip(nodes, nodes[1:]))
        ends.append(nodes[-1])
    assert sorted(ends) == sorted(leaves)
    assert [node_path(tree, leaf) for leaf in ends] == sorted(node_path(tree, leaf) for leaf in ends)
    assert tree.retrieve.shape[1] == tree.depth + 1


@pytest.mark.parametrize("paths, message", [
    ([[0], [0, 1, 0]], r"\[0, 1, 0\] has no parent"),
    ([[0], [1], [0]], r"\[0\] is listed twice"),
    ([[0], []], "empty rank path"),
    ([[0], [-1]], r"\[-1\]: ranks must be integers >= 0"),
    ([[0], [0.5]], "integers"),
    ([], "at least one"),
])
def test_invalid_paths_raise(paths, message):
    with pytest.raises(ValueError, match=message):
        Tree.from_paths(paths)


def test_chain_needs_a_token():
    with pytest.raises(ValueError):
        chain(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cache_len", [None, 12])
def test_attention_bias(dtype, cache_len):
    tree = Tree.from_paths([[0], [1], [0, 0]])
    bias = tree_attention_bias(tree, prefix_len=3, dtype=dtype, cache_len=cache_len)
    assert bias.shape == (1, 1, 4, cache_len or 7) and bias.dtype == dtype
    blocked = torch.finfo(dtype).min
    assert set(bias.unique().tolist()) == {0.0, blocked}
    allowed = (bias[0, 0] == 0).int().tolist()
    tail = [0] * ((cache_len or 7) - 7)
    assert allowed == [
        [1, 1, 1, 1, 0, 0, 0] + tail,
        [1, 1, 1, 1, 1, 0, 0] + tail,
        [1, 1, 1, 1, 0, 1, 0] + tail,
        [1, 1, 1, 1, 1, 0, 1] + tail,
    ]


def test_attention_bias_rejects_small_cache():
    with pytest.raises(ValueError, match="cannot hold"):
        tree_attention_bias(chain(3), prefix_len=5, dtype=torch.float32, cache_len=8)


def test_attention_with_bias_equals_attention_along_each_path():
    """Golden check: one attention pass over the tree with the bias gives, at every node, what
    attention over the prefix and that node's root-to-node path gives on its own."""
    generator = torch.Generator().manual_seed(0)
    tree, prefix_len, dim = MC_SIM_7B_63, 5, 8
    q = torch.randn(tree.num_nodes, dim, generator=generator)
    k = torch.randn(prefix_len + tree.num_nodes, dim, generator=generator)
    v = torch.randn(prefix_len + tree.num_nodes, dim, generator=generator)
    bias = tree_attention_bias(tree, prefix_len, torch.float32)[0, 0]
    together = torch.softmax(q @ k.T + bias, dim=-1) @ v
    for node in range(tree.num_nodes):
        path = tree.retrieve[(tree.retrieve == node).any(1)][0]
        path = path[: int(tree.depths[node]) + 1]
        cols = torch.cat([torch.arange(prefix_len), prefix_len + path])
        alone = torch.softmax(q[node] @ k[cols].T, dim=-1) @ v[cols]
        torch.testing.assert_close(together[node], alone)


def test_draw_tree():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [f"t{i}" for i in range(MC_SIM_7B_63.num_nodes)]
    ax = draw_tree(MC_SIM_7B_63, tokens=tokens, highlight=[1, 5, 13])
    assert len(ax.collections) == MC_SIM_7B_63.num_nodes
    assert [t.get_text() for t in ax.texts] == tokens
    plt.close(ax.figure)
