"""A draft that proposes from part of the vocabulary.

A draft's output layer reads one row of weights per token of the vocabulary at every pass, and its
tree picks take a top-k over all of them. For a small draft with a large vocabulary, such as
LLaVA-OneVision 0.5B's, that layer is a large share of the weights a pass reads (notebook 05, section
21, computes it), and most of its tokens are rare. A draft that keeps only the rows of a frequent part
of the vocabulary (FR-Spec, Zhao et al. 2025; EAGLE-3's draft vocabulary) reads a fraction of that
layer and picks from a fraction of the logits. It can no longer propose the other tokens, so a round whose target token lies outside it
stops there; the target still checks every proposal and adds its own next token, so the output is
the target's own either way.

    ids = first_tokens(pair.draft, 32768)      # the 32,768 lowest ids and the special tokens, sorted
    head = output_head(pair.draft, ids)        # nn.Linear: the output layer's rows `ids`
    logits = head(hidden)                      # [..., len(ids)]: row j scores token ids[j]

`fast.generate_fast(..., draft_vocab=ids)` drafts this way (or $SPECVLM_DRAFT_VOCAB=32768, which
takes `first_tokens`). Which tokens to keep is the choice: FR-Spec counts them in a corpus; this
module's default takes the lowest ids, which byte-level BPE tokenizers such as Qwen2's give to the
bytes and their earliest merges, and always adds the special tokens, the end tokens among them.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from .models import VideoLM


def first_tokens(lm: VideoLM, size: int) -> torch.Tensor:
    """The ids 0..size-1 and every special token of `lm`'s tokenizer (its end tokens among them),
    sorted, as a long tensor on the CPU. first_tokens(draft, 4) -> tensor([0, 1, 2, 3, <specials>])
    where the specials lie above 3. `size` is capped by the output layer's rows."""
    rows = output_rows(lm)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise ValueError(f"a draft vocabulary's size is a whole number of tokens, got {size!r}.")
    if size < 1:
        raise ValueError(f"a draft vocabulary needs at least one token, got size={size!r}.")
    size = int(size)
    special = set(lm.tokenizer.all_special_ids) | set(lm.eos_token_ids)
    ids = sorted(set(range(min(size, rows))) | {i for i in special if 0 <= i < rows})
    return torch.tensor(ids, dtype=torch.long)


def check_vocabulary(ids: torch.Tensor, rows: int) -> None:
    """Raise ValueError unless `ids` is a non-empty 1-D integer tensor of distinct, increasing token
    ids below `rows` (the draft's output-layer rows)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() \
            or ids.dtype == torch.bool:
        raise ValueError("a draft vocabulary is a 1-D tensor of integer token ids (e.g. draft_vocab.first_tokens), "
                         f"got {type(ids).__name__} {getattr(ids, 'shape', '')} {getattr(ids, 'dtype', '')}.")
    if ids.numel() == 0:
        raise ValueError("a draft vocabulary needs at least one token id.")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError("a draft vocabulary's token ids must be distinct and sorted in increasing order "
                         "(torch.unique sorts them).")
    if int(ids[0]) < 0 or int(ids[-1]) >= rows:
        raise ValueError(f"a draft vocabulary's token ids must lie in [0, {rows}), the draft's output-layer rows; "
                         f"got {int(ids[0])}..{int(ids[-1])}.")


def output_rows(lm: VideoLM) -> int:
    """The number of rows of `lm`'s output layer (its vocabulary, padded as the checkpoint pads it)."""
    return lm.model.get_output_embeddings().weight.shape[0]


@torch.no_grad()
def output_head(lm: VideoLM, ids: torch.Tensor) -> nn.Linear:
    """`lm`'s output layer cut to the rows `ids` (`check_vocabulary`), a copy on its device and in its
    dtype: head(hidden)[..., j] == lm's output layer(hidden)[..., ids[j]], up to the rounding of a
    matmul of another size."""
    full = lm.model.get_output_embeddings()
    check_vocabulary(ids, full.weight.shape[0])
    rows = ids.to(full.weight.device)
    head = nn.Linear(full.in_features, len(ids), bias=full.bias is not None,
                     device=full.weight.device, dtype=full.weight.dtype)
    head.weight.copy_(full.weight[rows])
    if full.bias is not None:
        head.bias.copy_(full.bias[rows])
    return head.requires_grad_(False)
