"""Ranks of the embedded target's greedy tokens among drafts' logits (`tree_search.draft_ranks`), on held-out
synthetic clips, for several drafts in one process: how often each drafts the target's token at rank 0, 1, ...,
and the tokens per round `MC_SIM_7B_63` would replay to. On a GPU in float32 (the notebook's pair, run faster):

    python benchmarks/draft_ranks.py --frames 192 --seeds 100-111 --check-seeds 4 \\
        --drafts shipped cut trained=runs/cut/draft --out $OUT/draft_ranks.json

A draft is `shipped` (the embedded draft), `cut` (`specvlm.tiny.cut.cut_draft` of the target, untrained) or
NAME=FOLDER (a saved draft)."""
import argparse, json, sys, time
from pathlib import Path

import torch

from specvlm import synthetic, tree_search
from specvlm.models import DEFAULT_QUESTION, LlavaOnevisionLM, Pair, embedded_paths, load_lm
from specvlm.tiny.cut import cut_draft
from specvlm.trees import MC_SIM_7B_63
from specvlm.video import from_array


def seeds(text):
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def draft_spec(text):
    """'shipped', 'cut' or NAME=FOLDER -> (name, folder or None)."""
    name, _, folder = text.partition("=")
    if not name or (not folder and name not in ("shipped", "cut")):
        raise argparse.ArgumentTypeError(f"{text!r}: give 'shipped', 'cut' or NAME=FOLDER.")
    return name, folder or None


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--frames", type=int, default=192)
parser.add_argument("--seeds", type=seeds, default=seeds("100-111"))
parser.add_argument("--check-seeds", type=seeds, default=[])
parser.add_argument("--drafts", nargs="+", type=draft_spec, default=[("shipped", None), ("cut", None)])
parser.add_argument("--method", default="specvlm")
parser.add_argument("--ratio", type=float, default=0.5)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--out", type=Path, required=True)
args = parser.parse_args()

target = load_lm(embedded_paths()[0], device=args.device, dtype=torch.float32)
result = {"frames": args.frames, "method": args.method, "ratio": args.ratio, "seeds": args.seeds,
          "check_seeds": args.check_seeds, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
          "dtype": "float32", "command": "python " + " ".join(sys.argv), "drafts": {}}
for name, folder in args.drafts:
    if name == "shipped":
        draft = load_lm(embedded_paths()[1], device=args.device, dtype=torch.float32)
    elif name == "cut" and not folder:
        draft = LlavaOnevisionLM(cut_draft(target.model), target.processor)
    else:
        draft = load_lm(folder, device=args.device, dtype=torch.float32)
    pair, start, ranks = Pair(target, draft), time.time(), {}
    for seed in args.seeds + args.check_seeds:
        clip = synthetic.make_clip(seed, num_frames=args.frames)
        prompt = target.prepare(from_array(clip.frames, fps=8.0), DEFAULT_QUESTION)
        ranks[str(seed)] = tree_search.draft_ranks(pair, prompt, args.method, args.ratio).tolist()
    grown_from = [ranks[str(s)] for s in args.seeds]
    entry = {"folder": folder or None, "ranks": ranks, "rank_profile": tree_search.rank_profile([torch.tensor(r) for r in grown_from], 8),
             "mc_sim_7b_63": tree_search.replayed(grown_from, MC_SIM_7B_63),
             "check": {str(s): tree_search.replayed([ranks[str(s)]], MC_SIM_7B_63) for s in args.check_seeds},
             "seconds": round(time.time() - start, 1)}
    result["drafts"][name] = entry
    print(f"{name:<10} top-1 {entry['rank_profile'][0]:.3f}  mc_sim_7b_63 replays to {entry['mc_sim_7b_63']['tokens_per_round']:.2f} "
          f"tokens/round; check {entry['check']}  ({entry['seconds']} s)", flush=True)
    args.out.write_text(json.dumps(result, indent=1))
