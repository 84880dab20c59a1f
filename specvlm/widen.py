"""Widen the embedded tiny pair into real language-model shapes, with the same outputs.

The embedded pair is trained but tiny; step costs depend on shapes, not on what the weights
learned. `widen_pair(sv.load_pair("tiny"))` embeds the tiny target into the language-model
shape of LLaVA-OneVision 7B and the tiny draft into that of 0.5B (`costs.SHAPES`), so that a
GPU run times real-sized steps while decoding what the trained pair decodes. In float32 that is
exact: the same greedy tokens and accepted draft tokens, logits equal up to float rounding
(`check_widening`). In bfloat16 a near-tie can round the other way, so a widened GPU run is
checked against the widened target's own AR (as every bench row is), not against the tiny pair.

How (d, D: tiny and wide hidden sizes). The wide residual stream holds the tiny one as `B x`,
where `B` [D, d] spreads tiny dim i over a group of wide dims (dim j belongs to group
j mod d) with random unit-norm coefficients: `B^T B = I`, so norms are kept, and every weight
that touches the residual stays dense.
- Writers into the residual (embedding rows of real tokens, projector output, `image_newline`,
  o_proj, down_proj) are `B W`; readers (q/k/v, gate/up, lm_head) are `W B^T`.
- RMSNorm over D dims of `B x` sees mean(x^2) * d / D: `rms_norm_eps` is scaled by d / D and
  each norm weight is the tiny one, spread over its group and scaled by sqrt(d / D). (Because
  B keeps groups apart, the per-dim weight commutes with B, so a tied lm_head still works.)
- Attention (head_dim kept, so scaling and rotary frequencies are the tiny ones): each tiny kv
  head gets c = ceil(group_tiny / group_wide) wide copies, its q heads fill their slots
  (duplicates split the head's o_proj columns equally); the remaining kv heads are *dead*:
  v rows and v bias exactly 0, so their q heads output 0 and their q/k/o weights stay random.
- MLP units beyond the tiny ones read only the complement of B (gate and up rows random and
  orthogonal to B's columns), so silu(gate) * up is at float rounding's level; their down_proj columns are random.
- Layers beyond the tiny ones come after them; their two norm weights and v bias are 0, so
  they add exactly 0 while every matrix is random.
- Vocabulary beyond the tiny one: lm_head rows copy the row of the image token (never
  generated in a video prompt), so greedy argmax (first index wins ties) is unchanged;
  input-embedding rows there are random (never looked up).
- Projector: tiny units first; extra units of linear_1 are 0 (gelu(0) = 0); linear_2 writes B.
Exact zeros left: dead v rows and biases, extra layers' norms and v biases, extra projector
units (`planned_zeros`); `widening_report` counts them, a small fraction of the parameters at the 7B and
0.5B shapes (notebook 05, section 6, prints it).

Not handled: a tied output layer when the tiny model is untied (the embedded pair is). An
untied lm_head `L` cannot be rewritten as a tied `E` with the same logits (L diag(g) would have
to lie in E's column space), so the widened 0.5B keeps a separate input table: a decoding step
reads only its tokens' rows of that table, so step costs are unchanged (`costs.weight_bytes`).
Also not handled: Qwen2.5-VL (3-D rotary), sliding-window layers; the vision tower stays tiny.
"""

from __future__ import annotations

import copy
import math

import torch
from transformers import Qwen2Config

from .costs import lm_config
from .models import Pair, head_dim, resolve_device, resolved_dtype

RANDOM_STD = 0.02  # scale of the random weights that never reach an output (as costs.build_lm)
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size")


def wide_text_config(tiny, shape: str | Qwen2Config, tie: bool | None = None) -> Qwen2Config:
    """The widened language model's config: the shape fields of `shape`, everything else (rotary,
    token ids, activation) from the tiny config `tiny`; rms_norm_eps scaled by d / D.
    `tie=None` ties the output layer when the shape does and the tiny model can (see the module
    docstring). Raises ValueError when the shape cannot hold the tiny model."""
    target = lm_config(shape) if isinstance(shape, str) else shape
    if not isinstance(target, Qwen2Config):
        raise TypeError(f"shape must be a name in costs.SHAPES or a Qwen2Config, got {type(target).__name__}.")
    name = shape if isinstance(shape, str) else "the given shape"
    if head_dim(target) != head_dim(tiny):
        raise ValueError(
            f"{name} has head_dim {head_dim(target)} but the tiny model has {head_dim(tiny)}: widening keeps "
            "head_dim (attention scaling and rotary frequencies depend on it); choose a shape whose "
            "hidden_size / num_attention_heads (or head_dim) equals the tiny one."
        )
    small = [f"{f} {getattr(target, f)} < {getattr(tiny, f)}" for f in SHAPE_FIELDS if getattr(target, f) < getattr(tiny, f)]
    if small:
        raise ValueError(f"{name} is smaller than the tiny model ({', '.join(small)}): widening only adds; "
                         "choose a shape at least as large in every field.")
    if target.num_attention_heads % target.num_key_value_heads:
        raise ValueError(f"{name}: num_attention_heads {target.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads {target.num_key_value_heads}.")
    copies = kv_copies(tiny, target)
    if target.num_key_value_heads < copies * tiny.num_key_value_heads:
        raise ValueError(
            f"{name} has {target.num_key_value_heads} kv heads of {target.num_attention_heads // target.num_key_value_heads} "
            f"q heads each; the tiny model's {tiny.num_key_value_heads} kv heads of "
            f"{tiny.num_attention_heads // tiny.num_key_value_heads} q heads need {copies * tiny.num_key_value_heads}."
        )
    if getattr(tiny, "use_sliding_window", False) or set(tiny.layer_types) != {"full_attention"}:
        raise ValueError("the tiny model has sliding-window layers; widening handles full attention only.")
    tiny_tied = bool(tiny.tie_word_embeddings)
    if tie is None:
        tie = bool(target.tie_word_embeddings) and tiny_tied
    elif tie and not tiny_tied:
        raise ValueError("tie=True needs a tiny model with a tied output layer; this one is untied "
                         "(use tie=None or False: a step's cost does not depend on it).")
    fields = tiny.to_dict()
    for key in ("layer_types", "transformers_version", "architectures"):
        fields.pop(key, None)
    fields.update({f: getattr(target, f) for f in SHAPE_FIELDS})
    fields.update(head_dim=head_dim(tiny), tie_word_embeddings=tie,
                  rms_norm_eps=tiny.rms_norm_eps * tiny.hidden_size / target.hidden_size)
    return Qwen2Config(**fields)


def kv_copies(tiny, wide) -> int:
    """Wide copies of each tiny kv head: enough wide slots for its q heads, e.g. 7 -> 2 per kv: 4."""
    tiny_group = tiny.num_attention_heads // tiny.num_key_value_heads
    return math.ceil(tiny_group / (wide.num_attention_heads // wide.num_key_value_heads))


def head_plan(tiny, wide) -> tuple[list, list, list]:
    """(q_source, kv_source, share): per wide q head the tiny q head it copies (None: dead), per
    wide kv head the tiny kv head it copies (None: dead, v = 0), per wide q head the share of its
    tiny head's o_proj columns (1 / number of copies). 14/2 -> 28/4 heads: q heads 0-13 copy
    0-13, kv heads 0-1 copy 0-1, the rest are dead."""
    tiny_group = tiny.num_attention_heads // tiny.num_key_value_heads
    wide_group = wide.num_attention_heads // wide.num_key_value_heads
    copies = kv_copies(tiny, wide)
    live = copies * tiny.num_key_value_heads
    kv_source = [j // copies if j < live else None for j in range(wide.num_key_value_heads)]
    q_source = []
    for i in range(wide.num_attention_heads):
        j = i // wide_group
        slot = (j % copies) * wide_group + i % wide_group  # slot among the copies of tiny kv head j // copies
        q_source.append(kv_source[j] * tiny_group + slot % tiny_group if kv_source[j] is not None else None)
    count = {h: q_source.count(h) for h in set(q_source) - {None}}
    share = [1.0 / count[h] if h is not None else None for h in q_source]
    return q_source, kv_source, share


class Spread:
    """The isometry B [D, d]: wide dim j carries tiny dim `group[j] = j % d` times `coef[j]`, the
    coefficients of each group a random unit vector. Applied by gathering, never as a matrix."""

    def __init__(self, d: int, D: int, generator: torch.Generator, device):
        self.d, self.D = d, D
        self.group = torch.arange(D, device=device) % d
        coef = torch.randn(D, generator=generator, device=device, dtype=torch.float64)
        norms = torch.zeros(d, device=device, dtype=torch.float64).index_add_(0, self.group, coef**2).sqrt()
        self.coef = (coef / norms[self.group]).float()

    def rows(self, w: torch.Tensor) -> torch.Tensor:
        """B @ w: [d, n] -> [D, n] (a writer: its outputs land in the residual); [d] -> [D]."""
        return w[self.group] * (self.coef if w.dim() == 1 else self.coef[:, None])

    def cols(self, w: torch.Tensor) -> torch.Tensor:
        """w @ B^T: [m, d] -> [m, D] (a reader of the residual)."""
        return w[:, self.group] * self.coef

    def complement(self, g: torch.Tensor) -> torch.Tensor:
        """g (I - B B^T): [m, D] rows that read nothing of the tiny residual."""
        gb = torch.zeros(g.shape[0], self.d, device=g.device).index_add_(1, self.group, g * self.coef)
        return g - self.cols(gb)

    def norm(self, weight: torch.Tensor) -> torch.Tensor:
        """A tiny RMSNorm weight [d] for the wide stream [D] (see the module docstring)."""
        return weight[self.group] * math.sqrt(self.d / self.D)


def widen_model(model, shape: str | Qwen2Config, device=None, dtype=None, seed: int = 0, tie: bool | None = None):
    """A LlavaOnevisionForConditionalGeneration with the language model of `shape` that computes
    what the tiny `model` computes. Built on the meta device and filled directly on `device`
    (default: cuda when available), so a 7B never passes through the CPU. `seed` seeds every
    random weight. The result carries `widening`, a dict for `widening_report`."""
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if kind != "llava_onevision":
        raise ValueError(f"widening handles LLaVA-OneVision models (a VideoLM's .model); got {kind!r}.")
    device = resolve_device(device)
    dtype = resolved_dtype(dtype, device)
    tiny_text = model.config.text_config
    text = wide_text_config(tiny_text, shape, tie)
    config = copy.deepcopy(model.config)
    config.text_config = text
    config.tie_word_embeddings = text.tie_word_embeddings
    with torch.device("meta"):
        wide = type(model)(config).to(dtype)
    wide = wide.to_empty(device=device)
    if text.tie_word_embeddings:
        wide.tie_weights()  # to_empty replaces parameters, which unties them
    _fill(wide, model, torch.Generator(device=device).manual_seed(seed), device)
    wide.model.language_model.rotary_emb = type(wide.model.language_model.rotary_emb)(text).to(device)
    wide.model.vision_tower.embeddings.position_ids.copy_(model.model.vision_tower.embeddings.position_ids)
    wide.generation_config = copy.deepcopy(model.generation_config)
    wide.set_attn_implementation("sdpa")
    wide.widening = {
        "shape": shape if isinstance(shape, str) else "custom",
        "tiny": {f: getattr(tiny_text, f) for f in SHAPE_FIELDS},
        "wide": {f: getattr(text, f) for f in SHAPE_FIELDS},
        "head_dim": head_dim(text), "tie_word_embeddings": text.tie_word_embeddings,
        "rms_norm_eps": text.rms_norm_eps, "seed": seed, "dtype": str(dtype).removeprefix("torch."),
        "planned_zeros": planned_zeros(model.config, text),
    }
    return wide.eval()


@torch.no_grad()
def _fill(wide, tiny, generator, device) -> None:
    """Write every parameter of `wide` from the tiny model's (see the module docstring)."""
    tiny_text, text = tiny.config.text_config, wide.config.text_config
    d, D, hd = tiny_text.hidden_size, text.hidden_size, head_dim(text)
    B = Spread(d, D, generator, device)

    def rand(*shape):
        return torch.randn(shape, generator=generator, device=device) * RANDOM_STD

    def src(t):
        return t.detach().to(device, torch.float32)

    def put(param, value):
        param.copy_(value)

    vision = dict(tiny.model.vision_tower.named_parameters())
    for name, p in wide.model.vision_tower.named_parameters():
        put(p, src(vision[name]))

    # projector: tiny units first, extra units of linear_1 exactly 0 (gelu(0) = 0); output spread by B
    tp, wp = tiny.model.multi_modal_projector, wide.model.multi_modal_projector
    put(wp.linear_1.weight, torch.cat([src(tp.linear_1.weight), torch.zeros(D - d, tp.linear_1.in_features, device=device)]))
    put(wp.linear_2.weight, torch.cat([B.rows(src(tp.linear_2.weight)), rand(D, D - d)], dim=1))
    if tp.linear_1.bias is not None:
        put(wp.linear_1.bias, torch.cat([src(tp.linear_1.bias), torch.zeros(D - d, device=device)]))
        put(wp.linear_2.bias, B.rows(src(tp.linear_2.bias)))
    put(wide.model.image_newline, B.rows(src(tiny.model.image_newline)))

    # vocabulary: real rows through B; extra lm_head rows copy the image token's row
    filler = int(tiny.config.image_token_id)
    V_t, V = tiny_text.vocab_size, text.vocab_size
    embed = B.cols(src(tiny.get_input_embeddings().weight))
    head = B.cols(src(tiny.lm_head.weight))
    if text.tie_word_embeddings:
        put(wide.get_input_embeddings().weight, torch.cat([embed, embed[filler].expand(V - V_t, D)]))
    else:
        put(wide.get_input_embeddings().weight, torch.cat([embed, rand(V - V_t, D)]))
        put(wide.lm_head.weight, torch.cat([head, head[filler].expand(V - V_t, D)]))
    put(wide.model.language_model.norm.weight, B.norm(src(tiny.model.language_model.norm.weight)))

    q_source, kv_source, share = head_plan(tiny_text, text)
    tiny_layers = tiny.model.language_model.layers
    for index, layer in enumerate(wide.model.language_model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if index >= len(tiny_layers):  # an extra layer: adds exactly 0
            for p in (attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias, attn.v_proj.weight,
                      attn.o_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight):
                put(p, rand(*p.shape))
            for p in (attn.v_proj.bias, layer.input_layernorm.weight, layer.post_attention_layernorm.weight):
                p.zero_()
            continue
        t = tiny_layers[index]
        ta = t.self_attn
        put(layer.input_layernorm.weight, B.norm(src(t.input_layernorm.weight)))
        put(layer.post_attention_layernorm.weight, B.norm(src(t.post_attention_layernorm.weight)))

        zeros = lambda *shape: torch.zeros(shape, device=device)
        for name, sources, dead in (("q_proj", q_source, rand), ("k_proj", kv_source, rand), ("v_proj", kv_source, zeros)):
            # tiny head h's rows read the residual through B; dead heads get dead(...)
            weight, bias = src(getattr(ta, name).weight).view(-1, hd, d), src(getattr(ta, name).bias).view(-1, hd)
            put(getattr(attn, name).weight, torch.cat([B.cols(weight[h]) if h is not None else dead(hd, D) for h in sources]))
            put(getattr(attn, name).bias, torch.cat([bias[h] if h is not None else dead(hd) for h in sources]))
        o = src(ta.o_proj.weight).view(d, -1, hd)
        put(attn.o_proj.weight, torch.cat([B.rows(o[:, h]) * s if h is not None else rand(D, hd)
                                           for h, s in zip(q_source, share)], dim=1))

        extra = text.intermediate_size - tiny_text.intermediate_size
        for name in ("gate_proj", "up_proj"):
            put(getattr(mlp, name).weight, torch.cat([B.cols(src(getattr(t.mlp, name).weight)),
                                                      B.complement(rand(extra, D))]))
        put(mlp.down_proj.weight, torch.cat([B.rows(src(t.mlp.down_proj.weight)), rand(D, extra)], dim=1))


def planned_zeros(tiny_config, text) -> int:
    """Parameters the construction sets exactly to 0 (zeros inherited from the tiny weights
    aside): v rows and biases of dead kv heads in tiny layers; norms and v bias of extra layers;
    extra projector units of linear_1; and, when D < 2d, the extra MLP units' gate/up entries
    on wide dims that alone carry a tiny dim (the complement of B is empty there). Needs
    configs only, so it works for shapes too big to build."""
    tiny_text = tiny_config.text_config
    hd, D, d = head_dim(text), text.hidden_size, tiny_text.hidden_size
    _, kv_source, _ = head_plan(tiny_text, text)
    dead = kv_source.count(None) * hd * (D + 1) * tiny_text.num_hidden_layers
    lone = int((torch.bincount(torch.arange(D) % d) == 1).sum())
    extra_units = 2 * (text.intermediate_size - tiny_text.intermediate_size) * lone * tiny_text.num_hidden_layers
    extra_layers = (text.num_hidden_layers - tiny_text.num_hidden_layers) * (2 * D + text.num_key_value_heads * hd)
    bias = 1 if tiny_config.multimodal_projector_bias else 0
    projector = (D - d) * (tiny_config.vision_config.hidden_size + bias)
    return dead + extra_units + extra_layers + projector


def planned_params(tiny_config, text) -> int:
    """Parameters of the widened model, counted on the meta device (nothing is allocated)."""
    config = copy.deepcopy(tiny_config)
    config.text_config = text
    config.tie_word_embeddings = text.tie_word_embeddings
    from transformers import LlavaOnevisionForConditionalGeneration

    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    if text.tie_word_embeddings:
        model.tie_weights()
    return sum(p.numel() for p in model.parameters())


def zero_fraction(model) -> float:
    """Share of the model's parameters (a tied tensor counted once) that are exactly 0."""
    zeros = total = 0
    for p in model.parameters():
        zeros += int((p == 0).sum())
        total += p.numel()
    return zeros / total


def widening_report(model) -> dict:
    """What `widen_model` did and the measured zero fraction; JSON-ready."""
    if not hasattr(model, "widening"):
        raise ValueError("this model was not made by widen_model (it has no `widening` record).")
    total = sum(p.numel() for p in model.parameters())
    return {**model.widening, "params": total, "zero_fraction": zero_fraction(model),
            "planned_zero_fraction": model.widening["planned_zeros"] / total}


def widen_pair(pair: Pair, target_shape: str | Qwen2Config = "llava-ov-7b",
               draft_shape: str | Qwen2Config = "llava-ov-0.5b", device=None, dtype=None, seed: int = 0) -> Pair:
    """The pair widened: same tokenizer, processor and video layout, same greedy tokens (fp32).
    widen_pair(sv.load_pair("tiny")).name -> 'tiny→llava-ov-7b/0.5b (stand-in)'."""
    target = widen_model(pair.target.model, target_shape, device, dtype, seed)
    draft = widen_model(pair.draft.model, draft_shape, device, dtype, seed + 1)
    t = target_shape if isinstance(target_shape, str) else "custom"
    d = draft_shape if isinstance(draft_shape, str) else "custom"
    prefix = t.rsplit("-", 1)[0] + "-"
    name = f"tiny→{t}/{d.removeprefix(prefix)} (stand-in)"
    return Pair(type(pair.target)(target, pair.target.processor), type(pair.draft)(draft, pair.draft.processor), name)


def check_widening(pair: Pair, widened: Pair, clips, max_new_tokens: int = 32, question: str | None = None,
                   logits: bool = True) -> dict:
    """Decode each clip (a synthetic `Clip` or a `Video`) with both pairs, AR and SpecVLM tree
    SD, and compare: equal token lists, equal accepted counts, and (with `logits`) on the
    target's and the draft's prompt logits the largest |wide - tiny| / max |tiny| over the tiny
    vocabulary and the share of rows whose argmax over the whole wide vocabulary equals the
    tiny one. All counts equal to `clips` and errors ~1e-6 (fp32) mean the widening is exact."""
    from .decoding import generate_ar, generate_sd
    from .models import DEFAULT_QUESTION
    from .trees import MC_SIM_7B_63
    from .video import Video, from_array

    question = question or DEFAULT_QUESTION
    counts = {"clips": 0, "ar_equal": 0, "sd_equal": 0, "sd_equals_ar": 0, "accepted_equal": 0}
    logit_error = {"target": 0.0, "draft": 0.0}
    argmax_rows = {"target": [0, 0], "draft": [0, 0]}
    for clip in clips:
        video = clip if isinstance(clip, Video) else from_array(clip.frames, fps=8.0)
        runs = []
        for p in (pair, widened):
            prompt = p.target.prepare(video, question)
            ar = generate_ar(p.target, prompt, max_new_tokens)
            sd = generate_sd(p, prompt, "specvlm", 0.9, max_new_tokens=max_new_tokens, tree=MC_SIM_7B_63)
            runs.append((prompt, ar, sd))
        (prompt, ar, sd), (wide_prompt, wide_ar, wide_sd) = runs
        counts["clips"] += 1
        counts["ar_equal"] += ar.tokens == wide_ar.tokens
        counts["sd_equal"] += sd.tokens == wide_sd.tokens
        counts["sd_equals_ar"] += wide_sd.tokens == ar.tokens
        counts["accepted_equal"] += sd.accepted == wide_sd.accepted
        for role in ("target", "draft") if logits else ():
            tiny_lm, wide_lm = getattr(pair, role), getattr(widened, role)
            tiny_logits = prompt_logits(tiny_lm, prompt)
            wide_logits = prompt_logits(wide_lm, wide_prompt)
            vocab = tiny_logits.shape[-1]
            error = (wide_logits[..., :vocab] - tiny_logits).abs().max() / tiny_logits.abs().max()
            logit_error[role] = max(logit_error[role], float(error))
            argmax_rows[role][0] += int((wide_logits.argmax(-1) == tiny_logits.argmax(-1)).sum())
            argmax_rows[role][1] += tiny_logits.shape[0]
    if not logits:
        return counts
    return {**counts, "max_rel_logit_error": logit_error,
            "argmax_rows_equal": {role: equal / total for role, (equal, total) in argmax_rows.items()}}


def prompt_logits(lm, prompt) -> torch.Tensor:
    """Logits [L, V] of every prompt row, fp32 on the CPU."""
    return lm.forward(lm.embed(prompt), prompt.position_ids, lm.new_cache())[0].cpu()


def main(argv=None) -> None:
    """python -m specvlm.widen --clips 8 --out "figures/widen_check_{card}.json": widen the
    embedded pair at the real shapes in fp32 on the card and check it decodes what the tiny pair
    decodes (`check_widening`), with the zero fractions (`widening_report`)."""
    import argparse
    import json
    from datetime import date

    import transformers

    from .bench import card_name
    from .costs import card_slug
    from .models import load_pair
    from .synthetic import make_clip

    parser = argparse.ArgumentParser(prog="python -m specvlm.widen", description=main.__doc__)
    parser.add_argument("--target-shape", default="llava-ov-7b")
    parser.add_argument("--draft-shape", default="llava-ov-0.5b")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON path; '{card}' becomes the card's name")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tiny = load_pair("tiny", device=device, dtype=torch.float32)
    widened = widen_pair(tiny, args.target_shape, args.draft_shape, device=device, dtype=torch.float32)
    clips = [make_clip(seed=10_000 + i, num_frames=args.frames[i % len(args.frames)]) for i in range(args.clips)]
    result = {
        "pair": widened.name, "card": card_name(device),
        "dtype": "float32", "torch": torch.__version__, "transformers": transformers.__version__, "date": str(date.today()),
        "frames": [len(c.frames) for c in clips],
        "reports": {"target": widening_report(widened.target.model), "draft": widening_report(widened.draft.model)},
        "check": check_widening(tiny, widened, clips),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        from .bench import save

        save(result, args.out.replace("{card}", card_slug(result["card"])))


if __name__ == "__main__":
    main()
