"""Weights on their way to the L2 cache before the kernels that read them start.

A 0.5B draft's pass multiplies one to a few rows by each projection of 24 decoder layers. Each
product reads 1.6 to 17 MB and does almost no arithmetic, yet on an H100 it takes two to five
times the weight's bytes over the card's bandwidth (notebook 05, sections 13 and 18): a kernel
this short spends most of its life waiting for its first bytes, and the next kernel asks for its
own only once this one has ended. Nothing overlaps.

Here one small kernel per decoder layer, launched at the layer's start, asks the memory system to
bring the weights that the layer reads later (and the next layer's first product) into L2:

    layer L:  prefetch(o_L, gate_up_L, down_L, qkv_{L+1})  norm  qkv_L  attention  o_L  ...  down_L

Hopper's `cp.async.bulk.prefetch.L2` takes an address and a byte count and returns at once (no
barrier tracks it), so the prefetch kernel ends in a few microseconds while the copies go on behind
the layer's first kernels, and the products then find their weights in L2. The bytes still come
from memory, but while other kernels run instead of one after another. A layer's prefetch (about
30 MB for the 0.5B) fits in an H100's 50 MB of L2.

Every weight is split into chunks of `CHUNK_BYTES`; a table per layer holds the chunks' addresses
and sizes (`chunk_table`), made once from the weights where they lie (remade when they move: the
fast path makes its engine anew when the weights' storage changes). Prefetching is a hint: it
changes no value, only when bytes arrive, so the tokens cannot change. It runs on CUDA cards of
compute capability 9.0 or newer (`available`), in a draft fused by `fusion.py` where
$SPECVLM_L2_PREFETCH=1 (`attach`).
"""

from __future__ import annotations

import torch
from torch import nn

from .flash_decode import triton

if triton is not None:
    import triton.language as tl

CHUNK_BYTES = 16384  # bytes per prefetch instruction (a multiple of 16, the instruction's unit)
LANES = 32  # chunks per program: one warp, one instruction each


def available(device: torch.device) -> bool:
    """Whether `prefetch` runs on `device`: Triton is importable and it is a CUDA card of compute
    capability 9.0 or newer (Hopper's bulk prefetch instruction). Triton's interpreter cannot run it."""
    device = torch.device(device)
    return (triton is not None and device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (9, 0))


def chunk_table(tensors: list[torch.Tensor], chunk: int = CHUNK_BYTES) -> torch.Tensor:
    """The int64 table [n, 2] of (address, bytes) pairs, one per chunk of `chunk` bytes, that covers
    each tensor's bytes exactly (its last chunk shorter), on the first tensor's device. Every tensor
    must be contiguous; a length that is not a multiple of 16 bytes leaves its last few bytes out
    (the instruction moves multiples of 16; the product reads them itself)."""
    if chunk <= 0 or chunk % 16:
        raise ValueError(f"a prefetch chunk is a positive multiple of 16 bytes, got {chunk}.")
    if not tensors:
        raise ValueError("chunk_table needs at least one tensor to prefetch.")
    rows = []
    for tensor in tensors:
        if not tensor.is_contiguous():
            raise ValueError(f"a prefetched tensor must be contiguous (its bytes one range), got shape "
                             f"{tuple(tensor.shape)} with strides {tensor.stride()}.")
        if tensor.device != tensors[0].device:
            raise ValueError(f"prefetched tensors must share a device, got {tensor.device} and {tensors[0].device}.")
        start, length = tensor.data_ptr(), tensor.numel() * tensor.element_size() // 16 * 16
        rows += [(start + offset, min(chunk, length - offset)) for offset in range(0, length, chunk)]
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
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 1; }",
            "=r,l,r", [address, size], dtype=tl.int32, is_pure=True, pack=1)
        # reading `after` (the layer's input) orders this kernel after the kernel that wrote it
        after = tl.load(after_ptr).to(tl.float32)
        tl.atomic_max(token_ptr, tl.sum(issued) + (after != after).to(tl.int32))


def prefetch(table: torch.Tensor, after: torch.Tensor, token: torch.Tensor) -> None:
    """Ask for every chunk of `table` (`chunk_table`) in L2, once `after` has been written (the
    kernel reads its first element, which orders it after `after`'s producer on the stream and in a
    compiled graph). `token`: an int32 tensor of one element that every program raises to the number
    of chunks it issued (an atomic max), so that neither Triton's compiler nor inductor drops the
    work. Returns at once; the copies go on in the background."""
    programs = -(-table.shape[0] // LANES)
    _prefetch_kernel[(programs,)](table, table.shape[0], after, token, LANES=LANES)


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
    """Forward pre-hook of a decoder layer: prefetch its `l2_table` once its input exists."""
    prefetch(layer.l2_table, args[0] if args else kwargs["hidden_states"], layer.l2_token)


def attach(layers: list[nn.Module]) -> None:
    """Give every decoder layer of `layers` (a language model's, in order) a prefetch at its start of
    `layer_weights(layer)` and the next layer's `first_weights`. Idempotent: a layer's table is rebuilt
    only when those weights lie elsewhere, and then in place where its size allows, since a captured
    CUDA graph keeps reading the buffer it was captured with. Call it after `fusion.fuse_projections`,
    whose stacked weights it reads."""
    if not layers or not available(layers[0].self_attn.o_proj.weight.device):
        raise ValueError("SPECVLM_L2_PREFETCH=1 needs Triton and a CUDA card of compute capability 9.0 or newer "
                         "(Hopper's bulk prefetch); unset it or set it to 0 elsewhere.")
    for index, layer in enumerate(layers):
        tensors = layer_weights(layer) + (first_weights(layers[index + 1]) if index + 1 < len(layers) else [])
        where = tuple((t.data_ptr(), t.numel() * t.element_size()) for t in tensors)
        if getattr(layer, "_l2_where", None) != where:
            table = chunk_table(tensors)
            old = getattr(layer, "l2_table", None)
            if old is not None and old.shape == table.shape and old.device == table.device:
                old.copy_(table)
            else:
                layer.register_buffer("l2_table", table, persistent=False)
            layer._l2_where = where
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
    return changed
