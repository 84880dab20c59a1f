"""Weights on their way to the L2 cache before the kernels that read them start.

A 0.5B draft's pass multiplies one to a few rows by each projection of its decoder layers. Each
product reads a few MB and does almost no arithmetic, yet on an H100 most of them took several times
the weight's bytes over the card's bandwidth (notebook 05, sections 18 and 23 print the ratios). The
reason this module tested: a kernel this short waits for its first bytes, and the next kernel asks
for its own only once this one has ended.

Here one small kernel per decoder layer, launched at the layer's start, asks the memory system to
bring the weights that the layer reads later (and the next layer's first product) into L2:

    layer L:  prefetch(o_L, gate_up_L, down_L, qkv_{L+1})  norm  qkv_L  attention  o_L  ...  down_L

Hopper's `cp.async.bulk.prefetch.L2` takes an address and a byte count and returns without waiting
(no barrier tracks it), so the prefetch kernel can end while the copies go on behind the layer's
first kernels, and the products may then find their weights in L2. The bytes still come from
memory; the hope is that they come while other kernels run instead of one product after another.
A layer's prefetch for the 0.5B (section 23 prints its size) is less than an H100's L2 holds, but L2
keeps no promise: the instruction is a hint.

Measured on H100s (notebook 05, section 23; `benchmarks/l2_prefetch.py`), it did not pay: a stand-in
one-row pass got slower by about the prefetch kernels' own time; the same pass with every weight
already in L2 was no faster in one call and a little faster in the other; and the widened pair's
eight clips ran as they did without it (one run, one card). Most of the products' time is a fixed
cost as kernels, which weights already in L2 hardly shorten. So it stays off by default, kept as
the experiment that showed this.

Every weight is split into chunks of `CHUNK_BYTES`; a table per layer holds the chunks' addresses
and sizes (`chunk_table`), made from the weights where they lie and rewritten in place when they
move (`attach`; a captured CUDA graph keeps reading the same buffer); `fusion.unfuse_projections`
takes the prefetches off again. Prefetching is a hint: it
changes no value, only when bytes arrive, so the tokens cannot change. It runs on CUDA cards of
compute capability 9.0 or newer (`available`), in a draft fused by `fusion.py`, on one device,
where $SPECVLM_L2_PREFETCH=1 (`fast.static_lm` calls `attach`).
"""

from __future__ import annotations

import torch
from torch import nn

from .flash_decode import triton

if triton is not None:
    import triton.language as tl

CHUNK_BYTES = 16384  # bytes per prefetch instruction (a multiple of 16, the instruction's unit)
MAX_CHUNK_BYTES = 2**20 - 16  # the instruction's size field counts 16-byte units in 16 bits
LANES = 32  # chunks per program: one warp (`num_warps=1`), each lane's chunk issued once


def available(device: torch.device) -> bool:
    """Whether `prefetch` runs on `device`: Triton is importable and it is a CUDA card of compute
    capability 9.0 or newer (Hopper's bulk prefetch instruction). Triton's interpreter cannot run it."""
    device = torch.device(device)
    return (triton is not None and device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (9, 0))


def chunk_table(tensors: list[torch.Tensor], chunk: int = CHUNK_BYTES) -> torch.Tensor:
    """The int64 table [n, 2] of (address, bytes) pairs, one per chunk of at most `chunk` bytes, on the
    first tensor's device. The instruction reads whole 16-byte units from 16-byte aligned addresses,
    so each tensor's range is shrunk to the aligned units inside it (its first and last few bytes may
    be left out: the products read them themselves) and never reaches past it. Every tensor must be
    contiguous."""
    if chunk <= 0 or chunk % 16 or chunk > MAX_CHUNK_BYTES:
        raise ValueError(f"a prefetch chunk is a multiple of 16 bytes from 16 to {MAX_CHUNK_BYTES:,} (the "
                         f"instruction's size field), got {chunk}.")
    if not tensors:
        raise ValueError("chunk_table needs at least one tensor to prefetch.")
    rows = []
    for tensor in tensors:
        if not tensor.is_contiguous():
            raise ValueError(f"a prefetched tensor must be contiguous (its bytes one range), got shape "
                             f"{tuple(tensor.shape)} with strides {tensor.stride()}.")
        if tensor.device != tensors[0].device:
            raise ValueError(f"prefetched tensors must share a device, got {tensor.device} and {tensors[0].device}.")
        start = -(-tensor.data_ptr() // 16) * 16
        end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // 16 * 16
        rows += [(offset, min(chunk, end - offset)) for offset in range(start, end, chunk)]
    return torch.tensor(rows, dtype=torch.int64, device=tensors[0].device).reshape(-1, 2)


if triton is not None:

    @triton.jit
    def _prefetch_kernel(table_ptr, count, after_ptr, token_ptr, LANES: tl.constexpr):
        lane = tl.program_id(0) * LANES + tl.arange(0, LANES)
        inside = lane < count
        address = tl.load(table_ptr + 2 * lane, mask=inside, other=0)
        size = tl.load(table_ptr + 2 * lane + 1, mask=inside, other=0).to(tl.int32)
        # "pure" for torch.compile's analysis of what the kernel writes (an impure asm makes it assume
        # every argument written, and copy them); its result feeds the atomic below, so it stays
        issued = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; selp.u32 $0, 1, 0, p; }",
            "=r,l,r", [address, size], dtype=tl.int32, is_pure=True, pack=1)
        # reading `after` (the layer's input) orders this kernel after the kernel that wrote it
        after = tl.load(after_ptr).to(tl.float32)
        tl.atomic_max(token_ptr, tl.sum(issued) + (after != after).to(tl.int32), sem="relaxed")


def prefetch(table: torch.Tensor, after: torch.Tensor, token: torch.Tensor) -> None:
    """Ask for every chunk of `table` (`chunk_table`) in L2, once `after` has been written (the
    kernel reads its first element, which orders it after `after`'s producer on the stream and in a
    compiled graph). `token`: an int32 tensor of one element that every program raises to the number
    of chunks it issued (an atomic max), so that neither Triton's compiler nor inductor drops the
    work. Returns at once; the copies go on in the background."""
    programs = -(-table.shape[0] // LANES)
    _prefetch_kernel[(programs,)](table, table.shape[0], after, token, LANES=LANES, num_warps=1)


def layer_weights(layer: nn.Module) -> list[torch.Tensor]:
    """A decoder layer's weights after its first product, in the order it reads them: the attention's
    output projection, the MLP's stacked gate/up (`fusion.py`; else gate and up) and down."""
    attention, mlp = layer.self_attn, layer.mlp
    stacked = getattr(mlp, "fused_weight", None)
    inner = [stacked] if stacked is not None else [mlp.gate_proj.weight, mlp.up_proj.weight]
    return [attention.o_proj.weight, *inner, mlp.down_proj.weight]


def first_weights(layer: nn.Module) -> list[torch.Tensor]:
    """What a decoder layer reads first: the attention's stacked q/k/v (`fusion.py`), else q, k and v."""
    attention = layer.self_attn
    stacked = getattr(attention, "fused_weight", None)
    if stacked is not None:
        return [stacked]
    return [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]


def prefetch_hook(layer: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a decoder layer: prefetch its `l2_table` once its input exists. Run
    eagerly, it first checks that the weights still lie where the table says (a `.to()` since
    `attach` moves them; the fast path attaches again before it compiles or captures a step) and
    skips the prefetch where they do not."""
    if not torch.compiler.is_compiling() and _where(layer, layer._l2_next) != layer._l2_where:
        return
    prefetch(layer.l2_table, args[0] if args else kwargs["hidden_states"], layer.l2_token)


def _prefetched(layer: nn.Module, following: nn.Module | None) -> list[torch.Tensor]:
    """What `layer`'s prefetch asks for: its later weights and `following`'s first (None: the last layer)."""
    return layer_weights(layer) + (first_weights(following) if following is not None else [])


def _where(layer: nn.Module, following: nn.Module | None) -> tuple:
    return tuple((t.data_ptr(), t.numel() * t.element_size()) for t in _prefetched(layer, following))


def attach(layers: list[nn.Module]) -> None:
    """Give every decoder layer of `layers` (a language model's, in order) a prefetch at its start of
    `layer_weights(layer)` and the next layer's `first_weights`. Idempotent: a layer's table is rebuilt
    only when those weights lie elsewhere, and then written in place while its size stays (a weight's
    size never changes without `fusion.py` changing the model, after which the fast path makes its
    engine and graphs anew), since a captured CUDA graph keeps reading the buffer it was captured with.
    Call it after `fusion.fuse_projections`, whose stacked weights it reads; `unfuse_projections` detaches."""
    if not layers or not available(layers[0].self_attn.o_proj.weight.device):
        raise ValueError("SPECVLM_L2_PREFETCH=1 needs Triton and a CUDA card of compute capability 9.0 or newer "
                         "(Hopper's bulk prefetch); unset it or set it to 0 elsewhere.")
    for index, layer in enumerate(layers):
        following = layers[index + 1] if index + 1 < len(layers) else None
        where = _where(layer, following)
        if getattr(layer, "_l2_where", None) != where:
            table = chunk_table(_prefetched(layer, following))
            old = getattr(layer, "l2_table", None)
            if old is not None and old.shape == table.shape and old.device == table.device:
                old.copy_(table)
            else:
                layer.register_buffer("l2_table", table, persistent=False)
            layer._l2_where = where
        object.__setattr__(layer, "_l2_next", following)  # not a submodule: a plain reference
        if getattr(layer, "l2_token", None) is None:
            layer.register_buffer("l2_token", torch.zeros(1, dtype=torch.int32, device=layer.l2_table.device),
                                  persistent=False)
        if prefetch_hook not in layer._forward_pre_hooks.values():
            layer.register_forward_pre_hook(prefetch_hook, with_kwargs=True)


def attached(lm) -> bool:
    """Whether any decoder layer of `lm`'s language model (a `VideoLM`) prefetches its weights."""
    return any(prefetch_hook in layer._forward_pre_hooks.values() for layer in lm.language_model.layers)


def detach(layers: list[nn.Module]) -> bool:
    """Undo `attach`. Returns whether any layer had a prefetch."""
    changed = False
    for layer in layers:
        for key in [key for key, hook in layer._forward_pre_hooks.items() if hook is prefetch_hook]:
            del layer._forward_pre_hooks[key]
            layer._forward_pre_hooks_with_kwargs.pop(key, None)
            changed = True
        for name in ("l2_table", "l2_token"):
            layer._buffers.pop(name, None)
        layer.__dict__.pop("_l2_where", None)
        layer.__dict__.pop("_l2_next", None)
    return changed
