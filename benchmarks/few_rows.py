"""Run on a GPU: a draft's projections for a few rows, cuBLAS (`F.linear`) against `few_rows`'
Triton kernels, at the language-model shapes of LLaVA-OneVision 0.5B.

For each projection of a decoder layer (q/k/v stacked with their bias, the output projection, the
MLP's gate/up stacked with the SiLU gate, the down projection) and each number of rows:

- "cublas" and "few_rows": the product and what reads it next (a residual add; the SiLU gate for
  cuBLAS's gate/up), compiled with `torch.compile` and captured, for every decoder layer's own weight (so the L2 cache holds none of
  them), in one CUDA graph;
- "kernel <launch>": `few_rows`' kernel alone for each launch of the sweep, captured likewise,
  to choose `few_rows.default_launch`.

Every row is the median of `--repeats` device-synchronised replays, per layer, beside the
weight's bytes over 3.0 TB/s; the first layer's output is compared with float32.

    python benchmarks/few_rows.py --out figures/few_rows_{card}.json
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import statistics
import sys

import torch
import torch.nn.functional as F

from specvlm import few_rows as fr
from specvlm.__main__ import git_commit, portable_out, recorded_environment
from specvlm.bench import card_name, save
from specvlm.costs import lm_config

BANDWIDTH = 3.0e12  # bytes per second, for the floor column only


def products(shape: str) -> dict:
    """name -> (output columns, inner size, gated, has bias) of one decoder layer's products."""
    c = lm_config(shape)
    dim = c.hidden_size // c.num_attention_heads
    return {"qkv": (c.hidden_size + 2 * c.num_key_value_heads * dim, c.hidden_size, False, True),
            "o": (c.hidden_size, c.hidden_size, False, False),
            "gate_up": (c.intermediate_size, c.hidden_size, True, False),
            "down": (c.hidden_size, c.intermediate_size, False, False)}


def replay_us(graph: torch.cuda.CUDAGraph, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1000)
    return statistics.median(times)


def captured(fn, warmups: int = 3) -> tuple[torch.cuda.CUDAGraph, object]:
    for _ in range(warmups):
        out = fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def measure(shape: str, name: str, rows: int, repeats: int, launches: list[fr.Launch]) -> list[dict]:
    columns, inner, gated, has_bias = products(shape)[name]
    layers = lm_config(shape).num_hidden_layers
    generator = torch.Generator("cuda").manual_seed(0)
    stacked = 2 * columns if gated else columns
    weights = [torch.randn(stacked, inner, device="cuda", dtype=torch.bfloat16, generator=generator) / inner ** 0.5
               for _ in range(layers)]
    biases = [torch.randn(columns, device="cuda", dtype=torch.bfloat16, generator=generator) if has_bias else None
              for _ in range(layers)]
    x = torch.randn(rows, inner, device="cuda", dtype=torch.bfloat16, generator=generator)
    residual = torch.randn(rows, columns, device="cuda", dtype=torch.bfloat16, generator=generator)
    exact = (fr.reference_gated(x.float(), weights[0].float()) if gated
             else F.linear(x.float(), weights[0].float(), None if biases[0] is None else biases[0].float()))
    bytes_per_layer = weights[0].numel() * 2
    base = {"shape": shape, "product": name, "rows": rows, "columns": columns, "inner": inner, "gated": gated,
            "layers": layers, "weight_bytes": bytes_per_layer, "floor_us": bytes_per_layer / BANDWIDTH * 1e6}
    out = []

    def record(variant: str, graph, first, launch=None):
        """`first`: after the replays, the first layer's output (a captured graph writes its outputs only when replayed)."""
        us = replay_us(graph, repeats) / layers
        first = first()
        out.append({**base, "variant": variant, **({"launch": launch.name} if launch else {}), "us": us,
                    "x_floor": us / base["floor_us"],
                    "max_abs_diff_vs_float32": (first.float() - exact).abs().max().item()})
        print(out[-1], flush=True)

    def cublas():
        if gated:
            return [fr.reference_gated(x, w) for w in weights]
        return [F.linear(x, w, b) + residual for w, b in zip(weights, biases)]

    counters = [fr.counters_for(columns, "cuda") for _ in weights]  # kept, as a fused model keeps its own

    def kernels():
        if gated:
            return [fr.gated(x, w) for w in weights]
        return [fr.linear(x, w, b, counters=c) + residual for w, b, c in zip(weights, biases, counters)]

    for variant, fn in (("cublas", cublas), ("few_rows", kernels)):
        graph, outs = captured(torch.compile(fn, dynamic=False))
        record(variant, graph, lambda: outs[0] if gated else outs[0] - residual,
               None if variant == "cublas" else fr.default_launch(columns, inner, gated))
    for launch in launches:
        if gated and launch.splits != 1:
            continue
        buffers = [torch.empty(rows, columns, dtype=torch.bfloat16, device="cuda") for _ in weights]
        counters = fr.counters_for(columns, "cuda")
        try:
            graph, _ = captured(lambda: [fr._launch(x, w, b, out, columns, launch, gated, counters)
                                         for w, b, out in zip(weights, biases, buffers)])
        except Exception as error:  # a launch the card cannot build: say so, go on
            out.append({**base, "variant": "kernel", "launch": launch.name, "error": str(error).splitlines()[0][:200]})
            print(out[-1], flush=True)
            continue
        record("kernel", graph, lambda: buffers[0], launch)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llava-ov-0.5b")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--sweep-rows", type=int, nargs="*", default=[1, 8], help="rows at which to time every launch")
    parser.add_argument("--block-n", type=int, nargs="*", default=[16, 32, 64])
    parser.add_argument("--block-k", type=int, nargs="*", default=[64, 128, 256])
    parser.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--warps", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="figures/few_rows_{card}.json")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    sweep = [fr.Launch(*numbers) for numbers in itertools.product(args.block_n, args.block_k, args.splits, args.warps)]
    rows = []
    for name in products(args.shape):
        for count in args.rows:
            rows += measure(args.shape, name, count, args.repeats, sweep if count in args.sweep_rows else [])
    card = card_name(torch.device("cuda"))
    result = {"card": card, "torch": torch.__version__,
              "command": recorded_environment() + shlex.join(["python", *portable_out(sys.argv)]),
              "code": git_commit(), "date": __import__("datetime").date.today().isoformat(),
              "note": "one decoder layer's product per row, median over replays of one CUDA graph holding every "
                      "layer's (each its own random bf16 weight); floor_us: the weight's bytes at 3.0 TB/s",
              "rows": rows}
    save(result, args.out.format(card=card.lower().replace(" ", "-")))


if __name__ == "__main__":
    main()
