"""Run on a GPU: `python -m specvlm bench --widen ...` once per draft in one process, every draft beside the same
widened target (widened once), so the drafts share the card, the process and the target:

    python benchmarks/drafts_ab.py specvlm/tiny/draft_cut,specvlm/tiny/draft --target specvlm/tiny/target \\
        --widen llava-ov-7b llava-ov-0.5b --clip synthetic --clip-seed 4 --frames 192 --paths fast --only specvlm-tree-0.5

writes $OUT/bench_draft_<index>_<folder name>.json for each draft folder, in the order given, each with its AR row
and a "drafts_ab" record: the draft's folder, its place in the order, and every folder of the run. Every draft
but the first is widened beside the first's widened target, so its JSON's "command" alone does not reproduce it."""
import json, os, sys
from pathlib import Path

import torch

from specvlm import __main__ as cli
from specvlm.models import Pair, load_lm
from specvlm.widen import widen_model

drafts, argv = sys.argv[1].split(","), sys.argv[2:]
widened = {}
original = cli.bench_pair


def bench_pair(args):
    """The first draft's pair as `bench` builds it; later drafts widened beside the same widened target."""
    named = lambda pair: f"{pair.name}, draft {args.draft}"
    if "pair" not in widened:
        pair, stand_in = widened["pair"] = original(args)
        return Pair(pair.target, pair.draft, named(pair)), stand_in
    (pair, stand_in), base = widened["pair"], load_lm(args.draft, device="cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    draft = widen_model(base.model, args.widen[1], args.device, dtype, seed=1)  # the seed widen_pair gives a draft
    return Pair(pair.target, type(base)(draft, base.processor), named(pair)), stand_in


cli.bench_pair = bench_pair
for index, folder in enumerate(drafts):
    out = Path(os.environ["OUT"]) / f"bench_draft_{index}_{Path(folder).name}.json"
    print("== draft", folder, flush=True)
    cli.main(["bench", *argv, "--draft", folder, "--out", str(out)])
    result = json.loads(out.read_text())
    result["drafts_ab"] = {"draft": folder, "index": index, "drafts": drafts}
    out.write_text(json.dumps(result, indent=1))
