"""Write the embedded pair's model card (README.md) from its measured files.

    python -m specvlm.tiny.card

Every number in the card is read from `metrics.json` and `metrics_long.json` (both written by
`specvlm.tiny.evaluate`, on 16-frame and on long clips), `train_log.jsonl` (written by
`specvlm.tiny.train`) and the saved configs: nothing is typed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

HERE = Path(__file__).parent
ATTRIBUTES = ("recall", "recall_small", "recall_brief", "colour", "shape", "size", "motion", "timing", "position")
ROWS = {
    "target": "target, all video tokens",
    "target_uniform_10pct": "target pruned to 10% of its own video (uniform)",
    "target_top_10pct": "target pruned to 10% of its own video (top attention)",
    "draft": "draft alone, all video tokens",
}


def _sizes(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    return (f"{text['num_hidden_layers']} layers, width {text['hidden_size']}, {text['num_attention_heads']} query heads / "
            f"{text['num_key_value_heads']} KV head(s) of dimension {text['head_dim']}, MLP {text['intermediate_size']}; "
            f"vision {vision['num_hidden_layers']} layers, width {vision['hidden_size']}, "
            f"{vision['image_size']} px frames in {vision['patch_size']} px patches")


def _parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def _stages(log: list[dict]) -> list[dict]:
    """Split the training log into runs: [{args, steps: {role: n}, loss: {role: last loss}}]."""
    stages, current = [], None
    for record in log:
        if "stage" in record or current is None:
            current = {"args": {}, "steps": {}, "loss": {}}
            stages.append(current)
        if "steps_done" in record:
            current["steps"][record["role"]] = record["steps_done"]
        elif "planned_steps" in record:
            current["steps"].setdefault(record["role"], record["planned_steps"])
        if "loss" in record:
            current["loss"][record["role"]] = record["loss"]
        if record.get("done"):
            current["args"] = record["args"]
    return stages


def _schedule(args: dict) -> str:
    fraction = float(args.get("decay_fraction", 1.0))
    return "constant" if fraction == 0 else "cosine to 0" if fraction == 1 else f"constant, then cosine over the last {fraction:g}"


def _frames(args: dict) -> list[int]:
    """The clip frame counts a run trained on (runs logged before `--frames` existed used 4..64)."""
    from .train import FRAMES

    return json.loads(args["frames"]) if "frames" in args else list(FRAMES)


def _command(index: int, stage: dict) -> str:
    args = stage["args"]
    init = f" --init run{index}" if index else ""
    frames = ""
    if "frames" in args:
        frames = f" --frames {' '.join(map(str, _frames(args)))}"
        if args.get("frame_weights", "None") != "None":
            frames += f" --frame-weights {' '.join(f'{w:g}' for w in json.loads(args['frame_weights']))}"
    return (f"python -m specvlm.tiny.train --out run{index + 1}{init} --target-steps {stage['steps'].get('target', 0)} "
            f"--draft-steps {stage['steps'].get('draft', 0)} --lr {args['lr']} --decay-fraction {args.get('decay_fraction', 1.0)} "
            f"--tokens-per-batch {args['tokens_per_batch']}{frames}")


def render(folder: Path = HERE) -> str:
    metrics = json.loads((folder / "metrics.json").read_text())
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    stages = _stages(log)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"

    lines = [
        "# The embedded pair (a stand-in)",
        "",
        "A small LLaVA-OneVision target/draft pair of the real transformers classes, trained by",
        "`python -m specvlm.tiny.train` on the synthetic captioned clips of `specvlm.synthetic`, shipped",
        "so that the demo, the notebooks and the tests show real behaviour offline on a CPU.",
        "It is a teaching stand-in, not a video-understanding model: the paper's drafts are",
        "off-the-shelf checkpoints, and this draft was trained on pruned video (see below).",
        "",
        "## Sizes",
        f"- target: {_parameters(folder / 'target'):,} parameters; {_sizes(folder / 'target')}",
        f"- draft: {_parameters(folder / 'draft'):,} parameters; {_sizes(folder / 'draft')}",
        "- shared tokenizer (byte-level BPE trained on the task's words) and processor: 8x8 video tokens per",
        "  frame plus one newline token per video.",
        "",
        "## Training recipe (from `train_log.jsonl`)",
        f"- seed {stages[0]['args']['seed']}, AdamW, bf16 autocast on a GPU, "
        f"about {stages[0]['args']['tokens_per_batch']} tokens per batch (one frame count per batch), in {len(stages)} runs, "
        "each continuing the last (`--init`):",
        "",
        "| run | clip frames | target steps | draft steps | peak learning rate | schedule | final loss (target / draft) |",
        "|---|---|---|---|---|---|---|",
        *[f"| {i + 1} | {min(_frames(st['args']))} to {max(_frames(st['args']))} | {st['steps'].get('target', 0)} | "
          f"{st['steps'].get('draft', 0)} | {st['args']['lr']} | "
          f"{_schedule(st['args'])} | {st['loss'].get('target', '-')} / {st['loss'].get('draft', '-')} |"
          for i, st in enumerate(stages)],
        "",
        "- the draft starts from the trained target's vision tower (LLaVA-OneVision's sizes share one SigLIP tower);",
        "  each of its batches is pruned at a ratio from {0, .5, .75, .9, .95} by a selection from",
        "  {specvlm (the trained target's attention), uniform, random}, kept tokens at their original positions;",
        "- reproduce (up to GPU nondeterminism), one command per run:",
        "",
        "```bash",
        *[_command(i, st) for i, st in enumerate(stages)],
        "```",
        "",
        f"## Measured on {metrics['clips']} held-out clips ({metrics['frames']} frames, "
        f"{metrics['video_tokens']} video tokens), {metrics['date']}",
        "",
        "Caption accuracy per attribute (`synthetic.score_caption`, pooled over objects):",
        "",
        "| model | " + " | ".join(ATTRIBUTES) + " | exact |",
        "|---|" + "---|" * (len(ATTRIBUTES) + 1),
    ]
    for key, name in ROWS.items():
        row = metrics["captions"][key]
        lines.append(f"| {name} | " + " | ".join(fmt(row[a]) for a in ATTRIBUTES) + f" | {fmt(row['exact'])} |")
    lines += [
        "",
        f"Mean accepted draft tokens per round (chain of {metrics['k']}, greedy; the bonus token not counted). "
        f"Unpruned speculative decoding: {metrics['mean_accepted']['sd@0.0']:.2f}.",
        "",
        *_mat_table(metrics["mean_accepted"]),
    ]
    long_path = folder / "metrics_long.json"
    if long_path.exists():
        lines += _long_section(json.loads(long_path.read_text()), fmt)
    lines += [
        "",
        "## What this pair does and does not show",
        "",
        *_findings(metrics),
    ]
    return "\n".join(lines) + "\n"


def _mat_table(mat: dict) -> list[str]:
    """Markdown rows: one per selection method, one column per pruning ratio."""
    ratios = sorted({float(k.split("@")[1]) for k in mat if not k.startswith("sd@")})
    methods = list(dict.fromkeys(k.split("@")[0] for k in mat if not k.startswith("sd@")))
    return ["| draft's video selection | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |",
            "|---|" + "---|" * len(ratios),
            *[f"| {m} | " + " | ".join(f"{mat[f'{m}@{r}']:.2f}" for r in ratios) + " |" for m in methods]]


def _long_section(long: dict, fmt) -> list[str]:
    """The same measurements on long clips (the GPU benchmark's lengths), fewer clips."""
    mat = long["mean_accepted"]
    lengths = long["target_new_tokens"]
    return [
        "",
        f"## Long clips: {long['clips']} held-out clips of {long['frames']} frames ({long['video_tokens']} video tokens), "
        f"{long['date']}, {long['device']}",
        "",
        "The length of the GPU benchmark (`python -m specvlm bench --widen`). The target's captions have "
        f"{lengths['mean']:.1f} new tokens on average ({lengths['min']} to {lengths['max']}).",
        "",
        "| model | " + " | ".join(ATTRIBUTES) + " | exact |",
        "|---|" + "---|" * (len(ATTRIBUTES) + 1),
        *[f"| {name} | " + " | ".join(fmt(long["captions"][key][a]) for a in ATTRIBUTES) + f" | {fmt(long['captions'][key]['exact'])} |"
          for key, name in ROWS.items()],
        "",
        f"Mean accepted draft tokens per round (chain of {long['k']}). Unpruned speculative decoding: {mat['sd@0.0']:.2f}.",
        "",
        *_mat_table(mat),
    ]


def _findings(metrics: dict, goal: float = 0.9) -> list[str]:
    """Sentences computed from the metrics, read against the project's targets for the pair."""
    captions, mat = metrics["captions"], metrics["mean_accepted"]
    attributes = ATTRIBUTES[3:]
    below = [f"{a} {captions['target'][a]:.2f}" for a in attributes if captions["target"][a] < goal]
    drops = {a: captions["target"][a] - captions["target_uniform_10pct"][a] for a in attributes}
    largest = max(drops, key=drops.get)
    change = mat["specvlm@0.9"] / mat["sd@0.0"] - 1
    blind = max(("uniform", "random"), key=lambda m: mat[f"{m}@0.9"])
    return [
        f"- Target accuracy per attribute: {'every attribute' if not below else 'all but ' + ', '.join(below)} "
        f"at or above {goal:.0%}.",
        f"- Pruned to 10% of its own video (uniform), the target loses up to {drops[largest] * 100:.0f} points "
        f"({largest}: {captions['target'][largest]:.2f} -> {captions['target_uniform_10pct'][largest]:.2f}).",
        f"- The draft alone, against the target: "
        + ", ".join(f"{a} {captions['draft'][a]:.2f} vs {captions['target'][a]:.2f}" for a in attributes) + ".",
        f"- The draft's MAT with 90% of its video pruned by SpecVLM is {mat['specvlm@0.9']:.2f} against "
        f"{mat['sd@0.0']:.2f} unpruned ({change:+.1%}); by the better spread-out content-blind selection, {blind}, "
        f"{mat[blind + '@0.9']:.2f}. The draft was trained on video pruned by SpecVLM's, uniform and random "
        "selection, so its tolerance of pruning is partly trained in.",
    ]


if __name__ == "__main__":
    (HERE / "README.md").write_text(render())
    print((HERE / "README.md").read_text())
