"""Top-k of a few rows of logits in two Triton kernels: a tree level's picks, in microseconds.

A tree round's draft picks each level's tokens from its logits: the k most likely tokens of each
of 1 to 16 rows over the whole vocabulary (152k for Qwen2), k at most a handful
(`fast.pick_level`). `torch.topk` does it with a radix select of several kernels, 52 to 71 us a
call on the H100 for 1 to 8 rows (notebook 05, section 18); a round picks five levels. The work
itself is one read of the logits, 5 MB for 8 rows: under two microseconds. Here it is two kernels:

1. `_chunk_top_k`, one program per (row, chunk of BLOCK columns): the chunk's k best, by k rounds
   of "the largest value; the smallest column holding it; take that column out", written as k
   (value, column) candidates. A chunk of fewer than k columns (the last) fills its rest with
   (-inf, NONE);
2. `_merge_top_k`, one program per row: the same k rounds over the row's chunks x k candidates
   (padded to a power of two), writing the k columns, or `ids[column]` where a draft vocabulary
   maps the columns of a cut output layer back to token ids (`draft_vocab.py`).

Order: by value, descending; equal values by the lowest column first, so the result is
deterministic (`torch.topk` leaves the order of ties unspecified). Both kernels rank by the same
total order, (value descending, column ascending), so every member of a row's top k is in its own
chunk's top k (fewer than k columns of the row beat it, so fewer than k of its chunk do): the
merge sees it, and the lowest column wins a tie across chunks too. Values are compared in
float32 (half-precision inputs convert exactly). A NaN ranks as -inf, below every number: the
picks stay real columns without a check on the host. The merge leaves the fillers out: since
k <= V, a row's chunks hold at least k real candidates between them.

Shapes never depend on the values and nothing waits for the device, so the kernels may run in a
captured CUDA graph. Needs Triton; on a CPU the kernels run in Triton's interpreter when
$TRITON_INTERPRET=1 is set before import (the tests do), as `flash_decode.py`'s do.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a build of torch without Triton: `available` says no
    triton = None

BLOCK = 2048  # columns per program of the first kernel: 75 chunks of a 152k vocabulary
NUM_WARPS = 4
MAX_K = 16  # the most picks per row: each is a round of two reductions in both kernels
MAX_CANDIDATES = 8192  # the most (chunks x k) one program of the merge holds: 152k columns at k=16 make 1,200
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Triton decides when a kernel is defined, so this is read once, at import
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether `top_k_indices` runs for logits of `dtype` (one of DTYPES) on `device`: Triton is
    importable and the device is a CUDA card of compute capability 8.0+ (Triton's bfloat16), or a
    CPU with Triton's interpreter on (for tests)."""
    device = torch.device(device)
    if triton is None or dtype not in DTYPES:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and INTERPRETED


if triton is not None:
    NONE = tl.constexpr(2**31 - 1)  # the column of a chunk's filler candidates: past every real one

    @triton.jit
    def _chunk_top_k(x_ptr, value_ptr, column_ptr, columns, stride, K: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        alive = cols < columns
        x = tl.load(x_ptr + row.to(tl.int64) * stride + cols, mask=alive, other=float("-inf")).to(tl.float32)
        x = tl.where(x == x, x, float("-inf"))  # NaN
        out = (row * tl.num_programs(1) + chunk) * K
        for i in tl.static_range(K):
            best = tl.max(tl.where(alive, x, float("-inf")), 0)
            column = tl.min(tl.where(alive & (x == best), cols, NONE), 0)  # NONE once the chunk is used up
            tl.store(value_ptr + out + i, best)
            tl.store(column_ptr + out + i, column)
            alive &= cols != column

    @triton.jit
    def _merge_top_k(value_ptr, column_ptr, ids_ptr, out_ptr, columns, CANDIDATES: tl.constexpr, K: tl.constexpr,
                     BLOCK_C: tl.constexpr, HAS_IDS: tl.constexpr):
        row = tl.program_id(0)
        slots = tl.arange(0, BLOCK_C)
        inside = slots < CANDIDATES
        value = tl.load(value_ptr + row * CANDIDATES + slots, mask=inside, other=float("-inf"))
        column = tl.load(column_ptr + row * CANDIDATES + slots, mask=inside, other=NONE)
        alive = column < columns  # the fillers never count: the row has at least K real candidates
        for i in tl.static_range(K):
            best = tl.max(tl.where(alive, value, float("-inf")), 0)
            pick = tl.min(tl.where(alive & (value == best), column, NONE), 0)
            alive &= column != pick
            if HAS_IDS:
                tl.store(out_ptr + row * K + i, tl.load(ids_ptr + pick))
            else:
                tl.store(out_ptr + row * K + i, pick.to(tl.int64))


def fits(columns: int, k: int, block: int = BLOCK) -> bool:
    """Whether `top_k_indices` takes k picks from rows of `columns` values with `block`:
    1 <= k <= min(MAX_K, columns), and the merge's candidates (chunks x k) at most MAX_CANDIDATES;
    `block` as `top_k_indices` takes it (a power of two, at least 16).
    fits(151_936, 16) -> True (75 chunks x 16 = 1,200); fits(2_000_000, 16) -> False."""
    return 1 <= k <= min(MAX_K, columns) and -(-columns // block) * k <= MAX_CANDIDATES


def top_k_indices(logits: torch.Tensor, k: int, ids: torch.Tensor | None = None, block: int = BLOCK) -> torch.Tensor:
    """The columns of each row's k largest values, largest first, equal values lowest column first:
    logits [rows, V] (float32, bfloat16 or float16), 1 <= k <= min(MAX_K, V) -> long [rows, k];
    with `ids` (long [V], on logits' device) ids[column] instead.
    top_k_indices(tensor([[1., 3., 3., 0.]]), 2) -> [[1, 2]]; with ids=tensor([5, 6, 7, 8]) -> [[6, 7]].
    `block`: columns per program of the first kernel (a power of two, at least 16)."""
    if triton is None:
        raise RuntimeError("top_k needs Triton (it comes with CUDA builds of torch).")
    if logits.dim() != 2 or 0 in logits.shape:
        raise ValueError(f"top_k_indices takes logits [rows, V] with rows and V at least 1, got {tuple(logits.shape)}.")
    rows, columns = logits.shape
    if logits.dtype not in DTYPES:
        raise ValueError(f"top_k_indices takes logits in one of {DTYPES}, got {logits.dtype}.")
    if not 1 <= k <= min(MAX_K, columns):
        raise ValueError(f"top_k_indices picks 1 to min(MAX_K={MAX_K}, V={columns}) per row, got k={k}; "
                         "use torch.topk for more.")
    if ids is not None and (ids.shape != (columns,) or ids.dtype != torch.long or ids.device != logits.device):
        raise ValueError(f"top_k_indices maps columns through ids, a long tensor [{columns}] on {logits.device}; "
                         f"got {ids.dtype} {tuple(ids.shape)} on {ids.device}.")
    if block < 16 or block & (block - 1):
        raise ValueError(f"top_k_indices needs a block of a power of two of at least 16 columns, got {block}.")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunks = -(-columns // block)
    if chunks * k > MAX_CANDIDATES:
        raise ValueError(f"top_k_indices merges at most {MAX_CANDIDATES} candidates per row, and {chunks} chunks of "
                         f"{block} columns x k={k} make {chunks * k}: take a larger block.")
    values = torch.empty(rows, chunks * k, dtype=torch.float32, device=logits.device)
    picked = torch.empty(rows, chunks * k, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, k, dtype=torch.long, device=logits.device)
    with torch.cuda.device(logits.device) if logits.device.type == "cuda" else contextlib.nullcontext():
        # Triton launches on the current device: a draft on another card than the target's
        _chunk_top_k[(rows, chunks)](logits, values, picked, columns, logits.stride(0), K=k, BLOCK=block,
                                     num_warps=NUM_WARPS)
        _merge_top_k[(rows,)](values, picked, out if ids is None else ids.contiguous(), out, columns,
                              CANDIDATES=chunks * k, K=k, BLOCK_C=triton.next_power_of_2(chunks * k),
                              HAS_IDS=ids is not None, num_warps=NUM_WARPS)
    return out
