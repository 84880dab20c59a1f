"""Run on a GPU: one draft step's CUDA graph replayed alone, in a quiet process and in conditions the
bench's process differs in.

On one H100 the bench's one-token draft step, replayed alone from its CUDA graph with no host work
between replays (`bench.host_side`'s "replay_us_per_step"), took about a tenth longer than the
profile's step at the same shape, for the same kernels and the same busy time (notebook 05,
section 28). The two processes differ in what else they hold and run: the bench holds a 7B target,
its caches and graphs, and runs the target's passes between the draft's. This script takes the
profile's step (random weights at the 0.5B shape, projections fused, combo kernels, flash-decoding,
the output layer cut to `--draft-vocab` rows, `--slots` cached tokens) and times its graph replayed
`bench.QUEUED` times in a row, between CUDA events (device time only; and the host's time to launch
them, "launch_host_us"), median of `--samples`:

- "quiet": nothing else on the card (nor in the process: the step's model alone);
- "widened_draft": a second graph, the embedded draft (`--draft`) widened to `--shape` as the bench
  widens it (`widen.widen_model`), at the same slots, vocabulary size and settings, replayed quiet: the
  bench's draft weights instead of random ones, in this process ("quiet_beside_widened": the first
  graph again, after it);
- "with_target": beside a `--target-shape` model with its own fast step (FlexAttention, as the bench's
  target runs) captured at `--target-slots` cached tokens (as the bench's process holds its 7B target:
  weights, cache, graphs);
- "after_target_step": each sample right after one replay of that target step's graph (a one-token
  step, not the bench's 26-node verification: work of the target's kind on the device just before);
- "after_matmuls": each sample right after `--load-ms` of large bf16 matrix products queued before
  it (compute-bound work, as the target's prefill);
- "after_copies": each sample right after as long a copy of a large tensor (bandwidth-bound work,
  as the target's decode passes);
- "with_memory": with `--filler-gb` of other tensors allocated and written (a process holding a
  7B target and its caches);
- "with_many_allocations": with `--pieces` tensors of 8 MiB allocated instead (a model's weights are
  hundreds of separate tensors; the caching allocator serves two per 20 MiB segment);
- "with_other_graphs": with `--graphs` other CUDA graphs captured (of 100 small kernels each);
- "quiet_again": nothing else again, after the rest, for drift;
- "after_profiler": after one replay under `torch.profiler`, as in a process that has profiled.

The target is compiled with combo kernels too (inductor's setting is the process's), which the bench's
target is not. Each row records the memory allocated, and the card's SM clock, memory clock, power and
temperature (nvidia-smi) read right after it. Every replay writes the same cache slots with the same
values, so the conditions change no number the step computes.

    python benchmarks/graph_gaps.py --out 'figures/graph_gaps_{card}.json'
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch._inductor import config as inductor_config

import specvlm
from specvlm import costs
from specvlm.__main__ import git_commit, portable_out, positive_int, recorded_environment
from specvlm.bench import QUEUED, card_id, card_name, median_ms, save
from specvlm.fusion import fuse_projections


DRAFT = Path(specvlm.__file__).parent / "tiny" / "draft_cut"
BUSY_CYCLES = 1_000_000  # a sleeping kernel of about half a millisecond ahead of every sample


def replay_us(graph, samples: int, before=None) -> tuple[float, float]:
    """(device, host) median µs per replay of `graph`: `QUEUED` replays in a row between two CUDA
    events, and the host's time to launch them. `before()` queues its work ahead of each sample,
    outside the events; then a sleeping kernel keeps the device busy while the host launches the
    replays, so every condition times replays queued back to back."""
    device, host = [], []
    for _ in range(samples):
        if before is not None:
            before()
        torch.cuda._sleep(BUSY_CYCLES)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        began = time.perf_counter()
        for _ in range(QUEUED):
            graph.replay()
        host.append(1e6 * (time.perf_counter() - began) / QUEUED)
        end.record()
        end.synchronize()
        device.append(1000 * start.elapsed_time(end) / QUEUED)
    return statistics.median(device), statistics.median(host)


def widened_lm(folder: str, shape, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 1):
    """The causal LM inside the checkpoint at `folder` widened to `shape` (`widen.widen_model`, in
    `dtype` on `device`, its new weights drawn from `seed`: 1, as the bench's `widen_pair` draws a
    draft's), as the bare Qwen2ForCausalLM that `costs.fast_step` takes: the widened decoder and output
    layer, shared."""
    from transformers import Qwen2ForCausalLM

    from specvlm.models import load_lm
    from specvlm.widen import widen_model

    wide = widen_model(load_lm(folder, device="cpu", dtype=torch.float32).model, shape, device, dtype, seed)
    with torch.device("meta"):
        bare = Qwen2ForCausalLM(wide.config.text_config)
    bare.model, bare.lm_head = wide.model.language_model, wide.lm_head
    return bare.eval()


def captured_step(model, slots: int, vocabulary: int | None, attention: str = "flash", fuse: bool = True):
    """`model`'s one-token fast step (projections fused where `fuse`, as the fast path fuses a draft's;
    `attention` as the fast path names it) at `slots` cached tokens, warmed up, and the CUDA graph it
    replays."""
    if fuse:
        fuse_projections(costs._BareLM(model))
    step = costs.fast_step(attention, None, vocabulary)(model, slots, 1)
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    return step, step.engine.last_graph


def card_state(device: torch.device) -> dict:
    """The card's clocks, power and temperature now, as nvidia-smi reports them (None where it
    reports none, or cannot be run)."""
    keys = ("sm_mhz", "memory_mhz", "power_w", "temperature_c")
    try:
        text = subprocess.run(["nvidia-smi", f"--id=GPU-{card_id(device)}",
                               "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return dict.fromkeys(keys)

    def number(field: str) -> float | None:
        try:
            return float(field)
        except ValueError:
            return None

    return dict(zip(keys, map(number, text.splitlines()[0].split(","))))


def timed_load(work, load_ms: float):
    """A function queuing `work()` as many times as takes about `load_ms` on the device."""
    work()
    torch.cuda.synchronize()
    began = time.perf_counter()
    work()
    torch.cuda.synchronize()
    times = max(1, round(load_ms / (1000 * (time.perf_counter() - began))))
    return lambda: [work() for _ in range(times)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llava-ov-0.5b")
    parser.add_argument("--slots", type=int, default=6168)
    parser.add_argument("--draft-vocab", type=int, default=32768)
    parser.add_argument("--samples", type=positive_int, default=30)
    parser.add_argument("--load-ms", type=float, default=20.0)
    parser.add_argument("--filler-gb", type=int, default=40, help="GiB of other tensors for 'with_memory'")
    parser.add_argument("--pieces", type=int, default=2000, help="tensors of 8 MiB for 'with_many_allocations'")
    parser.add_argument("--graphs", type=int, default=20, help="graphs of 100 kernels for 'with_other_graphs'")
    parser.add_argument("--draft", default=str(DRAFT), help="'' to leave out 'widened_draft'")
    parser.add_argument("--target-shape", default="llava-ov-7b", help="'' to leave out the target's conditions")
    parser.add_argument("--target-slots", type=int, default=12384, help="the bench's target: 12,313 prompt tokens")
    parser.add_argument("--out", default="figures/graph_gaps_{card}.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this script replays CUDA graphs: run it on a CUDA card.")
    device = torch.device("cuda")
    inductor_config.combo_kernels = True  # as the fast path compiles a draft's steps
    model = costs.build_lm(args.shape, device, torch.bfloat16)
    step, graph = captured_step(model, args.slots, args.draft_vocab)
    if graph is None:
        parser.error("the step was not captured as a CUDA graph by hand: leave SPECVLM_CUDA_GRAPHS unset or 'manual'.")
    result = {"card": card_name(device), "card_id": card_id(device), "torch": torch.__version__,
              "command": recorded_environment() + shlex.join(["python", *portable_out(sys.argv)]),
              "code": git_commit(), "date": __import__("datetime").date.today().isoformat(), "shape": args.shape,
              "slots": args.slots, "draft_vocab": args.draft_vocab, "queued": QUEUED, "samples": args.samples,
              "load_ms": args.load_ms, "draft": args.draft and Path(args.draft).name,
              "target_shape": args.target_shape, "target_slots": args.target_slots, "filler_gb": args.filler_gb,
              "pieces": args.pieces, "graphs": args.graphs,
              "note": "one draft step's CUDA graph (profile.py's: random weights, fused, combo kernels, flash, cut "
                      "output layer) replayed QUEUED times in a row between CUDA events, behind a sleeping kernel, "
                      "median us per replay; bench_median_ms: the same replays timed as bench.host_side times them; "
                      "widened_draft: the embedded draft widened to the same shape, its own graph, timed alike; "
                      "with_target/after_target_step: beside a random target's one-token step graph (FlexAttention, "
                      "unfused), and after one replay of it",
              "rows": []}
    out = args.out.format(card=costs.card_slug(card_name(device)))

    def row(condition: str, before=None, graph=graph) -> None:
        us, host_us = replay_us(graph, args.samples, before)
        result["rows"].append({"condition": condition, "replay_us": us, "launch_host_us": host_us,
                               "allocated_gib": torch.cuda.memory_allocated(device) / 2 ** 30, **card_state(device)})
        save(result, out)  # after every row: a later condition that fails keeps the earlier ones
        print(f"{condition:<22} {us:8.1f} us per replay, {host_us:6.1f} us to launch  {result['rows'][-1]}", flush=True)

    row("quiet")
    result["bench_median_ms"] = median_ms(device, graph.replay, lambda: None, args.samples, queued=QUEUED)
    if args.draft:
        widened, widened_graph = captured_step(widened_lm(args.draft, args.shape, device), args.slots, args.draft_vocab)
        row("widened_draft", graph=widened_graph)
        row("quiet_beside_widened")
        del widened, widened_graph
        costs._free(device)  # an engine and its model refer to each other: only the collector frees them
    if args.target_shape:
        target = costs.build_lm(args.target_shape, device, torch.bfloat16, seed=1)
        target_step, target_graph = captured_step(target, args.target_slots, None, "flex", fuse=False)  # as the bench's
        row("with_target")
        row("after_target_step", target_graph.replay)
        del target, target_step, target_graph
        costs._free(device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    source = torch.randn(2 ** 30, device=device, dtype=torch.bfloat16)  # 2 GiB
    destination = torch.empty_like(source)
    matmuls = timed_load(lambda: a @ a, args.load_ms)
    copies = timed_load(lambda: destination.copy_(source), args.load_ms)
    row("after_matmuls", matmuls)
    row("after_copies", copies)
    del a, source, destination, matmuls, copies
    torch.cuda.empty_cache()
    filler = [torch.ones(2 ** 29, device=device, dtype=torch.bfloat16) for _ in range(args.filler_gb)]
    row("with_memory")
    del filler
    torch.cuda.empty_cache()
    pieces = [torch.ones(2 ** 22, device=device, dtype=torch.bfloat16) for _ in range(args.pieces)]  # 8 MiB each
    row("with_many_allocations")
    del pieces
    torch.cuda.empty_cache()
    others = [torch.cuda.CUDAGraph() for _ in range(args.graphs)]
    x = torch.ones(1024, device=device)
    for other in others:
        with torch.cuda.graph(other):
            for _ in range(100):
                x.mul_(1.0)
    row("with_other_graphs")
    del others, x
    torch.cuda.empty_cache()
    row("quiet_again")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]):
        graph.replay()
        torch.cuda.synchronize()
    row("after_profiler")
    return 0


if __name__ == "__main__":
    sys.exit(main())
