"""Command line: `python -m specvlm demo|bench|costs [options]`.

`demo` runs AR, plain SD and SpecVLM on one clip with one pair, prints a table and exits
with status 1 if any speculative output differs from the target's greedy output.
`bench` times AR, SD and SpecVLM (chain and tree; `--self`: the target drafting for itself) over
frame counts and writes JSON; `--widen T D` first widens the embedded pair to real shapes.
`costs` times one forward pass (1 token, chain, tree) against context length at real
language-model shapes with random weights, beside its bytes-over-bandwidth floor, and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path


def at_least(low: int):
    """An argparse `type=`: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


positive_int, non_negative_int = at_least(1), at_least(0)


def ratio(text: str) -> float:
    """An argparse `type=`: the share of video tokens pruned, in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a share of video tokens to prune in [0, 1), e.g. 0.9; got {text!r}")
    return value


def question(text: str) -> str:
    """An argparse `type=`: a question with some text in it."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a question about the video, e.g. 'Describe the video.'; got an "
                                         "empty one")
    return text


def device(text: str) -> str:
    """An argparse `type=`: a device torch knows and this machine has (`models.resolve_device`)."""
    from .models import resolve_device

    try:
        resolve_device(text)
    except (RuntimeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error).splitlines()[0]) from None
    return text


def out_file(text: str) -> str:
    """An argparse `type=`: a file to write at the end, whose folder must exist now."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path in it, e.g. {path / 'result.json'}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {path.parent} does not exist; create it first "
                                         f"(mkdir -p {shlex.quote(str(path.parent))})")
    return text


def named_tree(text: str):
    """An argparse `type=`: NAME=FILE, FILE a JSON with the tree's rank paths under "paths" (as
    `python -m specvlm.tree_search` writes it) -> (NAME, Tree)."""
    from .tree_search import read_tree

    name, sep, path = text.partition("=")
    if not sep or not name or ":" in name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE (a name without ':' and a tree's JSON), e.g. "
                                         f"grown=figures/tree.json; got {text!r}")
    try:
        return name, read_tree(path)
    except (OSError, ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"{path}: {error}") from None


def flash_refusal(device_text: str | None, dtype_text: str | None) -> str | None:
    """Why attention "flash" cannot run for these `--device` and `--dtype` flags (their defaults
    resolved as the commands resolve them), or None: `flash_decode.refusal`, checked before any
    model is built."""
    from . import flash_decode
    from .models import resolve_device, resolved_dtype

    device = resolve_device(device_text)
    return flash_decode.refusal([device], resolved_dtype(dtype_text, device))


def dtypes() -> tuple[str, ...]:
    """The `--dtype` choices this torch has."""
    import torch

    names = ("float32", "bfloat16", "float16")
    return tuple(name for name in names if isinstance(getattr(torch, name, None), torch.dtype))


def inputs(args, parser):
    """What `demo` and `bench` check before loading any model: the pair's checkpoints
    (`models.pair_checkpoints`); `demo` reads its video (returned), `bench` finds its clip. A
    ValueError, OSError or ImportError becomes parser's one-line error naming the flag (exit 2)."""
    from .models import pair_checkpoints
    from .video import load_video, sample_video, sample_video_path

    def checked(flags, check, *values):
        try:
            return check(*values)
        except (ValueError, OSError, ImportError) as error:
            parser.error(f"argument {flags}: {error}")

    checked("--target/--draft", pair_checkpoints, args.target, args.draft)
    if args.command == "demo":
        if args.clip is None:  # the embedded pair's kind of clip, else a real one
            args.clip = "synthetic" if args.target == "tiny" else "bigbuckbunny"
        if args.clip_seed is not None and (args.clip != "synthetic" or args.video):
            parser.error("argument --clip-seed: it picks a synthetic clip; drop it, or drop --video and use "
                         "--clip synthetic.")
        args.clip_seed = DEMO_CLIP_SEED if args.clip_seed is None else args.clip_seed
    if args.command == "demo" and args.video:
        return checked("--video", load_video, args.video, args.frames)
    if args.command == "demo" and args.clip == "synthetic":
        return synthetic_video(args.clip_seed, args.frames)
    if args.command == "demo":
        return checked("--clip", sample_video, args.clip, args.frames)
    if args.clip != "synthetic":
        checked("--clip", sample_video_path, args.clip)
    if args.only is not None:
        checked("--only", possible_rows, args)
    if "fast" in args.paths:
        checked("--paths fast", fast_settings, args)
    return None


def fast_settings(args) -> None:
    """Refuse a bad $SPECVLM_* fast-path setting before `bench` loads the pair (`fast.check_settings`,
    with both models where `--device` and `--dtype` put them)."""
    from .fast import check_settings
    from .models import resolve_device, resolved_dtype

    device = resolve_device(args.device)
    where = ({device}, resolved_dtype(args.dtype, device))
    try:
        check_settings(target=where, draft=where)
    except ValueError as error:
        raise ValueError(f"the fast path's settings: {error}") from None


def possible_rows(args) -> None:
    """Refuse `bench --only` names that no row of this call could have, before loading the pair
    (the command line's pairs are two models, so their rows are named "draft"'s); one that only
    some pairs run ("hf-assisted-padded": output layers of different sizes) is checked again once
    the pair is loaded."""
    from .bench import run_labels

    possible = run_labels(args.self_speculation, args.transformers, "draft", True, args.selection,
                          tuple(dict(args.tree or [])))
    unknown = [name for name in args.only if name not in possible]
    if unknown:
        raise ValueError(f"{unknown} name no row of this call (see --self, --selection, --tree and --transformers); "
                         f"choose from {possible}")


DEMO_CLIP_SEED = 2  # a held-out synthetic clip (seeds below 10**5), the one 00_quickstart shows


def synthetic_video(seed: int, frames: int):
    """A synthetic clip of coloured shapes (`synthetic.make_clip`) as a `Video`, at the frame rate the
    embedded pair was trained at; its true caption in `source`."""
    from . import synthetic
    from .video import Video, from_array

    clip = synthetic.make_clip(seed, num_frames=frames)
    video = from_array(clip.frames, fps=8.0)
    return Video(video.frames, video.fps, video.indices, video.total_frames,
                 f"synthetic clip, seed {seed} (true caption: {clip.caption!r})")


def demo(args) -> int:
    from . import generate, load_pair

    video = args.input_video  # read by `inputs` before the pair loads
    pair = load_pair(args.target, args.draft, device=args.device)
    print(f"pair: {pair.name}\nvideo: {video.source}, {len(video.frames)} frames\nquestion: {args.question}\n")
    runs = [("ar", 0.0), ("sd", 0.0), ("specvlm", args.ratio)]
    results = [generate(pair, video, args.question, method=m, ratio=r, k=args.k, max_new_tokens=args.max_new_tokens)
               for m, r in runs]
    reference = results[0].tokens
    header = f"{'method':<9} {'ratio':>5} {'new tokens':>10} {'MAT':>5} {'draft video tokens':>18} {'decode s':>9} {'= AR':>5}"
    print(header + "\n" + "-" * len(header))
    for res in results:
        draft_video = "-" if res.draft_video_tokens is None else f"{res.draft_video_tokens}/{res.video_tokens}"
        mat = "-" if res.method == "ar" else f"{res.mean_accepted:.2f}"
        same = "yes" if res.tokens == reference else "NO"
        print(f"{res.method:<9} {res.ratio:>5.2f} {len(res.tokens):>10} {mat:>5} {draft_video:>18} "
              f"{res.decode_s:>9.3f} {same:>5}")
    print(f"\nAR output: {results[0].text!r}")
    if any(res.tokens != reference for res in results):
        print("error: a speculative output differs from the target's greedy output", file=sys.stderr)
        return 1
    return 0


def bench_pair(args):
    """(pair, stand_in) for `bench`: the named pair, or with `--widen` the embedded pair widened
    to real language-model shapes (`widen.widen_pair`; the same outputs, so still a stand-in)."""
    import torch

    from . import load_pair

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if not args.widen:
        return load_pair(args.target, args.draft, device=args.device, dtype=dtype), args.target == "tiny"
    try:
        from .widen import widen_pair
    except ImportError as error:
        raise SystemExit(f"--widen needs specvlm.widen, which could not be imported ({error}).") from error
    base = load_pair(args.target, args.draft, device="cpu")  # widened in fp32, then moved and cast
    target_shape, draft_shape = args.widen
    return widen_pair(base, target_shape, draft_shape, device=args.device, dtype=dtype), True


def bench(args) -> int:
    from .bench import bench as run, save, table
    from .video import sample_video

    import torch._inductor.config as inductor_config

    if args.combo_kernels:
        inductor_config.combo_kernels = True
    pair, stand_in = bench_pair(args)
    if args.clip == "synthetic":
        video_for = lambda frames: synthetic_video(args.clip_seed, frames)
    else:
        video_for = lambda frames: sample_video(args.clip, frames)
    facts = {"clip": f"synthetic seed {args.clip_seed}" if args.clip == "synthetic" else args.clip,
             "command": args.command_line, "code": git_commit(),
             "combo_kernels": bool(inductor_config.combo_kernels)}
    if args.widen:
        facts["widened_to"] = {"target": args.widen[0], "draft": args.widen[1]}
    # saved after every row, so a run cut short by a time limit still says where and how it ran
    result = run(pair, video_for, args.frames, args.max_new_tokens, args.k, args.repeats, question=args.question,
                 paths=args.paths,
                 transformers_baselines=args.transformers, self_speculation=args.self_speculation,
                 step_repeats=args.step_repeats, stand_in=stand_in, only=args.only, timeline=args.timeline,
                 step_kernels=args.step_kernels,
                 selection=args.selection, trees=dict(args.tree or []),
                 progress=(lambda partial: save({**partial, **facts}, args.out)) if args.out else None)
    result.update(facts)
    print(table(result))
    if args.out:
        save(result, args.out)
    return 0 if all(r["equal_to_ar"] for r in result["rows"]) else 1


def portable_out(argv: list[str]) -> list[str]:
    """argv with an absolute `--out` path outside the working directory written as its file
    name: where another machine put a result says nothing here (and is not this machine's path).
    ["bench", "--out", "/scratch/x.json"] -> ["bench", "--out", "x.json"]"""
    from pathlib import Path

    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--out":
            path = Path(argv[i + 1])
            if path.is_absolute() and not path.is_relative_to(Path.cwd()):
                argv[i + 1] = path.name
    return argv


def git_commit() -> str | None:
    """The commit of the checkout the package runs from, with " + uncommitted changes" when its
    tracked files differ from it (e.g. a copy of a working tree next to a stale .git); None
    outside a git checkout. $SPECVLM_CODE, when set, is taken instead: the commit a copy of the
    tree was made from, set by whoever made the copy without its .git."""
    import os
    import subprocess
    from pathlib import Path

    if os.environ.get("SPECVLM_CODE"):
        return os.environ["SPECVLM_CODE"]

    def git(*args):
        done = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        commit, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit:
        return None
    return commit + " + uncommitted changes" if changes else commit


def costs(args) -> int:
    import torch

    from .costs import card_slug, measure_costs, save, table

    dtype = getattr(torch, args.dtype) if args.dtype else None
    result = measure_costs(args.shapes, args.contexts, args.paths, device=args.device, dtype=dtype,
                           repeats=args.repeats, warmup=args.warmup, devices=args.devices,
                           progress=lambda row: print(f"{row['shape']} {row['path']} {row['kind']} {row['context']}: "
                                                      f"{row['ms'] if row['ms'] is not None else row['skipped']}",
                                                      file=sys.stderr))
    result.update(command=args.command_line, code=git_commit())
    print(table(result))
    if args.out:
        save(result, args.out.format(card=card_slug(result["device"])))
    return 0


def main(argv=None) -> int:
    from .models import DEFAULT_QUESTION
    from .video import SAMPLE_CLIPS

    parser = argparse.ArgumentParser(prog="python -m specvlm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("demo", help="AR vs SD vs SpecVLM on one clip; fails if outputs differ")
    d.add_argument("--target", default="tiny", help="target checkpoint (hub id or folder); default: the embedded pair")
    d.add_argument("--draft", default=None, help="draft checkpoint (needed unless --target tiny)")
    d.add_argument("--video", default=None, help="a video file; default: --clip")
    d.add_argument("--clip", default=None, choices=("synthetic", *SAMPLE_CLIPS),
                   help="'synthetic': a held-out clip of the kind the embedded pair was trained on (the default with "
                        "--target tiny), or a bundled real sample clip (default otherwise: bigbuckbunny; the "
                        "embedded pair never saw one, and its draft rarely agrees there)")
    d.add_argument("--clip-seed", type=non_negative_int, default=None,
                   help=f"seed of the synthetic clip (default {DEMO_CLIP_SEED}; held-out seeds: below 10**5)")
    d.add_argument("--frames", type=positive_int, default=16)
    d.add_argument("--ratio", type=ratio, default=0.9, help="share of the draft's video tokens to prune")
    d.add_argument("--k", type=positive_int, default=5, help="draft tokens per round")
    d.add_argument("--max-new-tokens", type=positive_int, default=48)
    d.add_argument("--question", type=question, default=DEFAULT_QUESTION)
    d.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda when available)")
    b = commands.add_parser("bench", help="decode time of AR, SD and SpecVLM (chain and tree) on one pair")
    b.add_argument("--target", default="tiny")
    b.add_argument("--draft", default=None)
    b.add_argument("--clip", default="synthetic", choices=("synthetic", *SAMPLE_CLIPS),
                   help="'synthetic' or a bundled sample clip name")
    b.add_argument("--clip-seed", type=non_negative_int, default=0,
                   help="seed of the synthetic clip (held-out seeds: below 10**5)")
    b.add_argument("--frames", type=positive_int, nargs="+", default=[16, 64])
    b.add_argument("--k", type=positive_int, default=5)
    b.add_argument("--max-new-tokens", type=positive_int, default=64)
    b.add_argument("--question", type=question, default=DEFAULT_QUESTION, help="asked of every clip (default: %(default)s)")
    b.add_argument("--repeats", type=positive_int, default=3)
    b.add_argument("--paths", nargs="+", choices=("plain", "fast"), default=["plain"],
                   help="plain: dynamic caches; fast: static caches and CUDA graphs (fast.py)")
    b.add_argument("--transformers", action="store_true",
                   help="also time transformers' generate and assisted generation (end to end)")
    b.add_argument("--self", dest="self_speculation", action="store_true",
                   help="add self-speculation rows: the target drafts for itself with its own pruned video")
    from .costs import SHAPES

    b.add_argument("--widen", nargs=2, default=None, metavar=("TARGET_SHAPE", "DRAFT_SHAPE"), choices=sorted(SHAPES),
                   help="widen the pair to these language-model shapes first, e.g. llava-ov-7b llava-ov-0.5b "
                        "(same outputs as the embedded pair: a stand-in)")
    b.add_argument("--step-repeats", type=positive_int, default=5, help="timed isolated passes per row (step_ms)")
    b.add_argument("--only", nargs="+", default=None, metavar="ROW",
                   help="run only these rows (AR always runs), e.g. specvlm-tree-0.9 hf-generate; names: "
                        "sv.bench.run_labels()")
    b.add_argument("--selection", action="store_true",
                   help="add SpecVLM's tree at 75%% and 95%% pruning and every other selection method at 90%% "
                        "(bench.SELECTION_RUNS)")
    b.add_argument("--tree", type=named_tree, nargs="+", default=None, metavar="NAME=FILE",
                   help="more draft trees, each adding a row METHOD-tree:NAME-RATIO beside every tree row (which "
                        "drafts mc_sim_7b_63); FILE: JSON with the rank paths under 'paths', e.g. from "
                        "python -m specvlm.tree_search")
    b.add_argument("--timeline", action="store_true",
                   help="profile one more generation per fast-path row: device busy and idle time per phase "
                        "of a round (specvlm.timeline)")
    b.add_argument("--step-kernels", action="store_true",
                   help="profile each fast-path row's queued passes (the draft's step, feed and level, the "
                        "verification, AR's step) in this process, on the row's own weights and caches: kernels per "
                        "pass by category and the costliest by name, the host's share and the pass's graph replayed "
                        "alone, under the row's 'step_kernels' (rows timed after a profiled row run in a process "
                        "that has run the profiler: compare settings without it)")
    b.add_argument("--combo-kernels", action="store_true",
                   help="compile with inductor's combo kernels, which launch data-independent kernels as one "
                        "(torch._inductor.config.combo_kernels, set for the whole process: the fast path's AR, draft "
                        "and verification steps, and transformers' compiled hf-generate-static row)")
    b.add_argument("--device", type=device, default=None)
    b.add_argument("--dtype", default=None, choices=dtypes(), help="default: bfloat16 on CUDA, float32 on CPU")
    b.add_argument("--out", type=out_file, default=None, help="write the JSON here (e.g. figures/bench_tiny.json)")
    from .costs import PATHS

    c = commands.add_parser("costs", help="ms per forward pass vs context length at real LM shapes (random weights)")
    c.add_argument("--shapes", nargs="+", default=["llava-ov-7b", "llava-ov-0.5b"], choices=sorted(SHAPES),
                   metavar="SHAPE", help=f"language-model shapes: {', '.join(SHAPES)}")
    c.add_argument("--contexts", type=positive_int, nargs="+", default=[1024, 4096, 16384, 65536])
    c.add_argument("--paths", nargs="+", default=["eager", "sdpa"], choices=sorted(PATHS))
    c.add_argument("--repeats", type=positive_int, default=10)
    c.add_argument("--warmup", type=non_negative_int, default=2)
    c.add_argument("--device", type=device, default=None)
    c.add_argument("--devices", type=device, nargs="+", default=None, metavar="DEVICE",
                   help="several GPUs, e.g. cuda:0 cuda:1: a shape too large for the first is spread over all "
                        "(needs accelerate)")
    c.add_argument("--dtype", default=None, choices=dtypes(), help="default: bfloat16 on CUDA, float32 on CPU")
    c.add_argument("--out", type=out_file, default=None,
                   help="JSON path; '{card}' becomes the card's name, e.g. figures/costs_{card}.json")
    args = parser.parse_args(argv)
    if args.command in ("demo", "bench"):
        args.input_video = inputs(args, commands.choices[args.command])
    if args.command == "costs" and "fast-flash" in args.paths:
        refusal = flash_refusal((args.devices or [args.device])[0], args.dtype)
        if refusal:
            c.error(f"argument --paths: fast-flash: {refusal}")
    args.command_line = recorded_environment() + "python -m specvlm " + \
        shlex.join(portable_out(sys.argv[1:] if argv is None else argv))
    return {"demo": demo, "bench": bench, "costs": costs}[args.command](args)


# the environment variables that change how the fast path runs, written before a result's command
# (inductor's autotuning changes which matmul kernels the compiled steps run)
FAST_PATH_ENVIRONMENT = ("SPECVLM_FAST_ATTENTION", "SPECVLM_CUDA_GRAPHS", "SPECVLM_FUSE_DRAFT", "SPECVLM_FEW_ROWS",
                         "SPECVLM_DRAFT_VOCAB", "SPECVLM_PICKS", "SPECVLM_L2_PREFETCH", "SPECVLM_DRAFT_COMBO",
                         "SPECVLM_DRAFT_PDL", "SPECVLM_FLEX_MIN_SLOTS", "SPECVLM_SPLIT_MIN_SLOTS",
                         "SPECVLM_SPLIT_MERGE", "TORCHINDUCTOR_MAX_AUTOTUNE", "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM",
                         "TORCHINDUCTOR_ENABLE_PDL")


def recorded_environment() -> str:
    """The set FAST_PATH_ENVIRONMENT variables as a command's prefix: "SPECVLM_FUSE_DRAFT=0 " or ""."""
    return "".join(f"{name}={shlex.quote(os.environ[name])} " for name in FAST_PATH_ENVIRONMENT
                   if os.environ.get(name))


if __name__ == "__main__":
    sys.exit(main())
