"""Run on a GPU: the fast path's attention kernels alone, at the language-model shapes of
LLaVA-OneVision 7B and 0.5B, against the length of the cache.

- One-token steps (a draft step, an AR step) and a draft's widest tree level: FlexAttention's
  split-KV decode kernel (`grouped_flex`, its block mask built once per step as in the model),
  `grouped_attention` (two batched matmuls around a float32 softmax) and `flash_decode` (the
  project's Triton split-KV kernel, attention "flash"). This sets `step_attention.FLEX_MIN_SLOTS`.
- The 7B's verifications, a chain's (6 tokens) and the 26-node tree's: `grouped_attention`,
  `flash_decode` and (for the tree) `split_attention` (the committed cache read in chunks by the
  variable-length flash kernel, the step's own slots apart, merged through the log-sum-exp).
  This sets `step_attention.SPLIT_MIN_SLOTS` (under "flex") and whether a target takes "flash".

For each shape, kernel and context, one step's attention over every decoder layer (a KV cache per
layer, so the L2 cache does not hold them all) is compiled (`torch.compile`, no CUDA graphs of its
own) and captured in one CUDA graph by hand; the replay is timed (median of `--repeats`,
device-synchronised), and the first layer's output compared with `grouped_attention` in float32.

    python benchmarks/attention_kernels.py --out figures/attention_kernels_{card}.json
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from specvlm import flash_decode as fd
from specvlm import step_attention as sa
from specvlm.__main__ import git_commit, portable_out, recorded_environment
from specvlm.bench import card_name, save
from specvlm.costs import lm_config
from specvlm.fast import DraftLevels, round_up
from specvlm.trees import MC_SIM_7B_63

sys.path.insert(0, __import__("os").path.dirname(__file__))
from few_rows import replay_us  # noqa: E402

def kernels(pattern: torch.Tensor, launches=()) -> dict:
    """name -> fn(query, key, value, bias, block_mask, start, span, scale) for a step of pattern's rows;
    `launches`: `flash_decode.Launch`es to time besides its default, as "flash-<launch.name>"."""
    q = pattern.shape[0]
    out = {"grouped": lambda Q, K, V, bias, mask, start, span, scale: sa.grouped_attention(Q, K, V, bias, scale),
           # the [1, q, Hq, d] layout the output projection reads, as the model's flex_or_sdpa returns it
           "flash": lambda Q, K, V, bias, mask, start, span, scale: fd.flash_decode(Q, K, V, start, pattern,
                                                                                     scale).transpose(1, 2)}
    for launch in launches:
        out[f"flash-{launch.name}"] = (lambda Q, K, V, bias, mask, start, span, scale, launch=launch:
                                       fd.flash_decode(Q, K, V, start, pattern, scale, launch).transpose(1, 2))
    if q <= sa.FLEX_MAX_QUERY:
        out["flex"] = lambda Q, K, V, bias, mask, start, span, scale: sa.grouped_flex(Q, K, V, mask, scale)
    else:
        for chunk in (512, 1024):
            out[f"split-{chunk}"] = (lambda Q, K, V, bias, mask, start, span, scale, chunk=chunk:
                                     sa.split_attention(Q, K, V, bias, start, span, scale, chunk))
        # the own slots and the merge through torch operations, not `split_merge`'s kernel
        out["split-512-torch"] = (lambda Q, K, V, bias, mask, start, span, scale:
                                  sa.split_attention(Q, K, V, bias, start, span, scale, 512, merge="torch"))
    return out


def reason(error: BaseException) -> str:
    """What went wrong, from an error and the errors it wraps: inductor's own message ends on
    advice ("Set TORCHDYNAMO_VERBOSE=1 ..."), its cause says what failed (e.g. "out of resource:
    shared memory, Required: 262144, Hardware limit: 232448")."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    lines = [f"{type(e).__name__}: {line.strip()}" for e in chain for line in str(e).splitlines() if line.strip()]
    telling = [line for line in lines if "out of resource" in line.lower()]
    advice = ("TORCHDYNAMO_VERBOSE", "TORCH_LOGS", "please do this")
    return (telling or [line for line in lines if not any(a in line for a in advice)] or lines or [repr(error)])[0][:200]


def launch_flag(text: str) -> fd.Launch:
    """--flash-launches' type: `Launch.parse`, its message kept in argparse's error."""
    try:
        return fd.Launch.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def measure(shape: str, context: int, pattern: torch.Tensor, repeats: int, only=(), launches=()) -> list[dict]:
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
    for name, fn in kernels(pattern, launches).items():
        if only and name not in only and not name.startswith("flash-"):
            continue
        def step(query, start, fn=fn, flex=name == "flex"):  # the masks once per step, as in the model
            bias = sa.visibility_bias(start, pattern, capacity, torch.bfloat16)
            mask = sa.flex_block_mask(start, pattern, capacity) if flex else None
            return [fn(query, k, v, bias, mask, start, span, scale) for k, v in caches]

        compiled = torch.compile(step, dynamic=False)
        try:
            for _ in range(3):
                outs = compiled(query, start)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = compiled(query, start)
        except Exception as error:
            if not name.startswith("flash-"):
                raise
            # a launch the card cannot build (e.g. tiles too large for its shared memory): say so, go on
            rows.append({"shape": shape, "context": context, "query_len": q, "kernel": name, "error": reason(error)})
            print(rows[-1], flush=True)
            continue
        us = replay_us(graph, repeats)
        kv_bytes = 2 * layers * kv_heads * (context + span) * dim * 2
        launch = fd.default_launch(heads // kv_heads * q, dim).name if name == "flash" else \
            name.removeprefix("flash-") if name.startswith("flash-") else None
        # how a split row computed its own slots and merge (before split_merge, "split-512" meant torch)
        merge = None if not name.startswith("split-") else "torch" if name.endswith("-torch") else \
            sa.merge_kernel(query.device, query.dtype, dim, capacity, int(name.split("-")[1]))
        rows.append({"shape": shape, "context": context, "query_len": q, "kernel": name, "layers": layers,
                     **({"launch": launch} if launch else {}), **({"merge": merge} if merge else {}),
                     "us": us, "us_per_layer": us / layers,
                     "kv_floor_us": kv_bytes / 3.0e12 * 1e6,
                     "max_abs_diff_vs_exact": (outs[0].float() - exact).abs().max().item()})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-contexts", type=int, nargs="*", default=[1024, 1638, 2560, 3584, 6144, 12288, 16384])
    parser.add_argument("--step-shapes", nargs="*", default=["llava-ov-0.5b", "llava-ov-7b"])
    parser.add_argument("--kernels", nargs="*", default=[], help="only these (default: every one that applies)")
    parser.add_argument("--level-contexts", type=int, nargs="*", default=[1638, 6144],
                        help="the 0.5B draft's widest level of the 26-node tree")
    parser.add_argument("--chain-contexts", type=int, nargs="*", default=[],
                        help="the 7B's chain verification (k+1 = 6 tokens, causal)")
    parser.add_argument("--tree-contexts", type=int, nargs="*", default=[1638, 6144, 12313, 16384, 32768])
    parser.add_argument("--chain-shape", default="llava-ov-7b", help="the shape of the chain verifications")
    parser.add_argument("--flash-launches", type=launch_flag, nargs="*", default=[],
                        help="flash_decode launches to time besides its default, rows-programs-tile-warps[-stages]")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="figures/attention_kernels_{card}.json")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    one = torch.ones(1, 1, dtype=torch.bool, device="cuda")
    rows = []
    level = DraftLevels.of(MC_SIM_7B_63)
    widest = max(range(len(level.patterns)), key=lambda i: level.patterns[i].shape[0])
    for context in args.step_contexts:
        for shape in args.step_shapes:
            rows += measure(shape, context, one, args.repeats, args.kernels, args.flash_launches)
    for context in args.level_contexts:
        rows += measure("llava-ov-0.5b", context, level.patterns[widest].cuda(), args.repeats, args.kernels,
                        args.flash_launches)
    for context in args.chain_contexts:
        rows += measure(args.chain_shape, context, sa.causal_pattern(6).cuda(), args.repeats, args.kernels,
                        args.flash_launches)
    for context in args.tree_contexts:
        rows += measure("llava-ov-7b", context, MC_SIM_7B_63.mask.cuda(), args.repeats, args.kernels,
                        args.flash_launches)
    card = card_name(torch.device("cuda"))
    result = {"card": card, "torch": torch.__version__, "command": recorded_environment() + shlex.join(["python", *portable_out(sys.argv)]),
              "code": git_commit(),
              "date": __import__("datetime").date.today().isoformat(),
              "note": "attention alone, one step over every decoder layer, compiled and replayed from one CUDA "
                      "graph; random bf16 caches, one per layer; kv_floor_us: their bytes at 3.0 TB/s",
              "rows": rows}
    save(result, args.out.format(card=card.lower().replace(" ", "-")))


if __name__ == "__main__":
    main()
