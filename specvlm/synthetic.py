"""Synthetic videos with ground truth: coloured shapes that move, appear and disappear.

The embedded tiny pair (`specvlm/tiny`) is trained and measured on this task, so
that accuracy is computed, never eyeballed. A clip is a few to 64 frames of 64x64 RGB on a dark,
mildly noisy background, with 1-3 objects. Each object has a shape (square, circle, triangle,
diamond, cross, ring), a colour (7 named ones), a size (small: 8-9 px, about one 8x8-pixel
video-token cell; big: 12-16 px), a motion (moves left/right/up/down, or stays still in one of
nine places) and a timing (present throughout, appears later, disappears early, or appears
briefly: visible in only 1-2 of the sampled frames, and then still). Within a clip shapes and
colours are all different and objects never touch, so every mask is exactly the object's
colour and "the square" names one object.

    clip = make_clip(12, num_frames=16)
    clip.frames  # [T, H, W, 3] uint8      clip.masks  # [T, N, H, W] bool
    clip.caption -> "a small white diamond moves right. a big red triangle moves left.
                     a small yellow circle appears briefly on the right."

Why small and brief objects: a target whose own video is pruned to 10% loses them first (the
model card of the embedded pair measures how much), while the draft needs no such detail to
propose the template words. They are where the contrast
"prune the draft, not the target" shows, in presence and colour, not only in shape and motion.

Captions (`describe`) have one sentence per object, in a canonical order (first visible frame,
then left to right, then top to bottom), from the small word list `vocabulary()`:

    a big red circle moves left.                        a big red circle stays on the left.
    a big red circle appears later and moves up.        a big red circle appears later in the centre.
    a big red circle moves down and then disappears.    a small red circle appears briefly at the top.

`score_caption(text, objects)` parses generated text (`parse_caption`) and matches described
objects to the truth greedily: by shape and colour, then by shape, then by colour (each truth
object in canonical order takes the first free described object). Matched objects count as
found (`recall`); colour, shape, size, motion and timing are scored on found objects, position
on found objects that stay still; `recall_small` and `recall_brief` are the recall of small and
of brief objects; `hallucinated` counts described objects left unmatched; `exact` is 1.0 when
the text is the canonical caption. `aggregate` pools these over clips. `make_question` asks
short questions ("what colour is the square?" -> "red.") scored by `score_answer`.

Not handled: occlusion, bouncing, rotation, speed or several motions per object, repeated
shapes or colours in one clip, lighting; pixels are drawn without anti-aliasing. When an
object finds no free place in 100 tries it is left out (about 2% of 3-object clips get 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("square", "circle", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (230, 40, 40),
    "orange": (255, 150, 20),
    "yellow": (245, 235, 50),
    "green": (40, 200, 70),
    "blue": (50, 90, 255),
    "purple": (180, 60, 230),
    "white": (240, 240, 240),
}
SIZES = ("small", "big")
MOTIONS = ("left", "right", "up", "down", "still")
TIMINGS = ("throughout", "appears", "disappears", "brief")
POSITIONS = {  # still objects: a cell of a 3x3 grid -> its phrase
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom", "bottom right": "in the bottom right corner",
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards
TIMING_ANSWERS = {"throughout": "all the time.", "appears": "from later on.", "disappears": "only early on.",
                  "brief": "only briefly."}


@dataclass(frozen=True)
class ObjectSpec:
    """One object's ground truth. `trajectory` holds its centre (x, y) in pixels at each frame
    of `visible` (a range of frame indices); `pixels` is its side length; `position` is the
    3x3-grid cell of a still object (None when it moves)."""

    shape: str
    colour: str
    size: str
    motion: str
    timing: str
    position: str | None
    visible: range
    trajectory: tuple[tuple[float, float], ...]
    pixels: int

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


@dataclass(frozen=True, eq=False)
class Clip:
    """A synthetic clip.  # frames: [T, S, S, 3] uint8, masks: [T, N, S, S] bool (N objects)"""

    frames: torch.Tensor
    objects: tuple[ObjectSpec, ...]
    masks: torch.Tensor
    caption: str
    seed: int


# --- drawing -----------------------------------------------------------------------------

def stencil(shape: str, pixels: int) -> np.ndarray:
    """The shape's pixels in its `pixels` x `pixels` box, sampled at pixel centres.

    stencil("cross", 6).sum() -> 20  (two 2-pixel-wide arms)
    """
    c = (np.arange(pixels) + 0.5) / (pixels / 2) - 1  # pixel centres in [-1, 1]
    v, u = np.meshgrid(c, c, indexing="ij")  # v: rows (down), u: columns (right)
    eps = 1e-6
    rule = {
        "square": np.ones_like(u, dtype=bool),
        "circle": u**2 + v**2 <= 1 + eps,
        "triangle": np.abs(u) <= (v + 1) / 2 + 1 / pixels + eps,  # apex at the top, half a pixel wider
        "diamond": np.abs(u) + np.abs(v) <= 1 + eps,
        "cross": (np.abs(u) <= 1 / 3 + eps) | (np.abs(v) <= 1 / 3 + eps),
        "ring": (u**2 + v**2 <= 1 + eps) & (u**2 + v**2 >= 0.25),
    }
    return rule[shape]


def _background(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    """Dark base colour + a static low-frequency texture + per-frame noise of +-4, all <= 75."""
    base = rng.uniform(12, 36, 3)
    y, x = np.mgrid[0:size, 0:size] / size
    texture = np.zeros((size, size, 3))
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 3, 2).tolist() + [rng.uniform(0, 2 * np.pi)]
        texture += rng.uniform(2, 6, 3) * np.sin(2 * np.pi * (fx * x + fy * y) + phase)[..., None]
    noise = rng.integers(-4, 5, (frames, size, size, 3), dtype=np.int16)
    return np.clip(noise + (base + texture).round().astype(np.int16), 0, 75).astype(np.uint8)


# --- sampling ------------------------------------------------------------------------------

def _timing_range(rng, timing: str, frames: int) -> range:
    """Visible frames for a timing label. appears: from frame >= T/4 on, >= 3 frames;
    disappears: up to frame <= T-1-T/4, >= 3 frames; brief: 1-2 frames, inside the clip."""
    quarter = max(1, -(-frames // 4))
    if timing == "appears":
        return range(int(rng.integers(quarter, frames - 2)), frames)
    if timing == "disappears":
        return range(0, int(rng.integers(2, frames - quarter)) + 1)
    if timing == "brief":
        length = 1 if frames < 8 else int(rng.integers(1, 3))
        low, high = (1, frames - length - 1) if frames >= length + 2 else (0, frames - length)
        start = int(rng.integers(low, high + 1))
        return range(start, start + length)
    return range(frames)


def _path(rng, motion: str, position: str | None, pixels: int, frames: int, size: int):
    """Top-left corners (x0, y0) per visible frame, the whole box inside the frame."""
    low, high = 1 + pixels / 2, size - 1 - pixels / 2  # allowed centres
    if motion == "still":
        row, col = _cell(position)
        third = size / 3
        centre = [rng.uniform(max(low, (k + 0.25) * third), min(high, (k + 0.75) * third)) for k in (col, row)]
        start = end = np.array(centre)
    else:
        dx, dy = DIRECTIONS[motion]
        distance = rng.uniform(0.3, 0.55) * size
        along = rng.uniform(low, high - distance)
        across = rng.uniform(low, high)
        start = np.array([along, across] if dx else [across, along])
        if dx < 0 or dy < 0:
            start[0 if dx else 1] = size - start[0 if dx else 1]
        end = start + distance * np.array([dx, dy])
    steps = np.linspace(0, 1, frames)[:, None] if frames > 1 else np.zeros((1, 1))
    centres = start + steps * (end - start)
    return np.round(centres - pixels / 2).astype(int)


def _cell(position: str) -> tuple[int, int]:
    row = 0 if "top" in position else 2 if "bottom" in position else 1
    col = 0 if "left" in position else 2 if "right" in position else 1
    return row, col


def _apart(a, b, gap: int = 2) -> bool:
    """Boxes (visible, corners, pixels) never closer than `gap` in any frame both show."""
    (va, ca, sa), (vb, cb, sb) = a, b
    for t in set(va) & set(vb):
        (xa, ya), (xb, yb) = ca[t - va.start], cb[t - vb.start]
        if not (xa + sa + gap <= xb or xb + sb + gap <= xa or ya + sa + gap <= yb or yb + sb + gap <= ya):
            return False
    return True


def make_clip(seed: int, num_frames: int = 16, size: int = 64, *, counts=(1, 2, 3), count_weights=(0.3, 0.4, 0.3),
              p_small: float = 0.35, p_brief_small: float = 0.4, p_brief_big: float = 0.05,
              p_still: float = 0.3, p_appears: float = 0.15, p_disappears: float = 0.15) -> Clip:
    """A seeded clip: same seed and arguments, same clip. Knobs: `counts`/`count_weights` (objects
    per clip), `p_small`, `p_brief_small`/`p_brief_big` (brief share by size), `p_still` (of the
    objects seen in >= 3 frames), `p_appears`/`p_disappears` (of the non-brief, clips of >= 4 frames).

    make_clip(0).frames.shape -> torch.Size([16, 64, 64, 3]);  make_clip(0).masks.shape[1] -> #objects
    """
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}.")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size!r}.")
    if max(counts) > len(SHAPES) or min(counts) < 1:
        raise ValueError(f"object counts must lie in 1..{len(SHAPES)}, got {counts!r}.")
    rng = np.random.default_rng(seed)
    frames = _background(rng, num_frames, size)
    count = int(rng.choice(counts, p=np.asarray(count_weights) / np.sum(count_weights)))
    shapes = rng.permutation(SHAPES)[:count]
    colours = rng.permutation(list(COLOURS))[:count]
    objects, boxes = [], []
    for shape, colour in zip(shapes.tolist(), colours.tolist()):
        size_word = "small" if rng.random() < p_small else "big"
        pixels = round(size * (rng.uniform(0.125, 0.14) if size_word == "small" else rng.uniform(0.19, 0.25)))
        p_brief = (p_brief_small if size_word == "small" else p_brief_big) if num_frames >= 2 else 0.0
        late, early = (p_appears, p_disappears) if num_frames >= 4 else (0.0, 0.0)
        timing = rng.choice(TIMINGS, p=[(1 - p_brief) * (1 - late - early), (1 - p_brief) * late,
                                        (1 - p_brief) * early, p_brief])
        visible = _timing_range(rng, str(timing), num_frames)
        motion = "still" if len(visible) < 3 or timing == "brief" or rng.random() < p_still else str(
            rng.choice(MOTIONS[:4]))
        for _ in range(100):  # place without touching the objects already placed
            position = str(rng.choice(list(POSITIONS))) if motion == "still" else None
            corners = _path(rng, motion, position, pixels, len(visible), size)
            box = (visible, corners, pixels)
            if all(_apart(box, other) for other in boxes):
                break
        else:
            continue  # no room: the clip gets fewer objects
        boxes.append(box)
        trajectory = tuple((float(x + pixels / 2), float(y + pixels / 2)) for x, y in corners.tolist())
        objects.append(ObjectSpec(shape, colour, size_word, motion, str(timing), position, visible, trajectory, pixels))
    objects = canonical(objects)
    masks = np.zeros((num_frames, len(objects), size, size), dtype=bool)
    for i, obj in enumerate(objects):
        mark = stencil(obj.shape, obj.pixels)
        for t, (x, y) in zip(obj.visible, obj.trajectory):
            x0, y0 = round(x - obj.pixels / 2), round(y - obj.pixels / 2)
            masks[t, i, y0 : y0 + obj.pixels, x0 : x0 + obj.pixels] = mark
        frames[masks[:, i]] = obj.rgb
    return Clip(torch.from_numpy(frames), tuple(objects), torch.from_numpy(masks), describe(objects), seed)


def canonical(objects) -> list[ObjectSpec]:
    """Objects in caption order: first visible frame, then left to right, then top to bottom."""
    return sorted(objects, key=lambda o: (o.visible.start, o.trajectory[0][0], o.trajectory[0][1]))


# --- captions and questions ----------------------------------------------------------------

def sentence(obj: ObjectSpec) -> str:
    """One object's sentence.  (big red circle, left, disappears) -> "a big red circle moves left and then disappears." """
    noun = f"a {obj.size} {obj.colour} {obj.shape}"
    where = POSITIONS[obj.position] if obj.motion == "still" else None
    if obj.timing == "brief":
        return f"{noun} appears briefly {where}."
    verb = f"stays {where}" if where else f"moves {obj.motion}"
    if obj.timing == "appears":
        return f"{noun} appears later {where}." if where else f"{noun} appears later and {verb}."
    if obj.timing == "disappears":
        return f"{noun} {verb} and then disappears."
    return f"{noun} {verb}."


def describe(objects) -> str:
    """The canonical caption: one sentence per object, in `canonical` order."""
    return " ".join(sentence(o) for o in canonical(objects))


QUESTION_KINDS = ("count", "colour", "shape", "size", "motion", "position", "timing", "presence")


def make_question(clip: Clip, rng, kind: str | None = None) -> tuple[str, str]:
    """A question about the clip and its answer; `rng` a numpy Generator or an int seed.

    ("what colour is the square?", "red.");  ("how many objects are there?", "two.")
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    still = [o for o in clip.objects if o.motion == "still"]
    kinds = [k for k in QUESTION_KINDS if k != "position" or still]
    kind = kind or str(rng.choice(kinds))
    if kind not in kinds:
        raise ValueError(f"cannot ask a {kind!r} question about this clip; choose one of {kinds}.")
    pool = still if kind == "position" else clip.objects
    obj = pool[int(rng.integers(len(pool)))]
    if kind == "count":
        return "how many objects are there?", f"{NUMBERS[len(clip.objects)]}."
    if kind == "colour":
        return f"what colour is the {obj.shape}?", f"{obj.colour}."
    if kind == "shape":
        return f"what shape is the {obj.colour} object?", f"{obj.shape}."
    if kind == "size":
        return f"is the {obj.shape} big or small?", f"{obj.size}."
    if kind == "motion":
        return f"which way does the {obj.shape} move?", "it does not move." if obj.motion == "still" else f"{obj.motion}."
    if kind == "position":
        return f"where is the {obj.shape}?", f"{POSITIONS[obj.position]}."
    if kind == "timing":
        return f"when is the {obj.shape} visible?", TIMING_ANSWERS[obj.timing]
    if rng.random() < 0.5:  # presence
        return f"is there a {obj.colour} {obj.shape}?", "yes."
    present = {(o.shape, o.colour) for o in clip.objects}
    absent = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in present]
    shape, colour = absent[int(rng.integers(len(absent)))]
    return f"is there a {colour} {shape}?", "no."


def words(text: str) -> list[str]:
    """Lowercase words and punctuation.  "A red, circle." -> ["a", "red", ",", "circle", "."]"""
    return re.findall(r"[a-z]+|[^\sa-z]", text.lower())


def vocabulary() -> list[str]:
    """Every word and punctuation mark a caption, question or answer can use (fixed order)."""
    text = " ".join([
        *SHAPES, *COLOURS, *SIZES, *DIRECTIONS, *POSITIONS.values(), *NUMBERS, *TIMING_ANSWERS.values(),
        "a moves stays appears later and then disappears briefly .",
        "how many objects are there what colour is the shape object big or small which way does move it not",
        "where when visible yes no ?",
    ])
    return list(dict.fromkeys(words(text)))


# --- parsing and scoring -------------------------------------------------------------------

_NOUN = re.compile(rf"\b(?:({'|'.join(SIZES)})\s+)?(?:({'|'.join(COLOURS)})\s+)?({'|'.join(SHAPES)})\b")
_WHERE = re.compile(r"\b(?:in|at|on) the (top left|top right|bottom left|bottom right|top|bottom|left|right|centre)\b")
_MOVES = re.compile(r"\bmoves? (?:to the )?(left|right|up|down)\b")


def parse_caption(text: str) -> list[dict]:
    """Described objects (shape, colour, size, motion, position, timing; None when unsaid),
    in text order. A new object starts at each "[size] [colour] shape"; text that names no
    shape is ignored.

    parse_caption("a big red circle moves left. ok") ->
        [{"shape": "circle", "colour": "red", "size": "big", "motion": "left", "position": None, "timing": "throughout"}]
    """
    described = []
    for part in re.split(r"[.?!;\n]+", text.lower()):
        nouns = list(_NOUN.finditer(part))
        for noun, after in zip(nouns, nouns[1:] + [None]):
            rest = part[noun.end() : after.start() if after else len(part)]
            where, moves, said = _WHERE.search(rest), _MOVES.search(rest), set(words(rest))
            timing = ("brief" if "briefly" in said else "appears" if "appears" in said
                      else "disappears" if "disappears" in said else "throughout")
            still = where is not None or "stays" in said or timing == "brief"
            described.append({
                "shape": noun[3], "colour": noun[2], "size": noun[1],
                "motion": moves[1] if moves else "still" if still else None,
                "position": where[1] if where else None, "timing": timing,
            })
    return described


def match(objects, described) -> list[int | None]:
    """For each truth object (in the given order), the index of its described object or None:
    greedy, first by shape and colour, then by shape, then by colour."""
    pairs = [None] * len(objects)
    free = set(range(len(described)))
    for keys in (("shape", "colour"), ("shape",), ("colour",)):
        for i, obj in enumerate(objects):
            if pairs[i] is None:
                j = next((j for j in sorted(free) if all(described[j][k] == getattr(obj, k) for k in keys)), None)
                if j is not None:
                    pairs[i] = j
                    free.discard(j)
    return pairs


ATTRIBUTES = ("colour", "shape", "size", "motion", "timing")
DENOMINATORS = {  # score key -> the count it is a share of
    "recall": "objects", "recall_small": "small_objects", "recall_brief": "brief_objects",
    **{a: "found" for a in ATTRIBUTES}, "position": "found_still",
}


def score_caption(text: str, objects) -> dict:
    """Per-attribute accuracy of `text` against the ground truth (None where nothing to score).

    score_caption("a big red circle moves left.", clip.objects)["recall"] -> share of objects found
    """
    objects = canonical(objects)
    described = parse_caption(text)
    pairs = match(objects, described)
    found = [(o, described[j]) for o, j in zip(objects, pairs) if j is not None]
    counts = {
        "objects": len(objects), "found": len(found),
        "small_objects": sum(o.size == "small" for o in objects),
        "brief_objects": sum(o.timing == "brief" for o in objects),
        "found_still": sum(o.motion == "still" for o, _ in found),
    }
    hits = {
        "recall": len(found),
        "recall_small": sum(o.size == "small" for o, _ in found),
        "recall_brief": sum(o.timing == "brief" for o, _ in found),
        **{a: sum(d[a] == getattr(o, a) for o, d in found) for a in ATTRIBUTES},
        "position": sum(d["position"] == o.position for o, d in found if o.motion == "still"),
    }
    rates = {k: hits[k] / counts[DENOMINATORS[k]] if counts[DENOMINATORS[k]] else None for k in DENOMINATORS}
    return {**rates, **counts, "described": len(described), "hallucinated": len(described) - len(found),
            "exact": float(" ".join(text.split()) == describe(objects))}


def score_answer(text: str, answer: str) -> float:
    """1.0 when the first sentence of `text` has the answer's words, else 0.0.

    score_answer("Red. and more", "red.") -> 1.0
    """
    first = lambda s: words(re.split(r"[.?!\n]", s.strip(), maxsplit=1)[0])
    return float(first(text) == first(answer))


def aggregate(scores: list[dict]) -> dict:
    """Pool `score_caption` results over clips: shares are over objects (each object weighs the
    same), `exact` and `hallucinated` are means per clip; counts are totals."""
    total = lambda key: sum(s[key] for s in scores)
    out = {"clips": len(scores)}
    for key, den in DENOMINATORS.items():
        n = total(den)
        out[key] = sum(s[key] * s[den] for s in scores if s[den]) / n if n else None
    for key in ("objects", "small_objects", "brief_objects", "described"):
        out[key] = total(key)
    out["exact"] = total("exact") / len(scores) if scores else None
    out["hallucinated"] = total("hallucinated") / len(scores) if scores else None
    return out


def object_token_mask(clip: Clip, grid=(8, 8), per_object: bool = False) -> torch.Tensor:
    """Video-token cells that show an object: a cell counts if any pixel of the object lies in
    it (a pooled token sees all its pixels, so one pixel can carry the object).

    object_token_mask(clip).shape -> [T, 8, 8];  per_object=True -> [T, N, 8, 8]
    """
    T, N, H, W = clip.masks.shape
    gh, gw = grid
    if H % gh or W % gw:
        raise ValueError(f"grid {grid} must divide the frame size {(H, W)}.")
    cells = clip.masks.reshape(T, N, gh, H // gh, gw, W // gw).any(dim=(3, 5))
    return cells if per_object else cells.any(dim=1)
