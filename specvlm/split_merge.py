"""The second half of `split_attention` in one Triton kernel: a wide step's own slots, and the merge.

`step_attention.split_attention` computes a tree verification's attention in two parts: the
committed cache, read in chunks by a variable-length flash kernel that returns each chunk's
partial output and log-sum-exp, and the step's own slots (the 26 tree nodes, each seeing its
ancestors and itself). Written with torch operations, the second part and the merge of all parts
cost about nine kernels per layer, more than the flash kernel itself: picking the own slots' keys,
values and mask columns, their scores, their softmax, masking the empty chunks, the weighted sum
over the chunks, and a copy into the layout the output projection reads (notebook 05, section 13,
profiles it). Here they are one kernel, one program per (KV head, query head of its group, block
of step rows), which reads the own slots' keys and values once for all its rows:

1. the rows' scores against the own slots, from `start` on, masked by the step's additive bias;
   their softmax, its log-sum-exp, and the own part's output (probabilities rounded to the value
   dtype, the output rounded too, as the torch version rounds them);
2. the chunks folded in one after another (an online softmax over the parts: an empty chunk,
   `used` 0, weighs nothing), each part weighted by its share of the whole softmax's denominator;
3. the result written straight into [1, q, Hq, d].

Same arithmetic as the torch version up to the order of float32 sums. Needs Triton; on a CPU it
runs in Triton's interpreter (float32, for tests), as `flash_decode` does (`available`).
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


# "triton" or "torch" ($SPECVLM_SPLIT_MERGE), read once, at import: the steps that call `available`
# are traced by dynamo, which should not read the environment; None: the default (`available`)
CHOICE = os.environ.get("SPECVLM_SPLIT_MERGE") or None


def available(device: torch.device, dtype: torch.dtype, dim: int = 128) -> bool:
    """Whether `split_attention` merges through this kernel, for heads of size `dim`: CHOICE
    ($SPECVLM_SPLIT_MERGE) "triton" or "torch" if set, else "triton" on CUDA and "torch" elsewhere
    (Triton's interpreter, a CPU's only way to run it, is for tests). "triton" needs Triton and, on CUDA, half precision
    (the fast path sends wide steps to `split_attention` only on cards of compute capability 8.0 or
    newer, `fast.StaticLM.kernels`), on a CPU Triton's interpreter and float32 (as `flash_decode`);
    and a head size that is a power of two of at least 16."""
    device = torch.device(device)
    choice = CHOICE or ("triton" if device.type == "cuda" else "torch")
    if choice not in ("triton", "torch"):
        raise ValueError(f"SPECVLM_SPLIT_MERGE must be 'triton' or 'torch', got {choice!r}.")
    if choice == "torch" or triton is None or dim < 16 or dim & (dim - 1):
        return False
    if device.type == "cuda":
        return dtype in (torch.float16, torch.bfloat16)
    return device.type == "cpu" and flash_decode.INTERPRETED and dtype == torch.float32


if triton is not None:

    @triton.jit
    def _split_attention_merge(rows_ptr, key_ptr, value_ptr, bias_ptr, start_ptr, part_ptr, lse_ptr, used_ptr,
                             out_ptr, stride_rh, stride_rm, stride_kh, stride_ks, stride_vh, stride_vs, stride_bq,
                             stride_pc, stride_ph, stride_pm, stride_lc, stride_lh, stride_lm,
                             stride_os, stride_oh, slots,
                             SCALE: tl.constexpr, STEP: tl.constexpr, GROUPS: tl.constexpr, SPAN: tl.constexpr,
                             CHUNKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, DIM: tl.constexpr):
        head = tl.program_id(0)
        group = tl.program_id(1)  # query head head*GROUPS + group
        step_rows = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)  # its step rows r: stacked rows group*STEP + r
        real = step_rows < STEP
        stacked = group * STEP + step_rows
        dims = tl.arange(0, DIM)
        start = tl.load(start_ptr)
        query = tl.load(rows_ptr + head * stride_rh + stacked[:, None] * stride_rm + dims[None, :],
                        mask=real[:, None], other=0.0)

        # 1. the own slots start .. start + SPAN - 1 (none past the cache), read once for the block's rows
        own = tl.arange(0, BLOCK_S)
        raw = start + own
        inside = (own < SPAN) & (raw < slots)
        slot = tl.minimum(raw, slots - 1)
        keys = tl.load(key_ptr + head * stride_kh + slot[:, None] * stride_ks + dims[None, :],
                       mask=inside[:, None], other=0.0)
        values = tl.load(value_ptr + head * stride_vh + slot[:, None] * stride_vs + dims[None, :],
                         mask=inside[:, None], other=0.0)
        bias = tl.load(bias_ptr + step_rows[:, None] * stride_bq + slot[None, :],
                       mask=real[:, None] & inside[None, :], other=float("-inf")).to(tl.float32)
        scores = tl.dot(query, tl.trans(keys)) * SCALE + bias  # [BLOCK_R, BLOCK_S] float32
        scores = tl.where(inside[None, :], scores, float("-inf"))
        own_top = tl.max(scores, 1)
        own_base = tl.where(own_top == float("-inf"), 0.0, own_top)
        own_total = tl.sum(tl.exp(scores - own_base[:, None]), 1)
        seen = own_total > 0
        top = tl.where(seen, own_base + tl.log(tl.where(seen, own_total, 1.0)), float("-inf"))  # the own lse
        probs = tl.exp(scores - tl.where(seen, top, 0.0)[:, None]).to(values.dtype)
        acc = tl.dot(probs, values).to(values.dtype).to(tl.float32)  # rounded as the torch version rounds it
        weight_sum = tl.where(seen, 1.0, 0.0)

        # 2. the chunks, folded in one at a time; an empty one (used 0) weighs nothing, whatever it holds
        for chunk in range(CHUNKS):
            used = tl.load(used_ptr + chunk) > 0
            lse = tl.load(lse_ptr + chunk * stride_lc + head * stride_lh + stacked * stride_lm,
                          mask=real & used, other=float("-inf"))
            lse = tl.where(used, lse, float("-inf"))
            new_top = tl.maximum(top, lse)
            base = tl.where(new_top == float("-inf"), 0.0, new_top)
            rescale = tl.exp(top - base)
            weight = tl.exp(lse - base)
            part = tl.load(part_ptr + chunk * stride_pc + head * stride_ph + stacked[:, None] * stride_pm
                           + dims[None, :], mask=(real & used)[:, None], other=0.0).to(tl.float32)
            acc = acc * rescale[:, None] + weight[:, None] * part
            weight_sum = weight_sum * rescale + weight
            top = new_top
        out = acc / tl.maximum(weight_sum, 1e-30)[:, None]

        # 3. straight into the layout the output projection reads
        target = step_rows[:, None] * stride_os + (head * GROUPS + group) * stride_oh + dims[None, :]
        tl.store(out_ptr + target, out.to(out_ptr.dtype.element_ty), mask=real[:, None])


BLOCK_R = 16  # step rows per program (tl.dot's smallest side): a 26-node tree takes two blocks per query head


def own_slots_and_merge(rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                        start: torch.Tensor, span: int, prefix_out: torch.Tensor, prefix_lse: torch.Tensor,
                        used: torch.Tensor, step: int, scale: float) -> torch.Tensor:
    """A wide step's attention from its chunks' partial results and its own slots.

    rows [Hkv, M, d] (the G = M / step query heads of each KV head stacked, row m = g*step + r),
    key/value [Hkv, K, d], bias [step, K] additive (0 or -inf, any float dtype), start 0-d long
    tensor, span: own slots from start on (those past K are unseen); prefix_out [chunks, Hkv, M, d]
    and prefix_lse [chunks, Hkv, M] (any strides, d contiguous), used [chunks] (0: an empty chunk,
    whose results are ignored) -> [1, step, Hkv*G, d] in value's dtype. One program per (KV head,
    query head of its group, block of BLOCK_R step rows). Each row must see at least one slot (its
    own node does)."""
    if triton is None:
        raise RuntimeError("own_slots_and_merge needs Triton (it comes with CUDA builds of torch).")
    heads, m, dim = rows.shape
    groups = m // step
    if m % step or dim & (dim - 1) or dim < 16:
        raise ValueError(f"own_slots_and_merge needs whole groups of {step} rows and a head size that is a power of "
                         f"two of at least 16; got {m} rows and head size {dim}.")
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    bias = bias if bias.stride(-1) == 1 else bias.contiguous()
    out = torch.empty(1, step, heads * groups, dim, dtype=value.dtype, device=rows.device)
    _split_attention_merge[(heads, groups, -(-step // BLOCK_R))](
        rows, key, value, bias, start, prefix_out, prefix_lse, used, out,
        rows.stride(0), rows.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1), bias.stride(0),
        *prefix_out.stride()[:3], *prefix_lse.stride(), out.stride(1), out.stride(2), key.shape[1],
        SCALE=scale, STEP=step, GROUPS=groups, SPAN=span, CHUNKS=prefix_lse.shape[0], BLOCK_R=BLOCK_R,
        BLOCK_S=max(16, triton.next_power_of_2(span)), DIM=dim)
    return out
