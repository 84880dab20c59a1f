"""Attention for the fast path's fixed-shape steps: which cached slots each row sees, and the
kernels that read them.

A step of q tokens is written at slots [write, write + q) of a static cache of `capacity` slots;
every row sees the committed slots before `start` and, among the step's own, what a [q, S] bool
`pattern` allows (causal for a chain, ancestors for a tree). Five ways to compute it:

- `visibility_bias`: an additive mask [1, 1, q, capacity] for sdpa or `grouped_attention`;
- `flex_block_mask`: the same rule as a FlexAttention BlockMask, whose decode kernel splits the
  visited blocks over the SMs and skips blocks no row sees (short steps);
- `grouped_attention`: two batched matmuls around a float32 softmax, with the query heads of
  each KV head stacked as rows, so grouped KV heads are read in place (wide steps; a short draft cache);
- `split_attention`: the committed slots in chunks through the variable-length flash kernel, the
  step's own slots apart, merged through the log-sum-exp (wide steps on a long cache); on CUDA
  (by default) the own slots and the merge are one Triton kernel (`split_merge.py`) for caches of
  up to `split_merge.MAX_CHUNKS` chunks (`merge_kernel`);
- `flash_decode.flash_decode`: a split-KV decode kernel in Triton, two kernels per layer, the rule
  evaluated inside it from `start` and `pattern` (short steps under attention "flash").

`flex_or_sdpa` is registered with transformers as FLEX_ATTENTION and picks among them per call;
`use_flex(lm)` switches a model to it. `fast.py` builds the masks inside its compiled steps.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import sdpa_with_scores
from . import split_merge
from .flash_decode import flash_decode
from .split_merge import own_slots_and_merge

# ----------------------------------------------------------------------------------------
# masks: which cached slots each row of a step sees


def visibility_bias(start: torch.Tensor, pattern: torch.Tensor, capacity: int, dtype) -> torch.Tensor:
    """Additive mask [1, 1, q, capacity]: row r sees slot c if c < start, or if
    0 <= c - start < S and pattern[r, c - start] (pattern: [q, S] bool); nothing else.
    E.g. start=2, pattern=[[1, 0], [1, 1]], capacity=5 (0 = seen, - = dtype min):
        0 0 0 - -
        0 0 0 0 -
    """
    width = pattern.shape[1]
    offset = torch.arange(capacity, device=pattern.device) - start  # [capacity]
    inside = (offset >= 0) & (offset < width)
    allowed = (offset < 0) | (pattern[:, offset.clamp(0, width - 1)] & inside)  # [q, capacity]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=pattern.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def causal_pattern(width: int) -> torch.Tensor:
    """[width, width] bool, lower triangular: each new token sees the ones before it and itself."""
    return torch.ones(width, width, dtype=torch.bool).tril()


# ----------------------------------------------------------------------------------------
# the same rule for FlexAttention (attention="flex"): a split-KV decode kernel on the GPU;
# and `grouped_attention`, for the steps too wide for that kernel
#
# Masked sdpa over the whole capacity is slow at long contexts: under torch.compile
# transformers repeats the grouped KV heads in memory whenever a mask is given, and the masked
# kernels do not split a long cache over the card's SMs. FlexAttention's decode kernel (chosen
# by inductor for short queries when the query heads per KV head are a power of two) reads each
# KV head once, splits the visited blocks evenly over the SMs, and skips blocks no row sees.

FLEX_ATTENTION = "specvlm_flex"
FLEX_BLOCK = 128  # slots per block of the block mask (capacities are multiples of it)
FLEX_ROWS = 128  # most query rows (rows x heads per KV head) one decode-kernel call takes
# widest step given to FlexAttention: measured on an H200 (figures/costs_llava_fastflex_*.json),
# a 26-node tree verification through flex took 76 ms at 16k context where masked sdpa took
# 18 ms (the decode kernel serves short queries only), so wider steps take `grouped_attention`.
# Measured again on an H100 through `grouped_flex` (heads split into decode-kernel calls), at 16k
# the 7B's tree verification took 76 ms through flex and 10.3 ms through `grouped_attention`.
FLEX_MAX_QUERY = 16
# FlexAttention's split-KV decode pays on long caches only: a short one is read faster by
# `grouped_attention`'s two matmuls, which launch fewer kernels. Under "flex" the fast path gives a
# *draft* whose cache has at most this many slots to `grouped_attention` (`fast.flex_min_slots`;
# $SPECVLM_FLEX_MIN_SLOTS overrides, 0 turns it off). Measured on the H100, one-token steps,
# attention alone over all layers (figures/attention_kernels_nvidia-h100-80gb-hbm3.json), grouped / FlexAttention:
# 0.5B shape 294 / 342 us at 1,638 slots, 332 / 399 at 3,584, 461 / 415 at 6,144; 7B shape (a
# model drafting for itself) 336 / 339 at 1,638, 387 / 357 at 2,560. Only the draft: its rounding
# never reaches the output, where a target's one-token kernel chosen by its capacity could differ
# between AR and speculative runs (their capacities differ) and with it a token.
FLEX_MIN_SLOTS = 3072
# Under "flash" every short step takes `flash_decode`, whatever the cache's length: on the H100 it beat both
# kernels above for the 0.5B draft at 1,638 and 6,144 slots and was level with FlexAttention for the 7B at
# 12k (figures/attention_kernels_flash_*.json). A target that uses it does so in AR and speculative runs alike.
# Wide steps stay with the kernels "flex" gives them: at the 7B shape on 12k slots flash_decode (its rows in
# blocks of 64) took 2,755 us for the 26-node tree verification against split_attention's 1,741. A 7B target
# also keeps FlexAttention for its short steps under "flex/flash": its chain verification (6 tokens, a short
# step) took 1,177 us through flash_decode against FlexAttention's 1,121 (figures/attention_kernels_wide_*.json).


def flex_block_mask(start: torch.Tensor, pattern: torch.Tensor, capacity: int, block: int = FLEX_BLOCK) -> BlockMask:
    """`visibility_bias`'s rule as a FlexAttention BlockMask over `capacity` slots (same
    start, pattern [q, S]). Made from tensors inside the step: no host sync, fixed shapes,
    so it is captured in the step's CUDA graph. Blocks wholly before `start` (the committed
    cache, which every row sees) are *full* blocks: the kernel reads them without evaluating
    the mask. The blocks from the one holding `start` up to the last one any row sees (slot
    start + S - 1) are *partial* (mask_mod applied); later blocks are skipped, so a step costs
    what its visible slots cost, whatever the capacity."""
    if capacity % block:
        raise ValueError(f"a flex block mask needs a capacity that is a multiple of {block}, got {capacity}.")
    q, width = pattern.shape
    blocks, tiles = capacity // block, -(-q // FLEX_ROWS)
    full = torch.div(start, block, rounding_mode="floor")
    visited = torch.clamp(torch.div(start + width + block - 1, block, rounding_mode="floor"), max=blocks)
    order = torch.arange(blocks, dtype=torch.int32, device=pattern.device)

    def per_tile(count, first):  # [1, 1, tiles] block counts, [1, 1, tiles, blocks] indices from `first` on
        indices = torch.remainder(order + first, blocks).to(torch.int32)
        return (count.to(torch.int32).reshape(1, 1, 1).repeat(1, 1, tiles),
                indices.repeat(tiles).reshape(1, 1, tiles, blocks))

    def visible(batch, head, row, slot):
        offset = slot - start
        seen = pattern[row.clamp(max=q - 1), offset.clamp(0, width - 1)]
        return (offset < 0) | ((offset < width) & seen)

    partial_count, partial_indices = per_tile(visited - full, full)
    full_count, full_indices = per_tile(full, 0)
    return BlockMask.from_kv_blocks(partial_count, partial_indices, full_count, full_indices,
                                    BLOCK_SIZE=(FLEX_ROWS, block), mask_mod=visible,
                                    seq_lengths=(q, capacity), **_NO_Q_BLOCKS)


# the transposed (backward-pass) block lists are not needed; older torch cannot skip them
_NO_Q_BLOCKS = ({"compute_q_blocks": False}
                if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters else {})


def grouped_flex(query, key, value, block_mask: BlockMask, scale: float | None = None) -> torch.Tensor:
    """flex_attention with grouped KV heads read in place (never repeated in memory).

    query [B, Hq, q, d], key/value [B, Hkv, K, d] -> [B, Hq, q, d]. The decode kernel wants a
    power-of-two number of query heads per KV head and at most FLEX_ROWS rows (q x heads) per
    KV head: the group is padded with zero queries (their outputs are dropped) and split into
    calls of `per_call` heads (e.g. 7 heads per KV head, a 26-node tree: 8 heads, 2 calls of 4)."""
    batch, heads, q, dim = query.shape
    groups = heads // key.shape[1]
    padded = 1 << (groups - 1).bit_length()
    per_call = max(1, min(padded, FLEX_ROWS // (1 << (q - 1).bit_length())))
    grouped = query.reshape(batch, key.shape[1], groups, q, dim)
    if padded > groups:
        grouped = F.pad(grouped, (0, 0, 0, 0, 0, padded - groups))
    outputs = [flex_attention(grouped[:, :, first:first + per_call].reshape(batch, -1, q, dim), key, value,
                              block_mask=block_mask, scale=scale, enable_gqa=True)
               for first in range(0, padded, per_call)]
    out = torch.cat([o.reshape(batch, key.shape[1], per_call, q, dim) for o in outputs], dim=2)
    return out[:, :, :groups].reshape(batch, heads, q, dim)


def grouped_attention(query, key, value, bias, scale: float) -> torch.Tensor:
    """Attention with an additive mask, grouped KV heads read in place: for wide steps.

    query [B, Hq, q, d], key/value [B, Hkv, K, d], bias [B or 1, 1, q, K] -> [B, Hq, q, d].
    The G = Hq / Hkv query heads that share a KV head are stacked as G*q rows of one batched
    matmul against it (a 26-node tree, 28 heads over 4 KV heads: 182 rows per KV head), so the
    KV heads are never repeated in memory and the long key axis is the matmul's wide side, which
    spreads over every SM. Scores and softmax in float32 (as sdpa's kernels keep them), the
    probabilities rounded to the value dtype before the second matmul (as flash does). Masked
    sdpa instead repeats each KV head G times under torch.compile and runs one tile of rows per
    head over the whole key axis: 63% of a 7B tree verification on the H100 (profile, 16k)."""
    batch, heads, q, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    rows = query.reshape(batch, kv_heads, groups * q, dim)
    scores = float32_scores(rows, key) * scale  # [B, Hkv, G*q, K]
    scores = scores.view(batch, kv_heads, groups, q, slots) + bias[:, :, None].float()
    probs = scores.softmax(-1).to(value.dtype).view(batch, kv_heads, groups * q, slots)
    return (probs @ value).view(batch, heads, q, dim)


SPLIT_CHUNK = 512  # slots per chunk of `split_attention`'s flash part
# Under "flex", a step wider than FLEX_MAX_QUERY (a tree verification) on a cache of at least this
# many slots takes `split_attention` instead of `grouped_attention` (`fast.split_min_slots`;
# $SPECVLM_SPLIT_MIN_SLOTS overrides, 0 turns it off). Measured on the H100, the 7B's 26-node
# verification, attention alone over its 28 layers (figures/attention_kernels_nvidia-h100-80gb-hbm3.json): 2.3 ms
# through grouped_attention and 1.7 ms through split_attention at 12k slots, 3.1 and 1.7 ms at 16k,
# 6.1 and 2.8 ms at 32k. At 1.6k slots the flash part's fixed cost made it about three times slower
# (an exploratory run of the same comparison, not in that file). The bound lies between two measured points
# (figures/attention_kernels_split_bound_*.json): at 4,096 slots 0.97 ms through grouped_attention and 1.31 ms
# through split_attention, at 8,192 slots 1.60 and 1.30 ms; the lines through them cross near 6.3k slots.
SPLIT_MIN_SLOTS = 8192


def split_attention(query, key, value, bias, start: torch.Tensor, span: int, scale: float,
                    chunk: int = SPLIT_CHUNK, merge: str | None = None) -> torch.Tensor:
    """`grouped_attention`'s result, with the committed cache read by a flash kernel in chunks.

    query [1, Hq, q, d], key/value [1, Hkv, K, d], bias [1, 1, q, K] (`visibility_bias` of `start`
    and a [q, span] pattern), start: 0-d long tensor -> [1, Hq, q, d]. Every row sees every slot
    before `start`; from `start` on, what the bias allows within `span` slots. The two parts are
    computed apart, each with the log-sum-exp of its scores, and merged exactly:

    1. the committed slots [0, start): the cache is cut into chunks of `chunk` slots (the last one
       takes the rest of the capacity), each chunk a sequence of a variable-length flash kernel
       whose used length is the part of the chunk before `start` (none for later chunks). No mask
       is needed, the shapes are fixed whatever `start` is, and the chunks spread over the SMs as
       a split-KV decode kernel spreads a long cache. The G = Hq / Hkv query heads of each KV head
       are stacked as G*q rows, so each key is read once per chunk, not once per query head.
    2. the step's own slots [start, start + span), through the bias's columns (float32 scores).

    E.g. K = 2048, chunk 512, start 1300: chunks of 512, 512, 276 and 0 keys in part 1.
    On CUDA in half precision part 1 is the flash kernel; elsewhere the same arithmetic in float32.
    `merge`: "triton" (part 2 and the merge in one kernel, `split_merge.own_slots_and_merge`, whose
    result is laid out as [1, q, Hq, d]), "torch" (torch operations), or None: "triton" where
    `split_merge.available` says so; more than `split_merge.MAX_CHUNKS` chunks keep the torch
    operations (`merge_kernel` says which runs)."""
    batch, heads, q, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    if batch != 1:
        raise ValueError(f"split_attention serves one sequence (the fast path's), got a batch of {batch}.")
    own_part = merge_kernel(query.device, query.dtype, dim, slots, chunk, merge)
    groups, chunks = heads // kv_heads, max(1, slots // chunk)
    rows = query.reshape(kv_heads, groups * q, dim)
    steps = torch.arange(chunks + 1, device=query.device)
    bounds = torch.where(steps == chunks, slots, steps * chunk)  # the last chunk takes the rest
    used = torch.minimum((start - bounds[:-1]).clamp(min=0), bounds[1:] - bounds[:-1])  # [chunks]

    # 1. the committed slots: [chunks, Hkv, G*q, d] and [chunks, Hkv, G*q]
    longest = slots - (chunks - 1) * chunk  # the last chunk's slots
    prefix_out, prefix_lse = chunked_prefix_attention(rows, key[0], value[0], bounds, used, longest, scale)
    if own_part == "triton":  # 2. and the merge in one kernel
        out = own_slots_and_merge(rows, key[0], value[0], bias[0, 0], start, span, prefix_out, prefix_lse, used, q,
                                  scale)
        return out.transpose(1, 2)  # [1, Hq, q, d], laid out as [1, q, Hq, d]: the output projection's layout
    unused = (used == 0)[:, None, None]
    prefix_lse = prefix_lse.masked_fill(unused, float("-inf"))  # the flash kernel writes +inf there
    prefix_out = prefix_out.masked_fill(unused[..., None], 0)

    # 2. the step's own slots
    raw = start + torch.arange(span, device=query.device)
    index = raw.clamp(max=slots - 1)
    own_bias = bias[0, 0].index_select(-1, index).float().masked_fill(raw >= slots, float("-inf"))
    scores = float32_scores(rows[None], key.index_select(2, index))[0] * scale  # [Hkv, G*q, span]
    scores = (scores.view(kv_heads, groups, q, span) + own_bias).view(kv_heads, groups * q, span)
    own_out, own_lse = softmax_with_lse(scores, value[0].index_select(1, index))  # [Hkv, G*q, d], [Hkv, G*q]

    # merge: each part weighted by its share of the whole softmax's denominator
    top = torch.maximum(prefix_lse.amax(0), own_lse)
    prefix_weight = (prefix_lse - top).exp()[..., None]  # [chunks, Hkv, G*q, 1]; 0 for unused chunks
    own_weight = (own_lse - top).exp()[..., None]
    total = (prefix_weight * prefix_out.float()).sum(0) + own_weight * own_out.float()
    out = total / (prefix_weight.sum(0) + own_weight)
    return out.to(value.dtype).view(1, heads, q, dim)


def merge_kernel(device, dtype, dim: int, slots: int, chunk: int = SPLIT_CHUNK, merge: str | None = None) -> str:
    """How `split_attention` computes a step's own slots and the merge on a cache of `slots` slots
    cut in chunks of `chunk`: "triton" (`split_merge`'s kernel) where `merge` is "triton", or None and
    `split_merge.available` says so, and the chunks are at most `split_merge.MAX_CHUNKS`; else "torch".
    E.g. on CUDA in bfloat16 with heads of 128: 12,416 slots -> "triton", 65,536 (128 chunks) -> "torch"."""
    if merge not in (None, "triton", "torch"):
        raise ValueError(f"merge must be 'triton', 'torch' or None, got {merge!r}.")
    wanted = merge == "triton" or merge is None and split_merge.available(device, dtype, dim)
    return "triton" if wanted and max(1, slots // chunk) <= split_merge.MAX_CHUNKS else "torch"


def chunked_prefix_attention(rows, key, value, bounds, used, longest: int, scale: float):
    """Unmasked attention of the same rows to the first `used[j]` keys of each chunk j.

    rows [H, M, d]; key/value [H, K, d]; bounds [chunks + 1] long (chunk j = slots bounds[j] ..
    bounds[j+1] - 1; `longest`: the most slots of one); used [chunks] long -> out [chunks, H, M, d]
    (value's dtype; zeros where used is 0) and the log-sum-exp of each row's scaled scores
    [chunks, H, M] float32 (+inf where used is 0, as the flash kernel writes it for an empty
    sequence). On CUDA in half precision: one call of the variable-length flash kernel, chunk j a
    sequence of its own (`seqused_k`: only its first used[j] keys are read)."""
    heads, m, dim = rows.shape
    chunks = used.shape[0]
    if rows.device.type == "cuda" and rows.dtype in (torch.float16, torch.bfloat16):
        queries = rows.transpose(0, 1).expand(chunks, m, heads, dim).reshape(chunks * m, heads, dim)
        query_bounds = torch.arange(chunks + 1, device=rows.device, dtype=torch.int32) * m
        out, lse = torch.ops.aten._flash_attention_forward(
            queries, key.transpose(0, 1), value.transpose(0, 1), query_bounds, bounds.to(torch.int32), m,
            longest, 0.0, False, False, scale=scale, seqused_k=used.to(torch.int32))[:2]
        return (out.view(chunks, m, heads, dim).transpose(1, 2),
                lse[:, :chunks * m].reshape(heads, chunks, m).transpose(0, 1))
    slots = key.shape[1]
    slot = torch.arange(slots, device=rows.device)
    chunk_of = (torch.searchsorted(bounds, slot, right=True) - 1).clamp(max=chunks - 1)  # [K]
    member = (chunk_of == torch.arange(chunks, device=rows.device)[:, None]) & (slot - bounds[chunk_of] < used[chunk_of])
    scores = (rows.float() @ key.float().transpose(-1, -2) * scale)[None]  # [1, H, M, K]
    scores = scores.masked_fill(~member[:, None, None], float("-inf"))  # [chunks, H, M, K]
    out, lse = softmax_with_lse(scores, value)
    # an unused chunk's log-sum-exp as the flash kernel writes it (+inf): the caller must mask it
    return out, lse.masked_fill((used == 0)[:, None, None], float("inf"))


def softmax_with_lse(scores: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scores) @ value and the log-sum-exp of each row of scores.

    scores [..., M, K] float32 (-inf where unseen), value [..., K, d] -> out [..., M, d] (value's
    dtype; the probabilities rounded to it first, as flash does), lse [..., M]. A row that sees
    nothing gets zeros (its lse is -inf)."""
    lse = scores.logsumexp(-1)
    probs = torch.nan_to_num((scores - lse[..., None]).exp())
    return probs.to(value.dtype) @ value, lse


def float32_scores(rows: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """rows [B, H, M, d] @ key [B, H, K, d]^T -> [B, H, M, K] in float32. Half-precision inputs
    on CUDA go through the tensor cores with float32 output (`torch.bmm(out_dtype=)`, a CUDA
    kernel: no float32 copy of the keys, no float32 matmul); elsewhere both sides are cast."""
    if rows.device.type in ("cuda", "meta") and rows.dtype in (torch.float16, torch.bfloat16):
        batch, heads, m, dim = rows.shape
        scores = torch.bmm(rows.reshape(batch * heads, m, dim), key.reshape(batch * heads, -1, dim).transpose(1, 2),
                           out_dtype=torch.float32)
        return scores.view(batch, heads, m, -1)
    return rows.float() @ key.float().transpose(-1, -2)


def flex_or_sdpa(module, query, key, value, attention_mask, scaling=None, grouped=False, split=None, decode=None,
                 **kwargs):
    """The attention function registered as FLEX_ATTENTION: FlexAttention when the mask is a
    BlockMask (the fast path's short steps), `flash_decode` when the step passes
    `decode=(start, pattern)` (short steps under attention "flash"), `split_attention` when it
    passes `split=(start, span)` (wide steps on long caches), `grouped_attention` when it asks for
    it (`grouped=True`: the fast path's other wide steps), otherwise exactly the project's sdpa
    (verifier scores included), so prefills and the plain path are unchanged."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if decode is not None:
        start, pattern = (t.to(key.device) for t in decode)  # a model spread over cards: this layer's
        return flash_decode(query, key, value, start, pattern, scale), None
    if isinstance(attention_mask, BlockMask):
        out = grouped_flex(query, key, value, attention_mask, scale)
    elif split is not None:
        start, span = split
        out = split_attention(query, key, value, attention_mask, start.to(key.device), span, scale)
    elif grouped:
        out = grouped_attention(query, key, value, attention_mask, scale)
    else:
        return sdpa_with_scores(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(FLEX_ATTENTION, flex_or_sdpa)
AttentionMaskInterface.register(FLEX_ATTENTION, sdpa_mask)
# "sdpa": masked sdpa for every step; "flex": FlexAttention for short steps, `grouped_attention`
# for wide ones; "flash": `flash_decode` (Triton) for short steps, wide ones as under "flex";
# "grouped": `grouped_attention` for every step (no split-KV kernel, fewer kernels)
ATTENTIONS = ("sdpa", "flex", "flash", "grouped")


def restore_output_capture() -> None:
    """Work around a torch.compile side-effect bug (torch 2.14): after a compiled call that
    holds a flex_attention, transformers' output collector stays in its "compiling" state with
    an empty collection, and every later eager forward silently records no hidden states (the
    next prefill's vision tower then fails). Put it back to its idle state."""
    from transformers.utils import output_capturing

    collector = output_capturing._active_collector
    if collector.compiling:
        collector.reset(None)


def use_flex(lm: VideoLM) -> None:
    """Switch `lm`'s language model to FLEX_ATTENTION (a superset of sdpa: see `flex_or_sdpa`)."""
    if lm.language_model.config._attn_implementation != FLEX_ATTENTION:
        # through the top-level model, as `attention.enable_scores` does: switching a submodel
        # alone left LLaVA-OneVision's vision tower without its hidden states after a compile
        composite = hasattr(lm.model.config, "text_config")
        lm.model.set_attn_implementation({"text_config": FLEX_ATTENTION} if composite else FLEX_ATTENTION)
