"""A draft cut from the target: the same network with half the head dimension.

The embedded draft is a separate, smaller model trained from scratch (its model card). Another way to get a
draft, free of training at the start, is to cut one from the target itself. The widened 0.5B shape fixes the
draft's head layout (14 query and 2 KV heads of dimension 64), while the target's heads have dimension 128, so
the cut keeps everything of the target (vision tower, projector, embeddings, norms, MLPs, output layer) and
halves each attention head:

- *queries and keys*: rotary position embedding turns dimension i of a head together with dimension i + d/2, at
  frequency theta^(-2i/d). A head of dimension d/f turns its pair j at theta^(-2jf/d), the frequency of the
  target's pair jf. So the cut head keeps the target's pairs 0, f, 2f, ... (`kept_rotary_dims`): on those
  dimensions its query-key products are the target's, term for term; the other pairs' terms are lost;
- *values and outputs*: each KV head's value projection (with its bias) is cut to the d/f directions of its
  largest singular values (`value_basis`), and every query head of its group reads its output projection in
  that basis: exact wherever the value projection has rank d/f or less, the best rank-d/f approximation
  otherwise.

A query-key product over half the dimensions is about half as large; the cut head's own softmax scale,
1/sqrt(d/f) instead of 1/sqrt(d), gives back a factor sqrt(f) of it. `query_scale` can rescale the queries
further: sqrt(1/f) makes the kept terms exactly the target's logits (the tests use it); the default, 1.0, leaves
the target's query weights as they are.

    draft = cut_draft(target_model)   # a LlavaOnevisionForConditionalGeneration with head_dim 64
"""

from __future__ import annotations

import copy

import torch

from .. import models


def kept_rotary_dims(head_dim: int, cut_head_dim: int) -> torch.Tensor:
    """Indices [cut_head_dim] into a head of `head_dim` whose rotary pairs the cut head keeps, in the
    cut head's order (its first half, then the partners). kept_rotary_dims(8, 4) -> [0, 2, 4, 6]."""
    if cut_head_dim <= 0 or cut_head_dim % 2 or head_dim % cut_head_dim or cut_head_dim >= head_dim:
        raise ValueError(f"a head of dimension {head_dim} can be cut to a smaller even divisor of it, not {cut_head_dim}.")
    step, half = head_dim // cut_head_dim, head_dim // 2
    first = torch.arange(0, half, step)
    return torch.cat([first, first + half])


def value_basis(value_weight: torch.Tensor, value_bias: torch.Tensor | None, dims: int) -> torch.Tensor:
    """An orthonormal basis [d, dims] (float64) of the `dims` directions of a KV head's values that carry the
    most: the leading left singular vectors of its projection [d, hidden] with the bias [d] as one more column."""
    stacked = value_weight if value_bias is None else torch.cat([value_weight, value_bias[:, None]], 1)
    if min(stacked.shape) < dims:
        raise ValueError(f"a value projection of shape {tuple(value_weight.shape)} has fewer than {dims} directions.")
    return torch.linalg.svd(stacked.double(), full_matrices=False)[0][:, :dims]


def _cut_attention(attention, config, cut_head_dim: int, query_scale: float) -> dict[str, torch.Tensor]:
    """The cut attention's parameters (float64), from one target layer's `self_attn`."""
    d, heads, kv_heads = models.head_dim(config), config.num_attention_heads, config.num_key_value_heads
    kept = kept_rotary_dims(d, cut_head_dim)
    weight = lambda module: module.weight.double()
    bias = lambda module: None if module.bias is None else module.bias.double()
    state = {}
    for name, scale in (("q_proj", query_scale), ("k_proj", 1.0)):
        projection = getattr(attention, name)
        count = heads if name == "q_proj" else kv_heads
        state[f"{name}.weight"] = scale * weight(projection).reshape(count, d, -1)[:, kept].reshape(count * cut_head_dim, -1)
        if projection.bias is not None:
            state[f"{name}.bias"] = scale * bias(projection).reshape(count, d)[:, kept].flatten()
    v, o = attention.v_proj, attention.o_proj
    v_weight, v_bias = weight(v).reshape(kv_heads, d, -1), None if v.bias is None else bias(v).reshape(kv_heads, d)
    o_weight = weight(o).reshape(o.weight.shape[0], heads, d)
    group = heads // kv_heads
    bases = [value_basis(v_weight[g], None if v_bias is None else v_bias[g], cut_head_dim) for g in range(kv_heads)]
    state["v_proj.weight"] = torch.cat([basis.T @ v_weight[g] for g, basis in enumerate(bases)])
    if v_bias is not None:
        state["v_proj.bias"] = torch.cat([basis.T @ v_bias[g] for g, basis in enumerate(bases)])
    state["o_proj.weight"] = torch.stack([o_weight[:, h] @ bases[h // group] for h in range(heads)], 1).flatten(1)
    if o.bias is not None:
        state["o_proj.bias"] = bias(o)
    return state


@torch.no_grad()
def cut_draft(target, cut_head_dim: int = 64, query_scale: float = 1.0):
    """A new model of the target's class and sizes but with attention heads of `cut_head_dim` (the
    module docstring says how each part is cut); the target is left unchanged. Needs default rotary
    embeddings over whole heads (Qwen2's)."""
    text = target.config.text_config
    rope = getattr(text, "rope_parameters", None) or {}
    partial = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0))
    if rope.get("rope_type", "default") != "default" or partial != 1.0:
        raise ValueError(f"cut_draft needs default rotary embeddings over whole heads, got {rope or text}.")
    if cut_head_dim >= models.head_dim(text):
        raise ValueError(f"the cut head ({cut_head_dim}) must be smaller than the target's ({models.head_dim(text)}).")
    config = copy.deepcopy(target.config)
    config.text_config.head_dim = cut_head_dim
    draft = type(target)(config).to(device=target.device, dtype=target.dtype)
    state = {name: value.clone() for name, value in target.state_dict().items()}
    layers = target.model.language_model.layers
    prefix = next(name for name in state if name.endswith("layers.0.self_attn.q_proj.weight")
                  and "language_model" in name).removesuffix("0.self_attn.q_proj.weight")
    for index, layer in enumerate(layers):
        for name, value in _cut_attention(layer.self_attn, text, cut_head_dim, query_scale).items():
            state[f"{prefix}{index}.self_attn.{name}"] = value.to(target.dtype)
    draft.load_state_dict(state, strict=True)
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft.eval()
