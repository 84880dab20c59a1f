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

A tree round (`tree=`, e.g. the paper's 25-node `MC_SIM_7B_63`) drafts level by level: one
draft pass per level over the nodes that have children, each node attending to the prefix,
its ancestors and itself (an explicit mask, also at single-node levels); the target verifies
all nodes in one pass with the tree mask at positions root + depth; the longest accepted
root-to-leaf path is kept and the target's cache keeps exactly that path, moved to
consecutive slots. The draft's cache drops its tree nodes and catches up next round. When
fewer tokens remain than the tree is deep, a chain round of the right length is used, so
`max_new_tokens` is never overshot.

With `temperature > 0` the same loops sample: drafts are drawn from the draft's distribution
(tree children without replacement), verification is speculative sampling (see
`acceptance.py`), and the output is distributed exactly as the target's own sampling.

Caches: the target's holds prompt + all committed tokens but the last one; the draft's holds
its (pruned) prompt + the first `draft_seen` committed tokens, and catches up at the start of
its next round. Positions of generated tokens continue from `prompt.next_position` in both
models, so pruned tokens leave gaps in positions, not in caches.
Not handled: batches of prompts; static caches and compiled steps (the GPU fast path).
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field

import torch

from . import pruning
from .attention import prefill_with_scores
from .models import DEFAULT_QUESTION, Pair, Prompt, VideoLM
from .sampling import Picker, check_seed
from .trees import Tree, tree_attention_bias
from .video import Video

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
    """(last-row logits [V], cache, scores [n] or None): the target's full prefill."""
    cache = target.new_cache()
    embeds = target.embed(prompt)
    if with_scores:
        logits, scores = prefill_with_scores(target, prompt, embeds, cache)
    else:
        logits, scores = target.forward(embeds, prompt.position_ids, cache, logits_rows=slice(-1, None)), None
    return logits[0, -1], cache, scores


def prefill_pruned(lm: VideoLM, prompt: Prompt, keep: torch.Tensor | None):
    """(last-row logits [V], cache) after prefilling the text and the kept video tokens only."""
    cache = lm.new_cache()
    rows = prompt.rows(keep)
    embeds = lm.embed(prompt)[:, rows.to(lm.device)]
    logits = lm.forward(embeds, prompt.position_ids[..., rows], cache, logits_rows=slice(-1, None))
    return logits[0, -1], cache


def select_video_tokens(method, prompt, ratio, scores, mass=0.4, seed=0) -> torch.Tensor | None:
    """Indices into the prompt's video tokens that the draft keeps (None: all of them)."""
    if method == "sd":
        return None
    options = {"mass": mass} if method == "specvlm" else {}
    generator = torch.Generator().manual_seed(int(seed))
    return pruning.select(method, n=prompt.num_video_tokens, ratio=ratio, scores=scores, generator=generator, **options)


def generate_ar(target: VideoLM, prompt: Prompt, max_new_tokens: int = 64, keep: torch.Tensor | None = None,
                picker: Picker | None = None) -> Result:
    """Decoding with the target alone (greedy unless `picker` samples). With `keep`, the target
    itself sees only those video tokens: a lossy comparison (what pruning does to the target's
    answers), not SpecVLM."""
    check_prompt(prompt, "generate_ar")
    check_max_new_tokens(max_new_tokens)
    picker = picker or Picker()
    watch = Stopwatch(target.device)
    logits, cache = prefill_pruned(target, prompt, keep)
    watch.lap("prefill")
    out = [picker.pick(logits)[0]]
    while len(out) < max_new_tokens and out[-1] not in target.eos_token_ids:
        logits = target.step([out[-1]], positions(prompt, len(out) - 1, 1), cache)
        out.append(picker.pick(logits[0, -1])[0])
    watch.lap("decode")
    return Result(out, target.decode(out), "ar", 0.0, video_tokens=prompt.num_video_tokens,
                  target_cache_len=cache.get_seq_length(), timings=watch.laps)


@dataclass
class Speculation:
    """The state between rounds. Invariants: the target's cache holds prompt + out[:-1];
    the draft's holds its (pruned) prompt + out[:draft_seen]."""

    target: VideoLM
    draft: VideoLM
    prompt: Prompt
    target_cache: object
    draft_cache: object
    out: list[int]
    picker: Picker
    draft_prompt: Prompt | None = None  # the draft's own positions, if its processor differs
    draft_seen: int = 0

    def __post_init__(self):
        self.draft_prompt = self.draft_prompt or self.prompt


def chain_round(s: Speculation, k: int) -> int:
    """One round with a chain of k drafted tokens (k may be 0); returns the accepted count."""
    # 1. draft: catch up on committed tokens it has not seen, then propose k tokens
    proposal, q_rows, feed, start = [], [], s.out[s.draft_seen:], s.draft_seen
    for _ in range(k):
        logits = s.draft.step(feed, positions(s.draft_prompt, start, len(feed)), s.draft_cache)
        start += len(feed)
        token, q = s.picker.pick(logits[0, -1])
        proposal.append(token)
        q_rows.append(q)
        feed = [token]
    # 2. target: score the last committed token and the k proposals in one pass
    logits = s.target.step([s.out[-1]] + proposal, positions(s.prompt, len(s.out) - 1, k + 1), s.target_cache)
    # 3. accept the agreeing prefix, then the target's own next token
    n, next_token = s.picker.verify_chain(proposal, q_rows, logits[0])
    # 4. rewind both caches to the committed text (the draft never consumed its last proposal)
    if k > n:
        s.target_cache.crop(-(k - n))
    if k:
        draft_valid = min(n, k - 1)
        if k - 1 > draft_valid:
            s.draft_cache.crop(-(k - 1 - draft_valid))
        s.draft_seen = len(s.out) + draft_valid
    s.out += proposal[:n] + [next_token]
    return n


def _bias(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """bool [q, K] (True = may attend) -> additive [1, 1, q, K]."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def keep_slots(cache, start: int, slots: torch.Tensor) -> None:
    """Keep cache entries [0, start) plus `start + slots`, moved to consecutive places."""
    for layer in cache.layers:
        index = torch.cat([torch.arange(start), start + slots]).to(layer.keys.device)
        layer.keys, layer.values = layer.keys[:, :, index], layer.values[:, :, index]


def draft_tree(s: Speculation, tree: Tree) -> tuple[list[int], torch.Tensor | None]:
    """Expand `tree` level by level with the draft; returns (node tokens [N+1] with the root
    first, the draft's distribution at every node [N+1, V] when sampling, else None).
    Each level is one draft pass over the nodes that have children, each node seeing the
    prefix, its ancestors and itself; afterwards the draft's cache is back at the committed text."""
    tokens = [s.out[-1]] + [0] * (tree.num_nodes - 1)
    q_rows = [None] * tree.num_nodes
    root_position = s.draft_prompt.next_position + len(s.out) - 1
    feed = s.out[s.draft_seen:]
    logits = s.draft.step(feed, positions(s.draft_prompt, s.draft_seen, len(feed)), s.draft_cache)[0, -1:]
    base = s.draft_cache.get_seq_length()  # prefix + root: visible to every node
    fed_slot = {0: base - 1}
    parents = tree.parents.tolist()
    expand = [0]
    for depth in range(1, tree.depth + 1):
        for row, node in enumerate(expand):
            children = tree.children(node).tolist()
            ranks = tree.ranks[children].tolist()
            child_tokens, q_rows[node] = s.picker.children(logits[row], ranks)
            for child, token in zip(children, child_tokens):
                tokens[child] = token
        expand = [int(n) for n in tree.level_nodes(depth) if len(tree.children(int(n)))]
        if not expand:
            break
        length = s.draft_cache.get_seq_length()
        allowed = torch.zeros(len(expand), length + len(expand), dtype=torch.bool)
        allowed[:, :base] = True
        for row, node in enumerate(expand):
            ancestor = parents[node]
            while ancestor > 0:
                allowed[row, fed_slot[ancestor]] = True
                ancestor = parents[ancestor]
            allowed[row, length + row] = True
            fed_slot[node] = length + row
        logits = s.draft.step([tokens[n] for n in expand], torch.full((len(expand),), root_position + depth),
                              s.draft_cache, attention_mask=_bias(allowed.to(s.draft.device), s.draft.dtype))[0]
    s.draft_cache.crop(-(s.draft_cache.get_seq_length() - base))
    s.draft_seen = len(s.out)
    if s.picker.greedy:
        return tokens, None
    vocab = logits.shape[-1]
    return tokens, torch.stack([q if q is not None else torch.zeros(vocab) for q in q_rows])


def tree_round(s: Speculation, tree: Tree) -> int:
    """One round with a static tree; returns the number of accepted drafted tokens."""
    # 1. draft: expand the tree level by level
    tokens, q_rows = draft_tree(s, tree)
    # 2. target: verify every node in one pass with the tree mask, at positions root + depth
    prefix = s.target_cache.get_seq_length()
    mask = tree_attention_bias(tree, prefix, s.target.dtype, device=s.target.device)
    logits = s.target.step(tokens, positions(s.prompt, len(s.out) - 1, 1)[0] + tree.depths, s.target_cache, mask)
    # 3. accept the longest agreeing root-to-leaf path, then the target's own next token
    accepted, next_token = s.picker.verify_tree(tree, tokens, q_rows, logits[0])
    # 4. the target keeps the root and the accepted path, moved to consecutive slots
    keep_slots(s.target_cache, prefix, torch.tensor([0] + accepted, dtype=torch.long))
    s.out += [tokens[n] for n in accepted] + [next_token]
    return len(accepted)


def generate_sd(pair: Pair, prompt: Prompt, method: str = "specvlm", ratio: float = 0.9, k: int = 5,
                max_new_tokens: int = 64, mass: float = 0.4, seed: int = 0, draft_prompt: Prompt | None = None,
                tree: Tree | None = None, picker: Picker | None = None) -> Result:
    """Speculative decoding; the draft's video pruned by `method` at `ratio`. Drafts a chain
    of `k` tokens, or the static `tree` when given; greedy unless `picker` samples."""
    check_pair(pair, "generate_sd")
    if method not in SPECULATIVE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")
    check_speculation(prompt, draft_prompt, ratio, mass, k, tree, max_new_tokens, seed)
    picker = picker or Picker()
    target, draft = pair.target, pair.draft
    watch = Stopwatch(target.device)

    logits, target_cache, scores = prefill_target(target, prompt, with_scores=method in SCORED_METHODS)
    first = picker.pick(logits)[0]
    watch.lap("target_prefill")
    keep = select_video_tokens(method, prompt, ratio, scores, mass, seed)
    watch.lap("select")
    draft_prompt = draft_prompt or prompt
    _, draft_cache = prefill_pruned(draft, draft_prompt, keep)
    watch.lap("draft_prefill")

    state = Speculation(target, draft, prompt, target_cache, draft_cache, [first], picker, draft_prompt)
    accepted = []
    while len(state.out) < max_new_tokens and not target.eos_token_ids.intersection(state.out):
        room = max_new_tokens - len(state.out) - 1  # drafted tokens that may still be kept
        if tree is not None and room >= tree.depth:
            accepted.append(tree_round(state, tree))
        else:  # a chain, or a tree too deep for the tokens left: never overshoot
            accepted.append(chain_round(state, min(k if tree is None else tree.depth, room)))
    watch.lap("decode")

    return speculative_result(state.out, target, prompt, method, ratio, accepted, keep, scores,
                              target_cache.get_seq_length(), draft_cache.get_seq_length(), watch.laps, max_new_tokens)


def check_speculation(prompt: Prompt, draft_prompt: Prompt | None, ratio: float, mass: float, k: int,
                      tree: Tree | None, max_new_tokens: int, seed: int = 0) -> None:
    """Raise ValueError (TypeError for a prompt or tree of the wrong kind), before any prefill, for
    arguments no speculative loop can run with (the plain path's `generate_sd` and the fast path's
    `generate_fast` alike)."""
    check_tree(tree)
    check_k(k, tree)
    check_max_new_tokens(max_new_tokens)
    check_prompts(prompt, draft_prompt)
    pruning.keep_budget(prompt.num_video_tokens, ratio)
    pruning.check_mass(mass)
    check_seed(seed)


def check_pair(pair, caller: str) -> None:
    """Raise TypeError unless `pair` is a `Pair` (the target and its draft, checked compatible)."""
    if not isinstance(pair, Pair):
        raise TypeError(f"{caller} takes a Pair as its first argument, got {type(pair).__name__}: load one with "
                        "sv.load_pair('tiny') (or sv.load_pair(target_checkpoint, draft_checkpoint)), or build one "
                        "from two loaded models with sv.Pair(target, draft).")


def check_prompt(prompt, caller: str, name: str = "prompt") -> None:
    """Raise TypeError unless `prompt` is a `Prompt`, what a model's `prepare(video, question)` returns."""
    if not isinstance(prompt, Prompt):
        hint = (" (a Video goes to sv.generate(pair, video, question, ...), which prepares it)"
                if isinstance(prompt, Video) else "")
        raise TypeError(f"{caller} takes a Prompt as {name}, got {type(prompt).__name__}{hint}: prepare one with "
                        "pair.target.prepare(video, question) (and, for draft_prompt, pair.draft.prepare(video, "
                        "question)).")


def check_ratio(ratio) -> None:
    """Raise ValueError unless `ratio` (the share of video tokens pruned) is a number in [0, 1),
    for every method alike, "ar" and "sd" included, where it has no effect."""
    pruning.keep_budget(0, ratio)


def check_k(k, tree: Tree | None) -> None:
    """Raise ValueError unless `k` (draft tokens per round) is an integer, >= 1 when no tree is given
    (with a tree, k is unused by the plain path)."""
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or (tree is None and k < 1):
        raise ValueError(f"k (draft tokens per round) must be an int >= 1, got {k!r}.")


def check_tree(tree) -> None:
    """Raise TypeError unless `tree` is None (draft a chain of k) or a `trees.Tree`."""
    if tree is not None and not isinstance(tree, Tree):
        raise TypeError(f"tree must be None (a chain of k drafted tokens) or a Tree, got {type(tree).__name__} "
                        f"{tree!r:.60}: build one from rank paths with sv.Tree.from_paths([[0], [1], [0, 0]]), "
                        "or use the paper's sv.MC_SIM_7B_63 or sv.chain(k).")


def check_max_new_tokens(max_new_tokens) -> None:
    """Raise ValueError unless `max_new_tokens` is an integer >= 1."""
    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")


def check_prompts(prompt: Prompt, draft_prompt: Prompt | None = None) -> None:
    """Raise ValueError unless `prompt` holds video tokens and `draft_prompt` (the draft's own, if
    any) lays the video out as the target's does: pruning picks indices into the target's video
    tokens, and the draft keeps the tokens at those indices in its own prompt. TypeError for a
    prompt that is not a `Prompt`."""
    check_prompt(prompt, "speculative decoding")
    if draft_prompt is not None:
        check_prompt(draft_prompt, "speculative decoding", "draft_prompt")
    if prompt.num_video_tokens == 0:
        raise ValueError("the prepared prompt contains no video tokens; check the processor's chat template "
                         "(SpecVLM prunes the draft's video tokens, so the prompt needs a video).")
    if draft_prompt is not None and (draft_prompt.num_video_tokens, tuple(draft_prompt.grid)) != (
            prompt.num_video_tokens, tuple(prompt.grid)):
        raise ValueError(
            f"the draft's prompt lays the video out differently from the target's (target {prompt.num_video_tokens} "
            f"video tokens, grid {tuple(prompt.grid)}; draft {draft_prompt.num_video_tokens}, grid "
            f"{tuple(draft_prompt.grid)}): the draft keeps the target's selected video tokens by index, so give both "
            "models' processors the same frame size settings (e.g. Qwen2.5-VL's min_pixels and max_pixels).")


def speculative_result(out, target: VideoLM, prompt: Prompt, method: str, ratio: float, accepted: list[int],
                       keep, scores, target_cache_len: int, draft_cache_len: int, timings: dict,
                       max_new_tokens: int) -> Result:
    """The `Result` of a speculative loop: committed tokens cut at the first end token and at
    `max_new_tokens`; ratio 0 for plain SD; the draft's video size from `keep` (None: all)."""
    out = truncate(out, target.eos_token_ids, max_new_tokens)
    return Result(
        out, target.decode(out), method, 0.0 if method == "sd" else ratio, accepted,
        video_tokens=prompt.num_video_tokens,
        draft_video_tokens=prompt.num_video_tokens if keep is None else len(keep),
        target_cache_len=target_cache_len, draft_cache_len=draft_cache_len,
        kept=keep, scores=scores, timings=timings,
    )


def generate(pair: Pair, video, question: str = DEFAULT_QUESTION, method: str = "specvlm", ratio: float = 0.9,
             k: int = 5, max_new_tokens: int = 64, mass: float = 0.4, seed: int = 0, tree: Tree | None = None,
             temperature: float = 0.0, top_p: float | None = None) -> Result:
    """Answer `question` about `video` (a `Video`) with `method`; see the module docstring.
    `tree` drafts a static tree instead of a chain of `k`; `temperature` > 0 samples (seeded
    by `seed`) with speculative sampling, which keeps the target's distribution; `top_p` (with
    temperature > 0) samples from the nucleus. `ratio` is checked for every method, "ar" included."""
    check_pair(pair, "generate")
    if video is None:
        raise ValueError("generate needs a video: SpecVLM prunes the draft's video tokens, and this prompt has none.")
    if not isinstance(video, Video):
        raise TypeError(f"generate takes a Video, got {type(video).__name__}: read a file with "
                        "sv.load_video(path, num_frames), or wrap frames with sv.from_array(frames, fps).")
    check_max_new_tokens(max_new_tokens)
    check_ratio(ratio)
    picker = Picker(temperature, top_p, seed)
    prompt = pair.target.prepare(video, question)
    check_prompts(prompt)
    if method == "ar":
        return generate_ar(pair.target, prompt, max_new_tokens, picker=picker)
    draft_prompt = prompt if pair.draft is pair.target else pair.draft.prepare(video, question)
    return generate_sd(pair, prompt, method, ratio, k, max_new_tokens, mass, seed, draft_prompt, tree, picker)
