"""Write the embedded pair's model card (README.md) from its measured files.

    python -m specvlm.tiny.card

Every number in the card is read from `metrics.json` (written by `specvlm.tiny.evaluate`),
`train_log.jsonl` (written by `specvlm.tiny.train`) and the saved configs: nothing is typed.
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


def _command(index: int, stage: dict) -> str:
    args = stage["args"]
    init = f" --init run{index}" if index else ""
    return (f"python -m specvlm.tiny.train --out run{index + 1}{init} --target-steps {stage['steps'].get('target', 0)} "
            f"--draft-steps {stage['steps'].get('draft', 0)} --lr {args['lr']} --decay-fraction {args.get('decay_fraction', 1.0)} "
            f"--tokens-per-batch {args['tokens_per_batch']}")


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
        f"- seed {stages[0]['args']['seed']}, AdamW, bf16 autocast on a GPU, clips of 4 to 64 frames, "
        f"about {stages[0]['args']['tokens_per_batch']} tokens per batch, in {len(stages)} runs, each continuing "
        "the last (`--init`):",
        "",
        "| run | target steps | draft steps | peak learning rate | schedule | final loss (target / draft) |",
        "|---|---|---|---|---|---|",
        *[f"| {i + 1} | {st['steps'].get('target', 0)} | {st['steps'].get('draft', 0)} | {st['args']['lr']} | "
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
    ratios = sorted({float(k.split("@")[1]) for k in metrics["mean_accepted"] if not k.startswith("sd@")})
    methods = list(dict.fromkeys(k.split("@")[0] for k in metrics["mean_accepted"] if not k.startswith("sd@")))
    lines += [
        "",
        f"Mean accepted draft tokens per round (chain of {metrics['k']}, greedy; the bonus token not counted). "
        f"Unpruned speculative decoding: {metrics['mean_accepted']['sd@0.0']:.2f}.",
        "",
        "| draft's video selection | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(f"{metrics['mean_accepted'][f'{method}@{r}']:.2f}" for r in ratios) + " |")
    lines += [
        "",
        "## What this pair does and does not show",
        "",
        *_findings(metrics),
    ]
    return "\n".join(lines) + "\n"


def _findings(metrics: dict, goal: float = 0.9) -> list[str]:
    """Sentences computed from the metrics, read against the project's targets for the pair."""
    captions, mat = metrics["captions"], metrics["mean_accepted"]
    attributes = ATTRIBUTES[3:]
    below = [f"{a} {captions['target'][a]:.2f}" for a in attributes if captions["target"][a] < goal]
    drops = {a: captions["target"][a] - captions["target_uniform_10pct"][a] for a in attributes}
    largest = max(drops, key=drops.get)
    change = mat["specvlm@0.9"] / mat["sd@0.0"] - 1
    return [
        f"- Target accuracy per attribute: {'every attribute' if not below else 'all but ' + ', '.join(below)} "
        f"at or above {goal:.0%}.",
        f"- Pruned to 10% of its own video (uniform), the target loses up to {drops[largest] * 100:.0f} points "
        f"({largest}: {captions['target'][largest]:.2f} -> {captions['target_uniform_10pct'][largest]:.2f}).",
        f"- The draft alone, against the target: "
        + ", ".join(f"{a} {captions['draft'][a]:.2f} vs {captions['target'][a]:.2f}" for a in attributes) + ".",
        f"- The draft's MAT with 90% of its video pruned by SpecVLM is {mat['specvlm@0.9']:.2f} against "
        f"{mat['sd@0.0']:.2f} unpruned ({change:+.1%}).",
    ]


if __name__ == "__main__":
    (HERE / "README.md").write_text(render())
    print((HERE / "README.md").read_text())
