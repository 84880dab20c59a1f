"""Fused projections: one matmul where a decoder layer runs several on the same input.

A small draft's decode step is bound by its kernel count, not by the bytes it reads (notebook
05, section 7: the 0.5B step runs about 540 kernels, most of them matrix-vector products far too
small to reach the card's bandwidth). Each attention multiplies its input by three matrices
(q, k, v) and each MLP by two (gate, up). Stacking each group's rows into one matrix gives the
same numbers with one kernel instead of three, and one instead of two:

    [q | k | v] = x @ [Wq; Wk; Wv]^T + [bq; bk; bv]        (one matmul, then three slices)

`fuse_projections(lm)` does this in place for the decoder layers of a `VideoLM`'s language
model, keeping transformers' own forward code:

- the stacked weight (and bias) becomes a buffer of the attention (or MLP) module, and each
  projection's weight becomes a view of its rows in it (no second copy; `state_dict` keeps its
  names and values);
- a forward pre-hook on the module multiplies the module's input by the stacked weight once;
- each projection then receives that product and returns its own columns.

Only the values' rounding can change (a different matmul shape may sum in another order), so the
fast path fuses the *draft* only (`fast.static_lm`): its proposals are checked by the target, so the
output stays the target's own (lossless). A model the fast path has served as a target is never
fused, and one fused as a draft is unfused (`unfuse_projections`) before it serves as a target.

With `few_rows=True` the products of up to `few_rows.MAX_ROWS` rows (a draft's passes) run as
`few_rows.py`'s Triton kernels instead of cuBLAS: the stacked q/k/v product, the output projection,
the gate/up product with the SiLU gate inside (one kernel where there were two: the MLP's forward
becomes `down(silu(gate) * up)` on the stacked weight) and the down projection. Products of more
rows (a prefill) stay `F.linear`. Only the rounding changes, again.

A fused model is for inference: the pre-hook refuses to run in training mode with gradients on, and
no gradient reaches the projections' weights in any mode. `.to()` or `copy.deepcopy` give each
projection its own copy again, and the forward then reads the stacked buffer, not the projections'
weights (a `load_state_dict` after them would not be seen) until `fuse_projections` re-stacks from the
projections' weights (the source of truth) and ties them again; the fast path does so at every call.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation

from . import few_rows as kernels
from . import l2_prefetch

# module attribute -> the projections that read its input, in the stacked order
GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
SILU = (nn.SiLU, SiLUActivation)  # the activations `few_rows.gated` computes (transformers' "silu" is the second)
# module attribute -> the projection that reads the module's inner product (few_rows' kernels take it too)
OUTPUTS = {"self_attn": "o_proj", "mlp": "down_proj"}


def _few(x: torch.Tensor) -> bool:
    """Whether `few_rows`' kernels take this input (1 to MAX_ROWS rows; shapes are static under compile)."""
    return x.shape[-1] > 0 and 0 < x.numel() // x.shape[-1] <= kernels.MAX_ROWS


class FewRowsLinear(nn.Linear):
    """An output projection whose products of a few rows run as `few_rows.linear` (more rows: F.linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _few(x):
            return kernels.linear(x, self.weight, self.bias, counters=self.few_rows_counters)
        return F.linear(x, self.weight, self.bias)


def gated_mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's forward in few-rows mode (its own `forward` for a Qwen2/LLaMA-style MLP with SiLU):
    down(silu(x Wg^T) * (x Wu^T)), the gate/up product and its SiLU in one kernel. (The module's
    `stacked_projection` pre-hook still runs first: it refuses training and passes x through.)"""
    if _few(x):
        return module.down_proj(kernels.gated(x, module.fused_weight))
    return module.down_proj(kernels.reference_gated(x, module.fused_weight))


class FusedColumns(nn.Linear):
    """A projection whose rows live in its module's stacked weight: its module's pre-hook has
    already multiplied the input by that weight, so its forward takes the product [..., total]
    and returns its own columns [..., out_features]. Its `weight` and `bias` stay what they
    were (views of the stacked tensors), so `state_dict` and `save_pretrained` see no change."""

    columns: slice
    stacked_width: int

    def forward(self, stacked_output: torch.Tensor) -> torch.Tensor:
        if stacked_output.shape[-1] != self.stacked_width:
            raise ValueError(f"this projection is fused (fusion.py): it takes its module's stacked product, "
                             f"[..., {self.stacked_width}], not an input of width {stacked_output.shape[-1]}; "
                             "call the attention or MLP module, or unfuse_projections first.")
        return stacked_output[..., self.columns]


def stacked_projection(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: replace the module's input (first positional argument, or
    `hidden_states=`) by its product with the stacked weight."""
    if module.training and torch.is_grad_enabled():
        raise RuntimeError("fused projections are for inference: their gradients would not reach the projections' "
                           "weights. Call fusion.unfuse_projections(lm) before training, or model.eval().")
    if getattr(module, "gated_forward", False):  # few-rows mode: the MLP's own forward multiplies
        return None

    def stacked(x):
        if getattr(module, "few_rows", False) and _few(x):
            return kernels.linear(x, module.fused_weight, module.fused_bias, counters=module.few_rows_counters)
        return F.linear(x, module.fused_weight, module.fused_bias)

    if args:
        return (stacked(args[0]), *args[1:]), kwargs
    if "hidden_states" not in kwargs:
        raise TypeError(f"{type(module).__name__} was called without its input; fused projections need it "
                        "as the first argument or as hidden_states=.")
    return args, {**kwargs, "hidden_states": stacked(kwargs["hidden_states"])}


def fuse_module(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Stack `module`'s projections `names` (plain `nn.Linear`s of one input size, all with
    biases or none, on one device) into one matmul. Returns whether anything changed: False for
    projections that cannot be stacked (missing, quantised, offloaded to "meta", ...) and for a
    module already fused whose weights are still views of its stacked ones; a module fused before
    a `.to()` or a deepcopy is stacked again from its projections' weights."""
    linears = [getattr(module, name, None) for name in names]
    if all(isinstance(linear, FusedColumns) for linear in linears):
        if all(_is_view_of(linear, module) for linear in linears):
            return False
    elif not all(type(linear) is nn.Linear for linear in linears):
        return False
    if len({linear.in_features for linear in linears}) != 1 or len({linear.bias is None for linear in linears}) != 1:
        return False
    if len({(linear.weight.device, linear.weight.dtype) for linear in linears}) != 1 or linears[0].weight.is_meta:
        return False
    with torch.no_grad():
        weight = torch.cat([linear.weight for linear in linears])
        bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
    start = 0
    for linear in linears:
        stop = start + linear.out_features
        linear.weight.data = weight[start:stop]  # a view: the stacked tensor holds the only copy
        if bias is not None:
            linear.bias.data = bias[start:stop]
        linear.__class__ = FusedColumns
        linear.columns, linear.stacked_width = slice(start, stop), weight.shape[0]
        start = stop
    module.register_buffer("fused_weight", weight, persistent=False)
    module.register_buffer("fused_bias", bias, persistent=False)
    if stacked_projection not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(stacked_projection, with_kwargs=True)
    return True


def _is_view_of(linear: nn.Module, module: nn.Module) -> bool:
    """Whether a fused projection's weight still lies in its module's stacked weight (a `.to()` or
    a deepcopy gives every tensor its own storage)."""
    stacked = getattr(module, "fused_weight", None)
    return stacked is not None and linear.weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()


def unfuse_module(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Undo `fuse_module`: each projection gets its own copy of its weights back and is a plain
    `nn.Linear` again; the pre-hook and the stacked buffers go. False if `module` was not fused."""
    linears = [getattr(module, name, None) for name in names]
    if not all(isinstance(linear, FusedColumns) for linear in linears):
        return False
    with torch.no_grad():
        for linear in linears:
            linear.weight.data = linear.weight.data.clone()
            if linear.bias is not None:
                linear.bias.data = linear.bias.data.clone()
            linear.__class__ = nn.Linear
            del linear.columns, linear.stacked_width
    set_few_rows(module, False)
    for key in [key for key, hook in module._forward_pre_hooks.items() if hook is stacked_projection]:
        del module._forward_pre_hooks[key]
        module._forward_pre_hooks_with_kwargs.pop(key, None)
    del module.fused_weight, module.fused_bias
    return True


def set_few_rows(module: nn.Module, on: bool) -> bool:
    """Turn `few_rows`' kernels on or off for a fused attention or MLP module (its stacked product
    and its output projection; an MLP only where its activation is SiLU and its gate/up have no
    bias, which its gated forward computes).
    Returns whether anything changed: False for a module already in that mode, one not fused, or
    one whose output projection (or activation) the kernels do not compute."""
    if on == bool(getattr(module, "few_rows", False)):
        return False
    output_name = next((name for name in OUTPUTS.values() if hasattr(module, name)), None)
    output = getattr(module, output_name, None) if output_name else None
    if on:
        mlp = output_name == "down_proj"
        if (getattr(module, "fused_weight", None) is None or type(output) is not nn.Linear
                or (mlp and (not isinstance(getattr(module, "act_fn", None), SILU) or module.fused_bias is not None))):
            return False  # the gated kernel computes silu(x Wg^T) * (x Wu^T): no bias, no other activation
        output.__class__ = FewRowsLinear
        device = module.fused_weight.device
        output.register_buffer("few_rows_counters", kernels.counters_for(output.out_features, device), persistent=False)
        if mlp:
            module.forward = functools.partial(gated_mlp_forward, module)  # pickles, and deepcopy rebinds it
            module.gated_forward = True
        else:
            module.register_buffer("few_rows_counters", kernels.counters_for(module.fused_weight.shape[0], device),
                                   persistent=False)
    else:
        output.__class__ = nn.Linear
        for owner in (output, module):
            owner._buffers.pop("few_rows_counters", None)
        module.__dict__.pop("forward", None)
        module.__dict__.pop("gated_forward", None)
    module.few_rows = on
    return True


def changes(lm) -> int:
    """How many times `fuse_projections` or `unfuse_projections` changed `lm`'s language model (its
    weights then lie elsewhere: the fast path recaptures graphs made before)."""
    return getattr(lm.language_model, "_specvlm_fusion_changes", 0)


def _count_change(lm, changed: int) -> int:
    if changed:
        lm.language_model._specvlm_fusion_changes = changes(lm) + 1
    return changed


def fuse_projections(lm, few_rows: bool = False) -> int:
    """Fuse q/k/v and gate/up in every decoder layer of `lm`'s language model (a `VideoLM`, or any
    object with `.language_model.layers`), in place. Returns how many modules changed (0 when all
    were fused already, in the same mode: calling it again is harmless, and ties the weights again
    after a `.to()`). `few_rows`: products of a few rows run as `few_rows.py`'s kernels (on a CUDA
    card in half precision, or Triton's interpreter in float32; see `few_rows.available`).
    The vision tower is left alone: its attention reads its input's width, which the stacked
    product changes."""
    if few_rows and not kernels.available(lm.device, lm.dtype):
        raise ValueError(f"few_rows' kernels need Triton on a CUDA card (compute capability 8.0+) in half precision, or "
                         f"float32 on a CPU in Triton's interpreter ($TRITON_INTERPRET=1 before importing specvlm); "
                         f"this model is {lm.dtype} on {lm.device}. Fuse without few_rows (SPECVLM_FEW_ROWS=0).")
    changed = 0
    for module, names in _groups(lm):
        stacked = fuse_module(module, names)
        changed += stacked | set_few_rows(module, few_rows)
    return _count_change(lm, changed)


def unfuse_projections(lm) -> int:
    """Undo `fuse_projections`: the model is transformers' own again (same weights, own storage), and
    its decoder layers' L2 prefetches (`l2_prefetch.attach`, which read the stacked weights) go too.
    Returns how many modules changed."""
    l2_prefetch.detach(lm.language_model.layers)
    return _count_change(lm, sum(unfuse_module(module, names) for module, names in _groups(lm)))


def is_fused(lm) -> bool:
    """Whether any decoder layer of `lm`'s language model computes its projections stacked."""
    return any(isinstance(module, FusedColumns) for module in lm.language_model.modules())


def uses_few_rows(lm) -> bool:
    """Whether any decoder layer of `lm`'s language model runs `few_rows.py`'s kernels."""
    return any(getattr(module, "few_rows", False) for module in lm.language_model.modules())


def _groups(lm):
    for layer in lm.language_model.layers:
        for attribute, names in GROUPS.items():
            module = getattr(layer, attribute, None)
            if module is not None:
                yield module, names
