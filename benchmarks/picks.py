"""Run on a GPU: a tree level's picks, `torch.topk` against `top_k.top_k_indices` (two Triton kernels).

For each vocabulary size (the 0.5B's whole output layer, and a draft vocabulary), rows and picks per
row, on random float32 logits (distinct values, so both must give the same columns in the same order):

- "device_us": the call alone, 10 calls captured in one CUDA graph, the median of `--repeats`
  replays, per call; with `ids`, the columns mapped to token ids (`torch.topk` then an indexing, as
  `StaticLM.token_ids` does; the kernel maps them in its second kernel);
- "host_us": what the host spends launching one call, eagerly, 100 calls queued without waiting.
  In a round the picks run between the draft's passes: the device's time adds to the round, the
  host's hides behind the pass before as long as it is shorter.

    python benchmarks/picks.py --out figures/picks_{card}.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from few_rows import captured, replay_us
from specvlm import top_k
from specvlm.__main__ import git_commit, portable_out, recorded_environment
from specvlm.bench import card_name, save

CALLS_PER_GRAPH = 10


def host_us(fn, calls: int = 100) -> float:
    fn()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    spent = time.perf_counter() - begin
    torch.cuda.synchronize()
    return spent / calls * 1e6


def measure(vocab: int, rows: int, k: int, mapped: bool, repeats: int) -> list[dict]:
    generator = torch.Generator("cuda").manual_seed(rows * 1000 + k)
    logits = torch.randn(rows, vocab, generator=generator, device="cuda")
    ids = torch.randperm(max(vocab, 152000), generator=generator, device="cuda")[:vocab].sort().values if mapped else None
    variants = {
        "torch.topk": lambda: (logits.topk(k).indices if ids is None else ids[logits.topk(k).indices]),
        "top_k": lambda: top_k.top_k_indices(logits, k, ids=ids),
    }
    results, outputs = [], {}
    for name, fn in variants.items():
        graph, out = captured(lambda: [fn() for _ in range(CALLS_PER_GRAPH)])
        graph.replay()
        torch.cuda.synchronize()
        outputs[name] = out[-1].clone()
        results.append({"variant": name, "vocab": vocab, "rows": rows, "k": k, "mapped": mapped,
                        "device_us": replay_us(graph, repeats) / CALLS_PER_GRAPH, "host_us": host_us(fn)})
    same = torch.equal(outputs["torch.topk"], outputs["top_k"])
    for result in results:
        result["same_as_torch"] = same
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[152000, 32768])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 3, 5, 8])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="figures/picks_{card}.json")
    args = parser.parse_args()
    rows = [result for vocab in args.vocab for count in args.rows for k in args.k
            for result in measure(vocab, count, k, vocab != 152000, args.repeats)]
    card = card_name(torch.device("cuda"))
    result = {"card": card, "torch": torch.__version__,
              "command": recorded_environment() + shlex.join(["python", *portable_out(sys.argv)]),
              "code": git_commit(), "date": __import__("datetime").date.today().isoformat(),
              "note": f"per call: device_us from {CALLS_PER_GRAPH} calls in one CUDA graph (median of replays), host_us "
                      "from 100 eager calls queued; random float32 logits; a vocabulary below 152,000 maps its "
                      "columns to sorted random token ids",
              "rows": rows}
    save(result, args.out.format(card=card.lower().replace(" ", "-")))
    for r in rows:
        print(f"{r['variant']:<11} V={r['vocab']:>6} rows={r['rows']} k={r['k']}: device {r['device_us']:6.1f} us, "
              f"host {r['host_us']:6.1f} us, same as torch: {r['same_as_torch']}")


if __name__ == "__main__":
    main()
