"""Static draft trees: rank paths -> parent array -> attention mask, depths, retrieval paths.

A *rank path* names one drafted token by the ranks taken on the way down from the root:
`[0]` is the draft's top-1 token after the root, `[1]` its top-2, `[0, 2]` the top-3 token
after `[0]`. A static tree (Medusa, EAGLE; SpecVLM's reference uses EAGLE's `mc_sim_7b_63`) is a
fixed list of such paths. Node 0 is the *root*, the last token already accepted; nodes 1..N
are the paths sorted by (depth, path), so every level is contiguous and parents come before
their children.

One round with a tree:
1. Draft, level by level. The draft scores the root, takes its top-k and keeps the ranks
   that appear at depth 1 (`[0] [1] [2] [3]` in `mc_sim_7b_63`). Each next level is one more
   draft pass over the nodes of the level just made that have children, each node seeing
   the prefix, its ancestors and itself; again the ranks named by the paths are kept. A tree
   of depth D costs D draft passes, whatever its width. (When sampling, the paths only say
   how many children a node gets; they are drawn from the draft's distribution without
   replacement, see `acceptance.sample_tree`.)
2. Verify in one target pass. All N+1 tokens go in together at positions `P + depth`
   (P = position of the root), with an attention mask where a node sees the whole prefix,
   its ancestors and itself, never its siblings or cousins (`tree_attention_bias`). The
   target's logits at a node are then exactly those it would give after the prefix
   followed by that node's root-to-node path.
3. Accept. A node is accepted if its parent is and its token is what the target predicts
   at its parent (see `acceptance.greedy_tree`). Reading the tree through its retrieval
   paths (`retrieve`, one row per leaf) this is a longest-matching-prefix per row; the
   longest row wins, the first in retrieval order on ties, and the target's prediction at
   the last accepted node is the bonus token.

A *chain* is the tree with one child per node, `[0] [0,0] [0,0,0] ...` (`chain(k)`): its mask
is causal and it has a single retrieval path; that is plain speculative decoding.

Everything here follows from one parent array (EAGLE-2's derivation): the mask row of a node
is its parent's row plus itself, its depth (position offset) is the row sum minus one, and a
retrieval path walks parents up from a leaf. Dynamic trees (EAGLE-2's re-ranking by draft
confidence) are not handled: the shape is fixed before decoding starts.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Tree:
    """A static draft tree. Example, `Tree.from_paths([[0], [1], [0, 0]])`:

        nodes    0=root  1=[0]  2=[1]  3=[0,0]
        parents  [-1, 0, 0, 1]     depths [0, 1, 1, 2]     ranks [-1, 0, 1, 0]
        mask     1 0 0 0           retrieve  [[0, 1, 3],
                 1 1 0 0                      [0, 2, -1]]
                 1 0 1 0
                 1 1 0 1
    """

    paths: tuple[tuple[int, ...], ...]  # N rank paths, sorted by (depth, path)
    parents: torch.Tensor  # [N+1] long, root -1
    depths: torch.Tensor  # [N+1] long, root 0: the position offsets
    ranks: torch.Tensor  # [N+1] long, root -1
    mask: torch.Tensor  # [N+1, N+1] bool, mask[i, j]: node i may attend node j
    retrieve: torch.Tensor  # [num_leaves, depth+1] long, root-to-leaf node indices, -1 padded

    @classmethod
    def from_paths(cls, paths) -> Tree:
        paths = sorted(_validated(paths), key=lambda path: (len(path), path))
        index = {path: i + 1 for i, path in enumerate(paths)}
        parents = [-1] + [index.get(path[:-1], 0) for path in paths]

        size = len(paths) + 1
        mask = torch.zeros(size, size, dtype=torch.bool)
        mask[0, 0] = True
        for node in range(1, size):
            mask[node] = mask[parents[node]]
            mask[node, node] = True
        depths = mask.sum(1) - 1

        # one retrieval row per leaf, in the order of the leaves' rank paths (EAGLE's order)
        leaves = sorted(set(range(1, size)) - set(parents), key=lambda node: paths[node - 1])
        rows = [_walk_up(leaf, parents) for leaf in leaves]
        width = int(depths.max()) + 1
        retrieve = torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long)
        return cls(
            paths=tuple(paths),
            parents=torch.tensor(parents),
            depths=depths,
            ranks=torch.tensor([-1] + [path[-1] for path in paths]),
            mask=mask,
            retrieve=retrieve,
        )

    @property
    def num_nodes(self) -> int:
        """Tokens verified per round, the root included."""
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        return int(self.depths.max())

    def level_nodes(self, d: int) -> torch.Tensor:
        """Node indices at depth d, in order; e.g. level 1 of [[0], [1], [0, 0]] -> [1, 2]."""
        return torch.nonzero(self.depths == d).flatten()

    def children(self, node: int) -> torch.Tensor:
        """Child node indices in rank order; e.g. children(1) of [[0], [1], [0, 0]] -> [3]."""
        return torch.nonzero(self.parents == node).flatten()

    def __eq__(self, other) -> bool:
        return isinstance(other, Tree) and self.paths == other.paths

    def __hash__(self) -> int:
        return hash(self.paths)

    def __repr__(self) -> str:
        return f"Tree(num_nodes={self.num_nodes}, depth={self.depth}, leaves={len(self.retrieve)})"


def _validated(paths) -> list[tuple[int, ...]]:
    out = []
    for path in paths:
        path = tuple(path)
        if not path:
            raise ValueError("empty rank path: the root is implicit, list only its descendants")
        if any(not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 0 for r in path):
            raise ValueError(f"rank path {list(path)}: ranks must be integers >= 0")
        out.append(tuple(int(r) for r in path))
    if not out:
        raise ValueError("a tree needs at least one rank path")
    seen = set()
    for path in out:
        if path in seen:
            raise ValueError(f"rank path {list(path)} is listed twice")
        seen.add(path)
    for path in out:
        if len(path) > 1 and path[:-1] not in seen:
            raise ValueError(f"rank path {list(path)} has no parent: {list(path[:-1])} is missing")
    return out


def _walk_up(node: int, parents: list[int]) -> list[int]:
    row = []
    while node >= 0:
        row.append(node)
        node = parents[node]
    return row[::-1]


def chain(k: int) -> Tree:
    """The one-branch tree of k drafted tokens: chain(3).paths -> ((0,), (0, 0), (0, 0, 0))."""
    if k < 1:
        raise ValueError(f"a chain needs k >= 1 drafted tokens, got {k}")
    return Tree.from_paths([[0] * d for d in range(1, k + 1)])


# EAGLE's `mc_sim_7b_63`, the tree SpecVLM's reference drafts: 25 nodes + root, depth 5, 15 leaves.
MC_SIM_7B_63 = Tree.from_paths([
    [0], [1], [2], [3],
    [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [2, 1], [3, 0],
    [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 2, 0], [0, 2, 1], [1, 0, 0],
    [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2],
    [0, 0, 0, 0, 0], [0, 0, 0, 0, 1],
])


def tree_attention_bias(tree: Tree, prefix_len: int, dtype: torch.dtype = torch.float32,
                        cache_len: int | None = None, device=None) -> torch.Tensor:
    """Additive mask for verifying the tree after `prefix_len` cached tokens:
    [1, 1, N+1, cache_len or prefix_len + N+1], 0 where allowed, finfo(dtype).min where not.

    Additive, not bool: transformers' eager attention adds the mask to the scores, so a bool
    mask there would be silently wrong. Columns past `prefix_len + N+1` (the unused tail of a
    static cache) are blocked. E.g. [[0], [1], [0, 0]] after 2 prefix tokens, `0`=0, `-`=min:
        0 0 0 - - -
        0 0 0 0 - -
        0 0 0 - 0 -
        0 0 0 0 - 0
    """
    size = tree.num_nodes
    total = prefix_len + size if cache_len is None else cache_len
    if total < prefix_len + size:
        raise ValueError(f"cache_len={cache_len} cannot hold {prefix_len} prefix + {size} tree tokens")
    allowed = torch.zeros(size, total, dtype=torch.bool, device=device)
    allowed[:, :prefix_len] = True
    allowed[:, prefix_len:prefix_len + size] = tree.mask.to(device)
    bias = torch.zeros(size, total, dtype=dtype, device=device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[None, None]


def draw_tree(tree: Tree, tokens=None, ax=None, highlight=None):
    """Draw the tree: depth left to right, rank order top to bottom, edges to parents.
    `tokens` labels nodes (strings or ids, one per node); `highlight` (node indices, e.g. the
    accepted path) is drawn in colour. Returns the matplotlib axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(1.6 * (tree.depth + 1), 0.45 * max(len(tree.retrieve), 2) + 0.6))
    highlight = {int(node) for node in (highlight or [])}
    depths = tree.depths.tolist()
    order = {}
    for d in range(tree.depth + 1):
        for row, node in enumerate(tree.level_nodes(d).tolist()):
            order[node] = row
    xy = {node: (depths[node], -order[node]) for node in range(tree.num_nodes)}

    for node, parent in enumerate(tree.parents.tolist()):
        if parent >= 0:
            on_path = node in highlight and parent in highlight | {0}
            (x0, y0), (x1, y1) = xy[parent], xy[node]
            ax.plot([x0, x1], [y0, y1], color="tab:green" if on_path else "0.7",
                    lw=2.5 if on_path else 1, zorder=1)
    for node, (x, y) in xy.items():
        colour = "tab:green" if node in highlight else ("0.3" if node == 0 else "tab:blue")
        ax.scatter([x], [y], s=380, color=colour, zorder=2)
        label = str(tokens[node]) if tokens is not None else str(node)
        ax.annotate(label, (x, y), ha="center", va="center", color="white", fontsize=8, zorder=3)
    ax.set_xticks(range(tree.depth + 1))
    ax.set_xlabel("depth (position offset)")
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"{tree.num_nodes} nodes, depth {tree.depth}, {len(tree.retrieve)} paths")
    return ax
