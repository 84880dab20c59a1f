"""Run on a GPU: the fast path's attention kernels alone, at the language-model shapes of
LLaVA-OneVision 7B and 0.5B, against the length of the cache.

- One-token steps (a draft step, an AR step): FlexAttention's split-KV decode kernel
  (`grouped_flex`, its block mask built once per step as in the model) against
  `grouped_attention` (two batched matmuls around a float32 softmax). This sets
  `step_attention.FLEX_MIN_SLOTS`.
- The 26-node tree verification: `grouped_attention` against `split_attention` below, an
  alternative kept here, not in the package: the committed cache read in chunks by the
  variable-length flash kernel (aten `_flash_attention_forward`, one chunk per sequence, `seqused_k`
  its part before the step's slots), the step's own slots apart, merged through the log-sum-exp.

For each shape, kernel and context, one step's attention over every decoder layer (a KV cache per
layer, so the L2 cache does not hold them all) is compiled (`torch.compile`, no CUDA graphs of its
own) and captured in one CUDA graph by hand; the replay is timed (median of `--repeats`,
device-synchronised), and the first layer's output compared with `grouped_attention` in float32.

    python benchmarks/attention_kernels.py --out figures/attention_kernels_{card}.json
"""

from __future__ import annotations

import argparse
import statistics

import torch

from specvlm import step_attention as sa
from specvlm.bench import card_name, save
from specvlm.costs import lm_config
from specvlm.fast import round_up
from specvlm.trees import MC_SIM_7B_63

SPLIT_CHUNK = 512  # keys per chunk of `split_attention`'s flash part


def split_attention(query, key, value, bias, start: torch.Tensor, span: int, scale: float,
                    chunk: int = SPLIT_CHUNK) -> torch.Tensor:
    """`grouped_attention`'s result, with the committed cache read by a flash kernel in chunks.

    query [1, Hq, q, d], key/value [1, Hkv, K, d], bias [1, 1, q, K] (`visibility_bias` of `start`
    and a [q, span] pattern), start: 0-d long tensor -> [1, Hq, q, d]. Every row sees every slot
    before `start`; from `start` on, what the bias allows within `span` slots. The two parts are
    computed apart, each with the log-sum-exp of its scores, and merged exactly:

    1. the committed slots [0, start): the cache is cut into chunks of `chunk` slots (the last one
       takes the rest of the capacity), each chunk a sequence of a variable-length flash kernel
       whose used length is the part of the chunk before `start` (none for later chunks). No mask
       is needed, the shapes are fixed whatever `start` is, and the chunks spread over the SMs as
       a split-KV decode kernel spreads a long cache. The G = Hq / Hkv query heads of each KV head
       are stacked as G*q rows, so each key is read once per chunk, not once per query head.
    2. the step's own slots [start, start + span), through the bias's columns (float32 scores).

    E.g. K = 2048, chunk 512, start 1300: chunks of 512, 512, 276 and 0 keys in part 1.
    On CUDA in half precision part 1 is the flash kernel; elsewhere the same arithmetic in float32."""
    batch, heads, q, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    if batch != 1:
        raise ValueError(f"split_attention serves one sequence (the fast path's), got a batch of {batch}.")
    groups, chunks = heads // kv_heads, max(1, slots // chunk)
    rows = query.reshape(kv_heads, groups * q, dim)
    steps = torch.arange(chunks + 1, device=query.device)
    bounds = torch.where(steps == chunks, slots, steps * chunk)  # the last chunk takes the rest
    used = torch.minimum((start - bounds[:-1]).clamp(min=0), bounds[1:] - bounds[:-1])  # [chunks]

    # 1. the committed slots: [chunks, Hkv, G*q, d] and [chunks, Hkv, G*q]
    longest = slots - (chunks - 1) * chunk  # the last chunk's slots
    prefix_out, prefix_lse = chunked_prefix_attention(rows, key[0], value[0], bounds, used, longest, scale)
    prefix_lse = prefix_lse.masked_fill((used == 0)[:, None, None], float("-inf"))

    # 2. the step's own slots
    raw = start + torch.arange(span, device=query.device)
    index = raw.clamp(max=slots - 1)
    own_bias = bias[0, 0].index_select(-1, index).float().masked_fill(raw >= slots, float("-inf"))
    scores = sa.float32_scores(rows[None], key.index_select(2, index))[0] * scale  # [Hkv, G*q, span]
    scores = (scores.view(kv_heads, groups, q, span) + own_bias).view(kv_heads, groups * q, span)
    own_lse = scores.logsumexp(-1)  # [Hkv, G*q]
    own_out = (scores - own_lse[..., None]).exp().to(value.dtype) @ value[0].index_select(1, index)

    # merge: each part weighted by its share of the whole softmax's denominator
    top = torch.maximum(prefix_lse.amax(0), own_lse)
    prefix_weight = (prefix_lse - top).exp()[..., None]  # [chunks, Hkv, G*q, 1]; 0 for unused chunks
    own_weight = (own_lse - top).exp()[..., None]
    total = (prefix_weight * prefix_out.float()).sum(0) + own_weight * own_out.float()
    out = total / (prefix_weight.sum(0) + own_weight)
    return out.to(value.dtype).view(1, heads, q, dim)


def chunked_prefix_attention(rows, key, value, bounds, used, longest: int, scale: float):
    """Unmasked attention of the same rows to the first `used[j]` keys of each chunk j.

    rows [H, M, d]; key/value [H, K, d]; bounds [chunks + 1] long (chunk j = slots bounds[j] ..
    bounds[j+1] - 1; `longest`: the most slots of one); used [chunks] long -> out [chunks, H, M, d] (value's dtype; zeros where
    used is 0) and the log-sum-exp of each row's scaled scores [chunks, H, M] float32 (undefined
    where used is 0). On CUDA in half precision: one call of the variable-length flash kernel,
    chunk j a sequence of its own (`seqused_k`: only its first used[j] keys are read)."""
    heads, m, dim = rows.shape
    chunks = used.shape[0]
    if rows.device.type == "cuda" and rows.dtype in (torch.float16, torch.bfloat16):
        queries = rows.transpose(0, 1).expand(chunks, m, heads, dim).reshape(chunks * m, heads, dim)
        query_bounds = torch.arange(chunks + 1, device=rows.device, dtype=torch.int32) * m
        out, lse = torch.ops.aten._flash_attention_forward(
            queries, key.transpose(0, 1), value.transpose(0, 1), query_bounds, bounds.to(torch.int32), m,
            longest, 0.0, False, False, scale=scale, seqused_k=used.to(torch.int32))[:2]
        return (out.view(chunks, m, heads, dim).transpose(1, 2),
                lse[:, :chunks * m].reshape(heads, chunks, m).transpose(0, 1))
    scores = rows.float() @ key.float().transpose(-1, -2) * scale  # [H, M, K]
    outs, lses = [], []
    for j in range(chunks):
        part = scores[..., bounds[j]:bounds[j + 1]]
        seen = torch.arange(part.shape[-1], device=rows.device) < used[j]
        part = part.masked_fill(~seen, float("-inf"))
        lse = part.logsumexp(-1)
        probs = torch.nan_to_num((part - lse[..., None]).exp())  # rows of an unused chunk: zeros
        outs.append((probs @ value[:, bounds[j]:bounds[j + 1]].float()).to(value.dtype))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def kernels(q: int) -> dict:
    """name -> fn(query, key, value, bias, block_mask, start, span, scale) for a step of q rows."""
    out = {"grouped": lambda Q, K, V, bias, mask, start, span, scale: sa.grouped_attention(Q, K, V, bias, scale)}
    if q <= sa.FLEX_MAX_QUERY:
        out["flex"] = lambda Q, K, V, bias, mask, start, span, scale: sa.grouped_flex(Q, K, V, mask, scale)
    else:
        for chunk in (512, 1024):
            out[f"split-{chunk}"] = (lambda Q, K, V, bias, mask, start, span, scale, chunk=chunk:
                                     split_attention(Q, K, V, bias, start, span, scale, chunk))
    return out


def measure(shape: str, context: int, pattern: torch.Tensor, repeats: int) -> list[dict]:
    config = lm_config(shape)
    heads, kv_heads, layers = config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers
    dim = config.hidden_size // heads
    q, span = pattern.shape
    capacity = round_up(context + 64 + q, 128)
    start = torch.tensor(context, device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    caches = [tuple(torch.randn(1, kv_heads, capacity, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
                    for _ in range(2)) for _ in range(layers)]
    query = torch.randn(1, heads, q, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    scale = dim ** -0.5
    bias = sa.visibility_bias(start, pattern, capacity, torch.float32)
    exact = sa.grouped_attention(query.float(), caches[0][0].float(), caches[0][1].float(), bias, scale)
    rows = []
    for name, fn in kernels(q).items():
        def step(query, start, fn=fn, flex=name == "flex"):  # the masks once per step, as in the model
            bias = sa.visibility_bias(start, pattern, capacity, torch.bfloat16)
            mask = sa.flex_block_mask(start, pattern, capacity) if flex else None
            return [fn(query, k, v, bias, mask, start, span, scale) for k, v in caches]

        compiled = torch.compile(step, dynamic=False)
        for _ in range(3):
            outs = compiled(query, start)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = compiled(query, start)
        times = []
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) * 1000)
        kv_bytes = 2 * layers * kv_heads * (context + span) * dim * 2
        rows.append({"shape": shape, "context": context, "query_len": q, "kernel": name, "layers": layers,
                     "us": statistics.median(times), "us_per_layer": statistics.median(times) / layers,
                     "kv_floor_us": kv_bytes / 3.0e12 * 1e6,
                     "max_abs_diff_vs_exact": (outs[0].float() - exact).abs().max().item()})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-contexts", type=int, nargs="+", default=[1024, 1638, 2560, 3584, 6144, 12288, 16384])
    parser.add_argument("--tree-contexts", type=int, nargs="+", default=[1638, 6144, 12313, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="figures/attention_kernels_{card}.json")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    one = torch.ones(1, 1, dtype=torch.bool, device="cuda")
    rows = []
    for context in args.step_contexts:
        rows += measure("llava-ov-0.5b", context, one, args.repeats)
        rows += measure("llava-ov-7b", context, one, args.repeats)
    for context in args.tree_contexts:
        rows += measure("llava-ov-7b", context, MC_SIM_7B_63.mask.cuda(), args.repeats)
    card = card_name(torch.device("cuda"))
    result = {"card": card, "torch": torch.__version__, "date": __import__("datetime").date.today().isoformat(),
              "note": "attention alone, one step over every decoder layer, compiled and replayed from one CUDA "
                      "graph; random bf16 caches, one per layer; kv_floor_us: their bytes at 3.0 TB/s",
              "rows": rows}
    save(result, args.out.format(card=card.lower().replace(" ", "-")))


if __name__ == "__main__":
    main()
