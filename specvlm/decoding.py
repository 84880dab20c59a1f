"""Autoregressive decoding and lossless speculative decoding with a pruned draft.

`generate(pair, video, question, method=..., ratio=...)` is the one entry point:

- `method="ar"`: the target alone, greedy: the reference every other path must equal.
- `method="sd"`: speculative decoding, the draft sees the whole video.
- `method="specvlm"` (or any selection in `pruning.METHODS`: "uniform", "random", "top",
  "window-front", ...): the draft is prefilled with the text and only
  `int(n * (1 - ratio))` of the n video tokens, chosen by that rule from the target's
  attention (SpecVLM, arXiv 2508.16201).

One round of chain speculative decoding (greedy):
  1. the draft proposes k tokens, one step each, from the last committed token;
  2. the target scores the last committed token and the k proposals in one forward pass;
  3. the longest prefix of proposals equal to the target's argmax is accepted, and the
     target's argmax after it is appended (the bonus token), so each round adds n + 1 tokens;
  4. both caches drop what was rejected (`crop`), so they hold exactly the committed text.
Because every committed token is the target's argmax given the committed text before it,
the output equals the target's own greedy decoding token for token, whatever the draft sees.

Caches: the target's holds prompt + all committed tokens but the last one; the draft's holds
its (pruned) prompt + the first `draft_seen` committed tokens, and catches up at the start of
its next round. Positions of generated tokens continue from `prompt.next_position` in both
models, so pruned tokens leave gaps in positions, not in caches.
Not handled here: batches; tree drafts and sampling live beside this chain loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import pruning
from .acceptance import greedy_chain
from .attention import prefill_with_scores
from .models import DEFAULT_QUESTION, Pair, Prompt, VideoLM

SPECULATIVE_METHODS = ("sd",) + tuple(pruning.METHODS)
METHODS = ("ar",) + SPECULATIVE_METHODS
SCORED_METHODS = ("top", "specvlm")


@dataclass
class Result:
    """What one generation did. `accepted[i]` counts the draft tokens accepted in round i
    (the bonus token not included); `mean_accepted` is their mean (MAT, the reference code's
    convention) and `tokens_per_round` = MAT + 1 for full rounds."""

    tokens: list[int]
    text: str
    method: str
    ratio: float
    accepted: list[int] = field(default_factory=list)
    video_tokens: int = 0
    draft_video_tokens: int | None = None
    target_cache_len: int = 0
    draft_cache_len: int | None = None
    kept: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    timings: dict = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return len(self.accepted)

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted) / len(self.accepted) if self.accepted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.mean_accepted + 1 if self.accepted else 0.0

    @property
    def decode_s(self) -> float:
        return self.timings.get("decode", 0.0)


class Stopwatch:
    """Wall-clock laps, synchronising the device first so GPU work is counted where it runs."""

    def __init__(self, device: torch.device):
        self.device, self.laps = device, {}
        self._sync()
        self._last = time.perf_counter()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lap(self, name: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now


def truncate(tokens: list[int], eos: frozenset, limit: int) -> list[int]:
    """Cut after the first end-of-sequence token and at `limit`: [5, 2, 7], eos={2} -> [5, 2]."""
    for i, t in enumerate(tokens[:limit]):
        if t in eos:
            return tokens[: i + 1]
    return tokens[:limit]


def positions(prompt: Prompt, start: int, count: int) -> torch.Tensor:
    """Absolute positions of committed tokens start..start+count-1."""
    return torch.arange(prompt.next_position + start, prompt.next_position + start + count)


def prefill_target(target: VideoLM, prompt: Prompt, with_scores: bool):
    """(first token, cache, scores or None): the target's prefill and its greedy first token."""
    cache = target.new_cache()
    embeds = target.embed(prompt)
    if with_scores:
        logits, scores = prefill_with_scores(target, prompt, embeds, cache)
    else:
        logits, scores = target.forward(embeds, prompt.position_ids, cache, logits_rows=slice(-1, None)), None
    return int(logits[0, -1].argmax()), cache, scores


def prefill_draft(draft: VideoLM, prompt: Prompt, keep: torch.Tensor | None):
    """The draft's cache after prefilling the text and the kept video tokens only."""
    cache = draft.new_cache()
    rows = prompt.rows(keep)
    embeds = draft.embed(prompt)[:, rows.to(draft.device)]
    draft.forward(embeds, prompt.position_ids[..., rows], cache, logits_rows=slice(-1, None))
    return cache


def select_video_tokens(method, prompt, ratio, scores, mass=0.4, seed=0) -> torch.Tensor | None:
    """Indices into the prompt's video tokens that the draft keeps (None: all of them)."""
    if method == "sd":
        return None
    options = {"mass": mass} if method == "specvlm" else {}
    generator = torch.Generator().manual_seed(seed)
    return pruning.select(method, n=prompt.num_video_tokens, ratio=ratio, scores=scores, generator=generator, **options)


def generate_ar(target: VideoLM, prompt: Prompt, max_new_tokens: int = 64) -> Result:
    """Greedy decoding with the target alone."""
    watch = Stopwatch(target.device)
    first, cache, _ = prefill_target(target, prompt, with_scores=False)
    watch.lap("prefill")
    out = [first]
    while len(out) < max_new_tokens and out[-1] not in target.eos_token_ids:
        logits = target.step([out[-1]], positions(prompt, len(out) - 1, 1), cache)
        out.append(int(logits[0, -1].argmax()))
    watch.lap("decode")
    return Result(out, target.decode(out), "ar", 0.0, video_tokens=prompt.num_video_tokens,
                  target_cache_len=cache.get_seq_length(), timings=watch.laps)


def generate_sd(pair: Pair, prompt: Prompt, method: str = "specvlm", ratio: float = 0.9, k: int = 5,
                max_new_tokens: int = 64, mass: float = 0.4, seed: int = 0, draft_prompt: Prompt | None = None) -> Result:
    """Chain speculative decoding, greedy; the draft's video pruned by `method` at `ratio`."""
    if method not in SPECULATIVE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}.")
    pruning.keep_budget(prompt.num_video_tokens, ratio)
    target, draft = pair.target, pair.draft
    draft_prompt = draft_prompt or prompt
    watch = Stopwatch(target.device)

    first, target_cache, scores = prefill_target(target, prompt, with_scores=method in SCORED_METHODS)
    watch.lap("target_prefill")
    keep = select_video_tokens(method, prompt, ratio, scores, mass, seed)
    watch.lap("select")
    draft_cache = prefill_draft(draft, draft_prompt, keep)
    watch.lap("draft_prefill")

    out, draft_seen, accepted = [first], 0, []
    while len(out) < max_new_tokens and out[-1] not in target.eos_token_ids:
        steps = min(k, max_new_tokens - len(out) - 1)
        # 1. draft: catch up on committed tokens it has not seen, then propose `steps` tokens
        proposal, feed, start = [], out[draft_seen:], draft_seen
        for _ in range(steps):
            logits = draft.step(feed, positions(prompt, start, len(feed)), draft_cache)
            start += len(feed)
            feed = [int(logits[0, -1].argmax())]
            proposal += feed
        # 2. target: score the last committed token and the proposals in one pass
        logits = target.step([out[-1]] + proposal, positions(prompt, len(out) - 1, steps + 1), target_cache)
        # 3. accept the agreeing prefix plus the target's bonus token
        n, bonus = greedy_chain(torch.tensor(proposal, dtype=torch.long), logits[0])
        # 4. rewind both caches to the committed text
        if steps > n:
            target_cache.crop(-(steps - n))
        draft_valid = min(n, steps - 1)  # the draft never consumed its last proposal
        if steps - 1 > draft_valid:
            draft_cache.crop(-(steps - 1 - draft_valid))
        draft_seen = len(out) + draft_valid if steps else draft_seen
        out += proposal[:n] + [bonus]
        accepted.append(n)
    watch.lap("decode")

    out = truncate(out, target.eos_token_ids, max_new_tokens)
    return Result(
        out, target.decode(out), method, 0.0 if method == "sd" else ratio, accepted,
        video_tokens=prompt.num_video_tokens,
        draft_video_tokens=prompt.num_video_tokens if keep is None else len(keep),
        target_cache_len=target_cache.get_seq_length(), draft_cache_len=draft_cache.get_seq_length(),
        kept=keep, scores=scores, timings=watch.laps,
    )


def generate(pair: Pair, video, question: str = DEFAULT_QUESTION, method: str = "specvlm", ratio: float = 0.9,
             k: int = 5, max_new_tokens: int = 64, mass: float = 0.4, seed: int = 0) -> Result:
    """Answer `question` about `video` (a `Video`) with `method`; see the module docstring."""
    if video is None:
        raise ValueError("generate needs a video: SpecVLM prunes the draft's video tokens, and this prompt has none.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    prompt = pair.target.prepare(video, question)
    if prompt.num_video_tokens == 0:
        raise ValueError("the prepared prompt contains no video tokens; check the processor's chat template.")
    if method == "ar":
        return generate_ar(pair.target, prompt, max_new_tokens)
    draft_prompt = prompt if pair.draft is pair.target else pair.draft.prepare(video, question)
    return generate_sd(pair, prompt, method, ratio, k, max_new_tokens, mass, seed, draft_prompt)
