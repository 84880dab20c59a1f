"""Train the embedded target/draft pair on synthetic captioned videos.

    python -m specvlm.tiny.train --out runs/tiny --target-steps 4000 --draft-steps 3000

Both models are LLaVA-OneVision models of the real transformers classes (SigLIP vision tower,
Qwen2 language model), sharing one byte-level BPE tokenizer trained on the task's words and
one processor (64x64 frames, 4-pixel patches pooled 2x2 to an 8x8 token grid per frame).
The language models keep the real checkpoints' head layout: 7 query heads per KV head (14 and 2),
head dimension 128 for the target (as in the 7B) and 64 for the draft (as in the 0.5B).

1. The target learns to caption clips (4 to 64 frames by default, `--frames` to change) from all its video tokens.
2. The draft learns the same captions from *pruned* video: each batch keeps a share
   (ratio in {0, .5, .75, .9, .95}) chosen by {specvlm (the trained target's attention),
   uniform, random}, with kept tokens at their original positions, exactly as decoding
   prefills it. A small draft trained only on full videos loses acceptance under pruning
   (the inputs are far from what it saw); the paper's off-the-shelf drafts need no such training.

Reproducible from `--seed` on a CPU or a GPU (bf16 autocast there); logs loss and held-out
caption accuracy; writes `save_pretrained` folders `out/target` and `out/draft`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import builders, pruning, synthetic
from ..attention import SCORES_ATTENTION, ScoreRecorder, enable_scores
from ..decoding import generate_ar
from ..models import LlavaOnevisionLM
from ..video import from_array

VISION = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256, image_size=64, patch_size=4)
TARGET = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=14, num_key_value_heads=2, head_dim=128,
              intermediate_size=768)
DRAFT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
             intermediate_size=384)
FRAMES = (4, 8, 16, 32, 64)
FRAME_WEIGHTS = (0.3, 0.3, 0.2, 0.12, 0.08)
DRAFT_RATIOS = (0.0, 0.5, 0.75, 0.9, 0.95)
DRAFT_SELECTIONS = ("specvlm", "uniform", "random")
QUESTION = "Describe the video."
HELD_OUT_SEEDS = range(0, 100_000)  # evaluation clips; training seeds start at 10**6
TRAIN_SEED_BASE = 10**6


def corpus(num_clips: int = 3000) -> str:
    captions = [synthetic.make_clip(TRAIN_SEED_BASE + 10**7 + i, num_frames=4).caption for i in range(num_clips)]
    return " ".join(synthetic.vocabulary()) + "\n" + "\n".join(captions)


def build_pair(seed: int, init: Path | None = None):
    """Target and draft (in memory) plus the shared processor: untrained, or the models saved
    under `init` (`init/target`, and `init/draft` when present) to continue training."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    if init is not None:
        processor = AutoProcessor.from_pretrained(init / "target")
        target = AutoModelForImageTextToText.from_pretrained(init / "target", dtype=torch.float32)
        if (init / "draft").exists():
            return target, AutoModelForImageTextToText.from_pretrained(init / "draft", dtype=torch.float32), processor
        return target, build_pair(seed)[1], processor
    tokenizer = builders.make_tokenizer(corpus(), vocab_size=512)
    processor = builders.llava_onevision_processor(tokenizer, VISION)
    models = []
    for offset, sizes in enumerate((TARGET, DRAFT)):
        torch.manual_seed(seed + offset)
        config = builders.llava_onevision_config(tokenizer, sizes, VISION)
        config.text_config.initializer_range = 0.02
        model = AutoModelForImageTextToText.from_config(config)
        model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        models.append(model)
    return models[0], models[1], processor


class Batches:
    """Batches (dicts: frames uint8 [B, T, S, S, 3], ids/labels/mask [B, L], video slots [n],
    prompt_len) of one frame count each, from seeded synthetic clips built in worker processes."""

    def __init__(self, processor, tokens_per_batch: int, seed: int, workers: int,
                 frames=FRAMES, frame_weights=FRAME_WEIGHTS):
        if len(frames) != len(frame_weights) or min(frames) < 1 or min(frame_weights) < 0:
            raise ValueError(f"frames {frames!r} and frame_weights {frame_weights!r} must pair up: "
                             "one weight >= 0 for each frame count >= 1.")
        self.processor, self.tokens = processor, tokens_per_batch
        self.frames, self.frame_weights = tuple(frames), tuple(frame_weights)
        self.rng = random.Random(seed)
        self.next_seed = TRAIN_SEED_BASE + seed * 10**8
        self.pool = ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) if workers > 1 else None
        self.pending = None
        tok = processor.tokenizer
        chat = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
            add_generation_prompt=True,
        )
        before, after = chat.split(processor.video_token)
        self.before, self.after = tok(before)["input_ids"], tok(after)["input_ids"]
        self.end = tok.eos_token_id
        self.pad = tok.pad_token_id
        self.per_frame = (VISION["image_size"] // VISION["patch_size"] // 2) ** 2

    def make(self, frames: int, clips):
        tok = self.processor.tokenizer
        n = frames * self.per_frame + 1
        prompt = self.before + [tok.convert_tokens_to_ids(self.processor.video_token)] * n + self.after
        answers = [tok(c[1])["input_ids"] + [self.end] for c in clips]
        length = len(prompt) + max(map(len, answers))
        ids = torch.full((len(clips), length), self.pad)
        labels = torch.full((len(clips), length), -100)
        mask = torch.zeros((len(clips), length), dtype=torch.long)
        for b, ans in enumerate(answers):
            seq = prompt + ans
            ids[b, : len(seq)] = torch.tensor(seq)
            labels[b, len(prompt) : len(seq)] = torch.tensor(ans)
            mask[b, : len(seq)] = 1
        frames_uint8 = torch.from_numpy(np.stack([c[0] for c in clips]))  # [B, T, S, S, 3]
        video_slots = torch.arange(len(self.before), len(self.before) + n)
        return dict(frames=frames_uint8, ids=ids, labels=labels, mask=mask, slots=video_slots, prompt_len=len(prompt))

    def _submit(self):
        frames = self.rng.choices(self.frames, self.frame_weights)[0]
        count = max(1, self.tokens // (frames * self.per_frame))
        seeds = range(self.next_seed, self.next_seed + count)
        self.next_seed += count
        if self.pool:
            chunk = -(-count // self.pool._max_workers)
            return frames, self.pool.map(_clip, seeds, [frames] * count, chunksize=chunk)
        return frames, [_clip(seed, frames) for seed in seeds]

    def __next__(self):
        if self.pending is None:
            self.pending = self._submit()
        frames, clips = self.pending
        self.pending = self._submit()  # the workers build the next batch while this one trains
        return self.make(frames, list(clips))


def _clip(seed: int, frames: int):
    clip = synthetic.make_clip(seed, num_frames=frames)
    return clip.frames.numpy(), clip.caption


def normalise(frames: torch.Tensor, processor) -> torch.Tensor:
    """uint8 [B, T, S, S, 3] at the processor's size -> pixel values [B, T, 3, S, S], as the
    video processor computes them (rescale, then normalise; resizing is the identity here)."""
    vp = processor.video_processor
    mean = torch.tensor(vp.image_mean, device=frames.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(vp.image_std, device=frames.device).view(1, 1, 3, 1, 1)
    return (frames.permute(0, 1, 4, 2, 3).float() * vp.rescale_factor - mean) / std


def embed(model, pixels, ids, video_slots):
    embeds = model.get_input_embeddings()(ids)
    features = model.model.get_video_features(
        pixels, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output
    embeds[:, video_slots] = features.to(embeds.dtype)
    return embeds


def caption_logits(model, embeds, labels, mask, positions, **kwargs):
    """Float logits [n, vocab] predicting the n caption tokens (rows where `labels` != -100), in order."""
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False, **kwargs
    ).last_hidden_state
    rows = labels[:, 1:] != -100
    return model.lm_head(hidden[:, :-1][rows]).float()


def caption_loss(model, embeds, labels, mask, positions, **kwargs):
    logits = caption_logits(model, embeds, labels, mask, positions, **kwargs)
    return F.cross_entropy(logits, labels[:, 1:][labels[:, 1:] != -100])


def distilled_loss(student_logits, teacher_logits, answers, distill: float):
    """(1 - distill) * cross-entropy on the true caption + distill * KL(teacher || student):
    the draft learns the target's distribution, which is what acceptance measures (DistillSpec).
    Logits [n, vocab], answers [n]; distill in [0, 1]."""
    student = F.log_softmax(student_logits, -1)
    kl = F.kl_div(student, F.log_softmax(teacher_logits, -1), log_target=True, reduction="batchmean")
    return (1 - distill) * F.nll_loss(student, answers) + distill * kl


def keep_rows(batch_size, ids_len, video_slots, ratio, method, scores, generator):
    """Per-sequence prompt rows [B, L'] kept for the draft: all text plus kept video slots."""
    n = len(video_slots)
    is_text = torch.ones(ids_len, dtype=torch.bool)
    is_text[video_slots] = False
    if ratio == 0:
        return torch.arange(ids_len).expand(batch_size, -1)
    rows = []
    for b in range(batch_size):
        keep = pruning.select(method, n=n, ratio=ratio, scores=None if scores is None else scores[b], generator=generator)
        rows.append(torch.cat([is_text.nonzero().flatten(), video_slots[keep]]).sort().values)
    return torch.stack(rows)


def learning_rate_factor(step: int, steps: int, warmup: int = 50, decay_fraction: float = 1.0) -> float:
    """Warm-up, then constant, then a cosine to 0 over the last `decay_fraction` of the steps
    (1.0: cosine over the whole run; 0.0: constant, for a stage that another run continues)."""
    decay_start = steps * (1 - decay_fraction)
    into_decay = max(0.0, min(step, steps) - decay_start) / max(steps - decay_start, 1e-9)
    return min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * into_decay)) if decay_fraction > 0 else 1.0)


REPLAN_AT = (40, 100, 200, 400, 800, 1600, 3200, 6400)


def planned_steps(cap: int, budget_s: float, before_warm_s: float, per_step_s: float, done: int) -> int:
    """Steps that fit `budget_s` at `per_step_s` after `before_warm_s` of start-up, at most `cap`
    and never fewer than one more than `done`. planned_steps(1000, 100, 10, 0.5, 40) -> 180."""
    return max(done + 1, min(cap, int((budget_s - before_warm_s) / per_step_s)))


def train_model(model, batches, steps, lr, device, log, role, target=None, seed=0, minutes=None, decay_fraction=1.0,
                stop_after_minutes=None, distill=0.0):
    """Train for `steps`, or fewer if `minutes` would be exceeded: the number of steps is
    planned from the mean time per step since step 10, at each step of REPLAN_AT (clip lengths,
    and so step times, vary from batch to batch: an early plan can be far off), and logged
    ("planned_steps", then "steps_done"), so a run is reproducible by passing "steps_done" back
    as `steps` (up to the learning-rate curve, which followed each plan). `stop_after_minutes`
    ends the run at that wall time whatever the schedule (for a constant-rate stage that a later run continues; "steps_done" is logged).
    With a `target` (training the draft), `distill` > 0 mixes in the KL divergence from the target's next-token
    distribution on the whole video to the draft's on its pruned video (`distilled_loss`)."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    plan = {"steps": steps}
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, plan["steps"], decay_fraction=decay_fraction))
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    start = time.time()
    step, data_s, skipped = 0, 0.0, 0
    while step < plan["steps"]:
        if stop_after_minutes is not None and time.time() - start > stop_after_minutes * 60:
            break
        if step == 10:
            warm = time.time()
        if minutes is not None and step in REPLAN_AT:
            per_step = (time.time() - warm) / (step - 10)
            plan["steps"] = planned_steps(steps, minutes * 60, warm - start, per_step, step)
            log({"role": role, "step": step, "planned_steps": plan["steps"], "seconds_per_step": round(per_step, 4)})
        waited = time.time()
        batch = next(batches)
        data_s += time.time() - waited
        ids, labels, mask = (batch[k].to(device) for k in ("ids", "labels", "mask"))
        pixels = normalise(batch["frames"].to(device), batches.processor)
        slots = batch["slots"]
        positions = torch.arange(ids.shape[1], device=device).expand(ids.shape[0], -1)
        with autocast:
            embeds = embed(model, pixels, ids, slots)
            if target is None:
                loss = caption_loss(model, embeds, labels, mask, positions)
            else:
                ratio, method = rng.choice(DRAFT_RATIOS), rng.choice(DRAFT_SELECTIONS)
                scores = None
                if method == "specvlm" and ratio > 0:
                    scores = target_scores(target, pixels, ids, mask, positions, slots, batch["prompt_len"])
                rows = keep_rows(ids.shape[0], ids.shape[1], slots, ratio, method, scores, generator).to(device)
                # ratio 0 keeps every row: the draft also learns from whole videos
                gather = lambda t: torch.gather(t, 1, rows if t.dim() == 2 else rows[..., None].expand(-1, -1, t.shape[-1]))
                if distill:
                    with torch.no_grad():
                        teacher = caption_logits(target, embed(target, pixels, ids, slots), labels, mask, positions)
                    student = caption_logits(model, gather(embeds), gather(labels), gather(mask), gather(positions))
                    loss = distilled_loss(student, teacher, labels[:, 1:][labels[:, 1:] != -100], distill)
                else:
                    loss = caption_loss(model, gather(embeds), gather(labels), gather(mask), gather(positions))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if torch.isfinite(norm):
            optimizer.step()
        else:  # a rare bf16 overflow: drop this batch rather than poison the weights
            skipped += 1
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == plan["steps"] - 1:
            log({"role": role, "step": step, "loss": round(loss.item(), 4), "frames": pixels.shape[1],
                 "lr": schedule.get_last_lr()[0], "elapsed_s": round(time.time() - start, 1),
                 "waiting_for_data_s": round(data_s, 1), "skipped_non_finite": skipped})
        step += 1
    log({"role": role, "steps_done": step, "skipped_non_finite": skipped})
    return model.eval()


@torch.no_grad()
def target_scores(target, pixels, ids, mask, positions, slots, prompt_len):
    """The trained target's verifier scores for a batch: [B, n] (text after the video -> video)."""
    recorder = ScoreRecorder(torch.arange(int(slots[-1]) + 1, prompt_len), slots)
    embeds = embed(target, pixels, ids[:, :prompt_len], slots)
    target.model.language_model(
        inputs_embeds=embeds, attention_mask=mask[:, :prompt_len], position_ids=positions[:, :prompt_len],
        use_cache=False, recorder=recorder,
    )
    return recorder.scores.float().cpu()


@torch.no_grad()
def caption_accuracy(model, processor, seeds, frames=16, max_new_tokens=48):
    """Greedy captions of held-out clips, scored against their ground truth."""
    lm = LlavaOnevisionLM(model, processor)
    scores = []
    for seed in seeds:
        clip = synthetic.make_clip(seed, num_frames=frames)
        prompt = lm.prepare(from_array(clip.frames, fps=8.0), QUESTION)
        text = generate_ar(lm, prompt, max_new_tokens).text
        scores.append(synthetic.score_caption(text, clip.objects))
    return synthetic.aggregate(scores)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-steps", type=int, default=4000)
    parser.add_argument("--draft-steps", type=int, default=3000)
    parser.add_argument("--target-minutes", type=float, default=None, help="cap the target's steps to this time")
    parser.add_argument("--draft-minutes", type=float, default=None, help="cap the draft's steps to this time")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tokens-per-batch", type=int, default=24_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--eval-clips", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--stop-after-minutes", type=float, default=None, help="end each model's training at this wall time")
    parser.add_argument("--init", type=Path, default=None, help="continue from the models saved in this folder")
    parser.add_argument("--frames", type=int, nargs="+", default=list(FRAMES),
                        help="frame counts of the training clips (64 video tokens per frame)")
    parser.add_argument("--frame-weights", type=float, nargs="+", default=None,
                        help="relative frequency of each --frames entry (default: the built-in mix, or equal)")
    parser.add_argument("--distill", type=float, default=0.0,
                        help="draft only: weight in [0, 1] of the KL divergence from the target's next-token distribution "
                             "(on the whole video) against the caption's cross-entropy (0: captions alone)")
    parser.add_argument("--draft-from-target", action="store_true",
                        help="start the draft as the (init) target cut to the draft's head dimension (`cut.cut_draft`), "
                             "not as the shipped or a fresh draft")
    parser.add_argument("--decay-fraction", type=float, default=1.0,
                        help="share of this run's steps over which the learning rate decays to 0 (0: constant)")
    args = parser.parse_args(argv)
    if not 0 <= args.distill <= 1:
        parser.error(f"--distill must lie in [0, 1] (a weight), got {args.distill}")
    if args.draft_from_target and (args.init is None or args.target_steps):
        parser.error("--draft-from-target cuts the draft from a trained target: give --init FOLDER (with the trained "
                     f"target) and --target-steps 0 (got --init {args.init}, --target-steps {args.target_steps}).")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    earlier = (args.init / "train_log.jsonl").read_text() if args.init and (args.init / "train_log.jsonl").exists() else ""
    log_file = open(args.out / "train_log.jsonl", "w")
    log_file.write(earlier)

    def log(record):
        print(json.dumps(record), flush=True)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    target, draft, processor = build_pair(args.seed, args.init)
    fresh_draft = args.init is None or not (args.init / "draft").exists()
    if args.draft_from_target:
        from .cut import cut_draft

        draft, fresh_draft = cut_draft(target, DRAFT["head_dim"]), False
    stage = sum('"stage"' in line for line in earlier.splitlines())
    log({"stage": stage, "init": str(args.init) if args.init else None,
         **({"draft": f"cut from the target, head dimension {DRAFT['head_dim']}"} if args.draft_from_target else {})})
    # a stage continued from saved models draws fresh clips: training seeds never repeat
    weights = args.frame_weights or (list(FRAME_WEIGHTS) if tuple(args.frames) == FRAMES else [1.0] * len(args.frames))
    batches = Batches(processor, args.tokens_per_batch, args.seed + 1000 * stage, args.workers, args.frames, weights)
    held_out = list(HELD_OUT_SEEDS[: args.eval_clips])

    roles = [("target", target)]
    if args.target_steps:
        train_model(target, batches, args.target_steps, args.lr, device, log, "target", seed=args.seed + 1000 * stage,
                    minutes=args.target_minutes, decay_fraction=args.decay_fraction,
                    stop_after_minutes=args.stop_after_minutes)
        log({"role": "target", "held_out": caption_accuracy(target, processor, held_out)})
    if args.draft_steps:
        target.to(device)
        if fresh_draft:  # the draft starts from the target's trained vision tower, as LLaVA-OneVision's sizes share one
            draft.model.vision_tower.load_state_dict(target.model.vision_tower.state_dict())
            log({"role": "draft", "vision_tower": "initialised from the trained target's"})
        enable_scores(LlavaOnevisionLM(target, processor))
        train_model(draft, batches, args.draft_steps, args.lr, device, log, "draft", target=target,
                    seed=args.seed + 1 + 1000 * stage, minutes=args.draft_minutes, decay_fraction=args.decay_fraction,
                    stop_after_minutes=args.stop_after_minutes, distill=args.distill)
        log({"role": "draft", "held_out": caption_accuracy(draft, processor, held_out)})
        roles.append(("draft", draft))

    for role, model in roles:
        model.to("cpu", torch.float32).save_pretrained(args.out / role, max_shard_size="15MB")
        processor.save_pretrained(args.out / role)
    log({"done": True, "args": {k: str(v) for k, v in vars(args).items()}, "scores_attention": SCORES_ATTENTION})


if __name__ == "__main__":
    main()
