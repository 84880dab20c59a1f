"""End-to-end decoding speed: AR vs speculative decoding vs SpecVLM on one pair, in one run.

    python -m specvlm bench --frames 16 64 --max-new-tokens 64 --out figures/bench.json

For each frame count, every method decodes the same prompt; each is timed `repeats` times
after one warm-up (device-synchronised wall clock, median reported), and its tokens are
compared with AR's. A speedup is reported only for outputs equal to AR token for token;
otherwise the row says so. Decode time starts after all prefill work (the target's prefill,
scores, selection and the draft's prefill), as in the paper's reference code; prefill is
reported beside it. `paths=("plain", "fast")` runs every method on the plain path
(`decoding.py`: dynamic caches, uncompiled) and on the fast path (`fast.py`: static caches,
fixed-shape steps, CUDA graphs on a GPU); each row's speedup is against AR on the same path,
and `speedup_vs_plain_ar` against the plain AR. Outputs of both paths are compared with the plain AR.
`transformers_baselines=True` adds transformers' own greedy `generate` and assisted generation
(the draft as `assistant_model`, seeing the whole video), timed end to end since `generate` has
no separate prefill: `speedup_vs_ar_total` compares every row's prefill + decode with AR's.
"""

from __future__ import annotations

import json
import platform
import statistics
from datetime import date

import torch
import transformers

from .decoding import Stopwatch, generate_ar, generate_sd
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


def run_once(path: str, pair: Pair, prompt, draft_prompt, method: str, shape, ratio: float, k: int, max_new_tokens: int):
    """One generation on the "plain" or "fast" path."""
    tree = MC_SIM_7B_63 if shape == "tree" else None
    if path == "fast":
        from .fast import generate_fast

        return generate_fast(pair, prompt, method, ratio, k, tree=tree, max_new_tokens=max_new_tokens,
                             draft_prompt=draft_prompt)
    if method == "ar":
        return generate_ar(pair.target, prompt, max_new_tokens)
    return generate_sd(pair, prompt, method, ratio, k, max_new_tokens, draft_prompt=draft_prompt, tree=tree)


def hf_generate(pair: Pair, prompt, max_new_tokens: int, assisted: bool) -> tuple[list[int], float]:
    """transformers' own greedy `generate` on the target, as users call it (assisted: with the
    draft as `assistant_model`, which sees the whole video): (new tokens, wall seconds including
    the vision tower and the prefill)."""
    model = pair.target.model
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in prompt.inputs.items()}
    if "pixel_values_videos" in inputs:
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(pair.target.dtype)
    extra = {"assistant_model": pair.draft.model} if assisted else {}
    watch = Stopwatch(pair.target.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    watch.lap("total")
    return out[0, prompt.input_ids.shape[1]:].tolist(), watch.laps["total"]


def hf_rows(pair: Pair, prompt, reference: list[int], ar_total_s: float, frames: int, max_new_tokens: int,
            repeats: int) -> list[dict]:
    """Rows for transformers' `generate` and assisted generation, timed end to end (prefill
    included, so compared with the project's AR prefill + decode)."""
    rows = []
    for method, assisted in (("hf-generate", False), ("hf-assisted", True)):
        hf_generate(pair, prompt, max_new_tokens, assisted)  # warm-up
        runs = [hf_generate(pair, prompt, max_new_tokens, assisted) for _ in range(repeats)]
        tokens, total_s = runs[0][0], statistics.median(t for _, t in runs)
        same = tokens == reference
        rows.append({
            "path": "transformers", "frames": frames, "video_tokens": prompt.num_video_tokens, "method": method,
            "draft": "assistant" if assisted else None, "ratio": 0.0, "new_tokens": len(tokens), "equal_to_ar": same,
            "total_s": total_s, "speedup_vs_ar_total": ar_total_s / total_s if same else None,
            "draft_video_tokens": prompt.num_video_tokens if assisted else None,
        })
    return rows


def bench(pair: Pair, video_for, frames_list, max_new_tokens=64, k=5, repeats=3, question="Describe the video.",
          paths=("plain",), transformers_baselines: bool = False) -> dict:
    """`video_for(frames)` returns a `Video`; returns a JSON-ready dict of rows."""
    rows = []
    for frames in frames_list:
        video = video_for(frames)
        prompt = pair.target.prepare(video, question)
        draft_prompt = prompt if pair.draft is pair.target else pair.draft.prepare(video, question)
        plain_ar_s, reference = None, None
        for path in paths:
            ar, ar_s, ar_prefill = timed(lambda: run_once(path, pair, prompt, draft_prompt, "ar", None, 0.0, k,
                                                            max_new_tokens), repeats)
            reference = reference or ar.tokens
            plain_ar_s = plain_ar_s or (ar_s if path == "plain" else None)
            for method, shape, ratio in RUNS:
                if method == "ar":
                    res, decode_s, prefill_s = ar, ar_s, ar_prefill
                else:
                    res, decode_s, prefill_s = timed(lambda: run_once(
                        path, pair, prompt, draft_prompt, method, shape, ratio, k, max_new_tokens), repeats)
                same = res.tokens == reference and ar.tokens == reference
                rows.append({
                    "path": path, "speedup_vs_plain_ar": (plain_ar_s / decode_s) if same and plain_ar_s and decode_s else None,
                    "frames": frames, "video_tokens": prompt.num_video_tokens, "method": method, "draft": shape,
                    "ratio": ratio, "new_tokens": len(res.tokens), "equal_to_ar": same,
                    "mean_accepted": res.mean_accepted, "rounds": res.rounds, "decode_s": decode_s, "prefill_s": prefill_s,
                    "tokens_per_s": len(res.tokens) / decode_s if decode_s else None,
                    "speedup_vs_ar": (ar_s / decode_s) if same and decode_s else None,
                    "draft_video_tokens": res.draft_video_tokens, "total_s": decode_s + prefill_s,
                    "speedup_vs_ar_total": (ar_s + ar_prefill) / (decode_s + prefill_s) if same else None,
                })
        if transformers_baselines:
            plain_ar = next(r for r in rows if r["frames"] == frames and r["method"] == "ar")
            rows += hf_rows(pair, prompt, reference, plain_ar["total_s"], frames, max_new_tokens, repeats)
    device = pair.target.device
    result = {
        "pair": pair.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(pair.target.dtype), "torch": torch.__version__, "transformers": transformers.__version__,
        "date": str(date.today()), "max_new_tokens": max_new_tokens, "k": k, "repeats": repeats,
        "timing": "median decode wall clock after one warm-up; device-synchronised", "rows": rows,
    }
    if "fast" in paths:
        from .fast import capture_report

        result["fast_path"] = capture_report(pair)
    return result


def table(result: dict) -> str:
    lines = [f"{result['pair']} on {result['device']} ({result['dtype']}), {result['date']}",
             f"{'path':<5} {'frames':>6} {'video':>6} {'method':<8} {'draft':<5} {'ratio':>5} {'MAT':>5} {'decode s':>9} "
             f"{'tok/s':>7} {'x AR':>6} {'= AR':>5}"]
    for r in result["rows"]:
        if r.get("path") == "transformers":
            total = "-" if r["speedup_vs_ar_total"] is None else f"{r['speedup_vs_ar_total']:.2f}"
            lines.append(f"{'hf':<5} {r['frames']:>6} {r['video_tokens']:>6} {r['method']:<12} total {r['total_s']:.3f} s, "
                         f"x AR (prefill + decode) {total}, = AR {'yes' if r['equal_to_ar'] else 'NO'}")
            continue
        speed = "-" if r["speedup_vs_ar"] is None else f"{r['speedup_vs_ar']:.2f}"
        lines.append(f"{r.get('path', 'plain'):<5} {r['frames']:>6} {r['video_tokens']:>6} {r['method']:<8} {r['draft'] or '-':<5} {r['ratio']:>5.2f} "
                     f"{r['mean_accepted']:>5.2f} {r['decode_s']:>9.3f} {r['tokens_per_s']:>7.1f} {speed:>6} "
                     f"{'yes' if r['equal_to_ar'] else 'NO':>5}")
    return "\n".join(lines)


def save(result: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
