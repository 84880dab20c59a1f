"""Verifier scores: how much the target's text attends to each video token.

SpecVLM (arXiv 2508.16201) ranks the draft's video tokens by the target's own attention
during its prefill: for every layer, the softmax attention from the prompt's text queries
that come after the video (the question and the assistant header) to every video key,
averaged over heads and query rows; then averaged over layers. One float per video token.

The scores are taken in the same prefill that fills the target's cache, without
`output_attentions` (which needs eager attention and materialises every layer's [H, L, L]
matrix): a custom attention function, registered under `SCORES_ATTENTION`, runs sdpa as
usual and, when a `ScoreRecorder` is passed to the forward, also computes the softmax of the
few text rows only ([H, r, L] per layer). The function must be registered as an attention
mask function too, or it receives no mask during multi-token verification.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SCORES_ATTENTION = "specvlm_sdpa_scores"


class ScoreRecorder:
    """Accumulates the layer-averaged attention of query rows `rows` to key slots `keys`.

    rows: [r] indices among the forward's queries; keys: [n] key slots (video tokens), the
    same for every sequence of a batch. After a forward, `scores` is [B, n]: mean over
    layers of the mean over heads and rows.
    """

    def __init__(self, rows: torch.Tensor, keys: torch.Tensor):
        self.rows, self.keys = rows, keys
        self.total, self.layers = None, 0

    def add(self, query, key, attention_mask, scaling, groups):
        rows, keys = self.rows.to(query.device), self.keys.to(query.device)
        q = query[:, :, rows].float()  # [B, H, r, d]
        k = repeat_kv(key, groups).float()  # [B, H, K, d]
        logits = (q @ k.transpose(-1, -2)) * scaling  # [B, H, r, K]
        if attention_mask is None:  # sdpa skipped its causal mask: rebuild it for these rows
            offset = key.shape[2] - query.shape[2]
            blocked = torch.arange(key.shape[2], device=q.device) > (rows + offset)[:, None]
            logits = logits.masked_fill(blocked, float("-inf"))
        elif attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask[:, :, rows, : key.shape[2]], float("-inf"))
        else:
            logits = logits + attention_mask[:, :, rows, : key.shape[2]].float()
        probs = logits.softmax(-1)[..., keys]  # [B, H, r, n]
        layer = probs.mean(dim=(1, 2))
        # a model spread over GPUs gives each layer's scores on that layer's device
        self.total = layer if self.total is None else self.total + layer.to(self.total.device)
        self.layers += 1

    @property
    def scores(self) -> torch.Tensor:
        if self.layers == 0:
            raise RuntimeError(
                f"no layer recorded scores: the target's language model must use attn_implementation {SCORES_ATTENTION!r}"
            )
        return (self.total / self.layers).cpu()


def sdpa_with_scores(module, query, key, value, attention_mask, scaling=None, recorder=None, **kwargs):
    """sdpa attention that also feeds `recorder` (when given) the rows it asks for."""
    output = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if recorder is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        recorder.add(query, key, attention_mask, scale, getattr(module, "num_key_value_groups", 1))
    return output


AttentionInterface.register(SCORES_ATTENTION, sdpa_with_scores)
AttentionMaskInterface.register(SCORES_ATTENTION, sdpa_mask)


def enable_scores(lm) -> None:
    """Switch `lm`'s language model to the score-recording sdpa (same outputs as sdpa)."""
    if lm.language_model.config._attn_implementation != SCORES_ATTENTION:
        lm.model.set_attn_implementation({"text_config": SCORES_ATTENTION})


def query_rows(prompt) -> torch.Tensor:
    """Prompt slots of the text after the last video token: the queries SpecVLM averages.

    input_ids = [sys, <v>, <v>, q1, q2] -> tensor([3, 4])
    """
    last_video = int(prompt.video_index[-1])
    rows = torch.arange(last_video + 1, prompt.input_ids.shape[1])
    if len(rows) == 0:
        raise ValueError("the prompt has no text after its video: there is no query to score video tokens with.")
    return rows


def prefill_with_scores(lm, prompt, embeds, cache):
    """Prefill the full prompt; return (logits of the last row [1, 1, V], scores [n])."""
    enable_scores(lm)
    recorder = ScoreRecorder(query_rows(prompt), prompt.video_index)
    logits = lm.forward(embeds, prompt.position_ids, cache, logits_rows=slice(-1, None), recorder=recorder)
    return logits, recorder.scores[0]
