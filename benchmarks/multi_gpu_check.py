"""Run on a machine with two GPUs: does a model spread over them give the logits and tokens of
the same model on one? (This machine's tests cannot: they have no second device.)

1. Random LLaVA-OneVision-7B language models (`costs.build_lm`, the same weights whatever the
   placement; untied, so the output layer sits on the second card) on cuda:0 and spread over
   cuda:0 and cuda:1: one forward pass of each kind
   (1 token, chain 6, tree 26) after 4096 cached tokens, on transformers' eager and sdpa paths
   and on the fast path's uncompiled steps (what a spread model runs): max |difference|.
2. The embedded pair with its target spread by `load_pair(..., target_device_map="balanced")`
   and its draft on either card: greedy tokens of AR, chain SD, SpecVLM (chain and tree) on the
   plain path and on the fast path, against the one-card target's, for a few synthetic clips.
3. The 72B shape spread over both: wall time of a few profiled steps beside each GPU's kernel
   time in them.

    python benchmarks/multi_gpu_check.py --out figures/multi_gpu_check_{card}.json
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from collections import Counter

import torch

import specvlm as sv
from specvlm import costs, synthetic
from specvlm.__main__ import git_commit
from specvlm.bench import card_name, save
from specvlm.fast import generate_fast
from specvlm.trees import MC_SIM_7B_63
from specvlm.video import from_array

DEVICES = ["cuda:0", "cuda:1"]
KINDS = {"step": (1, None), "chain": (6, None), "tree": (MC_SIM_7B_63.num_nodes, MC_SIM_7B_63)}


def logits_check(shape: str = "llava-ov-7b", context: int = 4096) -> list[dict]:
    one = costs.build_lm(shape, DEVICES[0])
    two = costs.build_lm(shape, DEVICES)
    same_weights = all(torch.equal(p, q.to(p.device)) for p, q in zip(one.parameters(), two.parameters()))
    layers = {str(d): n for d, n in Counter(costs.layer_devices(two)).items()}
    layers["lm_head"] = str(two.lm_head.weight.device)
    paths = {"eager": costs.PATHS["eager"], "sdpa": costs.PATHS["sdpa"],
             "fast (uncompiled)": costs.fast_step("sdpa", compile=False)}
    rows = []
    for path, make_step in paths.items():
        for kind, (query_len, tree) in KINDS.items():
            a = make_step(one, context, query_len, tree)().float()
            b = make_step(two, context, query_len, tree)().float().to(a.device)
            rows.append({"shape": shape, "path": path, "kind": kind, "context": context, "same_weights": same_weights,
                         "layers_per_device": layers, "max_abs_diff": (a - b).abs().max().item(),
                         "same_argmax": bool(torch.equal(a.argmax(-1), b.argmax(-1)))})
            print(rows[-1], flush=True)
    return rows


def tokens_check(seeds=(1, 2, 3), frames: int = 16, max_new_tokens: int = 33) -> list[dict]:
    one = sv.load_pair("tiny", device=DEVICES[0])
    rows = []
    for draft_device in DEVICES:
        two = sv.load_pair("tiny", device=draft_device, target_device_map="balanced")
        rows += _tokens_rows(one, two, seeds, frames, max_new_tokens)
    return rows


def _tokens_rows(one, two, seeds, frames, max_new_tokens) -> list[dict]:
    placed = {name: str(where) for name, where in getattr(two.target.model, "hf_device_map", {"": two.target.device}).items()}
    runs = [("ar", None), ("sd", None), ("specvlm", None), ("specvlm", MC_SIM_7B_63)]
    rows = []
    for seed in seeds:
        video = from_array(synthetic.make_clip(seed, num_frames=frames).frames, fps=8.0)
        reference = sv.generate(one, video, method="ar", max_new_tokens=max_new_tokens).tokens
        prompt = two.target.prepare(video, sv.models.DEFAULT_QUESTION)
        draft_prompt = two.draft.prepare(video, sv.models.DEFAULT_QUESTION)
        for method, tree in runs:
            for path in ("plain", "fast"):
                row = {"seed": seed, "method": method, "tree": tree is not None, "path": path,
                       "target_device_map": placed, "draft_device": str(two.draft.device),
                       "target_layers_per_device": {str(d): n for d, n in Counter(two.target.layer_devices).items()}}
                try:
                    if path == "plain":
                        result = sv.generate(two, video, method=method, tree=tree, max_new_tokens=max_new_tokens)
                    else:
                        result = generate_fast(two, prompt, method, tree=tree, max_new_tokens=max_new_tokens,
                                               draft_prompt=draft_prompt, attention="sdpa")
                    row.update(tokens=len(result.tokens), equal=result.tokens == reference)
                except Exception as error:  # a failure is a finding of this check, reported in its JSON
                    row.update(error=f"{type(error).__name__}: {error}", trace=traceback.format_exc()[-2000:])
                print(row, flush=True)
                rows.append(row)
    return rows


def busy_check(shape: str = "llava-ov-72b", context: int = 1024, steps: int = 5) -> list[dict]:
    """Where a spread model's step time goes: wall ms per step beside each GPU's kernel time
    per step (torch.profiler), for transformers' sdpa path and the fast path's uncompiled steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model = costs.build_lm(shape, DEVICES)
    rows = []
    for path, make_step in {"sdpa": costs.PATHS["sdpa"], "fast": costs.PATHS["fast"]}.items():
        step = make_step(model, context, 1)
        unprofiled = costs.time_ms(step, DEVICES, repeats=steps, warmup=2)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            costs._sync(DEVICES)
            began = time.perf_counter()
            for _ in range(steps):
                step()
            costs._sync(DEVICES)
            wall = 1000 * (time.perf_counter() - began) / steps
        busy = Counter()
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                busy[f"cuda:{event.device_index}"] += event.time_range.elapsed_us() / 1000 / steps
        rows.append({"shape": shape, "path": path, "context": context, "wall_ms": wall, "wall_ms_unprofiled": unprofiled,
                     "kernel_ms_per_device": dict(busy), "kernel_ms_total": sum(busy.values())})
        print(rows[-1], flush=True)
        step = None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON path; '{card}' becomes the card's name")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"this check needs two GPUs; this machine has {torch.cuda.device_count()}.")
    result = {"device": card_name(torch.device(DEVICES[0])), "devices": torch.cuda.device_count(),
              "torch": torch.__version__, "code": git_commit(), "logits": logits_check(), "tokens": tokens_check(),
              "busy": busy_check()}
    if args.out:
        save(result, args.out.format(card=costs.card_slug(result["device"])))


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
