"""Acceptance rules: which drafted tokens a target keeps, as pure tensor functions.

Notation throughout: p = the target's probabilities, q = the draft's; `p[i]` is the target's
distribution for the token after drafted position i (position 0 = the last accepted token).

Greedy (temperature 0): `greedy_chain`, `greedy_tree`. The verification pass gives the
target's logits at every drafted position, conditioned on exactly the drafted tokens before
it (causal mask for a chain, tree mask for a tree). A drafted token is kept only if it equals
the target's argmax at the position before it, and that position was itself kept. By
induction every kept token is the one the target's own greedy decoding would emit after the
text so far, and the bonus token, the argmax after the last kept one, is its next. So each
round appends 1 to k+1 tokens of the target's greedy continuation, never anything else:
the output is identical token for token (in fp32; in bf16 a near-tie of the target's top two logits can round
either way between a one-token step and a many-token verification).

Sampling (temperature > 0): `sample_chain` is speculative sampling (Leviathan et al. 2023,
Chen et al. 2023). For one position with x ~ q: accept x with prob. min(1, p(x)/q(x)),
otherwise draw from the residual r = norm(max(0, p - q)). With b = sum_x min(p(x), q(x)) the
acceptance probability, sum_x max(0, p(x) - q(x)) = 1 - b, so

    P(out = y) = q(y) min(1, p(y)/q(y)) + (1 - b) r(y) = min(p(y), q(y)) + max(0, p(y) - q(y)) = p(y).

Applied position by position along the chain (each draft token was drawn from q given the
tokens before it, each p[i] is the target's given the same tokens) the emitted tokens are
exact samples from the target. A rejection ends the round: later drafts were conditioned on a
token that is no longer in the text. After k acceptances the bonus token comes from p[k].

Tree sampling: `sample_tree` is the multi-candidate rule of SpecInfer (Miao et al. 2024) and
EAGLE's sampling verification, whose precondition is that the children of a node are drawn
from q *without replacement*; see its docstring for why it preserves p.

Temperature 0 is not a limit of the sampling rules here; greedy verification has its own
functions. Not handled: typical acceptance (Medusa), which is lossy; batches of sequences.
"""

from __future__ import annotations

import math
import numbers

import torch

from .trees import Tree

AFTER_CHAIN = ("k+1 rows for k drafted tokens: the target after the last accepted token and after each "
               "drafted one")
PER_NODE = "one row per tree node, root first: tree.num_nodes rows"


def _prefix_lengths(matches: torch.Tensor) -> torch.Tensor:
    # matches: [..., k] -> [...] number of leading Trues per row
    return matches.long().cumprod(-1).sum(-1)


def accepted_prefix_length(matches: torch.Tensor) -> int:
    """Number of leading Trues: [True, True, False, True] -> 2."""
    return int(_prefix_lengths(matches))


def greedy_chain(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Greedy verification of a chain: (n_accepted, bonus_token).
    draft_tokens: [k]; target_logits: [k+1, V], row i = the target after drafted position i.
    E.g. target argmaxes [5, 7, 2, 9] and draft [5, 7, 3] -> (2, 2)."""
    check_rows("draft_tokens", draft_tokens, None, 1)
    check_rows("target_logits", target_logits, len(draft_tokens) + 1, 2, AFTER_CHAIN)
    return chain_accept(draft_tokens, target_logits.argmax(-1))


def chain_accept(draft_tokens: torch.Tensor, predicted: torch.Tensor) -> tuple[int, int]:
    """`greedy_chain` from the target's argmaxes `predicted` [k+1] instead of its logits."""
    check_rows("draft_tokens", draft_tokens, None, 1)
    check_rows("predicted", predicted, len(draft_tokens) + 1, 1, AFTER_CHAIN)
    n = accepted_prefix_length(draft_tokens.to(predicted.device) == predicted[:-1])
    return n, int(predicted[n])


def greedy_tree(tree: Tree, node_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[list[int], int]:
    """Greedy verification of a tree: (accepted node indices below the root, bonus_token).
    node_tokens: [N+1] (root first); target_logits: [N+1, V], row i = the target after node i.
    A node is kept if its parent is and its token is the target's argmax at its parent; the
    longest kept root-to-leaf prefix wins, the first in `tree.retrieve` order on ties.
    E.g. tree [[0], [1], [0, 0]], node_tokens [4, 8, 6, 1], argmaxes [6, 2, 3, 5]:
    node 2 (token 6) is kept, node 1 (token 8) is not -> ([2], 3)."""
    check_rows("target_logits", target_logits, tree.num_nodes, 2, PER_NODE)
    return tree_accept(tree, node_tokens, target_logits.argmax(-1))


def tree_accept(tree: Tree, node_tokens: torch.Tensor, predicted: torch.Tensor) -> tuple[list[int], int]:
    """`greedy_tree` from the target's argmaxes `predicted` [N+1] instead of its logits; host work
    on CPU copies of both (pass CPU tensors to keep it free of device copies)."""
    check_rows("node_tokens", node_tokens, tree.num_nodes, 1, PER_NODE)
    check_rows("predicted", predicted, tree.num_nodes, 1, PER_NODE)
    predicted, node_tokens = predicted.cpu(), node_tokens.cpu()
    matches = node_tokens == predicted[tree.parents.clamp(min=0)]  # [N+1], root unused
    paths = tree.retrieve[:, 1:]  # [leaves, depth]
    lengths = _prefix_lengths(matches[paths.clamp(min=0)] & (paths >= 0))  # [leaves]
    best = int(lengths.argmax())  # argmax returns the first maximum
    accepted = paths[best, : int(lengths[best])].tolist()
    return accepted, int(predicted[accepted[-1] if accepted else 0])


def probs_from_logits(logits: torch.Tensor, temperature: float, top_p: float | None = None) -> torch.Tensor:
    """Softmax of logits / temperature, optionally restricted to the nucleus: the fewest most
    likely tokens whose mass reaches top_p, renormalised. [..., V] -> [..., V] float32.
    E.g. probs [0.5, 0.3, 0.2] with top_p=0.7 -> [0.625, 0.375, 0.0]."""
    if not is_real(temperature) or not math.isfinite(temperature) or not temperature > 0:
        raise ValueError(f"temperature must be a finite number > 0 for sampling, got {temperature!r}; "
                         "temperature 0 is greedy: use greedy_chain / greedy_tree")
    check_top_p(top_p)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is None or top_p == 1:
        return probs
    ordered, order = probs.sort(dim=-1, descending=True)
    mass_before = ordered.cumsum(-1) - ordered  # the most likely token always has 0 before it
    drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def is_real(value) -> bool:
    """True for a real number (numpy's included), False for bools, strings and tensors."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_top_p(top_p) -> None:
    """Raise ValueError unless `top_p` is None (no nucleus) or a number in (0, 1]."""
    if top_p is not None and (not is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None (no nucleus) or a number in (0, 1], e.g. 0.9, got {top_p!r}.")


def check_rows(name: str, tensor, rows: int | None, dims: int, meaning: str = "") -> None:
    """Raise ValueError unless `tensor` is a tensor of `dims` dimensions with `rows` rows (None:
    any): the acceptance rules index rows by drafted position, so a tensor of another shape would
    broadcast or index into a wrong answer instead of failing."""
    shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None
    if shape is not None and len(shape) == dims and (rows is None or shape[0] == rows):
        return
    wanted = ("[k]" if dims == 1 else "[rows, V]") if rows is None else (f"[{rows}]" if dims == 1 else f"[{rows}, V]")
    got = f"shape {list(shape)}" if shape is not None else f"a {type(tensor).__name__}"
    raise ValueError(f"{name} must be a tensor {wanted}{' (' + meaning + ')' if meaning else ''}, got {got}; "
                     "see the acceptance function's docstring for the shapes it takes.")


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)), what to sample from after a rejection; p itself if that is all
    zero (p == q, where a rejection cannot happen in exact arithmetic).
    E.g. p [0.5, 0.3, 0.2], q [0.2, 0.6, 0.2] -> [1.0, 0.0, 0.0]."""
    r = (p - q).clamp(min=0)
    total = r.sum()
    return r / total if total > 0 else p


def check_vocab(q_probs: torch.Tensor, p_probs: torch.Tensor) -> None:
    """Raise ValueError unless the draft's and the target's distributions cover the same tokens."""
    if q_probs.shape[-1] != p_probs.shape[-1]:
        raise ValueError(f"q_probs covers {q_probs.shape[-1]} tokens but p_probs {p_probs.shape[-1]}: give the draft's "
                         "distributions over the target's vocabulary (rows the draft lacks get probability 0, "
                         "see sampling.over_target_rows).")


def _draw(probs: torch.Tensor, generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_chain(draft_tokens: torch.Tensor, q_probs: torch.Tensor, p_probs: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[int, int]:
    """Speculative sampling of a chain: (n_accepted, next_token), next_token being the
    resampled token after a rejection or the bonus after full acceptance.
    draft_tokens: [k], each drawn from its row of q_probs [k, V]; p_probs: [k+1, V].
    `generator` lives on the probabilities' device."""
    check_rows("draft_tokens", draft_tokens, None, 1)
    k = len(draft_tokens)
    check_rows("q_probs", q_probs, k, 2, "one draft distribution per drafted token")
    check_rows("p_probs", p_probs, k + 1, 2, AFTER_CHAIN)
    check_vocab(q_probs, p_probs)
    rows = torch.arange(k, device=p_probs.device)
    tokens = draft_tokens.to(p_probs.device)
    u = torch.rand(k, generator=generator, device=p_probs.device)
    n = accepted_prefix_length(u * q_probs[rows, tokens] < p_probs[rows, tokens])  # u < p(x)/q(x)
    if n == k:
        return n, _draw(p_probs[k], generator)
    return n, _draw(residual(p_probs[n], q_probs[n]), generator)


def sample_tree(tree: Tree, node_tokens: torch.Tensor, q_probs: torch.Tensor, p_probs: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Multi-candidate speculative sampling of a tree: (accepted node indices below the root,
    next_token). node_tokens: [N+1]; q_probs: [N+1, V], row i = the draft distribution the
    children of node i were drawn from; p_probs: [N+1, V], row i = the target after node i.

    At the current node (the root first) try its children in rank order. Child x is accepted
    with prob. min(1, p(x)/q(x)): then move to it and repeat. Rejected: p <- norm(max(0, p - q)),
    q <- q with x removed (q(x) := 0, renormalised), try the next child. All rejected (or a
    leaf reached): draw the next token from the current p.

    Precondition: the children of each node are drawn from its q WITHOUT replacement
    (`torch.multinomial(q, k, replacement=False)`). Why p is then preserved: condition on
    everything before the j-th child x_j, so that x_j ~ q_j (q with x_1..x_{j-1} removed,
    renormalised: that is what drawing without replacement means) and p_j is fixed. Assume
    the rest of the procedure, after rejecting x_j, outputs a sample of p_{j+1} = norm(max(0,
    p_j - q_j)), which does not depend on x_j. Then, by the single-candidate identity in the
    module docstring, the output at step j is a sample of p_j. The last step (draw from the
    current p) satisfies the assumption trivially, so by induction back to j = 1 the first
    token is a sample of p_1 = p at the node; after an acceptance the same holds one level
    down with the target's distribution after that child. Deterministic top-k children (the
    greedy drafts of `mc_sim_7b_63`) are not draws from q, and children drawn with
    replacement need q kept unchanged: with either, this rule is not lossless.
    """
    check_rows("node_tokens", node_tokens, tree.num_nodes, 1, PER_NODE)
    check_rows("q_probs", q_probs, tree.num_nodes, 2, PER_NODE)
    check_rows("p_probs", p_probs, tree.num_nodes, 2, PER_NODE)
    check_vocab(q_probs, p_probs)
    accepted = []
    node = 0
    while True:
        p, q = p_probs[node], q_probs[node]
        for child in tree.children(node).tolist():
            x = int(node_tokens[child])
            u = torch.rand((), generator=generator, device=p.device)
            if u * q[x] < p[x]:  # u < p(x)/q(x)
                accepted.append(child)
                node = child
                break
            p = residual(p, q)
            q = q.clone()
            q[x] = 0.0
            left = q.sum()
            if not left > 0:  # no draft mass left: no further child can have been drawn from q
                return accepted, _draw(p, generator)
            q = q / left
        else:
            return accepted, _draw(p, generator)
