"""The second half of `split_attention` in one Triton kernel: a wide step's own slots, and the merge.

`step_attention.split_attention` computes a tree verification's attention in two parts: the
committed cache, read in chunks by a variable-length flash kernel that returns each chunk's
partial output and log-sum-exp, and the step's own slots (the 26 tree nodes, each seeing its
ancestors and itself). Written with torch operations, the second part and the merge of all parts
take several kernels per layer, which together cost the GPU most of what the flash kernel costs:
picking the own slots' keys, values and mask columns, their scores, their softmax, masking the
empty chunks, the weighted sum over the chunks, and a copy into the layout the output projection
reads (notebook 05, sections 13 and 14, profile them). Here they are one kernel, one program per
(KV head, stacked row):

1. the row's scores against the own slots, from `start` on, masked by the step's additive bias;
   their softmax, its log-sum-exp, and the own part's output (probabilities rounded to the value
   dtype, the output rounded too, as the torch version rounds them);
2. the chunks' log-sum-exps and outputs, all at once (an empty chunk, `used` 0, weighs nothing),
   beside the own part; each part weighted by its share of the whole softmax's denominator. The
   chunks' outputs sit in registers, so the kernel takes at most MAX_CHUNKS of them (32k slots in
   `split_attention`'s chunks of 512, the longest cache it was timed on); `split_attention` leaves
   a longer cache to the torch operations;
3. the result written straight into [1, q, Hq, d].

A program per row reads the own slots' keys and values again for every row (from the L2 cache).
A variant with one program per block of 16 rows, reading them once through `tl.dot` and folding
the chunks in one after another, was as fast at 12k slots and slower than the torch operations at
32k (64 chunks in series) on the H100 (notebook 05, section 14).

Same arithmetic as the torch version up to float32 rounding (the order of sums; the GPU's exp and
log). Needs Triton; on a CPU it runs in Triton's interpreter (for tests), as `flash_decode` does
(`available`).
"""

from __future__ import annotations

import os

import torch

from . import flash_decode

try:
    import triton
    import triton.language as tl
except ImportError:  # `available` says no
    triton = None


CHOICES = ("triton", "torch")


def choice_from(environ) -> str | None:
    """$SPECVLM_SPLIT_MERGE from a mapping: "triton", "torch", or None when unset or empty (the
    default, `available`). Anything else is returned as it is, for `check_choice` to refuse."""
    return environ.get("SPECVLM_SPLIT_MERGE") or None


# read once, at import: `available` runs inside steps that dynamo traces, which should not read the
# environment; the fast path refuses a bad value before any prefill (`check_choice`)
CHOICE = choice_from(os.environ)
MAX_CHUNKS = 64  # most chunks the kernel takes: their [chunks, d] float32 outputs sit in each program's registers


def check_choice(choice: str | None = None) -> None:
    """Raise ValueError unless `choice` (default CHOICE) is None or one of CHOICES."""
    choice = CHOICE if choice is None else choice
    if choice is not None and choice not in CHOICES:
        raise ValueError(f"SPECVLM_SPLIT_MERGE must be 'triton' or 'torch' (or unset), got {choice!r}.")


def available(device: torch.device, dtype: torch.dtype, dim: int = 128) -> bool:
    """Whether `split_attention` may merge through this kernel, for heads of size `dim` (it does for
    at most MAX_CHUNKS chunks: `step_attention.merge_kernel` has the whole rule): CHOICE
    ($SPECVLM_SPLIT_MERGE) "triton" or "torch" if set, else "triton" on CUDA and "torch" elsewhere
    (Triton's interpreter, a CPU's only way to run it, is for tests). "triton" needs Triton and, on
    CUDA, half precision (the fast path sends wide steps to `split_attention` only on cards of compute
    capability 8.0 or newer, `fast.StaticLM.kernels`); on a CPU, Triton's interpreter, float32 (as
    `flash_decode`) and an uncompiled step (dynamo cannot trace the interpreter); and a head size
    that is a power of two of at least 16."""
    check_choice()
    device = torch.device(device)
    choice = CHOICE or ("triton" if device.type == "cuda" else "torch")
    if choice == "torch" or triton is None or dim < 16 or dim & (dim - 1):
        return False
    if device.type == "cuda":
        return dtype in (torch.float16, torch.bfloat16)
    return (device.type == "cpu" and flash_decode.INTERPRETED and dtype == torch.float32
            and not torch.compiler.is_compiling())


if triton is not None:

    @triton.jit
    def _split_attention_merge(rows_ptr, key_ptr, value_ptr, bias_ptr, start_ptr, part_ptr, lse_ptr, used_ptr,
                             out_ptr, stride_rh, stride_rm, stride_kh, stride_ks, stride_vh, stride_vs, stride_bq,
                             stride_pc, stride_ph, stride_pm, stride_lc, stride_lh, stride_lm,
                             stride_os, stride_oh, slots,
                             SCALE: tl.constexpr, STEP: tl.constexpr, GROUPS: tl.constexpr, SPAN: tl.constexpr,
                             BLOCK_S: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr, DIM: tl.constexpr):
        head = tl.program_id(0)
        row = tl.program_id(1)  # query head head*GROUPS + row // STEP, step row row % STEP
        dims = tl.arange(0, DIM)
        start = tl.load(start_ptr)
        query = tl.load(rows_ptr + head * stride_rh + row * stride_rm + dims).to(tl.float32)

        # 1. the own slots start .. start + SPAN - 1 (none past the cache)
        own = tl.arange(0, BLOCK_S)
        raw = start + own
        inside = (own < SPAN) & (raw < slots)
        slot = tl.minimum(raw, slots - 1)
        bias = tl.load(bias_ptr + (row % STEP) * stride_bq + slot, mask=inside, other=float("-inf")).to(tl.float32)
        keys = tl.load(key_ptr + head * stride_kh + slot[:, None] * stride_ks + dims[None, :],
                       mask=inside[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(keys * query[None, :], 1) * SCALE + bias
        scores = tl.where(inside, scores, float("-inf"))
        own_top = tl.max(scores, 0)
        own_base = tl.where(own_top == float("-inf"), 0.0, own_top)
        own_total = tl.sum(tl.exp(scores - own_base), 0)
        own_lse = tl.where(own_total > 0, own_base + tl.log(tl.where(own_total > 0, own_total, 1.0)), float("-inf"))
        values = tl.load(value_ptr + head * stride_vh + slot[:, None] * stride_vs + dims[None, :],
                         mask=inside[:, None], other=0.0)
        probs = tl.exp(scores - tl.where(own_lse == float("-inf"), 0.0, own_lse)).to(values.dtype).to(tl.float32)
        own_out = tl.sum(probs[:, None] * values.to(tl.float32), 0).to(values.dtype).to(tl.float32)

        # 2. the chunks: an empty one (used 0) weighs nothing, whatever log-sum-exp it holds
        chunks = tl.arange(0, BLOCK_C)
        used = tl.load(used_ptr + chunks, mask=chunks < CHUNKS, other=0) > 0
        lse = tl.load(lse_ptr + chunks * stride_lc + head * stride_lh + row * stride_lm, mask=used,
                      other=float("-inf"))
        lse = tl.where(used, lse, float("-inf"))
        top = tl.maximum(tl.max(lse, 0), own_lse)
        top = tl.where(top == float("-inf"), 0.0, top)
        weight = tl.exp(lse - top)  # [BLOCK_C]
        own_weight = tl.exp(own_lse - top)
        part = tl.load(part_ptr + chunks[:, None] * stride_pc + head * stride_ph + row * stride_pm + dims[None, :],
                       mask=used[:, None], other=0.0).to(tl.float32)
        total = tl.sum(weight[:, None] * part, 0) + own_weight * own_out
        out = total / tl.maximum(tl.sum(weight, 0) + own_weight, 1e-30)

        # 3. straight into the layout the output projection reads
        target = (row % STEP) * stride_os + (head * GROUPS + row // STEP) * stride_oh + dims
        tl.store(out_ptr + target, out.to(out_ptr.dtype.element_ty))


def own_slots_and_merge(rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                        start: torch.Tensor, span: int, prefix_out: torch.Tensor, prefix_lse: torch.Tensor,
                        used: torch.Tensor, step: int, scale: float) -> torch.Tensor:
    """A wide step's attention from its chunks' partial results and its own slots.

    rows [Hkv, M, d] (the G = M / step query heads of each KV head stacked, row m = g*step + r),
    key/value [Hkv, K, d], bias [step, K] additive (0 where seen, the dtype's lowest value or -inf
    where not: `visibility_bias`; any float dtype), start 0-d long tensor, span: own slots from start
    on (those past K are unseen); prefix_out [chunks, Hkv, M, d] and prefix_lse [chunks, Hkv, M]
    (any strides, d contiguous: the flash kernel's own layouts are read in place), used [chunks]
    (0: an empty chunk, whose results are ignored) -> [1, step, Hkv*G, d] in value's dtype. Each row
    must see at least one slot (its own node does); under a bias of -inf, a row that sees none gets
    zeros here and NaN from the torch operations."""
    if triton is None:
        raise RuntimeError("own_slots_and_merge needs Triton (it comes with CUDA builds of torch).")
    heads, m, dim = rows.shape
    chunks = prefix_lse.shape[0]
    groups = m // step
    if m % step or dim & (dim - 1) or dim < 16:
        raise ValueError(f"own_slots_and_merge needs whole groups of {step} rows and a head size that is a power of "
                         f"two of at least 16; got {m} rows and head size {dim}.")
    strided = [name for name, tensor in (("key", key), ("value", value), ("prefix_out", prefix_out))
               if tensor.stride(-1) != 1]
    if strided or used.dim() != 1 or used.shape[0] != chunks or chunks > MAX_CHUNKS:
        raise ValueError(f"own_slots_and_merge reads key, value and prefix_out with a contiguous last axis, one "
                         f"`used` count per chunk and at most {MAX_CHUNKS} chunks; got strided {strided}, used of "
                         f"shape {tuple(used.shape)} for {chunks} chunks.")
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    bias = bias if bias.stride(-1) == 1 else bias.contiguous()
    used = used if used.stride(0) == 1 else used.contiguous()
    out = torch.empty(1, step, heads * groups, dim, dtype=value.dtype, device=rows.device)
    _split_attention_merge[(heads, m)](
        rows, key, value, bias, start, prefix_out, prefix_lse, used, out,
        rows.stride(0), rows.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1), bias.stride(0),
        *prefix_out.stride()[:3], *prefix_lse.stride(), out.stride(1), out.stride(2), key.shape[1],
        SCALE=scale, STEP=step, GROUPS=groups, SPAN=span, BLOCK_S=max(16, triton.next_power_of_2(span)),
        CHUNKS=chunks, BLOCK_C=max(2, triton.next_power_of_2(chunks)), DIM=dim)
    return out
