"""End-to-end decoding speed: AR vs speculative decoding vs SpecVLM on one pair, in one run.

    python -m specvlm bench --frames 16 64 --max-new-tokens 64 --out figures/bench.json

For each frame count, every method decodes the same prompt; each is timed `repeats` times
after one warm-up (device-synchronised wall clock, median reported), and its tokens are
compared with AR's. A speedup is reported only for outputs equal to AR token for token;
otherwise the row says so. Decode time starts after all prefill work (the target's prefill,
scores, selection and the draft's prefill), as in the paper's reference code; prefill is
reported beside it. This is the plain (dynamic-cache, uncompiled) path: it measures what the
library's loops cost on a card, not the fast path the paper's numbers need.
"""

from __future__ import annotations

import json
import platform
import statistics
from datetime import date

import torch
import transformers

from .decoding import generate_ar, generate_sd
from .models import Pair
from .trees import MC_SIM_7B_63

RUNS = (
    ("ar", None, 0.0),
    ("sd", "chain", 0.0),
    ("specvlm", "chain", 0.9),
    ("sd", "tree", 0.0),
    ("specvlm", "tree", 0.5),
    ("specvlm", "tree", 0.9),
    ("uniform", "tree", 0.9),
)


def timed(fn, repeats: int):
    fn()  # warm-up
    results = [fn() for _ in range(repeats)]
    return results[0], statistics.median(r.decode_s for r in results), statistics.median(
        sum(v for k, v in r.timings.items() if k != "decode") for r in results)


def bench(pair: Pair, video_for, frames_list, max_new_tokens=64, k=5, repeats=3, question="Describe the video.") -> dict:
    """`video_for(frames)` returns a `Video`; returns a JSON-ready dict of rows."""
    rows = []
    for frames in frames_list:
        video = video_for(frames)
        prompt = pair.target.prepare(video, question)
        draft_prompt = prompt if pair.draft is pair.target else pair.draft.prepare(video, question)
        ar, ar_s, ar_prefill = timed(lambda: generate_ar(pair.target, prompt, max_new_tokens), repeats)
        for method, shape, ratio in RUNS:
            if method == "ar":
                res, decode_s, prefill_s = ar, ar_s, ar_prefill
            else:
                tree = MC_SIM_7B_63 if shape == "tree" else None
                res, decode_s, prefill_s = timed(lambda: generate_sd(
                    pair, prompt, method, ratio, k, max_new_tokens, draft_prompt=draft_prompt, tree=tree), repeats)
            same = res.tokens == ar.tokens
            rows.append({
                "frames": frames, "video_tokens": prompt.num_video_tokens, "method": method, "draft": shape,
                "ratio": ratio, "new_tokens": len(res.tokens), "equal_to_ar": same,
                "mean_accepted": res.mean_accepted, "rounds": res.rounds, "decode_s": decode_s, "prefill_s": prefill_s,
                "tokens_per_s": len(res.tokens) / decode_s if decode_s else None,
                "speedup_vs_ar": (ar_s / decode_s) if same and decode_s else None,
                "draft_video_tokens": res.draft_video_tokens,
            })
    device = pair.target.device
    return {
        "pair": pair.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(pair.target.dtype), "torch": torch.__version__, "transformers": transformers.__version__,
        "date": str(date.today()), "max_new_tokens": max_new_tokens, "k": k, "repeats": repeats,
        "timing": "median decode wall clock after one warm-up; device-synchronised", "rows": rows,
    }


def table(result: dict) -> str:
    lines = [f"{result['pair']} on {result['device']} ({result['dtype']}), {result['date']}",
             f"{'frames':>6} {'video':>6} {'method':<8} {'draft':<5} {'ratio':>5} {'MAT':>5} {'decode s':>9} "
             f"{'tok/s':>7} {'x AR':>6} {'= AR':>5}"]
    for r in result["rows"]:
        speed = "-" if r["speedup_vs_ar"] is None else f"{r['speedup_vs_ar']:.2f}"
        lines.append(f"{r['frames']:>6} {r['video_tokens']:>6} {r['method']:<8} {r['draft'] or '-':<5} {r['ratio']:>5.2f} "
                     f"{r['mean_accepted']:>5.2f} {r['decode_s']:>9.3f} {r['tokens_per_s']:>7.1f} {speed:>6} "
                     f"{'yes' if r['equal_to_ar'] else 'NO':>5}")
    return "\n".join(lines)


def save(result: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
