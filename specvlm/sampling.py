"""How a decoding loop picks tokens: greedy (temperature 0) or seeded sampling.

One `Picker` is handed to every loop, so AR, chain and tree decoding share one notion of
"the next token" and one random stream. Greedy picks the argmax and verifies with
`greedy_chain` / `greedy_tree`; sampling draws from softmax(logits / temperature), optionally
restricted to the top-p nucleus, and verifies with speculative sampling (`sample_chain`,
`sample_tree`), which returns exact samples of the target's distribution. Tree children are
the draft's top-k ranks when greedy, and draws *without replacement* from the draft's
distribution when sampling (the precondition of `sample_tree`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field

import torch

from .acceptance import check_top_p, greedy_chain, greedy_tree, is_real, probs_from_logits, sample_chain, sample_tree

# what torch.Generator.manual_seed takes
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)


@dataclass
class Picker:
    """temperature 0 -> greedy; > 0 -> sampling seeded by `seed` (a CPU generator)."""

    temperature: float = 0.0
    top_p: float | None = None
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        check_temperature(self.temperature)
        check_top_p(self.top_p)
        check_seed(self.seed)
        if self.temperature == 0 and self.top_p is not None and self.top_p != 1:
            warnings.warn(f"top_p={self.top_p} is ignored: temperature 0 decodes greedily; pass temperature > 0 "
                          "(e.g. temperature=0.7) to sample from the top-p nucleus, or leave top_p out.",
                          UserWarning, stacklevel=4)
        self.generator = torch.Generator().manual_seed(int(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] logits -> [..., V] float32 probabilities on the CPU."""
        return probs_from_logits(logits.float().cpu(), self.temperature, self.top_p)

    def pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """(token, its distribution or None when greedy) from logits [V]."""
        if self.greedy:
            return int(logits.argmax()), None
        probs = self.probs(logits)
        return int(torch.multinomial(probs, 1, generator=self.generator)), probs

    def children(self, logits: torch.Tensor, ranks: list[int]) -> tuple[list[int], torch.Tensor | None]:
        """Tokens for children of the given ranks (sorted) from the logits [V] at their parent."""
        if self.greedy:
            top = logits.topk(max(ranks) + 1).indices
            return [int(top[r]) for r in ranks], None
        probs = self.probs(logits)
        drawn = torch.multinomial(probs, len(ranks), replacement=False, generator=self.generator)
        return drawn.tolist(), probs

    def verify_chain(self, proposal: list[int], q_rows: list, target_logits: torch.Tensor) -> tuple[int, int]:
        """(accepted count, next token) for a chain; target_logits [k+1, V]."""
        tokens = torch.tensor(proposal, dtype=torch.long)
        if self.greedy:
            return greedy_chain(tokens, target_logits)
        q = torch.stack(q_rows) if q_rows else torch.zeros(0, target_logits.shape[-1])
        return sample_chain(tokens, over_target_rows(q, target_logits), self.probs(target_logits), self.generator)

    def verify_tree(self, tree, node_tokens: list[int], q_rows: torch.Tensor | None,
                    target_logits: torch.Tensor) -> tuple[list[int], int]:
        """(accepted nodes below the root, next token) for a tree; target_logits [N+1, V]."""
        tokens = torch.tensor(node_tokens, dtype=torch.long)
        if self.greedy:
            return greedy_tree(tree, tokens, target_logits)
        return sample_tree(tree, tokens, over_target_rows(q_rows, target_logits), self.probs(target_logits),
                           self.generator)


def check_temperature(temperature) -> None:
    """Raise ValueError unless `temperature` is a finite number >= 0 (0: greedy; inf would sample
    uniformly, whatever the logits say)."""
    if not is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy, e.g. 0.7 samples), "
                         f"got {temperature!r}.")


def check_seed(seed) -> None:
    """Raise ValueError unless `seed` is an integer that seeds a torch.Generator (numpy's included)."""
    if (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)
            or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise ValueError(f"seed must be an integer (e.g. 0) in [-2**63, 2**64), got {seed!r}.")


def over_target_rows(q: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """The draft's distributions [..., V_draft] over the target's output rows [..., V_target]: a draft
    whose output layer has fewer rows (e.g. LLaVA-OneVision 0.5B drafting for 7B, whose layers are
    padded differently) gives the rows it lacks probability 0, which keeps speculative sampling exact.
    `check_compatible` refuses a draft with more rows than its target."""
    missing = target_logits.shape[-1] - q.shape[-1]
    return torch.nn.functional.pad(q, (0, missing)) if missing > 0 else q
