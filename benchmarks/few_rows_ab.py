"""Run on a GPU: `python -m specvlm bench` twice in one process on one widened pair, the draft's
few-row products as cuBLAS (SPECVLM_FEW_ROWS=0) and as few_rows' kernels (=1), in the order given,
so that both variants share the card, the process and the widening (which takes minutes):

    python benchmarks/few_rows_ab.py 0,1 --widen llava-ov-7b llava-ov-0.5b --clip synthetic ... --only specvlm-tree-0.5

writes $OUT/bench_few_rows_0.json and $OUT/bench_few_rows_1.json, each with its AR row."""
import os, sys
from specvlm import __main__ as cli

order, argv = sys.argv[1].split(","), sys.argv[2:]
built = {}
original = cli.bench_pair
cli.bench_pair = lambda args: built.setdefault("pair", original(args))
for value in order:
    os.environ["SPECVLM_FEW_ROWS"] = value
    out = os.path.join(os.environ["OUT"], f"bench_few_rows_{value}.json")
    print("== SPECVLM_FEW_ROWS", value, flush=True)
    cli.main(["bench", *argv, "--out", out])
