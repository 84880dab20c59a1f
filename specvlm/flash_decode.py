"""Flash-decoding in Triton: attention for a short step on a static cache, split over the key axis.

A draft step of q tokens (q = 1 for a chain, a tree level's width, the catch-up feed) reads a
cache of a few thousand slots. Its attention is a small amount of work spread thin: the
`grouped_attention` of `step_attention.py` launches three kernels per layer (scores, softmax,
values) and FlexAttention's decode kernel about eight (padding, its reductions, layout copies);
on a 0.5B draft either costs ten to fourteen microseconds a layer for a cache whose bytes take
half a microsecond. Here it is two kernels:

1. `_flash_decode_partials`, one program per (row block, KV head, split of the cache): the G query
   heads that share the KV head are stacked as G*q rows (each key is read once per block of at
   most MAX_BLOCK_R rows), and the program runs the online softmax over its split's visible
   slots, writing a float32 partial output and the log-sum-exp of its scores per row. A one-token
   step has one row block; a 16-token step of a 7B (7 query heads per KV head) has two, whose
   programs run side by side and share the split's keys through the L2 cache. The kernel takes
   wider steps too, but the fast path gives it only short ones: for a 7B's 26-node verification
   on 12k slots it was slower than `split_attention` with every launch timed (`default_launch`;
   the comment after `step_attention.FLEX_MIN_SLOTS`);
2. `_flash_decode_merge`, one program per (KV head, row): its partial outputs, all splits at once, weighted by
   their share of the whole softmax's denominator (through the log-sum-exps), written straight
   into the layout the output projection reads, [1, q, Hq, d].

Visibility is `step_attention.visibility_bias`'s rule, evaluated inside the kernel from `start`
(a 0-d tensor: the committed slots every row sees) and the [q, S] bool `pattern` of the step's own
slots, so nothing is built over the whole capacity and the shapes never depend on `start`: one
CUDA graph serves every step of the same shape. Programs whose split lies past the visible slots
end at once.

Needs Triton (it comes with CUDA builds of torch). On a CPU the kernels run in Triton's
interpreter when $TRITON_INTERPRET=1 is set before this module is imported (the tests do); the
fast path gives them CUDA steps only (`available`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a build of torch without Triton: `available` says no
    triton = None

BLOCK_N = 64  # slots per tile of the inner loop (a multiple of 16, as tl.dot needs)
MAX_BLOCK_R = 64  # most stacked rows per program: a wider step (a verification) takes several row blocks
TARGET_PROGRAMS = 256  # programs (KV heads x splits) to aim for: two per SM of an H100; each further row block adds as many
MAX_SPLITS = 64  # the merge reads every split of a row at once


# Triton decides when a kernel is defined, so this is read once, at import
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fast path may use `flash_decode` for a model of `dtype` on `device`: Triton is
    importable, and either the device is a CUDA card of compute capability 8.0+ (where Triton's
    bfloat16 dot runs) and the dtype half precision (a float32 dot would run in TF32 there, less
    exact than the other kernels), or the device is a CPU, Triton's interpreter is on and the
    dtype float32 (for tests: slow, exact; the interpreter multiplies bfloat16 as raw integers)."""
    device = torch.device(device)
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0) and dtype in (torch.float16, torch.bfloat16)
    return device.type == "cpu" and INTERPRETED and dtype == torch.float32


def refusal(devices, dtype: torch.dtype, what: str = "this run") -> str | None:
    """Why attention "flash" cannot run for `what` (e.g. "the draft") whose layers lie on `devices`
    in `dtype` (`available`'s rule), or None where it can: the one message the command line and the
    fast path give. It names only the devices where the kernel cannot run."""
    if triton is None:
        return "'flash' needs Triton, which is not installed; use 'flex' or 'grouped'"
    failing = sorted({str(torch.device(device)) for device in devices if not available(device, dtype)})
    if not failing:
        return None
    return (f"'flash' runs a Triton kernel in half precision on a CUDA card of compute capability 8.0 or newer (on a "
            f"CPU only in float32, in Triton's interpreter: TRITON_INTERPRET=1 set before importing specvlm), and "
            f"{what} is {str(dtype).removeprefix('torch.')} on {', '.join(failing)}; use 'flex' or 'grouped'")


def split_size(capacity: int, kv_heads: int, block: int = BLOCK_N, programs: int = TARGET_PROGRAMS) -> int:
    """Slots per split: about `programs` programs over the KV heads, at most MAX_SPLITS splits,
    a whole number of tiles. split_size(1792, 2) -> 64 (28 splits of one tile);
    split_size(12416, 4) -> 256 (49 splits of four tiles)."""
    splits = min(MAX_SPLITS, max(1, programs // kv_heads))
    wanted = -(-capacity // splits)
    return -(-wanted // block) * block


def dashed_numbers(text: str) -> list[int]:
    """'64-256-64-8' -> [64, 256, 64, 8]; [] where a part is not a whole number (a launch's text)."""
    try:
        return [int(part) for part in text.split("-")]
    except ValueError:
        return []


@dataclass(frozen=True)
class Launch:
    """How `flash_decode` cuts its work: `block_rows` stacked rows per program (a power of two, at
    least 16), `programs` programs per row block to aim for (KV heads x splits; sets the split
    size), `block_n` slots per tile (a multiple of 16), Triton's `num_warps` (a power of two) and
    `num_stages` (None: Triton's default). Any launch gives the same attention up to float
    rounding; one whose tiles do not fit in the card's shared memory fails to build."""

    block_rows: int
    programs: int = TARGET_PROGRAMS
    block_n: int = BLOCK_N
    num_warps: int = 4
    num_stages: int | None = None

    def __post_init__(self):
        power_of_two = lambda n: n > 0 and n & (n - 1) == 0
        problems = [what for what, bad in (
            ("rows a power of two of at least 16", not (self.block_rows >= 16 and power_of_two(self.block_rows))),
            ("programs at least 1", self.programs < 1),
            ("a tile a positive multiple of 16", self.block_n < 16 or self.block_n % 16),
            ("warps a power of two", not power_of_two(self.num_warps)),
            ("stages at least 1", self.num_stages is not None and self.num_stages < 1)) if bad]
        if problems:
            raise ValueError(f"a flash launch needs {', '.join(problems)}; got {self}")

    @classmethod
    def parse(cls, text: str) -> Launch:
        """'64-256-64-8-2' -> Launch(64, 256, 64, 8, 2): rows-programs-tile-warps[-stages]."""
        numbers = dashed_numbers(text)
        if len(numbers) not in (4, 5):
            raise ValueError(f"a flash launch is rows-programs-tile-warps[-stages] in whole numbers, got {text!r}")
        return cls(*numbers)

    @property
    def name(self) -> str:
        tail = "" if self.num_stages is None else f"-{self.num_stages}"
        return f"{self.block_rows}-{self.programs}-{self.block_n}-{self.num_warps}{tail}"


def default_launch(rows: int, dim: int) -> Launch:
    """The launch `flash_decode` takes for `rows` stacked rows (query heads per KV head x step
    width) of head size `dim`: blocks of up to MAX_BLOCK_R rows, TARGET_PROGRAMS programs each,
    tiles of BLOCK_N slots. The fast path gives it short steps only. For a 7B's 26-node tree
    verification (182 rows, 12k slots) a sweep on the H100 found 64-32-128-8 faster than this
    launch, yet slower than `split_attention` (notebook 05, section 13); its wide tiles would not
    fit in the shared memory of smaller cards, so it is not the default."""
    block_rows = min(MAX_BLOCK_R, max(16, 1 << (rows - 1).bit_length()))
    return Launch(block_rows, num_warps=8 if block_rows * dim > 64 * 64 else 4)


if triton is not None:

    @triton.jit
    def _flash_decode_partials(q_ptr, k_ptr, v_ptr, pattern_ptr, start_ptr, out_ptr, lse_ptr,
                               stride_qh, stride_qs, stride_kh, stride_ks, stride_vh, stride_vs, capacity,
                               SCALE: tl.constexpr, ROWS: tl.constexpr, STEP: tl.constexpr, GROUPS: tl.constexpr,
                               WIDTH: tl.constexpr,
                               SPLIT: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, PADDED: tl.constexpr,
                               BLOCK_N: tl.constexpr, DIM: tl.constexpr):
        block = tl.program_id(0)  # the row blocks of one split run side by side: they share its keys in L2
        head = tl.program_id(1)
        split = tl.program_id(2)
        start = tl.load(start_ptr)
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)  # row r: query head head*GROUPS + r // STEP, step row r % STEP
        dims = tl.arange(0, DIM)
        real = rows < ROWS
        where_q = (head * GROUPS + rows // STEP)[:, None] * stride_qh + (rows % STEP)[:, None] * stride_qs
        query = tl.load(q_ptr + where_q + dims[None, :], mask=real[:, None], other=0.0)
        top = tl.full([BLOCK_R], float("-inf"), tl.float32)  # running max of the scores
        total = tl.zeros([BLOCK_R], tl.float32)  # running sum of exp(score - top)
        acc = tl.zeros([BLOCK_R, DIM], tl.float32)
        first = split * SPLIT
        end = tl.minimum(tl.minimum(first + SPLIT, start + WIDTH), capacity)
        for lo in range(first, end, BLOCK_N):
            cols = lo + tl.arange(0, BLOCK_N)
            inside = cols < end
            keys = tl.load(k_ptr + head * stride_kh + cols[:, None] * stride_ks + dims[None, :],
                           mask=inside[:, None], other=0.0)
            scores = tl.dot(query, tl.trans(keys)) * SCALE  # [BLOCK_R, BLOCK_N] float32
            own = cols - start  # the step's own slots: 0 <= own < WIDTH
            mine = inside & (own >= 0)
            seen = tl.load(pattern_ptr + (rows % STEP)[:, None] * WIDTH + own[None, :],
                           mask=real[:, None] & mine[None, :], other=0)
            visible = (inside & (cols < start))[None, :] | (seen != 0)
            scores = tl.where(visible, scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            base = tl.where(new_top == float("-inf"), 0.0, new_top)  # a row that has seen nothing yet
            probs = tl.exp(scores - base[:, None])
            rescale = tl.exp(top - base)
            total = total * rescale + tl.sum(probs, 1)
            values = tl.load(v_ptr + head * stride_vh + cols[:, None] * stride_vs + dims[None, :],
                             mask=inside[:, None], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(probs.to(values.dtype), values)
            top = new_top
        seen_any = total > 0
        lse = tl.where(seen_any, top + tl.log(tl.where(seen_any, total, 1.0)), float("-inf"))
        where = (head * SPLITS + split) * PADDED + rows
        tl.store(lse_ptr + where, lse)
        tl.store(out_ptr + where[:, None] * DIM + dims[None, :], acc / tl.where(seen_any, total, 1.0)[:, None])

    @triton.jit
    def _flash_decode_merge(part_ptr, lse_ptr, out_ptr, stride_os, stride_oh,
                            STEP: tl.constexpr, GROUPS: tl.constexpr, SPLITS: tl.constexpr,
                            BLOCK_S: tl.constexpr, PADDED: tl.constexpr, DIM: tl.constexpr):
        head = tl.program_id(0)
        row = tl.program_id(1)  # query head head*GROUPS + row // STEP, step row row % STEP
        splits = tl.arange(0, BLOCK_S)
        dims = tl.arange(0, DIM)
        where = (head * SPLITS + splits) * PADDED + row  # [BLOCK_S]: this row in every split
        lse = tl.load(lse_ptr + where, mask=splits < SPLITS, other=float("-inf"))
        top = tl.max(lse, 0)
        weight = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))  # 0 for splits the row saw nothing of
        partial = tl.load(part_ptr + where[:, None] * DIM + dims[None, :], mask=(splits < SPLITS)[:, None], other=0.0)
        out = tl.sum(weight[:, None] * partial, 0) / tl.maximum(tl.sum(weight, 0), 1e-30)
        target = (row % STEP) * stride_os + (head * GROUPS + row // STEP) * stride_oh + dims
        tl.store(out_ptr + target, out.to(out_ptr.dtype.element_ty))


def flash_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, start: torch.Tensor,
                 pattern: torch.Tensor, scale: float, launch: Launch | None = None) -> torch.Tensor:
    """Attention of a q-token step to a static cache, as `visibility_bias(start, pattern)` masks it.

    query [1, Hq, q, d], key/value [1, Hkv, K, d] (any strides with a contiguous last axis);
    start: 0-d long tensor (slots before it are committed: every row sees them); pattern [q, S]
    bool (row r sees slot start + j if pattern[r, j]) -> [1, q, Hq, d] in value's dtype (the layout
    the output projection reads). Every row must see at least one slot. d must be a power of two
    of at least 16; Hq a multiple of Hkv. `launch`: how to cut the work (default `default_launch`)."""
    batch, heads, q, dim = query.shape
    kv_heads, capacity = key.shape[1], key.shape[2]
    if batch != 1:
        raise ValueError(f"flash_decode serves one sequence (the fast path's), got a batch of {batch}.")
    if triton is None:
        raise RuntimeError("flash_decode needs Triton (it comes with CUDA builds of torch).")
    if heads % kv_heads or dim < 16 or dim & (dim - 1) or value.shape[-1] != dim:
        raise ValueError(f"flash_decode needs query heads in whole groups per KV head and one head size, a power of "
                         f"two of at least 16, for keys and values; got {heads} query and {kv_heads} KV heads, key "
                         f"size {dim}, value size {value.shape[-1]}. Use attention 'flex' or 'grouped'.")
    groups, rows = heads // kv_heads, heads // kv_heads * q
    launch = launch or default_launch(rows, dim)
    block_rows = launch.block_rows
    blocks = -(-rows // block_rows)
    split = split_size(capacity, kv_heads, launch.block_n, launch.programs)
    splits = -(-capacity // split)
    partial = torch.empty(kv_heads, splits, blocks * block_rows, dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(kv_heads, splits, blocks * block_rows, dtype=torch.float32, device=query.device)
    out = torch.empty(1, q, heads, dim, dtype=value.dtype, device=query.device)
    _flash_decode_partials[(blocks, kv_heads, splits)](
        query, key, value, pattern.contiguous(), start, partial, lse, query.stride(1), query.stride(2),
        key.stride(1), key.stride(2), value.stride(1), value.stride(2), capacity,
        SCALE=scale, ROWS=rows, STEP=q, GROUPS=groups, WIDTH=pattern.shape[1], SPLIT=split, SPLITS=splits,
        BLOCK_R=block_rows, PADDED=blocks * block_rows, BLOCK_N=launch.block_n, DIM=dim,
        num_warps=launch.num_warps, **({} if launch.num_stages is None else {"num_stages": launch.num_stages}))
    _flash_decode_merge[(kv_heads, rows)](partial, lse, out, out.stride(1), out.stride(2), STEP=q, GROUPS=groups,
                                          SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits),
                                          PADDED=blocks * block_rows, DIM=dim)
    return out
