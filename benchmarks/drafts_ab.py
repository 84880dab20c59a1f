"""Run on a GPU: `python -m specvlm bench --widen ...` once per draft (and per clip) in one process, every draft
beside the same widened target (widened once), so the drafts and clips share the card, the process and the target:

    python benchmarks/drafts_ab.py specvlm/tiny/draft_cut,specvlm/tiny/draft --target specvlm/tiny/target \\
        --widen llava-ov-7b llava-ov-0.5b --clip synthetic --clip-seed 4 --frames 192 --paths fast --only specvlm-tree-0.5

writes $OUT/bench_draft_<index>_<folder name>.json for each draft folder, in the order given, each with its AR row
and a "drafts_ab" record: the draft's folder, its place in the order, and every folder of the run. Every draft
but the first is widened beside the first's widened target, so its JSON's "command" alone does not reproduce it.

`--clip-seeds 4 1 2` (in place of `--clip-seed`) benchmarks every draft on each synthetic clip in turn, widening each
draft once; the files are then named bench_draft_<index>_<folder name>_seed<seed>.json. The clips of a 192-frame run
all have the same prompt length, so each draft's fast-path graphs are captured for its first clip and reused (an
engine that another entry's settings replaced in between is made anew; dynamo keeps its compiled code). Each file's
"drafts_ab" record then also lists the run's clip seeds ("clip_seeds"; None without the option).

`--baselines-on 4` (with `--clip-seeds` and `--only`) also runs transformers' rows on that one clip, for every draft
entry, so each entry's rows there meet them in one run: `--baselines`, by default `hf-generate hf-assisted-padded`
(the padded row exists for pairs whose output layers differ in size, as the widened 7B/0.5B's do).

A draft entry may carry the project's settings for its runs, FOLDER@SPECVLM_NAME=VALUE@...: the same folder twice,
e.g. `specvlm/tiny/draft_cut,specvlm/tiny/draft_cut@SPECVLM_DRAFT_VOCAB=32768`, compares a setting
in one process beside one widened target (a setting that changes what the draft's steps compute, such as
SPECVLM_FEW_ROWS, SPECVLM_FUSE_DRAFT or SPECVLM_DRAFT_VOCAB, compiles the draft's steps once more). Settings are the
ones a bench command records (`specvlm.__main__.FAST_PATH_ENVIRONMENT`) but SPECVLM_SPLIT_MERGE, which is read at
import, checked before anything runs; the record's
"settings" lists them. The script exits with the largest of its bench runs' exit codes (1: a row unequal to AR)."""
import argparse, contextlib, json, os, sys
from pathlib import Path

import torch

from specvlm import __main__ as cli
from specvlm import fast
from specvlm.models import Pair, load_lm
from specvlm.widen import widen_model

# SPECVLM_SPLIT_MERGE is read when specvlm.split_merge is imported: set it for the whole process, not per entry
SETTINGS = [name for name in cli.FAST_PATH_ENVIRONMENT if name.startswith("SPECVLM_") and name != "SPECVLM_SPLIT_MERGE"]


@contextlib.contextmanager
def applied(settings: dict[str, str]):
    """The environment with `settings` set, restored afterwards."""
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


def draft_entry(text: str) -> tuple[str, dict[str, str]]:
    """"FOLDER" or "FOLDER@SPECVLM_NAME=VALUE@...": a draft folder and the project's settings its runs take,
    each checked as the fast path reads it."""
    folder, *pairs = text.split("@")
    settings = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    if len(settings) < len(pairs) or not set(settings) <= set(SETTINGS):
        sys.exit(f"drafts_ab.py: a draft entry is FOLDER or FOLDER@NAME=VALUE@... with NAME one of {SETTINGS}, "
                 f"got {text!r}.")
    try:
        with applied(settings):
            fast.check_settings()
    except ValueError as error:
        sys.exit(f"drafts_ab.py: draft entry {text!r} (its settings over the process's environment): {error}")
    return folder, settings


entries = [draft_entry(text) for text in sys.argv[1].split(",")]
drafts = [folder for folder, _ in entries]
options = argparse.ArgumentParser(prog="drafts_ab.py", add_help=False)  # only what this script reads; bench parses the rest
options.add_argument("--clip-seeds", type=cli.non_negative_int, nargs="+", default=None)
options.add_argument("--clip", default="synthetic")
options.add_argument("--clip-seed", default=None)
options.add_argument("--baselines-on", type=cli.non_negative_int, default=None)
options.add_argument("--only", nargs="+", default=None)
options.add_argument("--baselines", nargs="+", default=["hf-generate", "hf-assisted-padded"])
known, argv = options.parse_known_args(sys.argv[2:])
if known.baselines_on is not None and (known.clip_seeds is None or known.baselines_on not in known.clip_seeds
                                       or known.only is None or any(a == "--transformers" or a.startswith("--tra") for a in argv)):
    options.error("--baselines-on SEED adds transformers' rows to one of --clip-seeds, beside an --only list "
                  "(in place of --transformers).")
if known.baselines_on is None and "--baselines" in sys.argv[2:]:
    options.error("--baselines names the rows --baselines-on SEED adds: give both.")
argv += ["--clip", known.clip] + ([] if known.clip_seed is None else ["--clip-seed", known.clip_seed])
clip_seeds = [None]
if known.clip_seeds is not None:
    if known.clip_seed is not None or len(set(known.clip_seeds)) < len(known.clip_seeds):
        options.error("--clip-seeds takes one or more different seeds, in place of --clip-seed.")
    if known.clip != "synthetic":
        options.error("--clip-seeds picks synthetic clips: give --clip synthetic (or leave --clip out).")
    clip_seeds = known.clip_seeds
widened = {}  # "pair": the first draft's pair as bench builds it; each draft folder: its widened pair
original = cli.bench_pair


def bench_pair(args):
    """The first draft's pair as `bench` builds it; later drafts widened beside the same widened target; each draft
    widened once, whatever the clip."""
    named = lambda pair: f"{pair.name}, draft {args.draft}"
    if "pair" not in widened:
        widened["pair"] = widened[args.draft] = original(args)
    elif args.draft not in widened:
        (pair, stand_in), base = widened["pair"], load_lm(args.draft, device="cpu")
        dtype = getattr(torch, args.dtype) if args.dtype else None
        draft = widen_model(base.model, args.widen[1], args.device, dtype, seed=1)  # the seed widen_pair gives a draft
        widened[args.draft] = Pair(pair.target, type(base)(draft, base.processor), pair.name), stand_in
    pair, stand_in = widened[args.draft]
    return Pair(pair.target, pair.draft, named(pair)), stand_in


cli.bench_pair = bench_pair
codes = []
for seed in clip_seeds:  # clip after clip, every draft on each: a run cut short still compares them on its clips
    for index, (folder, settings) in enumerate(entries):
        name = f"bench_draft_{index}_{Path(folder).name}" + ("" if seed is None else f"_seed{seed}")
        out = Path(os.environ["OUT"]) / f"{name}.json"
        print("== draft", folder, "" if seed is None else f"clip seed {seed}", settings or "", flush=True)
        only = known.only and known.only + (known.baselines if seed == known.baselines_on else [])
        with applied(settings):
            codes.append(cli.main(["bench", *argv, "--draft", folder, "--out", str(out),
                                   *([] if seed is None else ["--clip-seed", str(seed)]),
                                   *(["--only", *only] if only else []),
                                   *(["--transformers"] if seed is not None and seed == known.baselines_on else [])])
                         or 0)
        result = json.loads(out.read_text())
        result["drafts_ab"] = {"draft": folder, "index": index, "drafts": drafts,
                               "clip_seeds": None if seed is None else clip_seeds, "settings": settings}
        out.write_text(json.dumps(result, indent=1))
sys.exit(max(codes, default=0))
