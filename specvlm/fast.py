"""The fast decoding path: static KV caches and step functions of fixed shapes.

Same loops as `decoding.py` (AR, chain SD, tree SD, every pruning method), same tokens and
same accepted counts (up to ties among a tree node's ranked children, which `top_k`'s kernels, the
picks' default on CUDA, break by the lowest token id), on the same transformers model classes;
only how each step runs differs. `generate_fast(pair, prompt, ...)` is the entry point.

Why. The draft of a speculative decoder is small, so one draft step is *launch-bound*: the
time a small model needs to read its weights is a small fraction of what hundreds of kernel
launches and the Python around them cost (notebook 05, section 3, measures it: for a
0.5B model transformers' default path sits tens of times above the memory-traffic floor).
SpecVLM only pays off if draft steps are cheap, so that overhead must go. A CUDA graph
records a step's kernels once and replays them with one launch, but it replays *fixed*
memory addresses and shapes. Hence:

1. Static caches (`SlotCache`): each layer's keys and values are allocated once at full
   capacity (prompt + max_new_tokens + slack for the widest step) and written in place at
   explicit slots. Rejecting drafted tokens moves the write position back (`length = n`): no
   copy, no crop; the next step overwrites the stale slots. Keeping a tree round's accepted
   path moves only those entries to consecutive slots (`SlotCache.move`, in-place index copy).
2. Fixed shapes per kind of step: AR step (1 token), draft step (1 token), draft catch-up
   (the tokens the draft has not seen yet, padded to a fixed width), draft tree level (the
   widest level, padded), chain verification (k+1, padded when fewer are drafted near the
   end), tree verification (`tree.num_nodes`). Padding rows come after the real ones and no
   real row attends to them; whatever they write lies past `length` and is overwritten.
3. The attention mask spans the whole capacity, [1, 1, q, capacity], additive (or a FlexAttention
   BlockMask over it), built on the device inside the step from the step's inputs, so its shape
   never changes either (`step_attention.py`: the masks and the attention kernels).
4. No waiting for the device inside a round: drafted tokens are picked on the device (argmax,
   or top-k and index tensors for a tree level) and fed to the next pass as tensors, so the
   host queues every pass of a round while the device runs the earlier ones and reads the
   device once, after the verification (its argmaxes with the drafted tokens, one copy). AR
   queues its next step before it reads the current token (`HostCopy`).
With `compile=True` (default on CUDA) each kind is compiled by `torch.compile` (inductor
kernels) and replayed from a CUDA graph captured by hand (`CapturedGraph`: no dynamo guards or
graph-tree bookkeeping per call); `SPECVLM_CUDA_GRAPHS=trees` replays through torch.compile's
own CUDA graphs (`mode="reduce-overhead"`) instead. A draft's steps compile with inductor's
combo kernels unless $SPECVLM_DRAFT_COMBO is "0" (`draft_combo_kernels`), and with programmatic
dependent launch for inductor's Triton kernels where $SPECVLM_DRAFT_PDL is "1" (`draft_pdl`);
compiled steps only, so not a draft spread over several devices.

Cache invariants (as in `decoding.py`): the target's holds prompt + out[:-1], the draft's its
(pruned) prompt + out[:draft_seen]; slots from `length` on hold garbage that masks block.

Not handled: sampling (greedy only: `temperature > 0` raises); batches; the prefills, which
run on the plain path (`decoding.prefill_target` / `prefill_pruned`, scores included) and
are then copied into the static caches.
"""

from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass

import torch
from transformers import Cache

from .acceptance import chain_accept, tree_accept
from .decoding import (METHODS, SCORED_METHODS, Result, Stopwatch, check_max_new_tokens, check_pair, check_prompt,
                       check_ratio, check_speculation, prefill_pruned, prefill_target, select_video_tokens,
                       speculative_result)
from .draft_vocab import check_vocabulary, first_tokens, output_head, output_rows
from .fusion import changes as fusion_changes
from .fusion import fuse_projections, is_fused, unfuse_projections, uses_few_rows
from .models import Pair, Prompt, VideoLM, head_dim
from .sampling import check_temperature
from .timeline import phase
from . import flash_decode, l2_prefetch, split_merge, top_k
from . import few_rows as few_rows_kernels
from .step_attention import (  # noqa: F401 (re-exported: fast.grouped_attention, fast.FLEX_MAX_QUERY, ...)
    ATTENTIONS, FLEX_ATTENTION, FLEX_BLOCK, FLEX_MAX_QUERY, FLEX_MIN_SLOTS, FLEX_ROWS, SPLIT_MIN_SLOTS, causal_pattern,
    flex_block_mask, flex_or_sdpa, float32_scores, grouped_attention, grouped_flex, merge_kernel,
    restore_output_capture, split_attention, use_flex, visibility_bias)
from .trees import Tree

# ----------------------------------------------------------------------------------------
# the cache


class SlotCache(Cache):
    """A KV cache of fixed capacity, written at explicit slots.

    keys[i], values[i]: [1, H, capacity, d] for layer i, allocated once on layer i's device (one
    device, or one per layer for a model spread over several); they never change address
    (`StaticLM` makes a new SlotCache, and new graphs, when a prompt outgrows one).
    `length` (a Python int): slots 0..length-1 hold the committed text; the rest is garbage.
    `position` (a 0-d long tensor on the first layer's device): where the running forward writes; a forward
    of q tokens writes slots position..position+q-1 in every layer and nothing else. Only the
    step function sets it (from its inputs); the layers never move it.
    E.g. length 10, a chain verification of 4 tokens writes slots 10..13; 1 accepted ->
    `length = 12` (slots 12, 13 are stale and will be overwritten).
    """

    def __init__(self, shapes: list[tuple[int, int, int]], capacity: int, dtype: torch.dtype, device):
        super().__init__(layers=[])
        self.capacity, self.length = capacity, 0
        devices = per_layer(device, len(shapes))
        self.keys = [torch.zeros(1, heads, capacity, dim, dtype=dtype, device=where)
                     for (heads, dim, _), where in zip(shapes, devices)]
        self.values = [torch.zeros(1, heads, capacity, vdim, dtype=dtype, device=where)
                       for (heads, _, vdim), where in zip(shapes, devices)]
        self.position = torch.zeros((), dtype=torch.long, device=devices[0])
        for t in (*self.keys, *self.values, self.position):
            torch._dynamo.mark_static_address(t)  # compiled graphs read and write them in place

    @classmethod
    def like(cls, cache, capacity: int) -> SlotCache:
        """An empty SlotCache with the layer shapes, dtype and per-layer devices of a filled DynamicCache."""
        layers = cache.layers
        shapes = [(layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1]) for layer in layers]
        return cls(shapes, capacity, layers[0].keys.dtype, [layer.keys.device for layer in layers])

    def fits(self, cache) -> bool:
        return len(self.keys) == len(cache.layers) and all(
            k.shape[1] == layer.keys.shape[1] and k.shape[-1] == layer.keys.shape[-1] and k.dtype == layer.keys.dtype
            and k.device == layer.keys.device for k, layer in zip(self.keys, cache.layers))

    def load(self, cache) -> None:
        """Copy a prefilled DynamicCache into slots 0..n-1; length = n."""
        n = cache.get_seq_length()
        if n > self.capacity:
            raise ValueError(f"a prefill of {n} tokens does not fit a static cache of {self.capacity} slots")
        for keys, values, layer in zip(self.keys, self.values, cache.layers):
            keys[:, :, :n].copy_(layer.keys)
            values[:, :, :n].copy_(layer.values)
        self.length = n

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Called by every attention layer: write the q new entries at `position`, return the
        whole buffers (the step's mask hides every slot a row must not see)."""
        device = self.keys[layer_idx].device
        slots = self.position.to(device) + torch.arange(key_states.shape[-2], device=device)
        self.keys[layer_idx].index_copy_(2, slots, key_states)
        self.values[layer_idx].index_copy_(2, slots, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity

    def move(self, source: torch.Tensor, dest: torch.Tensor) -> None:
        """Copy the entries at slots `source` [m] to slots `dest` [m] in every layer, in place.
        All sources are read before any destination is written, so the two may overlap."""
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer.index_copy_(2, dest.to(buffer.device), buffer.index_select(2, source.to(buffer.device)))


def per_layer(device, layers: int) -> list:
    """One device per layer: `device` repeated, or `device` itself when it is already a list of
    `layers` devices (a model spread over several). per_layer("cpu", 2) -> ["cpu", "cpu"]."""
    devices = list(device) if isinstance(device, (list, tuple)) else [device] * layers
    if len(devices) != layers:
        raise ValueError(f"one device per layer is needed: {layers} layers, {len(devices)} devices.")
    return devices


def path_moves(start: int, accepted: list[int], depth: int) -> tuple[list[int], list[int]]:
    """(source, dest) slots that put a tree's accepted nodes right after its root at slot
    `start`, padded to `depth` pairs (a fixed shape) with slots copied onto themselves.
    start=10, accepted=[2, 7], depth=4 -> ([12, 17, 13, 14], [11, 12, 13, 14])."""
    dest = [start + 1 + i for i in range(depth)]
    return [start + node for node in accepted] + dest[len(accepted):], dest


@dataclass(frozen=True, eq=False)
class DraftLevels:
    """Where each draft tree level's nodes go in the draft's cache, and what they see.

    `nodes[i]`: the nodes at depth i+1 that have children (the ones fed at that level), in
    order; level i is written at slots base + offsets[i] + row, base = the first slot after
    the root; `patterns` [levels, width, S] bool: row r of level i sees its ancestors' slots
    and its own (relative to base; everything before base is seen by all). Rows past a
    level's node count are padding and see only themselves. `picks[d]`: how the nodes at
    depth d+1 get their tokens, (row, node, rank): node = the rank-th most likely token of
    logits row `row` (the root's for d = 0, else level d-1's); `top[d]`: the most ranks a row
    of depth d+1 takes. E.g. [[0], [1], [0, 0], [0, 0, 0]]: nodes ((1,), (3,)), offsets (0, 1),
    width 1, patterns [[[1, 0]], [[1, 1]]], picks (((0, 1, 0), (0, 2, 1)), ((0, 3, 0),),
    ((0, 4, 0),)), top (2, 1, 1). `pick_index[d]` ([3, m] long: rows, nodes, ranks) and
    `expand_index[i]` ([len(nodes[i])] long) hold the same as tensors, for drafting on the device.
    """

    nodes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    width: int
    patterns: torch.Tensor
    picks: tuple[tuple[tuple[int, int, int], ...], ...]
    top: tuple[int, ...]
    pick_index: tuple[torch.Tensor, ...]
    expand_index: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, tree: Tree) -> DraftLevels:
        parents = tree.parents.tolist()
        nodes = tuple(tuple(n for n in tree.level_nodes(d).tolist() if len(tree.children(n)))
                      for d in range(1, tree.depth))
        width = max((len(level) for level in nodes), default=0)
        offsets = tuple(sum(len(level) for level in nodes[:i]) for i in range(len(nodes)))
        size = max((o + width for o in offsets), default=0)
        patterns = torch.zeros(len(nodes), width, size, dtype=torch.bool)
        slot = {}
        for i, level in enumerate(nodes):
            for row in range(width):
                patterns[i, row, offsets[i] + row] = True
            for row, node in enumerate(level):
                slot[node] = offsets[i] + row
                ancestor = parents[node]
                while ancestor > 0:
                    patterns[i, row, slot[ancestor]] = True
                    ancestor = parents[ancestor]
        ranks = tree.ranks.tolist()
        picks = tuple(tuple((row, child, ranks[child]) for row, node in enumerate(expanded)
                            for child in tree.children(node).tolist())
                      for expanded in ((0,), *nodes))
        top = tuple(max(rank for _, _, rank in level) + 1 for level in picks)
        pick_index = tuple(torch.tensor(level, dtype=torch.long).T.contiguous() for level in picks)
        expand_index = tuple(torch.tensor(level, dtype=torch.long) for level in nodes)
        return cls(nodes, offsets, width, patterns, picks, top, pick_index, expand_index)


# ----------------------------------------------------------------------------------------
# one model, its static cache and its step functions


@torch.no_grad()
def step_logits(lm: VideoLM, cache: SlotCache, inputs: torch.Tensor, pattern: torch.Tensor,
                attention: str = "sdpa", split: bool = False, head=None) -> torch.Tensor:
    """One forward of fixed shape: the function that gets compiled (one graph per shape).

    inputs: [2q + 2] long on the device = token ids [q], positions [q], write slot, mask start;
    pattern: [q, S] bool (see `visibility_bias`). Returns logits [1, q, V] (float32; through
    `head` where given, a draft's output layer cut to its vocabulary: V is then its rows).
    attention "flex" passes the same visibility as a BlockMask (`flex_block_mask`) to steps of at
    most FLEX_MAX_QUERY tokens (a draft step, a chain verification) and as the bias, for
    `grouped_attention` (or, with `split`, `split_attention`), to wider ones (a tree verification);
    "flash" gives the short steps to `flash_decode` (start and pattern themselves) and the wide
    ones to the same kernels as "flex"; "grouped" gives every step to `grouped_attention`."""
    q = pattern.shape[0]
    cache.position.copy_(inputs[2 * q])
    embeds = lm.model.get_input_embeddings()(inputs[:q].reshape(1, q))
    attention_kwargs = {}
    if attention == "flex" and q <= FLEX_MAX_QUERY:
        mask = flex_block_mask(inputs[2 * q + 1], pattern, cache.capacity)
    else:
        mask = visibility_bias(inputs[2 * q + 1], pattern, cache.capacity, lm.dtype)
        if attention == "flash" and q <= FLEX_MAX_QUERY:  # the kernel reads start and pattern; the bias goes unused
            attention_kwargs = {"decode": (inputs[2 * q + 1], pattern)}
        elif attention != "sdpa":
            attention_kwargs = {"grouped": True}
            if split:  # `StaticLM.kernels` says so only under "flex" or "flash"
                attention_kwargs["split"] = (inputs[2 * q + 1], pattern.shape[1])
    return lm.forward(embeds, lm.position_ids_for(inputs[q:2 * q]), cache, mask, head=head, **attention_kwargs)


class StaticLM:
    """A `VideoLM` with one `SlotCache` and one step function per input shape (q, S), compiled
    with `torch.compile(**options)` unless `options` is None. Reused across generations while the
    cache is large enough, so compiled graphs survive from one call to the next. `attention`:
    "sdpa" (an additive mask), "flex" (a BlockMask and FlexAttention for short steps), "flash"
    (`flash_decode` for short steps) or "grouped" (`grouped_attention` for every step); the same
    logits up to rounding."""

    def __init__(self, lm: VideoLM, options: dict | None, attention: str = "sdpa", grouped_up_to: int = 0,
                 split_from: int | None = None, vocabulary: torch.Tensor | None = None, combo_kernels: bool = False,
                 pdl: bool = False):
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; choose one of {ATTENTIONS}.")
        split_merge.check_choice()  # a bad $SPECVLM_SPLIT_MERGE, refused before any prefill
        self.spread = spread_over_devices(lm)
        if self.spread and attention == "flex":
            raise ValueError("the fast path's FlexAttention mask lives on one device, and this model is spread over "
                             f"{sorted(map(str, set(lm.layer_devices)))}; use attention='sdpa' or 'grouped'.")
        if attention == "flash":
            check_flash(*placement(lm))
        self.lm, self.options, self.attention = lm, options, attention
        # a draft's vocabulary (`draft_vocab.py`): its steps' logits cover only these token ids, in this order
        self.head = None if vocabulary is None else output_head(lm, vocabulary)
        # where `step` returns the logits the picks map back: `lm.device` (the cut layer's output is moved there)
        self.vocabulary = None if vocabulary is None else vocabulary.to(lm.device)
        self.grouped_up_to = grouped_up_to  # under "flex": a cache of at most this many slots takes "grouped"
        # under "flex" or "flash": wide steps on a cache of at least this many slots take `split_attention` (0: never)
        self.split_from = split_min_slots() if split_from is None else split_from
        self.cache: SlotCache | None = None
        self.steps: dict[tuple[int, int], object] = {}
        self._last_step = None  # the step function `step` called last (`last_graph`)
        self._moves: dict[int, object] = {}  # one compiled move per number of slots moved (a tree's depth)
        self._constants: dict[object, torch.Tensor] = {}
        # "manual": CUDA graphs captured by hand (`CapturedGraph`); "trees": torch.compile's own
        # (mode="reduce-overhead"); None: no CUDA graphs
        self.graphs = graphs_for(lm, options)
        self._pool = None
        self.weights: tuple[int, ...] | None = None  # `weight_storage` when `static_lm` made it
        self.l2_prefetch = False  # whether its decoder layers prefetch their weights (`l2_prefetch.attach`)
        self.combo_kernels = combo_kernels  # compiled with inductor's combo kernels (`with_combo_kernels`)
        self.pdl = pdl  # asked for programmatic dependent launch (`draft_pdl`); `compiled_with_pdl`: whether emitted

    @property
    def _graph_trees(self) -> bool:
        """Whether torch.compile's own CUDA graphs may replay the steps (any compiled mode on CUDA
        but manual capture: "max-autotune" uses them too)."""
        return (self.options is not None and not self.spread and self.lm.device.type == "cuda"
                and self.graphs != "manual")

    @property
    def compiled_with_combo(self) -> bool:
        """Whether its steps compile with inductor's combo kernels: compiled at all (`_compiled`: not
        without options, nor for a model spread over devices), by inductor, and asked for, by
        `combo_kernels` or by inductor's process-wide flag (`bench --combo-kernels`)."""
        import torch._inductor.config as inductor_config

        return (self.options is not None and not self.spread and by_inductor(self.options)
                and (self.combo_kernels or bool(inductor_config.combo_kernels)))

    @property
    def compiled_with_pdl(self) -> bool:
        """Whether its steps' inductor kernels launch with programmatic dependent launch: compiled by
        inductor (as for `compiled_with_combo`) on an NVIDIA card (not ROCm) of compute capability 9.0
        or newer, where inductor emits it, and asked for, by `pdl` or by inductor's process-wide
        `triton.enable_pdl`. Worked out from these, as inductor decides; the kernels are not inspected."""
        import torch._inductor.config as inductor_config

        device = self.lm.device
        return (self.options is not None and not self.spread and by_inductor(self.options)
                and device.type == "cuda" and not torch.version.hip
                and torch.cuda.get_device_capability(device) >= (9, 0)
                and (self.pdl or bool(inductor_config.triton.enable_pdl)))

    @property
    def length(self) -> int:
        return self.cache.length

    @length.setter
    def length(self, value: int) -> None:
        self.cache.length = value

    def load(self, prefilled, capacity: int) -> None:
        """Copy a prefilled DynamicCache in, (re)allocating the static cache if it is missing,
        too small or of another model shape (new buffers mean new graphs), or if a cache of the
        needed size would take other kernels than this larger one (`kernels`): a run's kernels
        follow its own needs, not those of an earlier run with a longer video."""
        needed = round_up(capacity, 128)
        if (self.cache is None or self.cache.capacity < capacity or not self.cache.fits(prefilled)
                or self.kernels(needed) != self.kernels(self.cache.capacity)):
            self.cache, self.steps, self._moves = None, {}, {}
            self.cache = SlotCache.like(prefilled, needed)
        self.cache.load(prefilled)

    def constant(self, key, make) -> torch.Tensor:
        """A constant tensor (a mask pattern, an index) kept on the device, made once per key."""
        if key not in self._constants:
            self._constants[key] = make().to(self.lm.device)
        return self._constants[key]

    def step(self, tokens, positions: list[int], pattern: torch.Tensor, start: int | None = None):
        """Run `tokens` (padded to `pattern`'s rows) at `positions`, written from slot `length`;
        slots before `start` (default: `length`) are seen by every row. Advances `length` by
        len(tokens) and returns their logits [len(tokens), V] on `lm.device` (the device of the
        input embeddings, also for a model spread over several).

        `tokens`: a list of ints, or a 1-D long tensor on the device (e.g. the argmax of the
        last step's logits): then nothing waits for the device, and the host can queue the next
        steps while this one runs (the decoding loops copy to the host once per round)."""
        width, count, write = pattern.shape[0], len(tokens), self.length
        if not 0 < count <= width:
            raise ValueError(f"a step of width {width} cannot take {count} tokens")
        if write + width > self.cache.capacity:
            raise RuntimeError(f"static cache overflow: writing {width} slots at {write} of {self.cache.capacity}")
        pad = width - count
        start = write if start is None else start
        tail = list(positions) + [positions[-1]] * pad + [write, start]
        if isinstance(tokens, torch.Tensor):
            inputs = torch.cat([tokens, tokens[-1:].expand(pad), to_device(tail, self.lm.device)])
        else:
            inputs = to_device(list(tokens) + [tokens[-1]] * pad + tail, self.lm.device)
        if self.attention != "sdpa":
            use_flex(self.lm)  # a prefill in between may have switched the implementation
        if self._graph_trees:
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs may reuse the last step's outputs
        self._last_step = self._step_fn(tuple(pattern.shape))
        logits = self._last_step(inputs, pattern)
        if self.attention != "sdpa" and self.options is not None:
            restore_output_capture()
        self.length = write + count
        return logits[0, :count].to(self.lm.device)  # a spread model's output layer may sit on another card

    @property
    def last_graph(self) -> torch.cuda.CUDAGraph | None:
        """The CUDA graph the last `step` replayed (None before any step, and where steps are not
        captured by hand). Replaying it again repeats that step on the inputs still in its buffers:
        it writes the same cache slots, with the same values while nothing else (a `move`, another
        step) has changed what the step reads, and it overwrites the output buffer that all of the
        model's graphs share (`CapturedGraph`)."""
        return getattr(self._last_step, "graph", None)

    def move(self, source: list[int], dest: list[int]) -> None:
        """`SlotCache.move` in every layer as one compiled function (on CUDA: one CUDA graph
        instead of four eager kernels per layer, launched from the host every tree round), one
        per number of slots moved: trees of different depths move paths of different lengths."""
        moves = to_device([source, dest], self.lm.device)
        if len(source) not in self._moves:
            # captured with every slot copied onto itself: a move run twice is not the same move
            self._moves[len(source)] = self._compiled(functools.partial(move_slots, self.cache),
                                                      neutral=lambda moves: moves[[1, 1]])
        if self._graph_trees:
            torch.compiler.cudagraph_mark_step_begin()
        self._moves[len(source)](moves)

    def token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """The token ids of indices into this model's logits (the same where it has no `vocabulary`)."""
        return indices if self.vocabulary is None else self.vocabulary[indices]

    def extend(self, tokens: list[int], first_position: int, width: int):
        """Causal step: `tokens` at consecutive positions from `first_position`, padded to `width`."""
        pattern = self.constant(("causal", width), lambda: causal_pattern(width))
        return self.step(tokens, list(range(first_position, first_position + len(tokens))), pattern)

    def kernels(self, capacity: int) -> tuple[str, bool]:
        """(attention, split) for the steps on a cache of `capacity` slots: `attention`, but
        "grouped" for "flex" at most `grouped_up_to` slots (a short draft cache, FLEX_MIN_SLOTS);
        split: whether steps wider than FLEX_MAX_QUERY take `split_attention` (under "flex" or "flash", from
        `split_from` slots on; on CUDA only in half precision on a card its flash kernel serves,
        compute capability 8.0 or newer; on a CPU in float32 arithmetic, for tests)."""
        attention = "grouped" if self.attention == "flex" and capacity <= self.grouped_up_to else self.attention
        device = self.lm.device
        flash = device.type != "cuda" or (self.lm.dtype in (torch.float16, torch.bfloat16)
                                          and torch.cuda.get_device_capability(device) >= (8, 0))
        return attention, attention in ("flex", "flash") and 0 < self.split_from <= capacity and flash

    @property
    def step_attention(self) -> str:
        """The attention the steps on the current cache use (`kernels`)."""
        return self.attention if self.cache is None else self.kernels(self.cache.capacity)[0]

    @property
    def split_wide_steps(self) -> bool:
        """Whether the wide steps on the current cache take `split_attention` (`kernels`)."""
        return self.cache is not None and self.kernels(self.cache.capacity)[1]

    def _step_fn(self, shape: tuple[int, int]):
        if shape not in self.steps:
            attention, split = self.kernels(self.cache.capacity)
            self.steps[shape] = self._compiled(functools.partial(step_logits, self.lm, self.cache,
                                                                 attention=attention, split=split, head=self.head))
        return self.steps[shape]

    def _compiled(self, fn, neutral=None):
        """`fn` compiled with the options (none: as it is); with manual graphs, compiled without
        torch.compile's CUDA graphs and captured by hand at its first call (`neutral`: see
        `CapturedGraph`). A model spread over several GPUs runs its steps as they are: a CUDA graph
        holds one device's work. Such a model's layers each read a gigabyte or more, so launching
        them one by one costs less than it does for a small model, but not nothing (notebook 05,
        section 8, profiles it)."""
        if self.options is None or self.spread:
            return fn
        extra = {**({"combo_kernels": True} if self.combo_kernels else {}),
                 **({"triton.enable_pdl": True} if self.pdl else {})}
        with_extra = (lambda options: with_inductor_options(options, extra)) if extra else (lambda options: options)
        if self.graphs != "manual":
            return torch.compile(fn, **with_extra(self.options))
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for all of this model's graphs
        return CapturedGraph(torch.compile(fn, **with_extra({**self.options, "mode": "default"})), self._pool, neutral)


class CapturedGraph:
    """A function of device tensors replayed from a CUDA graph captured by hand (the
    alternative is torch.compile's own graphs, mode="reduce-overhead"). The first call runs
    `fn` a few times on a side stream (compiling it, and initialising the kernels'
    workspaces), then captures one call with its arguments copied
    into static buffers. Every call copies its arguments into those buffers and replays: no
    dynamo guards, no graph-tree bookkeeping on the host, which for a small model cost more
    than its step on the device.

    Invariants: arguments keep the shapes and dtypes of the first call; the warm-up and the
    capture run `fn` on the first call's arguments, or on `neutral(arg)` of each where given, and
    the first replay runs it once more, so `fn` must give the same result when run again with the
    same arguments (a step writes the same cache slots with the same values) or be given neutral
    ones (a KV move, whose rerun would move moved slots again, is warmed up moving every slot onto
    itself); the output is a static buffer in a memory pool that all of a model's graphs share, so
    the next call of *any* step of that model may overwrite it: read it (or queue the kernels that
    read it) before the next call. Capture and replay run on the arguments' device, whichever
    device is current."""

    WARMUP = 3

    def __init__(self, fn, pool, neutral=None):
        self.fn, self.pool, self.neutral = fn, pool, neutral
        self.graph, self.static, self.output = None, None, None

    def __call__(self, *args: torch.Tensor):
        with torch.cuda.device(args[0].device):
            if self.graph is None:
                self._capture(args)
            for buffer, arg in zip(self.static, args):
                buffer.copy_(arg, non_blocking=True)
            self.graph.replay()
        return self.output

    @torch.no_grad()  # inference only; and the steps were compiled without grad, which their guards check
    def _capture(self, args) -> None:
        device = args[0].device
        self.static = [(self.neutral(arg) if self.neutral else arg).clone() for arg in args]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self.fn(*self.static)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            self.output = self.fn(*self.static)
        self.graph = graph


def to_device(values: list, device: torch.device) -> torch.Tensor:
    """A long tensor of host ints on `device` without waiting for the device: on CUDA through
    page-locked memory (a copy from pageable memory may wait for the work queued before it)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


def to_target(tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The draft's tokens on the target's device (the same tensor when they share one). Without
    waiting only towards a GPU: a non-blocking copy to the CPU would be read before it lands."""
    return tokens.to(device, non_blocking=device.type == "cuda")


def move_slots(cache: SlotCache, moves: torch.Tensor) -> None:
    """cache.move(moves[0], moves[1]): the function `StaticLM.move` compiles (moves: [2, m] long)."""
    cache.move(moves[0], moves[1])


def round_up(n: int, multiple: int) -> int:
    """round_up(130, 128) -> 256."""
    return -(-n // multiple) * multiple


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TARGETS: weakref.WeakSet = weakref.WeakSet()  # the nn.Modules the fast path has served as targets


def static_lm(lm: VideoLM, role: str, options: dict | None, attention: str | None = None,
              vocabulary: torch.Tensor | None = None) -> StaticLM:
    """The `StaticLM` kept for `lm` in `role` ("target" or "draft": a model drafting for itself
    needs two caches). Made anew when the compile options, the CUDA-graph mode, the role's attention
    (`fast_attention`), the slot bounds that pick a kernel by the cache's length (`flex_min_slots`, drafts
    only; `split_min_slots`), the weights' storage (fusion, `.to()`) or a draft's vocabulary
    (`vocabulary`, else `draft_vocabulary`'s from $SPECVLM_DRAFT_VOCAB; a target's is always whole) change.

    Fusion (`fusion.py`): a draft's projections are fused where `fuse_draft` says so, unless the
    model has served as a target, and unfused where $SPECVLM_FUSE_DRAFT is "0" (a draft fused by
    hand is otherwise left as it is); a model fused as a draft is unfused before it serves as a target,
    so a target always computes what its checkpoint's own modules compute."""
    attention = fast_attention(attention, role)
    if role == "target":
        _TARGETS.add(lm.model)
        unfuse_projections(lm)
    elif fuse_draft(options, lm) and lm.model not in _TARGETS:
        fuse_projections(lm, few_rows=few_rows_draft())
    elif os.environ.get("SPECVLM_FUSE_DRAFT") == "0":  # asked for transformers' own modules, even after a fused run
        unfuse_projections(lm)
    prefetch = role == "draft" and l2_prefetch_draft() and is_fused(lm) and not spread_over_devices(lm)
    if prefetch:
        l2_prefetch.attach(lm.language_model.layers)
    else:
        l2_prefetch.detach(lm.language_model.layers)
    engines = _ENGINES.setdefault(lm, {})
    weights = weight_storage(lm)
    engine = engines.get(role)
    grouped_up_to = flex_min_slots() if role == "draft" else 0
    combo = role == "draft" and draft_combo_kernels()
    pdl = role == "draft" and draft_pdl()
    vocabulary = None if role == "target" else draft_vocabulary(lm, vocabulary)
    if vocabulary is not None:  # its cut output layer is a copy: made anew when the layer's weights change
        # (in place through autograd-visible ops, `load_state_dict`, `.to()`; writes through `.data` go unseen)
        output = lm.model.get_output_embeddings().weight
        weights = (*weights, output.data_ptr(), output._version)
    same_vocabulary = engine is not None and (
        engine.vocabulary is None if vocabulary is None
        else engine.vocabulary is not None and torch.equal(engine.vocabulary.cpu(), vocabulary.cpu()))
    if (engine is None or engine.options != options or engine.attention != attention
            or engine.graphs != graphs_for(lm, options) or engine.weights != weights
            or engine.grouped_up_to != grouped_up_to or engine.split_from != split_min_slots() or not same_vocabulary
            or engine.l2_prefetch != prefetch or engine.combo_kernels != combo or engine.pdl != pdl):
        engines[role] = StaticLM(lm, options, attention, grouped_up_to, vocabulary=vocabulary, combo_kernels=combo,
                                 pdl=pdl)
        engines[role].weights, engines[role].l2_prefetch = weights, prefetch
    return engines[role]


def picked_columns(draft: VideoLM, vocabulary: torch.Tensor | None) -> int:
    """How many token ids the picks rank from: the draft vocabulary's size, else the output layer's rows."""
    return output_rows(draft) if vocabulary is None else len(vocabulary)


def draft_vocabulary(draft: VideoLM, vocabulary: torch.Tensor | None = None) -> torch.Tensor | None:
    """The token ids a draft proposes from on the fast path (`draft_vocab.py`), sorted: `vocabulary`
    where given (checked), else `draft_vocab.first_tokens(draft, N)` where $SPECVLM_DRAFT_VOCAB is a
    whole number N (0 or unset: the whole vocabulary, None)."""
    if vocabulary is not None:
        check_vocabulary(vocabulary, output_rows(draft))
        return vocabulary.to(torch.long)
    size = draft_vocab_setting()
    return first_tokens(draft, size) if size else None


def draft_vocab_setting() -> int:
    """$SPECVLM_DRAFT_VOCAB: the draft vocabulary's size, 0 (or unset) for the whole vocabulary."""
    return _whole_number_setting("SPECVLM_DRAFT_VOCAB", 0, "tokens")


def flex_min_slots() -> int:
    """Under "flex", a draft cache of at most this many slots takes `grouped_attention`:
    $SPECVLM_FLEX_MIN_SLOTS if set (0: never), else FLEX_MIN_SLOTS (`step_attention.py` has the
    measurement). Drafts only (`static_lm`): a target's one-token and chain steps keep one kernel
    whatever its capacity."""
    return _whole_number_setting("SPECVLM_FLEX_MIN_SLOTS", FLEX_MIN_SLOTS)


def split_min_slots() -> int:
    """Under "flex" or "flash", steps wider than FLEX_MAX_QUERY on a cache of at least this many slots take
    `split_attention`: $SPECVLM_SPLIT_MIN_SLOTS if set (0: never), else SPLIT_MIN_SLOTS. Only
    speculative runs have such steps, so AR's kernels never depend on it."""
    return _whole_number_setting("SPECVLM_SPLIT_MIN_SLOTS", SPLIT_MIN_SLOTS)


def _flag_setting(name: str) -> str | None:
    """An on/off setting's value: "1", "0", or None where it is unset (or empty); any other value is an error."""
    choice = os.environ.get(name) or None
    if choice not in (None, "0", "1"):
        raise ValueError(f"{name} must be '0' or '1', got {choice!r}.")
    return choice


def _whole_number_setting(name: str, default: int, unit: str = "slots") -> int:
    value = os.environ.get(name) or str(default)
    if not value.isdigit():
        raise ValueError(f"{name} must be a whole number of {unit} (0 turns it off), got {value!r}.")
    return int(value)


def weight_storage(lm: VideoLM) -> tuple[int, ...]:
    """How many times fusion changed `lm` (`fusion.changes`) and where its first decoder layer's
    weights lie (data pointers, for a `.to()`): graphs captured on weights that have moved since
    would read stale memory. The count does not rely on the allocator never reusing an address."""
    return (fusion_changes(lm), *(p.data_ptr() for p in lm.language_model.layers[0].parameters()))


def fast_attention(attention: str | None, role: str | None = None) -> str:
    """The fast path's attention: given, else $SPECVLM_FAST_ATTENTION, else "sdpa". One of
    ATTENTIONS for both models, or "target/draft" for each its own: fast_attention("flex/grouped")
    -> "flex/grouped"; with role="draft" -> "grouped", role="target" -> "flex"."""
    source = "" if attention else "$SPECVLM_FAST_ATTENTION: "
    attention = attention or os.environ.get("SPECVLM_FAST_ATTENTION") or "sdpa"
    parts = attention.split("/")
    if len(parts) > 2 or any(part not in ATTENTIONS for part in parts):
        raise ValueError(f"{source}unknown fast-path attention {attention!r}; choose one of {ATTENTIONS}, or one "
                         "for the target and one for the draft, e.g. 'flex/grouped'.")
    if role not in (None, "target", "draft"):
        raise ValueError(f"role must be 'target' or 'draft', got {role!r}.")
    if role is None:
        return attention
    return parts[-1] if role == "draft" else parts[0]


def fuse_draft(options: dict | None, lm: VideoLM) -> bool:
    """Whether the fast path fuses a draft's projections (`fusion.fuse_projections`):
    $SPECVLM_FUSE_DRAFT "1" or "0" if set, else where its steps replay as CUDA graphs (there a step
    costs what its kernels cost, and fusing removes three per layer; on a CPU it changes little)."""
    choice = _flag_setting("SPECVLM_FUSE_DRAFT")
    if choice:
        return choice == "1"
    return graphs_for(lm, options) is not None


def few_rows_draft() -> bool:
    """Whether a fused draft's products of a few rows run as `few_rows.py`'s Triton kernels: only
    where $SPECVLM_FEW_ROWS is "1" (for a draft the fast path fuses, `fuse_draft`; an error where
    the kernels cannot run). Off by default: on the H100 they shortened the draft step in the
    benchmark and lengthened it in the profile, each by a few percent (notebook 05, section 18). Under "1" a draft compiled on a CPU would reach Triton's
    interpreter, which dynamo cannot trace: use it uncompiled there (tests) or on CUDA."""
    return _flag_setting("SPECVLM_FEW_ROWS") == "1"


DRAFT_COMBO = True  # $SPECVLM_DRAFT_COMBO's default (`draft_combo_kernels`): on, as measured in notebook 05, section 25


def draft_combo_kernels() -> bool:
    """Whether a draft's compiled steps take inductor's combo kernels (`with_combo_kernels`), as
    $SPECVLM_DRAFT_COMBO says: "1" or "0", unset: DRAFT_COMBO. A combo kernel launches kernels that
    do not depend on each other as one (in a decoder layer, the writes of its keys and its values
    into the cache), so a launch-bound draft step runs fewer kernels (notebook 05, section 15
    profiled one). On by default: on two H100s, eight clips each, with and without them in one
    process per card, they shortened the draft step and SpecVLM's summed decode (section 25).
    Only the draft's: what they change is when kernels run, and at most the rounding of a draft's
    logits, which the target checks; a target (and so AR) compiles as before, unless inductor's
    process-wide flag is on (`bench --combo-kernels`: every compiled function, whatever this says).
    Read by `static_lm`, which makes a draft's steps anew when it changes."""
    choice = _flag_setting("SPECVLM_DRAFT_COMBO")
    return choice == "1" if choice else DRAFT_COMBO


def with_combo_kernels(options: dict) -> dict:
    """torch.compile's keyword arguments `options` with inductor's `combo_kernels` on, for that
    compiled function only (`with_inductor_options`)."""
    return with_inductor_options(options, {"combo_kernels": True})


def with_inductor_options(options: dict, extra: dict) -> dict:
    """torch.compile's keyword arguments `options` with the inductor config keys `extra` set, for
    that compiled function only (not the process's inductor config). torch.compile takes a `mode` or
    inductor `options`, not both, so the mode becomes its options (`torch._inductor.list_mode_options`):
    ({"mode": "reduce-overhead", "fullgraph": False}, {"combo_kernels": True}) -> {"fullgraph": False,
    "options": {"triton.cudagraphs": True, "combo_kernels": True}}. Options for a backend other than
    inductor (say "eager", for tests) come back unchanged: only inductor reads its config."""
    if not by_inductor(options):
        return options
    rest = {name: value for name, value in options.items() if name not in ("mode", "options")}
    mode_options = torch._inductor.list_mode_options(options.get("mode") or "default", options.get("dynamic"))
    return {**rest, "options": {**mode_options, **(options.get("options") or {}), **extra}}


DRAFT_PDL = False  # $SPECVLM_DRAFT_PDL's default (`draft_pdl`): no change in notebook 05, section 26's profile


def draft_pdl() -> bool:
    """Whether a draft's compiled steps generate inductor's Triton kernels for programmatic dependent
    launch (Hopper's PDL, inductor's `triton.enable_pdl`), as $SPECVLM_DRAFT_PDL says: "1" or "0",
    unset: DRAFT_PDL. With it, an inductor kernel may be launched before the kernel ahead of it has
    finished; it waits (`gdc_wait`) before its first read of what that kernel wrote, at the latest
    after its own first load. Only inductor's generated Triton kernels take part (not its matmul
    templates, cuBLAS's products or this project's Triton kernels), and inductor emits it on NVIDIA
    cards of compute capability 9.0 or newer only; elsewhere the setting changes nothing. The aim is
    less idle time between a launch-bound draft step's kernels; on one H100 it left the profiled draft
    step unchanged (notebook 05, section 26), so DRAFT_PDL is False. Only the draft's, as for
    `draft_combo_kernels`: what it changes is when kernels run, and at most the rounding of a draft's
    logits, which the target checks; a target (and so AR) compiles as before unless inductor's
    process-wide `triton.enable_pdl` is on. Read by `static_lm`, which makes a draft's steps anew
    when it changes."""
    choice = _flag_setting("SPECVLM_DRAFT_PDL")
    return choice == "1" if choice else DRAFT_PDL


def by_inductor(options: dict) -> bool:
    """Whether torch.compile's keyword arguments `options` compile with inductor (its default backend)."""
    return options.get("backend") in (None, "inductor")


def l2_prefetch_draft(device: torch.device | None = None) -> bool:
    """Whether a draft's decoder layers prefetch their weights into L2 at their start
    (`l2_prefetch.py`): only where $SPECVLM_L2_PREFETCH is "1", and only for a fused draft on one
    device (`static_lm`; a model that has served as a target, as in self-speculation, is never fused).
    Only when bytes arrive changes, never a value. With a `device`, "1" is an error where the
    prefetch cannot run there (a CUDA card of compute capability 9.0 or newer); `generate_fast`
    checks it before any prefill, for every method."""
    choice = _flag_setting("SPECVLM_L2_PREFETCH")
    if choice == "1" and device is not None and not l2_prefetch.available(device):
        raise ValueError("SPECVLM_L2_PREFETCH=1 prefetches with Hopper's bulk prefetch instruction, on a CUDA card of "
                         f"compute capability 9.0 or newer with Triton, and the draft lies on {device}; unset it or "
                         "set it to 0.")
    return choice == "1"


def picks_kernel(device: torch.device | None = None, top: int | None = None, columns: int | None = None) -> str:
    """How a tree level's tokens are picked from the draft's logits (`pick_level`): "torch"
    (`torch.topk`) or "triton" (`top_k.py`'s two kernels), as $SPECVLM_PICKS says:

    - unset or "auto" (the default): "triton" where the draft's logits lie on a CUDA card the
      kernels run on (`top_k.available`) and they take the tree's picks (`top_k.fits`: at most
      `top_k.MAX_K` tokens ranked at a node, `top`, from logits of `columns` token ids), else
      "torch". On one H100, eight clips, one process, the kernels made SpecVLM's decoding a little
      faster summed (notebook 05, section 24, prints by how much);
    - "torch" or "triton": that one; "triton" is an error, with a `device`, where the kernels cannot
      run there or cannot take the picks (`top_k.fits`).

    Without `columns`, `top` stands for it (only the number of picks is checked). Without a
    `device` only the setting's value is checked ("auto" stays "auto"). `generate_fast`
    reads it once per generation, so it may change between runs."""
    choice = os.environ.get("SPECVLM_PICKS") or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"SPECVLM_PICKS must be 'auto', 'torch' or 'triton', got {choice!r}.")
    if device is None:
        return choice
    device = torch.device(device)
    fits = top is None or top_k.fits(columns or top, top)
    if choice == "auto":
        return "triton" if device.type == "cuda" and fits and top_k.available(device) else "torch"
    if choice == "triton" and not top_k.available(device):
        raise ValueError("SPECVLM_PICKS=triton runs Triton kernels on a CUDA card of compute capability 8.0 or newer "
                         "(or, on a CPU, in Triton's interpreter: TRITON_INTERPRET=1 before importing specvlm), and "
                         f"the draft's logits lie on {device} (or Triton is missing); set SPECVLM_PICKS=torch or unset it.")
    if choice == "triton" and not fits:
        raise ValueError(f"SPECVLM_PICKS=triton cannot take this tree's picks: {picks_misfit(top, columns)}; set "
                         "SPECVLM_PICKS=torch (or unset it).")
    return choice


def picks_misfit(top: int, columns: int | None) -> str:
    """Why `top_k.fits` refuses `top` picks a node from `columns` token ids (`picks_kernel`'s error)."""
    if top > top_k.MAX_K:
        return (f"the tree ranks up to {top} tokens at a node and the kernels pick at most {top_k.MAX_K} "
                "(or take a narrower tree)")
    if columns is not None and columns < top:
        return f"the tree ranks up to {top} tokens at a node from only {columns} token ids (give the draft more)"
    most = top_k.MAX_CANDIDATES // top * top_k.BLOCK
    return (f"the kernels' merge holds {top} picks from at most {most:,} token ids and the draft has {columns:,} "
            "(or take a smaller draft vocabulary)")


CUDA_GRAPHS = ("manual", "trees")


def cuda_graphs(options: dict | None, device: torch.device) -> str | None:
    """How compiled steps replay on CUDA: None without compile options, off CUDA, or for a
    mode other than "reduce-overhead"; else $SPECVLM_CUDA_GRAPHS: "manual" (default:
    `CapturedGraph`, captured by hand) or "trees" (torch.compile's CUDA-graph trees)."""
    if options is None or device.type != "cuda" or options.get("mode") != "reduce-overhead":
        return None
    return cuda_graphs_setting()


def cuda_graphs_setting() -> str:
    """$SPECVLM_CUDA_GRAPHS: "manual" (unset) or "trees"; anything else is an error."""
    graphs = os.environ.get("SPECVLM_CUDA_GRAPHS") or "manual"
    if graphs not in CUDA_GRAPHS:
        raise ValueError(f"SPECVLM_CUDA_GRAPHS must be one of {CUDA_GRAPHS}, got {graphs!r}.")
    return graphs


def placement(lm: VideoLM) -> tuple[set, torch.dtype]:
    """Where `lm` runs, for `check_settings`: (the set of its layers' devices, its dtype)."""
    return set(lm.layer_devices), lm.dtype


def check_settings(attention: str | None = None, draft_vocab: torch.Tensor | None = None,
                   target: tuple[set, torch.dtype] | None = None,
                   draft: tuple[set, torch.dtype] | None = None) -> None:
    """Read every $SPECVLM_* setting the fast path takes (`__main__.FAST_PATH_ENVIRONMENT`), so that a
    bad value fails here, before any model work, whichever method runs and whether or not the run
    would reach it (a CPU replays no CUDA graphs, AR fuses no draft). Raises ValueError.

    `attention`, `draft_vocab`: as `generate_fast` takes them; where given, $SPECVLM_FAST_ATTENTION or
    $SPECVLM_DRAFT_VOCAB is not read. `target`, `draft`: where each model runs (`placement`), to check
    the settings that need a card there: attention "flash" for that model (`flash_decode.available`),
    and for the draft $SPECVLM_FEW_ROWS=1 (`few_rows.available`) and $SPECVLM_L2_PREFETCH=1
    (`l2_prefetch.available`). `generate_fast`, `bench` on the command line and
    `benchmarks/drafts_ab.py` call it."""
    fast_attention(attention)
    cuda_graphs_setting()
    _flag_setting("SPECVLM_FUSE_DRAFT")
    few_rows = few_rows_draft()
    draft_combo_kernels()
    draft_pdl()
    flex_min_slots()
    split_min_slots()
    if draft_vocab is None:
        draft_vocab_setting()
    picks_kernel()  # the value; trees resolve it against the card and the vocabulary (`generate_fast`)
    split_merge.check_choice()
    for role, where in (("target", target), ("draft", draft)):
        if where is not None and fast_attention(attention, role) == "flash":
            check_flash(*where, role)
    if draft is not None:
        devices, dtype = draft
        if few_rows and not all(few_rows_kernels.available(device, dtype) for device in devices):
            raise ValueError("SPECVLM_FEW_ROWS=1 runs Triton kernels on a CUDA card of compute capability 8.0 or newer "
                             "in half precision (on a CPU only in float32, in Triton's interpreter), and the draft is "
                             f"{dtype} on {sorted(map(str, devices))}; unset it or set it to 0.")
        for device in devices:
            l2_prefetch_draft(device)


def check_flash(devices, dtype: torch.dtype, role: str = "model") -> None:
    """Refuse attention "flash" for a model whose layers lie on `devices` in `dtype`, where
    `flash_decode` cannot run (`flash_decode.refusal`)."""
    refusal = flash_decode.refusal(devices, dtype, f"the {role}")
    if refusal:
        raise ValueError(f"attention {refusal}.")


def spread_over_devices(lm: VideoLM) -> bool:
    """Whether `lm`'s weights sit on more than one device (a `device_map` spread them): its decoder
    layers, or its embeddings or output layer apart from them."""
    return len({p.device for p in lm.model.parameters()}) > 1


def graphs_for(lm: VideoLM, options: dict | None) -> str | None:
    """`cuda_graphs` for a model: None for one spread over several devices (`StaticLM._compiled`)."""
    return None if spread_over_devices(lm) else cuda_graphs(options, lm.device)


def compile_options(compile, device: torch.device) -> dict | None:
    """torch.compile keyword arguments, or None for plain eager steps.
    None -> {"mode": "reduce-overhead"} on CUDA, None elsewhere; True -> the same on any
    device; False -> None; "max-autotune" -> {"mode": "max-autotune"}; a dict is passed through
    (e.g. {"backend": "eager"}: dynamo's tracing without code generation, for tests)."""
    if compile is None:
        compile = device.type == "cuda"
    if compile is True:
        compile = "reduce-overhead"
    if isinstance(compile, str):
        compile = {"mode": compile}
    if compile:
        # one graph per step shape and model: more than dynamo's default of 8 per function
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        return {"fullgraph": False, "dynamic": False, **compile}
    return None


def capture_report(pair: Pair | None = None) -> dict:
    """What the fast path compiled, for a benchmark's JSON: options, CUDA graphs on or off,
    the step shapes (q, S) per model, whether the tree rounds' KV move was compiled, and
    dynamo's counters (graph breaks, cudagraph skips)."""
    from torch._dynamo.utils import counters

    report = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    roles = {}
    for role, lm in (("target", pair.target), ("draft", pair.draft)) if pair else ():
        engine = _ENGINES.get(lm, {}).get(role)
        if engine is not None:
            roles[role] = {
                "compile": engine.options,
                "attention": engine.attention,
                "step_attention": engine.step_attention,  # "grouped" for a short draft cache under "flex"
                # wide steps (tree verifications) through `split_attention` (under "flex", on a long cache)
                "split_wide_steps": engine.split_wide_steps,
                # how `split_attention` computes their own slots and merge: "triton" (`split_merge.py`) or "torch"
                "split_merge": (merge_kernel(lm.device, lm.dtype, head_dim(lm.language_model.config),
                                             engine.cache.capacity) if engine.split_wide_steps else None),
                "cuda_graphs": engine.graphs is not None,
                "graphs": engine.graphs,
                "capacity": engine.cache.capacity if engine.cache is not None else None,
                "step_shapes": [list(shape) for shape in sorted(engine.steps)],
                "compiled_move": bool(engine._moves) and engine.options is not None and not engine.spread,
                "spread": engine.spread,  # over several devices: steps ran uncompiled, whatever "compile" says
                "fused_projections": is_fused(lm),  # q/k/v and gate/up as one matmul each (`fusion.py`)
                "few_rows": uses_few_rows(lm),  # their products of a few rows as Triton kernels (`few_rows.py`)
                "l2_prefetch": engine.l2_prefetch,  # decoder layers prefetch their weights into L2 (`l2_prefetch.py`)
                "combo_kernels": engine.compiled_with_combo,  # with inductor's combo kernels (`draft_combo_kernels`)
                "pdl": engine.compiled_with_pdl,  # inductor's kernels with programmatic dependent launch (`draft_pdl`)
            }
    report["models"] = roles
    report["graph_breaks"] = sum(counters["graph_break"].values())
    report["graph_break_reasons"] = dict(counters["graph_break"].most_common(5))
    report["cudagraph_skips"] = counters["inductor"].get("cudagraph_skips", 0)
    report["unique_graphs"] = counters["stats"].get("unique_graphs", 0)
    return report


# ----------------------------------------------------------------------------------------
# decoding


@dataclass
class Run:
    """The state between rounds; invariants as in `decoding.Speculation`: target cache =
    prompt + out[:-1] (once `target_move` is queued), draft cache = draft prompt + out[:draft_seen]."""

    target: StaticLM
    draft: StaticLM
    prompt: Prompt
    draft_prompt: Prompt
    out: list[int]
    verify_width: int  # k+1 (chain) or tree depth + 1: chain verifications are padded to it
    feed_width: int  # the most committed tokens the draft may have to catch up on
    draft_seen: int = 0
    draft_prefix: int = 0  # draft cache slots before the first generated token
    picks: str = "torch"  # how tree levels pick their tokens (`picks_kernel`), read once per generation
    # the last tree round's KV move (source, dest slots), not queued yet: the next round queues its
    # draft passes first, so the host launches the move while the device runs them
    target_move: tuple[list[int], list[int]] | None = None

    def finish_target_move(self) -> None:
        """Queue the pending KV move (before anything reads the target's cache)."""
        if self.target_move is not None:
            self.target.move(*self.target_move)
            self.target_move = None

    def draft_feed(self) -> torch.Tensor:
        """Feed the committed tokens the draft has not seen; return its logits [V] after the last."""
        feed = self.out[self.draft_seen:]
        width = 1 if len(feed) == 1 else self.feed_width
        logits = self.draft.extend(feed, self.draft_prompt.next_position + self.draft_seen, width)[-1]
        self.draft_seen = len(self.out)
        return logits


def chain_round(run: Run, k: int) -> int:
    """One greedy round with a chain of k drafted tokens (k may be 0); returns the accepted count.
    The drafted tokens stay on the device (each step's argmax is the next step's input) until
    the verification's argmaxes come back with them in one copy."""
    # 1. draft: catch up, then propose k tokens, one step each
    drafted = []
    with phase("draft"):
        if k:
            logits = run.draft_feed()
            for i in range(k):
                drafted.append(run.draft.token_ids(logits.argmax(-1, keepdim=True)))  # [1], on the device
                if i < k - 1:
                    logits = run.draft.extend(drafted[-1], run.draft_prompt.next_position + run.draft_seen + i, 1)[-1]
    # 2. target: the last committed token and the proposals in one pass (padded to a fixed width)
    start = len(run.out) - 1
    with phase("move"):
        run.finish_target_move()
    with phase("verify"):
        device = run.target.lm.device
        drafted = [to_target(token, device) for token in drafted]
        logits = run.target.extend(torch.cat([to_device([run.out[-1]], device), *drafted]),
                                   run.prompt.next_position + start, run.verify_width)
    with phase("accept"):
        # 3. accept the agreeing prefix and the target's next token (one copy to the host)
        host = torch.cat([*drafted, logits.argmax(-1)]).cpu()
        proposal, predicted = host[:k], host[k:]
        n, next_token = chain_accept(proposal, predicted)
        # 4. rewind: both caches keep exactly the committed text (the draft never fed its last proposal)
        run.target.length -= k - n
        if k:
            valid = min(n, k - 1)
            run.draft_seen = len(run.out) + valid
            run.draft.length = run.draft_prefix + run.draft_seen
        run.out += proposal[:n].tolist() + [next_token]
    return n


def draft_tree(run: Run, tree: Tree, levels: DraftLevels) -> torch.Tensor:
    """Expand `tree` with the draft, one fixed-width step per level; returns node tokens [N+1]
    (root first) on the device: each level's tokens are picked from the last level's logits
    there, so the host queues every level without waiting. Afterwards the draft's cache is
    back at the committed text."""
    draft = run.draft
    tokens = to_device([run.out[-1]] + [0] * (tree.num_nodes - 1), draft.lm.device)
    root_position = run.draft_prompt.next_position + len(run.out) - 1
    logits = run.draft_feed()[None]  # [1, V]: the root's
    base = draft.length
    for depth in range(1, tree.depth + 1):
        pick_level(draft, tree, levels, depth, logits, tokens, run.picks)
        if depth > len(levels.nodes):
            break
        expand = draft.constant(("expand", tree, depth), lambda: levels.expand_index[depth - 1])
        draft.length = base + levels.offsets[depth - 1]
        pattern = draft.constant((tree, depth), lambda: levels.patterns[depth - 1])
        logits = draft.step(tokens[expand], [root_position + depth] * len(expand), pattern, start=base)
    draft.length = base
    return tokens


def pick_level(draft: StaticLM, tree: Tree, levels: DraftLevels, depth: int, logits: torch.Tensor,
               tokens: torch.Tensor, kernel: str = "torch") -> None:
    """Write the tokens of the nodes at `depth` into `tokens` [N+1] (on the device, in place): each
    is the rank-th most likely token of its parent's row of `logits` [rows, V] (the root's for
    depth 1, else the last level's passes), by `torch.topk` (`kernel` "torch") or
    `top_k.top_k_indices` ("triton", as `picks_kernel` returns it). No copy to the host."""
    k = levels.top[depth - 1]
    if kernel == "triton":
        top = top_k.top_k_indices(logits, k, ids=draft.vocabulary)  # [rows, k], ties lowest index first
    else:
        top = draft.token_ids(logits.topk(k).indices)  # [rows, k]
    rows, nodes, ranks = draft.constant(("picks", tree, depth), lambda: levels.pick_index[depth - 1])
    tokens[nodes] = top[rows, ranks]


def accept_round(tree: Tree, tokens: torch.Tensor, logits: torch.Tensor) -> tuple[list[int], int, list[int]]:
    """A tree round's acceptance from its node tokens [N+1] and the verification's logits [N+1, V],
    both on the device: the drafted tokens and the target's argmaxes come to the host in one copy
    (it waits for the verification), then `tree_accept`. Returns (accepted nodes, the target's
    next token, the node tokens as ints)."""
    node_tokens, predicted = torch.stack([tokens, logits.argmax(-1)]).cpu()
    accepted, next_token = tree_accept(tree, node_tokens, predicted)
    return accepted, next_token, node_tokens.tolist()


def tree_round(run: Run, tree: Tree, levels: DraftLevels) -> int:
    """One greedy round with a static tree; returns the number of accepted drafted tokens."""
    # 1. draft: expand the tree level by level
    with phase("draft"):
        tokens = to_target(draft_tree(run, tree, levels), run.target.lm.device)
    with phase("move"):
        run.finish_target_move()
    # 2. target: every node in one pass with the tree mask, at positions root + depth
    with phase("verify"):
        prefix = run.target.length
        root_position = run.prompt.next_position + len(run.out) - 1
        pattern = run.target.constant(tree, lambda: tree.mask)
        logits = run.target.step(tokens, (root_position + tree.depths).tolist(), pattern)
    with phase("accept"):
        # 3. accept the longest agreeing root-to-leaf path and the target's next token (one copy to the host)
        accepted, next_token, node_tokens = accept_round(tree, tokens, logits)
        # 4. the target keeps the root and the accepted path, moved to consecutive slots (queued by
        # the next round, after its draft passes)
        if accepted:
            run.target_move = path_moves(prefix, accepted, tree.depth)
        run.target.length = prefix + 1 + len(accepted)
        run.out += [node_tokens[node] for node in accepted] + [next_token]
    return len(accepted)


@torch.no_grad()
def generate_fast(pair: Pair, prompt: Prompt, method: str = "specvlm", ratio: float = 0.9, k: int = 5,
                  tree: Tree | None = None, max_new_tokens: int = 64, mass: float = 0.4, seed: int = 0,
                  draft_prompt: Prompt | None = None, compile=None, temperature: float = 0.0,
                  attention: str | None = None, draft_vocab: torch.Tensor | None = None) -> Result:
    """`decoding.generate_ar` (method="ar") or `decoding.generate_sd` on static caches with
    fixed-shape steps: the same tokens and accepted counts (up to ties among a tree node's ranked
    children: `picks_kernel`), greedy only. `compile`: None -> compiled on CUDA only; True / False;
    or a torch.compile mode string. `attention`: "sdpa", "flex" (FlexAttention's split-KV decode
    kernel for short steps, `grouped_attention` for wide ones; by the cache's length,
    `grouped_attention` for a short draft cache and `split_attention` for wide steps on a long one:
    `StaticLM.step_attention`, `split_min_slots`), "flash" (`flash_decode` for short steps, wide
    ones as under "flex"; a CUDA card with Triton) or "grouped" (`grouped_attention` for every
    step), or "target/draft" (e.g. "flex/flash"); None ->
    $SPECVLM_FAST_ATTENTION or "sdpa". `prompt` is a `Prompt` (`pair.target.prepare(video, question)`),
    not a `Video`; `ratio` is checked for every method, "ar" included. `draft_vocab`: sorted token ids
    the draft proposes from (`draft_vocab.py`: its output layer keeps only their rows), None ->
    $SPECVLM_DRAFT_VOCAB's (`draft_vocabulary`; unset: the whole vocabulary); the tokens are the
    target's own either way, the accepted counts the plain path's only where every token the draft
    would propose lies inside it."""
    check_pair(pair, "generate_fast")
    check_prompt(prompt, "generate_fast")
    check_temperature(temperature)
    if temperature > 0:
        raise ValueError(f"generate_fast is greedy only (temperature 0), got temperature={temperature}; "
                         "use decoding.generate for sampling.")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")
    check_max_new_tokens(max_new_tokens)
    check_ratio(ratio)
    check_settings(attention, draft_vocab, placement(pair.target), placement(pair.draft))  # for every method
    attention = fast_attention(attention)
    draft_vocab = draft_vocabulary(pair.draft, draft_vocab)  # likewise
    if method == "ar":
        return _generate_ar(pair.target, prompt, max_new_tokens, compile, fast_attention(attention, "target"))
    check_speculation(prompt, draft_prompt, ratio, mass, k, tree, max_new_tokens, seed)
    target, draft = pair.target, pair.draft
    levels = DraftLevels.of(tree) if tree is not None else None
    if draft_vocab is not None and levels is not None and len(draft_vocab) < max(levels.top):
        raise ValueError(f"the tree ranks up to {max(levels.top)} of the draft's tokens at a node, and its vocabulary "
                         f"has {len(draft_vocab)}: give the draft a vocabulary of at least {max(levels.top)} tokens "
                         "or a narrower tree.")
    picks = (picks_kernel(draft.device, max(levels.top), picked_columns(draft, draft_vocab))
             if levels is not None else "torch")
    options = compile_options(compile, target.device)
    depth = k if tree is None else tree.depth
    watch = Stopwatch(target.device)

    fast_target = static_lm(target, "target", options, attention)  # first: it may unfuse the target (`fusion.py`)
    logits, target_cache, scores = prefill_target(target, prompt, with_scores=method in SCORED_METHODS)
    widest = max(depth + 1, tree.num_nodes if tree is not None else 0)
    fast_target.load(target_cache, target_cache.get_seq_length() + max_new_tokens + widest)
    del target_cache
    first = int(logits.argmax())
    watch.lap("target_prefill")
    keep = select_video_tokens(method, prompt, ratio, scores, mass, seed)
    watch.lap("select")
    draft_prompt = draft_prompt or prompt
    fast_draft = static_lm(draft, "draft", options, attention, draft_vocab)  # first: it may fuse the draft (`fusion.py`)
    _, draft_cache = prefill_pruned(draft, draft_prompt, keep)
    draft_prefix = draft_cache.get_seq_length()
    feed_width = 2 if tree is None else depth + 1
    tree_slots = levels.patterns.shape[-1] if levels is not None else 0
    fast_draft.load(draft_cache, draft_prefix + max_new_tokens + feed_width + max(k, tree_slots) + 1)
    del draft_cache
    watch.lap("draft_prefill")

    run = Run(fast_target, fast_draft, prompt, draft_prompt, [first], depth + 1, feed_width, draft_prefix=draft_prefix,
              picks=picks)
    accepted = []
    with phase("decode"):
        while len(run.out) < max_new_tokens and not target.eos_token_ids.intersection(run.out):
            room = max_new_tokens - len(run.out) - 1  # drafted tokens that may still be kept
            if tree is not None and room >= tree.depth:
                accepted.append(tree_round(run, tree, levels))
            else:  # a chain, or a tree too deep for the tokens left: never overshoot
                accepted.append(chain_round(run, min(depth, room)))
        with phase("move"):
            run.finish_target_move()
    watch.lap("decode")

    return speculative_result(run.out, target, prompt, method, ratio, accepted, keep, scores,
                              fast_target.length, fast_draft.length, watch.laps, max_new_tokens)


def _generate_ar(target: VideoLM, prompt: Prompt, max_new_tokens: int, compile, attention: str = "sdpa") -> Result:
    """The target alone, greedy, one fixed-shape step per token. Each step's input is the last
    step's argmax on the device, and the host queues a step before it reads the token of the
    one before (through `HostCopy`, which waits for that token only, not for the queued step),
    so the device never waits for the host between steps; a step queued past an end token is
    dropped (its slot lies past the cache's length)."""
    watch = Stopwatch(target.device)
    fast = static_lm(target, "target", compile_options(compile, target.device), attention)  # before the prefill
    logits, cache = prefill_pruned(target, prompt, None)
    fast.load(cache, cache.get_seq_length() + max_new_tokens)
    prefix = fast.length
    del cache
    watch.lap("prefill")
    out = [int(logits.argmax())]
    queued = None  # the argmax [1] of the step that feeds out[-1], not read yet
    with phase("decode"):
        while len(out) < max_new_tokens and out[-1] not in target.eos_token_ids:
            with phase("ar"):
                if queued is None:  # the first step: its input comes from the host
                    queued = HostCopy(fast.extend(out[-1:], prompt.next_position + len(out) - 1, 1)[-1:].argmax(-1))
                ahead = None
                if len(out) + 1 < max_new_tokens:  # queue the step after it before waiting for it
                    ahead = HostCopy(fast.extend(queued.on_device, prompt.next_position + len(out), 1)[-1:].argmax(-1))
                out.append(int(queued.wait()))
                queued = ahead
    fast.length = prefix + len(out) - 1  # the cache holds prompt + out[:-1]
    watch.lap("decode")
    return Result(out, target.decode(out), "ar", 0.0, video_tokens=prompt.num_video_tokens,
                  target_cache_len=fast.length, timings=watch.laps)


class HostCopy:
    """A device tensor and its copy on the host, started now. `wait()` returns the copy once
    the work queued *before* it is done; `.item()` or `.cpu()` would wait for everything queued
    on the stream, steps queued after it included. On the CPU the copy is a clone: on either
    device it holds the values the tensor had when the copy started.
    E.g. token = HostCopy(logits.argmax(-1)); queue the next step with token.on_device; then
    int(token.wait())."""

    def __init__(self, tensor: torch.Tensor):
        self.on_device, self._event = tensor, None
        if tensor.device.type == "cuda":
            with torch.cuda.device(tensor.device):  # the copy and the event on that device's stream
                self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                self._host.copy_(tensor, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record()
        else:
            self._host = tensor.clone()

    def wait(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
        return self._host
