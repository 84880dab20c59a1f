"""Which video tokens the draft keeps: SpecVLM's two-stage selection and simple baselines.

SpecVLM (EMNLP 2025, arXiv 2508.16201) prefills the draft model with the text and only a
subset of the video tokens. Every function here returns that subset as a sorted 1-D CPU
LongTensor of indices into the prompt's `n` video tokens (0 .. n-1), never a mask:

    keep_random   a random subset (seeded with a torch.Generator)
    keep_uniform  evenly spaced indices
    keep_window   one contiguous block at the front, middle or back
    keep_top      the highest scores (scores: the target's text-to-video attention)
    keep_specvlm  Stage I: the top scores until they hold `mass` of the total score;
                  Stage II: the rest of the budget evenly spaced over the tokens left

`select(method, ...)` dispatches on the names in `METHODS`.

Semantics of the paper's reference code, reproduced exactly (the tests compare against a
literal re-implementation of its loops):
- the budget is `keep = int(n * (1 - ratio))`, floating rounding included:
  `keep_budget(10, 0.9) -> 0` and `keep_budget(100, 0.9) -> 9`, since 1 - 0.9 is
  0.09999999999999998;
- evenly spaced means `torch.linspace(0, m - 1, k, dtype=torch.long)` (truncated, not rounded);
- Stage I takes at least one token, and all `n` when rounding keeps the running sum below
  `mass * total` (common at `mass=1.0`); the running sum is float32, one token after
  another, and scores are compared in float32, as the reference's loop and its
  list-to-tensor round trip do.

Not handled: scores per frame or per head (pass one score per video token), batches (call once
per sequence), and ties beyond the rule "the lower index wins" (sorting is stable).
"""

import numbers
from functools import partial

import torch


def keep_budget(n: int, ratio: float) -> int:
    """How many of `n` video tokens survive pruning `ratio` of them: `int(n * (1 - ratio))`.

    keep_budget(120, 0.75) -> 30;  keep_budget(100, 0.9) -> 9 (floating rounding, as the reference)
    """
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n (number of video tokens) must be an int >= 0, got {n!r}.")
    if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool) or not 0 <= ratio < 1:
        raise ValueError(f"ratio (share of video tokens pruned) must be a float in [0, 1), got {ratio!r}.")
    return int(n * (1 - ratio))


def keep_random(n: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """`keep` indices drawn without replacement, sorted.

    keep_random(10, 0.5, torch.Generator().manual_seed(0)) -> tensor([1, 3, 4, 5, 7])
    """
    keep = keep_budget(n, ratio)
    return torch.randperm(n, generator=generator)[:keep].sort().values


def keep_uniform(n: int, ratio: float) -> torch.Tensor:
    """`keep` evenly spaced indices from 0 to n-1 (truncated linspace, as the reference).

    keep_uniform(10, 0.5) -> tensor([0, 2, 4, 6, 9])
    """
    return torch.linspace(0, n - 1, keep_budget(n, ratio), dtype=torch.long)


WINDOWS = ("front", "middle", "back")


def keep_window(n: int, ratio: float, where: str = "front") -> torch.Tensor:
    """One contiguous block of `keep` indices at the front, middle or back.

    keep_window(10, 0.7, "middle") -> tensor([3, 4, 5])
    """
    if where not in WINDOWS:
        raise ValueError(f"unknown window {where!r}; choose one of {WINDOWS}.")
    keep = keep_budget(n, ratio)
    start = {"front": 0, "middle": (n - keep) // 2, "back": n - keep}[where]
    return torch.arange(start, start + keep)


def _checked(scores: torch.Tensor) -> torch.Tensor:
    """scores: [n] float -> a float32 CPU copy (the reference compares scores in float32)."""
    if not isinstance(scores, torch.Tensor) or scores.ndim != 1 or not scores.is_floating_point():
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a 1-D float tensor (one score per video token), got {shape}.")
    scores = scores.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(scores).all():
        raise ValueError(f"scores must be finite; {(~torch.isfinite(scores)).sum()} are NaN or inf.")
    return scores


def _descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices of `scores` from the highest to the lowest; ties: the lower index first."""
    return torch.sort(scores, descending=True, stable=True).indices


def keep_top(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """The `keep` highest-scoring indices, sorted.  # scores: [n_video]

    keep_top(tensor([.1, .5, .2, .9]), 0.5) -> tensor([1, 3])
    """
    scores = _checked(scores)
    return _descending(scores)[: keep_budget(len(scores), ratio)].sort().values


def check_mass(mass) -> None:
    """Raise ValueError unless `mass` (the share of the total score Stage I must reach) lies in (0, 1]."""
    if not isinstance(mass, numbers.Real) or isinstance(mass, bool) or not 0 < mass <= 1:
        raise ValueError(f"mass (share of the total score Stage I must reach) must be in (0, 1], got {mass!r}.")


def keep_specvlm(scores: torch.Tensor, ratio: float, mass: float = 0.4, return_stage: bool = False):
    """SpecVLM's two-stage selection, sorted; with `return_stage`, also each kept index's stage.

    Stage I takes the fewest top-scoring tokens whose summed score reaches `mass` of the total
    (at least one; at most `keep`). Stage II spreads the rest of the budget evenly over the
    tokens Stage I left, in index order.  # scores: [n_video]

    keep_specvlm(tensor([.05, .4, .05, .3, .1, .1]), 0.5, mass=0.6, return_stage=True)
    -> (tensor([0, 1, 3]), tensor([2, 1, 1]))   # Stage I: .4 + .3 >= .6; Stage II: index 0 of [0, 2, 4, 5]
    """
    check_mass(mass)
    scores = _checked(scores)
    n, keep = len(scores), keep_budget(len(scores), ratio)
    order = _descending(scores)
    # Stage I. The reference adds scores one by one in float32; numpy's cumsum does the same,
    # while torch's CPU cumsum accumulates float32 in double and disagrees when mass is near 1.
    running = torch.from_numpy(scores[order].numpy().cumsum())
    reached = (running >= scores.sum() * mass).nonzero()
    first = min(int(reached[0]) + 1 if len(reached) else n, keep)
    # Stage II: evenly spaced over the indices Stage I did not take
    free = torch.ones(n, dtype=torch.bool)
    free[order[:first]] = False
    available = free.nonzero().flatten()
    spread = available[torch.linspace(0, len(available) - 1, keep - first, dtype=torch.long)]
    kept, position = torch.cat([order[:first], spread]).sort()
    if not return_stage:
        return kept
    stage = torch.cat([torch.ones(first, dtype=torch.long), torch.full((len(spread),), 2)])
    return kept, stage[position]


METHODS = {
    "random": keep_random,
    "uniform": keep_uniform,
    **{f"window-{where}": partial(keep_window, where=where) for where in WINDOWS},
    "top": keep_top,
    "specvlm": keep_specvlm,
}
METHOD_NAMES = tuple(METHODS)
SCORED_METHODS = ("top", "specvlm")


def select(method: str, n: int | None = None, *, ratio: float, scores: torch.Tensor | None = None,
           generator: torch.Generator | None = None, **options) -> torch.Tensor:
    """Kept video-token indices by `method` (a name in `METHODS`); `options` go to the method
    (e.g. `mass` for "specvlm"). `n` defaults to `len(scores)`.

    select("window-back", 8, ratio=0.5) -> tensor([4, 5, 6, 7])
    """
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {METHOD_NAMES}.")
    if method in SCORED_METHODS and scores is None:
        raise ValueError(f"method {method!r} ranks video tokens by the target's attention: pass scores.")
    if n is None and scores is None:
        raise ValueError(f"method {method!r} needs n, the number of video tokens.")
    if n is not None and scores is not None and len(scores) != n:
        raise ValueError(f"scores has {len(scores)} entries but the prompt has {n} video tokens.")
    if method in SCORED_METHODS:
        return METHODS[method](scores, ratio, **options)
    if method == "random":
        options["generator"] = generator
    return METHODS[method](len(scores) if n is None else n, ratio, **options)
