"""Run on a GPU: a draft-shaped decoder step with and without `l2_prefetch`'s prefetches.

A stand-in for the 0.5B draft's pass, at LLaVA-OneVision 0.5B's language-model shapes with random
bfloat16 weights (each layer its own, so the L2 cache holds none of them from one layer to the
next): per layer an RMS norm, the stacked q/k/v product, attention of the step's rows over a cache
of `--slots` slots (SDPA, grouped heads), the output product, a norm, the stacked gate/up product,
SiLU, the down product. All layers are compiled with `torch.compile` and captured in one CUDA graph,
as the fast path does. Variants:

- "plain": as above;
- "prefetch": each layer starts with `l2_prefetch.prefetch` of its weights after q/k/v and the next
  layer's q/k/v (`l2_prefetch.attach`'s schedule);
- "warm": every layer reads layer 0's weights, which then stay in L2: what the products cost when
  their bytes are already there (a bound, not a model).

Each row is the median of `--repeats` device-synchronised replays, with what the profiler saw of one
replay: its kernels, their summed device time (`busy_us`) and the longest by name. `gaps_us`, the
timed replay less `busy_us`, is an estimate of the time between kernels: the two come from different
replays, and the profiler can stretch kernels. "plain" and "prefetch" must give identical outputs
(asserted: a prefetch changes no value).

    python benchmarks/l2_prefetch.py --out 'figures/l2_prefetch_{card}.json'
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
import torch.nn.functional as F

from specvlm import l2_prefetch
from specvlm.__main__ import git_commit, portable_out, recorded_environment
from specvlm.bench import card_name, save
from specvlm.costs import lm_config

sys.path.insert(0, __import__("os").path.dirname(__file__))
from few_rows import captured, replay_us  # noqa: E402


def make_layers(shape: str, slots: int, warm: bool) -> list[dict]:
    c = lm_config(shape)
    head = c.hidden_size // c.num_attention_heads
    qkv = c.hidden_size + 2 * c.num_key_value_heads * head
    generator = torch.Generator("cuda").manual_seed(0)

    def randn(*size):
        return torch.randn(*size, device="cuda", dtype=torch.bfloat16, generator=generator) / size[-1] ** 0.5

    layers = []
    for index in range(c.num_hidden_layers):
        if warm and index:
            layers.append({**layers[0], "k": randn(1, c.num_key_value_heads, slots, head),
                           "v": randn(1, c.num_key_value_heads, slots, head)})
            continue
        layers.append({"qkv": randn(qkv, c.hidden_size), "qkv_bias": randn(qkv), "o": randn(c.hidden_size, c.hidden_size),
                       "gate_up": randn(2 * c.intermediate_size, c.hidden_size), "down": randn(c.hidden_size, c.intermediate_size),
                       "k": randn(1, c.num_key_value_heads, slots, head), "v": randn(1, c.num_key_value_heads, slots, head)})
    for index, layer in enumerate(layers):
        following = [layers[index + 1]["qkv"]] if index + 1 < len(layers) else []
        layer["table"] = l2_prefetch.chunk_table([layer["o"], layer["gate_up"], layer["down"], *following])
        layer["token"] = torch.zeros(1, dtype=torch.int32, device="cuda")
    return layers


def step(layers: list[dict], h: torch.Tensor, heads: int, prefetch: bool) -> torch.Tensor:
    """One pass of the stand-in decoder over h [rows, hidden]."""
    rows, hidden = h.shape
    for layer in layers:
        if prefetch:
            l2_prefetch.prefetch(layer["table"], h, layer["token"])
        x = F.rms_norm(h, (hidden,))
        q = F.linear(x, layer["qkv"], layer["qkv_bias"])[:, :hidden]
        q = q.view(1, rows, heads, hidden // heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, layer["k"], layer["v"], enable_gqa=True)
        h = h + F.linear(a.transpose(1, 2).reshape(rows, hidden), layer["o"])
        gate, up = F.linear(F.rms_norm(h, (hidden,)), layer["gate_up"]).chunk(2, dim=-1)
        h = h + F.linear(F.silu(gate) * up, layer["down"])
    return h


def replay_profile(graph: torch.cuda.CUDAGraph, replays: int = 5, top: int = 6) -> dict:
    """What one replay's kernels are, from the profiler's CUDA activity over `replays` replays: how
    many ("kernels"), their summed device time ("busy_us"), and the `top` names by device time, each
    per replay. Copies and memsets are left out."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.count
               and "memcpy" not in e.key.lower() and "memset" not in e.key.lower()]
    kernels.sort(key=lambda e: -e.device_time_total)
    return {"kernels": round(sum(e.count for e in kernels) / replays),
            "busy_us": sum(e.device_time_total for e in kernels) / replays,
            "top": [{"name": e.key[:80], "us": e.device_time_total / replays, "calls": e.count // replays}
                    for e in kernels[:top]]}


def measure(shape: str, slots: int, rows: int, repeats: int) -> list[dict]:
    c = lm_config(shape)
    out, outputs = [], {}
    for variant in ("plain", "prefetch", "warm"):
        layers = make_layers(shape, slots, warm=variant == "warm")
        h = torch.randn(rows, c.hidden_size, device="cuda", dtype=torch.bfloat16,
                        generator=torch.Generator("cuda").manual_seed(1))
        fn = torch.compile(lambda: step(layers, h, c.num_attention_heads, variant == "prefetch"), dynamic=False)
        graph, result = captured(fn)
        us = replay_us(graph, repeats)
        outputs[variant] = result.clone()
        weight_bytes = sum(layer[name].numel() * 2 for layer in layers for name in ("qkv", "o", "gate_up", "down"))
        if variant == "warm":
            weight_bytes = sum(layers[0][name].numel() * 2 for name in ("qkv", "o", "gate_up", "down")) * len(layers)
        profiled = replay_profile(graph)
        out.append({"shape": shape, "slots": slots, "rows": rows, "variant": variant, "us": us,
                    "weight_bytes": weight_bytes, "us_per_layer": us / len(layers), **profiled,
                    "gaps_us": us - profiled["busy_us"]})
        print(out[-1], flush=True)
        del graph, fn, layers
    if not torch.equal(outputs["plain"], outputs["prefetch"]):
        raise AssertionError("the prefetch changed the step's output: it must change no value")
    out[1]["same_as_plain"] = True
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llava-ov-0.5b")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--slots", type=int, default=6200)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="figures/l2_prefetch_{card}.json")
    args = parser.parse_args()
    if not l2_prefetch.available(torch.device("cuda")):
        raise SystemExit("l2_prefetch needs a CUDA card of compute capability 9.0 or newer.")
    rows = [row for count in args.rows for row in measure(args.shape, args.slots, count, args.repeats)]
    card = card_name(torch.device("cuda"))
    properties = torch.cuda.get_device_properties(torch.device("cuda"))
    result = {"card": card, "torch": torch.__version__, "triton": l2_prefetch.triton.__version__,
              "l2_cache_bytes": properties.L2_cache_size, "sms": properties.multi_processor_count,
              "command": recorded_environment() + shlex.join(["python", *portable_out(sys.argv)]),
              "code": git_commit(), "date": __import__("datetime").date.today().isoformat(),
              "note": "a stand-in decoder pass at the shape's language-model sizes, random bf16 weights, all layers in one "
                      "compiled CUDA graph; median over replays, microseconds per pass",
              "rows": rows}
    save(result, args.out.format(card=card.lower().replace(" ", "-")))


if __name__ == "__main__":
    main()
