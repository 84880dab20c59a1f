"""Matrix products for a few rows: a draft step's projections as Triton kernels cut for them.

A draft pass multiplies 1 to 16 rows (one token, a tree level, the catch-up feed) by each
projection of every decoder layer. Such a product reads the whole weight and does almost no
arithmetic, so it should cost the weight's bytes over the card's bandwidth. cuBLAS picks tiles
made for many rows: on the H100, a 0.5B draft's down projection (896 x 4864) took a split-K
kernel and a reduction kernel, 7.5 us for 8.7 MB that the bandwidth reads in 3 us, and the
gate/up product a kernel of its own before the SiLU's (notebook 05, section 15's profile).

Here every product is one kernel whose programs tile the output columns and, where there are
too few column tiles to fill the card, split the inner axis too:

    partial[s] = x[:, K_s] @ W[:, K_s]^T        (float32, one program per column tile and split s)
    y = sum_s partial[s] (+ bias)                (in the same kernel: the last program of a column
                                                  tile to finish, counted by an atomic counter,
                                                  sums the tile's partials in split order)

The MLP's gate and up rows, stacked as `fusion.py` stacks them, are read by the same program,
which writes silu(x Wg^T) * (x Wu^T) directly: one kernel where cuBLAS and inductor ran two.

Rows are padded to 16 inside the kernel (Triton's `tl.dot` needs 16); the pad costs no memory
traffic, only tensor-core work that the bytes hide. Only the rounding differs from `F.linear`
(another order of summation), so the fast path uses these kernels for a *draft* only, whose
proposals the target checks (`fusion.fuse_projections(lm, few_rows=True)`). On an H100 their first
version (the sums left to torch) beat cuBLAS product by product, timed alone, but both versions
moved a whole draft step by a few percent only, shorter in the
benchmark and longer in the profile (notebook 05, section 18), so the fast path runs them only
where $SPECVLM_FEW_ROWS=1.

Needs Triton, like `flash_decode.py`: on a CPU the kernels run in Triton's interpreter when
$TRITON_INTERPRET=1 is set before import (the tests do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# `available`: where these kernels run is where flash-decoding's do (Triton's half-precision dot on a
# CUDA card of compute capability 8.0+, or its interpreter in float32 on a CPU)
from .flash_decode import available, dashed_numbers, triton

if triton is not None:
    import triton.language as tl

MAX_ROWS = 16  # the most rows a kernel takes: wider products (a target's verification) go to F.linear


@dataclass(frozen=True)
class Launch:
    """How a product is cut: `block_n` output columns per program (a multiple of 16), `block_k`
    inner elements per loop step (a multiple of 16), `splits` parts of the inner axis (each a whole
    number of steps), Triton's `num_warps`. Any launch gives the same product up to rounding."""

    block_n: int
    block_k: int
    splits: int
    num_warps: int = 4

    def __post_init__(self):
        if self.block_n < 16 or self.block_n % 16 or self.block_k < 16 or self.block_k % 16:
            raise ValueError(f"a few-rows launch needs column and inner blocks that are multiples of 16; got {self}")
        if self.splits < 1 or self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"a few-rows launch needs at least one split and a power of two of warps; got {self}")

    @classmethod
    def parse(cls, text: str) -> Launch:
        """'16-256-4-4' -> Launch(16, 256, 4, 4): columns-inner-splits-warps."""
        numbers = dashed_numbers(text)
        if len(numbers) != 4:
            raise ValueError(f"a few-rows launch is columns-inner-splits-warps in whole numbers, got {text!r}")
        return cls(*numbers)

    @property
    def name(self) -> str:
        return f"{self.block_n}-{self.block_k}-{self.splits}-{self.num_warps}"


def default_launch(columns: int, inner: int, gated: bool = False) -> Launch:
    """Column tiles of 32, inner steps of 128, and the inner axis split into 8 parts or one per step (none for
    a gated product, whose SiLU needs whole sums; its programs read two tiles, gate and up, with 2
    warps). Within 7% of the best of the launches an H100 timed for each product of a 0.5B draft at 1
    and 8 rows (108 for q/k/v, output and down, 27 for gate/up), with the first version of the
    kernel, which left the sums of the splits to torch (notebook 05, section 18). For that draft: q/k/v
    (1152 x 896) 36 tiles x 7 splits; down (896 x 4864) 28 x 8; gate/up (2 x 4864 x 896) 152 x 1."""
    if gated:
        return Launch(32, 128, 1, 2)
    return Launch(32, 128, 8, 4)  # `split_axis` uses fewer splits where the inner axis has fewer steps


if triton is not None:

    @triton.jit
    def _few_rows_kernel(x_ptr, w_ptr, bias_ptr, partial_ptr, counter_ptr, out_ptr, rows, columns, inner, per_split,
                         stride_x, stride_w, SPLITS: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        tile = tl.program_id(0)
        split = tl.program_id(1)
        r = tl.arange(0, BLOCK_M)
        c = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        lo = split * per_split
        hi = tl.minimum(lo + per_split, inner)
        for k0 in range(lo, hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + r[:, None] * stride_x + k[None, :], mask=(r < rows)[:, None] & (k < hi)[None, :], other=0.0)
            w_mask = (c < columns)[:, None] & (k < hi)[None, :]
            w = tl.load(w_ptr + c[:, None] * stride_w + k[None, :], mask=w_mask, other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
            if GATED:  # the up rows lie `columns` rows below the gate rows
                u = tl.load(w_ptr + (c + columns)[:, None] * stride_w + k[None, :], mask=w_mask, other=0.0)
                up = tl.dot(x, tl.trans(u), up)
        inside = (r < rows)[:, None] & (c < columns)[None, :]
        here = r[:, None] * columns + c[None, :]
        last = True
        if SPLITS > 1:
            # every split leaves its partial product; the last of a tile's splits to finish (the
            # counter's acquire-release add orders the others' stores before its loads) sums them
            # in split order, so the result does not depend on which finished last
            tl.store(partial_ptr + split * rows * columns + here, acc, mask=inside)
            tl.debug_barrier()  # every thread's stores issued before the one thread's release below
            last = tl.atomic_add(counter_ptr + tile, 1) == SPLITS - 1
            if last:
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for s in range(SPLITS):
                    acc += tl.load(partial_ptr + s * rows * columns + here, mask=inside, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(counter_ptr + tile, 0)  # ready for the next call (and the next replay of a graph)
        if last:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + c, mask=c < columns, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc = acc / (1.0 + tl.exp(-acc)) * up
            tl.store(out_ptr + here, acc.to(out_ptr.dtype.element_ty), mask=inside)


def split_axis(inner: int, launch: Launch) -> tuple[int, int]:
    """(elements per split, splits actually used) of an inner axis of `inner` elements: each split
    a whole number of `block_k` steps, none empty. split_axis(4864, Launch(16, 128, 5)) -> (1024, 5);
    split_axis(896, Launch(16, 128, 8)) -> (128, 7)."""
    steps = -(-inner // launch.block_k)
    per_split = -(-steps // launch.splits) * launch.block_k
    return per_split, -(-inner // per_split)


def counters_for(columns: int, device) -> torch.Tensor:
    """The int32 counters a product of `columns` output columns needs (one per column tile of the
    narrowest launch), zero: each call leaves them zero again. A module that runs the kernels keeps
    its own (`fusion.py`), so a compiled step allocates and clears nothing."""
    return torch.zeros(-(-columns // 16), dtype=torch.int32, device=device)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, columns: int,
            launch: Launch, gated: bool, counters: torch.Tensor | None) -> None:
    """One launch: out [rows, columns] = x [rows, K] @ weight[:columns]^T (+ bias), or the gated product."""
    rows, inner = x.shape
    per_split, splits = split_axis(inner, launch)
    tiles = -(-columns // launch.block_n)
    if splits > 1 and (counters is None or counters.numel() < tiles or counters.dtype != torch.int32
                       or counters.device != x.device):
        raise ValueError(f"a split product needs int32 counters for its {tiles} column tiles on {x.device} "
                         "(few_rows.counters_for).")
    partial = torch.empty(splits if splits > 1 else 0, rows, columns, dtype=torch.float32, device=x.device)
    _few_rows_kernel[(tiles, splits)](
        x, weight, out if bias is None else bias, partial, out if counters is None else counters, out, rows, columns,
        inner, per_split, x.stride(0), weight.stride(0), SPLITS=splits, GATED=gated, HAS_BIAS=bias is not None,
        BLOCK_M=MAX_ROWS, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, num_warps=launch.num_warps)


def _checked(x: torch.Tensor, weight: torch.Tensor, what: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("few_rows needs Triton (it comes with CUDA builds of torch).")
    rows = x.numel() // max(1, x.shape[-1])
    if rows > MAX_ROWS or rows == 0 or x.shape[-1] == 0:
        raise ValueError(f"few_rows.{what} takes 1 to {MAX_ROWS} rows of a non-empty axis, got input {tuple(x.shape)}; "
                         "use F.linear.")
    if weight.shape[-1] != x.shape[-1] or weight.stride(-1) != 1:
        raise ValueError(f"few_rows.{what} needs a weight [N, {x.shape[-1]}] with a contiguous last axis, "
                         f"got {tuple(weight.shape)} with strides {weight.stride()}.")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"few_rows.{what} needs its input and weight in one dtype on one device, got "
                         f"{x.dtype} on {x.device} and {weight.dtype} on {weight.device}.")
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.is_contiguous() or bias.device != x.device):
        raise ValueError(f"few_rows.{what} needs a contiguous bias [{weight.shape[0]}] on {x.device}, "
                         f"got {tuple(bias.shape)} on {bias.device}.")
    return x.reshape(rows, x.shape[-1]).contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           launch: Launch | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [..., K] of at most MAX_ROWS rows, weight [N, K] ->
    [..., N] in x's dtype, in one kernel: each split of K writes a float32 partial product, and the
    last split of each column tile to finish sums them (in split order), adds the bias and casts.
    `counters`: `counters_for(N, device)`, kept by the caller (made here if None)."""
    flat = _checked(x, weight, "linear", bias)
    columns = weight.shape[0]
    launch = launch or default_launch(columns, flat.shape[1])
    if counters is None:
        counters = counters_for(columns, x.device)
    out = torch.empty(flat.shape[0], columns, dtype=x.dtype, device=x.device)
    _launch(flat, weight, bias, out, columns, launch, gated=False, counters=counters)
    return out.reshape(*x.shape[:-1], columns)


def gated(x: torch.Tensor, stacked: torch.Tensor, launch: Launch | None = None) -> torch.Tensor:
    """silu(x @ Wg^T) * (x @ Wu^T) for x [..., K] of at most MAX_ROWS rows and stacked = [Wg; Wu]
    [2I, K] (the MLP's stacked weight, `fusion.py`) -> [..., I] in x's dtype, in one kernel."""
    flat = _checked(x, stacked, "gated")
    if stacked.shape[0] % 2:
        raise ValueError(f"few_rows.gated needs the gate and up rows stacked, an even number; got {stacked.shape[0]}.")
    columns = stacked.shape[0] // 2
    launch = launch or default_launch(columns, flat.shape[1], gated=True)
    if launch.splits != 1:
        raise ValueError(f"few_rows.gated applies the SiLU inside its kernel, so its inner axis is not split; got {launch}.")
    out = torch.empty(flat.shape[0], columns, dtype=x.dtype, device=x.device)
    _launch(flat, stacked, None, out, columns, launch, gated=True, counters=None)
    return out.reshape(*x.shape[:-1], columns)


def reference_gated(x: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """What `gated` computes, in torch operations (the MLP's own order: two products, SiLU, product)."""
    gate, up = F.linear(x, stacked).chunk(2, dim=-1)
    return F.silu(gate) * up
