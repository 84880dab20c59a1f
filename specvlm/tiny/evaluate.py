"""Measure the embedded pair on held-out synthetic clips and write its model card numbers.

    python -m specvlm.tiny.evaluate --pair specvlm/tiny --clips 160 --workers 14 --out specvlm/tiny/metrics.json

Measured (never typed): caption accuracy per attribute of the target with all video tokens,
of the target pruned to 10% of its own video tokens (uniform, and top attention), and of the
draft alone; and the mean accepted tokens (chain of 5) of speculative decoding for every
selection method at ratios 0, .5, .75, .9, .95. Held-out clips use seeds below 10**5; training
clips start at 10**6.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch

from .. import synthetic
from ..attention import prefill_with_scores
from ..decoding import generate_ar, generate_sd
from ..models import Pair, load_lm
from ..pruning import METHODS, select
from ..video import from_array

QUESTION = "Describe the video."
RATIOS = (0.0, 0.5, 0.75, 0.9, 0.95)


def held_out(seeds, frames: int):
    for seed in seeds:
        clip = synthetic.make_clip(seed, num_frames=frames)
        yield clip, from_array(clip.frames, fps=8.0)


def target_pruned_keep(lm, prompt, method: str, ratio: float):
    """The target's own video pruned: indices kept by `method` (top uses its own attention)."""
    scores = None
    if method in ("top", "specvlm"):
        _, scores = prefill_with_scores(lm, prompt, lm.embed(prompt), lm.new_cache())
    return select(method, n=prompt.num_video_tokens, ratio=ratio, scores=scores, generator=torch.Generator().manual_seed(0))


def measure(pair: Pair, seeds, frames: int, k: int, max_new_tokens: int, methods=METHODS) -> dict:
    """Raw per-clip caption scores and per-clip MAT for the held-out clips `seeds`."""
    target, draft = pair.target, pair.draft
    captions = {"target": [], "target_uniform_10pct": [], "target_top_10pct": [], "draft": []}
    accepted = {f"{m}@{r}": [] for m in ("sd",) + tuple(methods) for r in RATIOS if (m == "sd") == (r == 0.0)}
    lengths = []
    for clip, video in held_out(seeds, frames):
        prompt = target.prepare(video, QUESTION)
        score = lambda res: synthetic.score_caption(res.text, clip.objects)
        reference = generate_ar(target, prompt, max_new_tokens)
        lengths.append(len(reference.tokens))
        captions["target"].append(score(reference))
        captions["draft"].append(score(generate_ar(draft, prompt, max_new_tokens)))
        for name, method in (("target_uniform_10pct", "uniform"), ("target_top_10pct", "top")):
            keep = target_pruned_keep(target, prompt, method, 0.9)
            captions[name].append(score(generate_ar(target, prompt, max_new_tokens, keep=keep)))
        for key in accepted:
            method, ratio = key.split("@")
            accepted[key].append(generate_sd(pair, prompt, method, float(ratio), k, max_new_tokens).mean_accepted)
    return {"captions": captions, "accepted": accepted, "video_tokens": prompt.num_video_tokens, "lengths": lengths}


def _shard(args):
    folder, seeds, frames, k, max_new_tokens, methods, device = args
    if device == "cpu":
        torch.set_num_threads(1)
    pair = Pair(load_lm(folder / "target", device), load_lm(folder / "draft", device), "embedded")
    with torch.inference_mode():
        return measure(pair, seeds, frames, k, max_new_tokens, methods)


def evaluate(folder: Path, clips: int, frames: int, k: int, max_new_tokens: int, workers: int = 1,
             methods=METHODS, device: str = "cpu") -> dict:
    """Metrics over held-out seeds 0..clips-1, computed on the CPU in `workers` processes
    (or in this process on `device`, e.g. "cuda" for long clips)."""
    import multiprocessing

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown selection method(s) {sorted(unknown)}: choose from {list(METHODS)}.")
    if device != "cpu":
        workers = 1
    shards = [(folder, range(i, clips, workers), frames, k, max_new_tokens, tuple(methods), device) for i in range(workers)]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_shard, shards)
    else:
        parts = [_shard(shards[0])]
    captions = {name: [row for part in parts for row in part["captions"][name]] for name in parts[0]["captions"]}
    accepted = {key: [v for part in parts for v in part["accepted"][key]] for key in parts[0]["accepted"]}
    lengths = [n for part in parts for n in part["lengths"]]
    return {
        "clips": clips, "frames": frames, "k": k, "max_new_tokens": max_new_tokens,
        "video_tokens": parts[0]["video_tokens"],
        "target_new_tokens": {"mean": sum(lengths) / len(lengths), "min": min(lengths), "max": max(lengths)},
        "captions": {name: synthetic.aggregate(rows) for name, rows in captions.items()},
        "mean_accepted": {key: sum(v) / len(v) for key, v in accepted.items()},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", type=Path, default=Path(__file__).parent)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="CPU processes")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="selection methods for the MAT table")
    parser.add_argument("--device", default="cpu", help='"cpu" (with --workers processes) or e.g. "cuda"')
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device {args.device!r}: use cpu (with --workers processes) or cuda.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for, but torch sees no CUDA device: use --device cpu.")
    if args.device != "cpu" and args.workers > 1:
        parser.error("--workers applies to --device cpu only: on a GPU the clips run in this process.")
    start = time.time()
    metrics = evaluate(args.pair, args.clips, args.frames, args.k, args.max_new_tokens, args.workers, args.methods,
                       args.device)
    where = f"cpu x{args.workers} processes" if args.device == "cpu" else torch.cuda.get_device_name(args.device)
    metrics.update(date=str(date.today()), device=where, seconds=round(time.time() - start, 1))
    args.out.write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
