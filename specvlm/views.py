"""Views of video tokens on their frames, for the notebooks.

A prompt's `n` video tokens are a `(T, h, w)` grid in row-major order (token `t*h*w + i*w + j`
is cell `(i, j)` of frame, or temporal patch, `t`), possibly followed by extra tokens that sit
on no cell (LLaVA-OneVision's one newline token after the video). These helpers move between
the flat token order the models and `pruning.py` use and that grid:

    token_grid(scores, prompt)        # [n] per-token values -> [T, h, w]
    kept_grid(keep, prompt)           # kept indices -> bool [T, h, w]
    hit_rate(keep, objects, grid)     # share of the object-covering cells a selection keeps
    overlay_heat(ax, frame, heat)     # a [h, w] heat map stretched over a frame
    overlay_tokens(ax, frame, cells)  # outlines of the True cells of a [h, w] mask

A token cell covers `H/h x W/w` pixels of the frame as shown. LLaVA-OneVision's processor resizes
frames to a square without keeping the aspect ratio, so there a cell of a wide frame is wide;
Qwen2.5-VL's (`smart_resize`) keeps it up to rounding to whole 28-pixel cells, so its cells are nearly square.
Pure functions over tensors and matplotlib axes; nothing here runs a model.
"""

from __future__ import annotations

import torch
from matplotlib.patches import Rectangle


def _grid(grid) -> tuple[int, int, int]:
    """`(T, h, w)` from a tuple or from anything with a `.grid` (a `Prompt`)."""
    grid = tuple(getattr(grid, "grid", grid))
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be (T, h, w) with positive sizes, got {grid}.")
    return grid


def token_grid(values, grid) -> torch.Tensor:
    """Per-token values [n] -> [T, h, w]; values past the grid (the newline token) are dropped.

    token_grid(torch.arange(9), (2, 2, 2)) -> [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]   # 8 dropped
    """
    T, h, w = _grid(grid)
    values = torch.as_tensor(values)
    if values.ndim != 1 or len(values) < T * h * w:
        raise ValueError(f"need one value per video token, at least T*h*w = {T * h * w}, got shape {tuple(values.shape)}.")
    return values[: T * h * w].reshape(T, h, w)


def kept_grid(keep, grid) -> torch.Tensor:
    """Kept video-token indices -> bool [T, h, w], True where a cell's token is kept.
    An index past the grid but below the prompt's `num_video_tokens` (LLaVA-OneVision's newline;
    a bare `(T, h, w)` allows that one token, `T*h*w`) sits on no cell and is ignored; a larger
    one is no video token and raises.

    kept_grid(tensor([0, 3, 8]), (2, 2, 2))[0] -> [[True, False], [False, True]]
    """
    T, h, w = _grid(grid)
    keep = torch.as_tensor(keep, dtype=torch.long)
    if keep.ndim != 1 or (len(keep) and int(keep.min()) < 0):
        raise ValueError(f"keep must be a 1-D tensor of indices >= 0, got {keep!r}.")
    n = getattr(grid, "num_video_tokens", T * h * w + 1)
    if len(keep) and int(keep.max()) >= n:
        raise ValueError(f"kept index {int(keep.max())} is no video token: there are {n} video tokens "
                         f"({T}x{h}x{w} grid cells and {n - T * h * w} after them).")
    mask = torch.zeros(T * h * w, dtype=torch.bool)
    mask[keep[keep < T * h * w]] = True
    return mask.reshape(T, h, w)


def hit_rate(keep, objects: torch.Tensor, grid=None) -> float:
    """Share of the object-covering cells whose token is kept.  # objects: bool [T, h, w]

    hit_rate(tensor([0, 5]), tensor([[[True, True], [False, False]]] * 2)) -> 0.5  (cells 0, 1, 4, 5; kept 0, 5)
    """
    objects = torch.as_tensor(objects, dtype=torch.bool)
    if objects.ndim != 3:
        raise ValueError(f"objects must be a bool [T, h, w] mask, got shape {tuple(objects.shape)}.")
    if grid is not None and tuple(objects.shape) != _grid(grid):
        raise ValueError(f"objects has shape {tuple(objects.shape)} but the prompt's grid is {_grid(grid)}.")
    total = int(objects.sum())
    if total == 0:
        raise ValueError("objects marks no cell: the hit rate of an empty set is undefined.")
    return int((kept_grid(keep, objects.shape if grid is None else grid) & objects).sum()) / total


def _show(ax, frame):
    """Draw `frame` [H, W, 3] on `ax` (unless None); return the (H, W) the last image on the axes
    spans (its extent, so a heat map stretched over the frame measures as the frame)."""
    if frame is not None:
        ax.imshow(torch.as_tensor(frame).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
    if not ax.images:
        raise ValueError("no frame: pass one, or draw it on the axes first.")
    left, right, bottom, top = ax.images[-1].get_extent()
    return abs(bottom - top), right - left


def overlay_heat(ax, frame, heat, alpha: float = 0.6, cmap: str = "magma", vmax=None):
    """Show `frame` (or keep the one on `ax` when None) with `heat` [h, w] stretched over it,
    one colour block per token cell. Returns the heat image (for a colour bar)."""
    heat = torch.as_tensor(heat, dtype=torch.float32)
    if heat.ndim != 2:
        raise ValueError(f"heat must be [h, w], got shape {tuple(heat.shape)}.")
    H, W = _show(ax, frame)
    return ax.imshow(heat.numpy(), extent=(-0.5, W - 0.5, H - 0.5, -0.5), cmap=cmap, alpha=alpha,
                     interpolation="nearest", vmin=0, vmax=vmax)


def overlay_tokens(ax, frame, cells, colour: str = "red", linewidth: float = 1.5, label: str | None = None,
                   inset: float = 0.0) -> list[Rectangle]:
    """Outline the True cells of `cells` [h, w] over `frame` [H, W, 3] (None: the frame already
    on `ax`). `inset` (in cells) shrinks each outline so that two selections drawn on one
    frame stay apart. Returns the rectangles, in row-major cell order; `label` goes on the first.

    overlay_tokens(ax, frame_64x64, mask_8x8_with_cell_1_2) -> [Rectangle(xy=(15.5, 7.5), 8 x 8)]
    """
    cells = torch.as_tensor(cells, dtype=torch.bool)
    if cells.ndim != 2:
        raise ValueError(f"cells must be a bool [h, w] mask, got shape {tuple(cells.shape)}.")
    H, W = _show(ax, frame)
    h, w = cells.shape
    ch, cw = H / h, W / w
    boxes = []
    for i, j in cells.nonzero().tolist():
        box = Rectangle(((j + inset) * cw - 0.5, (i + inset) * ch - 0.5), (1 - 2 * inset) * cw, (1 - 2 * inset) * ch,
                        fill=False, edgecolor=colour, linewidth=linewidth, label=None if boxes else label)
        ax.add_patch(box)
        boxes.append(box)
    return boxes


def draw_token_grid(ax, frame, hw: tuple[int, int], colour: str = "white", linewidth: float = 0.8, **line_options):
    """Lines between the `hw` = (h, w) token cells over `frame` (None: the frame already on `ax`)."""
    H, W = _show(ax, frame)
    h, w = hw
    for i in range(1, h):
        ax.axhline(i * H / h - 0.5, color=colour, linewidth=linewidth, **line_options)
    for j in range(1, w):
        ax.axvline(j * W / w - 0.5, color=colour, linewidth=linewidth, **line_options)
