"""Views of video tokens: flat token order <-> (T, h, w) grid, hit rates, overlays."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from specvlm import views


class FakePrompt:
    grid = (2, 3, 4)


@pytest.mark.parametrize("grid", [(2, 3, 4), FakePrompt()])
def test_token_grid_is_row_major_and_drops_the_newline(grid):
    values = torch.arange(2 * 3 * 4 + 1)  # the last one: a newline token on no cell
    out = views.token_grid(values, grid)
    assert out.shape == (2, 3, 4)
    for t, i, j in [(0, 0, 0), (0, 2, 1), (1, 0, 3), (1, 2, 3)]:
        assert out[t, i, j] == t * 12 + i * 4 + j


def test_token_grid_needs_one_value_per_cell():
    with pytest.raises(ValueError, match="one value per video token"):
        views.token_grid(torch.zeros(23), (2, 3, 4))
    with pytest.raises(ValueError, match="grid must be"):
        views.token_grid(torch.zeros(4), (2, 2))


def test_kept_grid_marks_kept_cells_and_ignores_the_newline():
    mask = views.kept_grid(torch.tensor([0, 5, 11, 12]), (1, 3, 4))  # 12: the newline
    assert mask.sum() == 3
    assert mask[0, 0, 0] and mask[0, 1, 1] and mask[0, 2, 3]
    with pytest.raises(ValueError, match="indices >= 0"):
        views.kept_grid(torch.tensor([-1]), (1, 3, 4))


class FakeQwenPrompt:
    grid = (1, 3, 4)
    num_video_tokens = 12  # no newline after the grid


def test_kept_grid_rejects_indices_past_the_video_tokens():
    with pytest.raises(ValueError, match="kept index 13 .* 13 video tokens"):  # 12 is the newline, 13 nothing
        views.kept_grid(torch.tensor([0, 13]), (1, 3, 4))
    with pytest.raises(ValueError, match="kept index 12 .* 12 video tokens"):  # a prompt without a newline
        views.kept_grid(torch.tensor([12]), FakeQwenPrompt())
    assert views.kept_grid(torch.tensor([11]), FakeQwenPrompt()).sum() == 1


def test_hit_rate_hand_case():
    objects = torch.zeros(2, 2, 2, dtype=torch.bool)
    objects[0, 0, :] = True  # tokens 0, 1
    objects[1, 1, 1] = True  # token 7
    assert views.hit_rate(torch.tensor([0, 7, 8]), objects) == pytest.approx(2 / 3)
    assert views.hit_rate(torch.tensor([2, 3, 4]), objects) == 0.0
    assert views.hit_rate(torch.arange(9), objects) == 1.0


def test_hit_rate_rejects_empty_and_mismatched_masks():
    with pytest.raises(ValueError, match="marks no cell"):
        views.hit_rate(torch.tensor([0]), torch.zeros(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="grid is"):
        views.hit_rate(torch.tensor([0]), torch.ones(1, 2, 2, dtype=torch.bool), grid=(1, 4, 1))


def test_random_selection_hits_at_the_kept_share_on_average():
    generator = torch.Generator().manual_seed(0)
    objects = torch.rand(4, 8, 8, generator=generator) < 0.2
    rates = [views.hit_rate(torch.randperm(256, generator=generator)[:64], objects) for _ in range(400)]
    assert np.mean(rates) == pytest.approx(0.25, abs=0.01)


def test_overlay_tokens_outlines_cells_in_pixel_coordinates():
    fig, ax = plt.subplots()
    cells = torch.zeros(8, 8, dtype=torch.bool)
    cells[1, 2] = cells[7, 0] = True
    boxes = views.overlay_tokens(ax, np.zeros((64, 128, 3), np.uint8), cells, colour="red", label="kept")
    assert [b.get_xy() for b in boxes] == [(2 * 16 - 0.5, 1 * 8 - 0.5), (-0.5, 7 * 8 - 0.5)]
    assert (boxes[0].get_width(), boxes[0].get_height()) == (16, 8)
    assert boxes[0].get_label() == "kept" and not boxes[1].get_label()  # one legend entry
    inset = views.overlay_tokens(ax, None, cells, inset=0.25)  # drawn on the frame already there
    assert inset[0].get_width() == 8 and len(ax.patches) == 4
    plt.close(fig)


def test_overlays_need_a_frame_and_2d_masks():
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="no frame"):
        views.overlay_tokens(ax, None, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[h, w\]"):
        views.overlay_heat(ax, np.zeros((8, 8, 3), np.uint8), torch.ones(1, 2, 2))
    ax.imshow(np.zeros((8, 8, 3), np.uint8))
    image = views.overlay_heat(ax, None, torch.rand(2, 2))
    assert image.get_extent() == [-0.5, 7.5, 7.5, -0.5]
    views.draw_token_grid(ax, None, (2, 4))
    assert len(ax.lines) == 1 + 3
    plt.close(fig)


def test_overlays_measure_the_frame_being_drawn_not_an_older_image():
    fig, ax = plt.subplots()
    ax.imshow(np.zeros((8, 8, 3), np.uint8))  # an old, smaller image on the axes
    (box,) = views.overlay_tokens(ax, np.zeros((64, 128, 3), np.uint8), torch.tensor([[True]]))
    assert (box.get_width(), box.get_height()) == (128, 64)
    views.overlay_heat(ax, None, torch.rand(2, 2))  # a [2, 2] heat map stretched over the 64 x 128 frame
    (box,) = views.overlay_tokens(ax, None, torch.tensor([[True]]))
    assert (box.get_width(), box.get_height()) == (128, 64)
    plt.close(fig)
