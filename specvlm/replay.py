"""Replay greedy chain speculative decoding offline: every method's accepted counts, cheaply.

With greedy verification the committed text is always the target's own greedy output y
(`decoding.generate_ar`), whatever the draft sees. In a round that starts after p committed
tokens, the draft's j-th proposal is argmax draft(prompt, y[:p+j]) as long as all earlier
proposals matched, and the round stops at the first mismatch. So one teacher-forced draft
pass over [pruned draft prompt, y] gives the draft's prediction d_i after y[:i] for every i,
the match vector m_i = (d_i == y_i), and from it the accepted count of every round:

    matches = draft_matches(pair, prompt, y, keep)      # one draft prefill + one forward
    accepted = chain_rounds(matches, k=5, max_new_tokens=64, end=index_of_end_token)

`chain_rounds` follows the loop of `decoding.generate_sd` rule for rule: the first token comes from the
target's prefill; a round drafts min(k, max_new_tokens - committed - 1) tokens; it commits the
accepted ones plus the target's bonus token; decoding stops once an end token is committed.
A round may accept tokens past the end token (they are cut from the output afterwards), so
the target's tokens must continue a little past it: `target_tokens` decodes k more.

`replay_mat` puts it together for one clip: one target decode (its prefill also gives the
verifier scores that "top" and "specvlm" rank by), then one draft pass per distinct set of
kept video tokens. The tests check the replayed counts against `generate_sd`'s `accepted`.

Exact in float32, where the tests run: there a (k+1)-token verification and AR's one-token steps give
the same tokens. In bf16 on a GPU the two kernel shapes may round a near-tie differently
(`bench.first_divergence`), so a replayed MAT is that of a run whose every verification agreed with AR.

Not handled: tree drafts (a tree round depends on the draft's top-k ranks along y, not only
on its argmax), sampling (temperature > 0: proposals are random, not a function of y).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import pruning
from .decoding import (SPECULATIVE_METHODS, check_prompts, positions, prefill_target, select_video_tokens,
                       truncate)
from .models import DEFAULT_QUESTION, Pair, Prompt, VideoLM


def chain_rounds(matches, k: int, max_new_tokens: int, end: int | None = None) -> list[int]:
    """Accepted draft tokens per round of greedy chain speculative decoding.

    matches[i] (i >= 1): the draft's greedy token after the target's first i tokens equals
    the target's token i (matches[0] is unused: the first token comes from the target's
    prefill). `end`: index of the first end token in the target's tokens, None if none.

    chain_rounds([1, 1, 0, 1, 1, 1, 1, 1], k=2, max_new_tokens=8) -> [1, 2, 1]
    (rounds start after 1, 3, 6 tokens; the last may draft only 8 - 6 - 1 = 1 token)
    """
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if end is not None and end < 0:
        raise ValueError(f"end (index of the first end token) must be >= 0 or None, got {end}.")
    matches = [bool(m) for m in (matches.tolist() if isinstance(matches, torch.Tensor) else matches)]
    committed, accepted = 1, []
    while committed < max_new_tokens and (end is None or committed <= end):
        drafted = min(k, max_new_tokens - committed - 1)  # the room rule of generate_sd
        n = 0
        while n < drafted:
            i = committed + n
            if i >= len(matches):
                raise ValueError(
                    f"matches has {len(matches)} entries but the round after {committed} tokens needs entry {i}: "
                    "pass matches for the target's tokens continued up to k past the end token (see target_tokens)."
                )
            if not matches[i]:
                break
            n += 1
        accepted.append(n)
        committed += n + 1
    return accepted


@torch.no_grad()
def target_tokens(target: VideoLM, prompt: Prompt, max_new_tokens: int, past_end: int, with_scores: bool = False):
    """(tokens, scores [n] or None): the target's greedy tokens (`generate_ar`'s), continued
    `past_end` tokens beyond the first end token (at most `max_new_tokens` in all). The scores
    come from the same prefill when `with_scores`."""
    logits, cache, scores = prefill_target(target, prompt, with_scores)
    out, limit, seen_end = [int(logits.argmax())], max_new_tokens, False
    while True:
        if not seen_end and out[-1] in target.eos_token_ids:
            seen_end, limit = True, min(max_new_tokens, len(out) + past_end)
        if len(out) >= limit:
            return out, scores
        logits = target.step([out[-1]], positions(prompt, len(out) - 1, 1), cache)
        out.append(int(logits[0, -1].argmax()))


@torch.no_grad()
def draft_matches(pair: Pair, prompt: Prompt, target_tokens: list[int], keep: torch.Tensor | None,
                  draft_prompt: Prompt | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
    """bool [len(target_tokens)]: entry i says whether the draft, prefilled with the text and the
    kept video tokens `keep` (None: all), predicts target_tokens[i] from target_tokens[:i].
    `embeds` [1, L, D]: the draft's `embed(draft_prompt)`, to reuse over many `keep`s.

    Entry 0 comes from the prefill's last row; entries 1.. from one forward over
    target_tokens[:-1] at positions continuing from `draft_prompt.next_position`, as the
    draft's steps in `decoding.chain_round` see them.
    """
    draft, draft_prompt = pair.draft, draft_prompt or prompt
    if not target_tokens:
        raise ValueError("target_tokens is empty: pass the target's greedy tokens (see target_tokens).")
    embeds = draft.embed(draft_prompt) if embeds is None else embeds
    # the pruned prefill of decoding.prefill_pruned, on embeddings computed once
    rows = draft_prompt.rows(keep)
    cache = draft.new_cache()
    logits = draft.forward(embeds[:, rows.to(draft.device)], draft_prompt.position_ids[..., rows], cache,
                           logits_rows=slice(-1, None))[0]  # [1, V]: the prediction of target_tokens[0]
    if len(target_tokens) > 1:
        steps = draft.step(target_tokens[:-1], positions(draft_prompt, 0, len(target_tokens) - 1), cache)
        logits = torch.cat([logits, steps[0]])
    return logits.argmax(-1).cpu() == torch.tensor(target_tokens)


@dataclass
class Replay:
    """One clip's replay. `tokens`: the output every greedy path returns; `accepted`:
    (method, ratio, seed) -> accepted draft tokens per round, as `generate_sd(...).accepted`."""

    tokens: list[int]
    video_tokens: int
    accepted: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)  # (method, ratio, seed) -> number of kept video tokens
    scores: torch.Tensor | None = None  # [n] the verifier scores, when a method needed them

    def mean_accepted(self, method: str, ratio: float, seed: int = 0) -> float:
        """MAT of one run: accepted draft tokens per round (the bonus token not counted)."""
        rounds = self.accepted[(method, ratio, seed)]
        return sum(rounds) / len(rounds) if rounds else 0.0


def replay_mat(pair: Pair, video_or_prompt, methods, ratios, k: int = 5, max_new_tokens: int = 64,
               seeds=(0,), question: str = DEFAULT_QUESTION, mass: float = 0.4,
               draft_prompt: Prompt | None = None) -> Replay:
    """Accepted counts of greedy chain SD for every method x ratio (x seed, for "random")
    on one clip (a `Video`, or a target `Prompt` with an optional `draft_prompt`), as
    `generate(pair, video, question, method, ratio, k, max_new_tokens, mass, seed)` would give.

    replay_mat(pair, video, ["specvlm", "random"], [0.9], seeds=(0, 1)).accepted
    -> {("specvlm", 0.9, 0): [...], ("random", 0.9, 0): [...], ("random", 0.9, 1): [...]}
    """
    unknown = [m for m in methods if m not in SPECULATIVE_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {SPECULATIVE_METHODS}.")
    if k < 1 or max_new_tokens < 1:
        raise ValueError(f"k and max_new_tokens must be >= 1, got k={k}, max_new_tokens={max_new_tokens}.")
    if isinstance(video_or_prompt, Prompt):
        prompt = video_or_prompt
    else:
        prompt = pair.target.prepare(video_or_prompt, question)
        if draft_prompt is None and pair.draft is not pair.target:
            draft_prompt = pair.draft.prepare(video_or_prompt, question)  # as generate() does
    draft_prompt = draft_prompt or prompt
    check_prompts(prompt, draft_prompt)  # as generate_sd: the draft keeps the target's video tokens by index
    pruning.check_mass(mass)
    for ratio in ratios:
        pruning.keep_budget(prompt.num_video_tokens, ratio)

    scored = any(m in ("top", "specvlm") for m in methods)
    tokens, scores = target_tokens(pair.target, prompt, max_new_tokens, past_end=k, with_scores=scored)
    output = truncate(tokens, pair.target.eos_token_ids, max_new_tokens)
    end = len(output) - 1 if output[-1] in pair.target.eos_token_ids else None
    embeds = pair.draft.embed(draft_prompt)

    replay, done = Replay(output, prompt.num_video_tokens, scores=scores), {}
    for method in methods:
        for ratio in ratios:
            for seed in seeds if method == "random" else (0,):
                keep = select_video_tokens(method, prompt, ratio, scores, mass, seed)
                key = None if keep is None else tuple(keep.tolist())
                if key not in done:  # e.g. every method keeps everything at ratio 0
                    matches = draft_matches(pair, prompt, tokens, keep, draft_prompt, embeds)
                    done[key] = chain_rounds(matches, k, max_new_tokens, end)
                replay.accepted[(method, ratio, seed)] = done[key]
                replay.kept[(method, ratio, seed)] = prompt.num_video_tokens if keep is None else len(keep)
    return replay
