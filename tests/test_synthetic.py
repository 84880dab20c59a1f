from collections import Counter
from dataclasses import replace as with_

import numpy as np
import pytest
import torch

from specvlm import synthetic as syn

SEEDS = range(300)


@pytest.fixture(scope="module")
def clips():
    return [syn.make_clip(seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def objects(clips):
    return [o for clip in clips for o in clip.objects]


# --- the clip ------------------------------------------------------------------------------

def test_same_seed_same_clip_other_seed_other_clip():
    a, b, c = syn.make_clip(5), syn.make_clip(5), syn.make_clip(6)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.masks, b.masks)
    assert a.caption == b.caption and a.objects == b.objects
    assert not torch.equal(a.frames, c.frames)


def test_global_rng_untouched():
    torch.manual_seed(0)
    np.random.seed(0)
    expected = torch.rand(1), np.random.rand()
    torch.manual_seed(0)
    np.random.seed(0)
    syn.make_clip(1)
    assert (torch.rand(1), np.random.rand()) == expected


@pytest.mark.parametrize("frames,size", [(1, 64), (2, 64), (4, 64), (16, 64), (64, 64), (8, 96)])
def test_shapes_and_dtypes(frames, size):
    clip = syn.make_clip(3, num_frames=frames, size=size)
    n = len(clip.objects)
    assert 1 <= n <= 3
    assert clip.frames.shape == (frames, size, size, 3) and clip.frames.dtype == torch.uint8
    assert clip.masks.shape == (frames, n, size, size) and clip.masks.dtype == torch.bool
    for obj in clip.objects:
        assert len(obj.trajectory) == len(obj.visible) >= 1
        assert 0 <= obj.visible.start and obj.visible.stop <= frames


def test_masks_match_frames_and_visibility(clips):
    for clip in clips[:60]:
        frames, masks = clip.frames.numpy(), clip.masks.numpy()  # numpy: quick on a busy CPU
        assert not (masks.sum(1) > 1).any(), "objects never overlap"
        for i, obj in enumerate(clip.objects):
            shown = masks[:, i].reshape(len(frames), -1).any(1)
            assert shown.nonzero()[0].tolist() == list(obj.visible)
            assert (frames[masks[:, i]] == obj.rgb).all()
        background = frames[~masks.any(1)]
        assert background.max() <= 75 and background.std() > 1  # dark, but not flat


def test_motion_follows_the_label(clips):
    for obj in (o for clip in clips for o in clip.objects):
        (x0, y0), (x1, y1) = obj.trajectory[0], obj.trajectory[-1]
        dx, dy = syn.DIRECTIONS.get(obj.motion, (0, 0))
        if obj.motion == "still":
            assert (x0, y0) == (x1, y1) and obj.position in syn.POSITIONS
        else:
            assert (x1 - x0) * dx + (y1 - y0) * dy >= 16 and obj.position is None  # two token cells at least


def test_timing_follows_the_label():
    for seed in range(100):
        frames = 16
        for obj in syn.make_clip(seed, num_frames=frames).objects:
            v = obj.visible
            expected = {
                "throughout": v == range(frames),
                "appears": v.start >= 4 and v.stop == frames and len(v) >= 3,
                "disappears": v.start == 0 and v.stop <= 12 and len(v) >= 3,
                "brief": len(v) <= 2 and v.start >= 1 and v.stop < frames,
            }
            assert expected[obj.timing], (seed, obj)


def test_distribution_over_seeds(clips, objects):
    counts = Counter(len(c.objects) for c in clips)
    assert set(counts) == {1, 2, 3}
    assert {o.shape for o in objects} == set(syn.SHAPES)
    assert {o.colour for o in objects} == set(syn.COLOURS)
    assert {o.motion for o in objects} == set(syn.MOTIONS)
    assert {o.timing for o in objects} == set(syn.TIMINGS)
    assert {o.position for o in objects} - {None} == set(syn.POSITIONS)
    small = np.mean([o.size == "small" for o in objects])
    brief = np.mean([o.timing == "brief" for o in objects])
    assert 0.25 < small < 0.45 and 0.1 < brief < 0.3
    assert np.mean([o.size == "small" for o in objects if o.timing == "brief"]) > 0.6  # brief ones are mostly small
    hard = np.mean([any(o.size == "small" or o.timing == "brief" for o in c.objects) for c in clips])
    assert hard > 1 / 3
    for clip in clips:
        assert len({o.shape for o in clip.objects}) == len({o.colour for o in clip.objects}) == len(clip.objects)


def test_object_counts_configurable():
    clips = [syn.make_clip(s, counts=(1,), count_weights=(1,)) for s in range(20)]
    assert all(len(c.objects) == 1 for c in clips)


# --- captions ------------------------------------------------------------------------------

def test_sentence_grammar():
    obj = syn.ObjectSpec("circle", "red", "big", "left", "throughout", None, range(16), ((30.0, 30.0),) * 16, 14)
    replace = lambda **changes: with_(obj, **changes)
    assert syn.describe([obj]) == "a big red circle moves left."
    assert syn.sentence(replace(timing="appears", visible=range(5, 16))) == "a big red circle appears later and moves left."
    assert syn.sentence(replace(timing="disappears")) == "a big red circle moves left and then disappears."
    still = replace(motion="still", position="top left")
    assert syn.sentence(still) == "a big red circle stays in the top left corner."
    assert syn.sentence(replace(motion="still", position="centre", timing="appears")) == "a big red circle appears later in the centre."
    assert syn.sentence(replace(motion="still", position="top", size="small", timing="brief")) == (
        "a small red circle appears briefly at the top.")


def test_canonical_order_first_appearance_then_left_to_right():
    base = dict(size="big", motion="still", timing="throughout", position="centre", pixels=12)
    late = syn.ObjectSpec("square", "red", visible=range(4, 8), trajectory=((5.0, 5.0),) * 4, **base)
    right = syn.ObjectSpec("circle", "blue", visible=range(8), trajectory=((50.0, 5.0),) * 8, **base)
    left = syn.ObjectSpec("ring", "green", visible=range(8), trajectory=((20.0, 40.0),) * 8, **base)
    assert [o.shape for o in syn.canonical([late, right, left])] == ["ring", "circle", "square"]


def test_caption_round_trip_is_perfect(clips):
    for clip in clips:
        score = syn.score_caption(clip.caption, clip.objects)
        assert score["exact"] == 1.0 and score["hallucinated"] == 0
        for key in syn.DENOMINATORS:
            assert score[key] in (1.0, None), (clip.seed, key, clip.caption)
    total = syn.aggregate([syn.score_caption(c.caption, c.objects) for c in clips])
    assert all(total[key] == 1.0 for key in syn.DENOMINATORS)


def first_clip(clips, predicate):
    return next(c for c in clips if predicate(c))


def test_wrong_colour_is_found_but_scored_wrong(clips):
    clip = first_clip(clips, lambda c: len(c.objects) == 2)
    first = clip.objects[0]
    other = next(c for c in syn.COLOURS if c not in {o.colour for o in clip.objects})
    score = syn.score_caption(clip.caption.replace(first.colour, other, 1), clip.objects)
    assert score["recall"] == 1.0 and score["colour"] == 0.5 and score["shape"] == 1.0 and score["exact"] == 0.0


def test_wrong_shape_matches_by_colour(clips):
    clip = first_clip(clips, lambda c: len(c.objects) == 1)
    obj = clip.objects[0]
    other = next(s for s in syn.SHAPES if s != obj.shape)
    score = syn.score_caption(clip.caption.replace(obj.shape, other), clip.objects)
    assert score["recall"] == 1.0 and score["shape"] == 0.0 and score["colour"] == 1.0


def test_missing_and_hallucinated_objects(clips):
    clip = first_clip(clips, lambda c: len(c.objects) == 3 and any(o.size == "small" for o in c.objects))
    empty = syn.score_caption("", clip.objects)
    assert empty["recall"] == 0.0 and empty["colour"] is None and empty["recall_small"] == 0.0
    assert empty["hallucinated"] == 0 and empty["exact"] == 0.0
    first_sentence = syn.sentence(syn.canonical(clip.objects)[0])
    partial = syn.score_caption(first_sentence, clip.objects)
    assert partial["recall"] == pytest.approx(1 / 3) and partial["colour"] == 1.0
    unused = [(s, c) for s in syn.SHAPES for c in syn.COLOURS
              if s not in {o.shape for o in clip.objects} and c not in {o.colour for o in clip.objects}][0]
    extra = syn.score_caption(clip.caption + f" a big {unused[1]} {unused[0]} moves up.", clip.objects)
    assert extra["hallucinated"] == 1 and extra["recall"] == 1.0 and extra["exact"] == 0.0


def test_small_and_brief_recall():
    brief = syn.ObjectSpec("ring", "white", "small", "still", "brief", "top", range(3, 4), ((30.0, 8.0),), 6)
    big = syn.ObjectSpec("cross", "red", "big", "up", "throughout", None, range(8), ((30.0, 50.0),) * 8, 14)
    score = syn.score_caption("a big red cross moves up.", [big, brief])
    assert score["recall"] == 0.5 and score["recall_small"] == 0.0 and score["recall_brief"] == 0.0
    score = syn.score_caption(syn.describe([big, brief]), [big, brief])
    assert score["recall_small"] == score["recall_brief"] == score["position"] == 1.0


def test_parser():
    assert syn.parse_caption("A big red circle moves left. a small blue square appears briefly in the top right corner.") == [
        dict(shape="circle", colour="red", size="big", motion="left", position=None, timing="throughout"),
        dict(shape="square", colour="blue", size="small", motion="still", position="top right", timing="brief"),
    ]
    # no periods, partial phrases, junk around
    parsed = syn.parse_caption("zzz a red ring stays on the left a cross appears later and moves down ?? .. red big")
    assert [(d["shape"], d["colour"], d["size"], d["motion"], d["position"], d["timing"]) for d in parsed] == [
        ("ring", "red", None, "still", "left", "throughout"), ("cross", None, None, "down", None, "appears")]


@pytest.mark.parametrize("junk", ["", ".....", "the the the", "a big red", "????", "moves left and then disappears.",
                                  "a a a a big big red red", "\n\n", "squares123 §§ circlee", "é ü ☃"])
def test_parser_ignores_junk(junk, clips):
    assert syn.parse_caption(junk) == []
    score = syn.score_caption(junk, clips[0].objects)
    assert score["recall"] == 0.0 and score["hallucinated"] == 0


def test_aggregate_pools_over_objects():
    one = syn.ObjectSpec("ring", "white", "small", "still", "throughout", "top", range(2), ((30.0, 8.0),) * 2, 6)
    two = syn.ObjectSpec("cross", "red", "big", "up", "throughout", None, range(2), ((30.0, 50.0),) * 2, 14)
    scores = [syn.score_caption("a small white ring stays at the top.", [one]),  # 1 of 1 found
              syn.score_caption("", [one, two])]  # 0 of 2 found
    total = syn.aggregate(scores)
    assert total["recall"] == pytest.approx(1 / 3) and total["objects"] == 3 and total["clips"] == 2
    assert total["colour"] == 1.0 and total["exact"] == 0.5 and total["recall_brief"] is None


# --- questions and vocabulary --------------------------------------------------------------

def test_questions_answers_and_vocabulary(clips):
    vocab = set(syn.vocabulary())
    assert len(vocab) == len(syn.vocabulary()) < 100
    rng = np.random.default_rng(0)
    kinds = Counter()
    for clip in clips[:100]:
        assert set(syn.words(clip.caption)) <= vocab, clip.caption
        for kind in syn.QUESTION_KINDS:
            if kind == "position" and all(o.motion != "still" for o in clip.objects):
                continue
            question, answer = syn.make_question(clip, rng, kind)
            assert set(syn.words(question + " " + answer)) <= vocab, (question, answer)
            assert question.endswith("?") and answer.endswith(".")
            assert syn.score_answer(answer, answer) == 1.0
            kinds[kind, answer] += 1
        question, answer = syn.make_question(clip, rng)  # random kind
        assert set(syn.words(question + answer)) <= vocab
    assert kinds["presence", "yes."] > 20 and kinds["presence", "no."] > 20


def test_question_answers_are_true(clips):
    clip = first_clip(clips, lambda c: len(c.objects) == 2)
    rng = np.random.default_rng(1)
    assert syn.make_question(clip, rng, "count") == ("how many objects are there?", "two.")
    question, answer = syn.make_question(clip, rng, "colour")
    obj = next(o for o in clip.objects if o.shape in question)
    assert answer == f"{obj.colour}."
    question, answer = syn.make_question(clip, rng, "size")
    assert answer == f"{next(o for o in clip.objects if o.shape in question).size}."
    for _ in range(10):
        question, answer = syn.make_question(clip, rng, "presence")
        present = any(f"a {o.colour} {o.shape}?" in question for o in clip.objects)
        assert answer == ("yes." if present else "no.")


def test_score_answer():
    assert syn.score_answer("red.", "red.") == 1.0
    assert syn.score_answer("  Red . more words", "red.") == 1.0
    assert syn.score_answer("blue.", "red.") == 0.0
    assert syn.score_answer("red blue.", "red.") == 0.0
    assert syn.score_answer("", "red.") == 0.0


# --- video-token cells ---------------------------------------------------------------------

def test_object_token_mask_covers_the_masks(clips):
    for clip in clips[:50]:
        cells = syn.object_token_mask(clip)
        per_object = syn.object_token_mask(clip, per_object=True)
        T, N, H, W = clip.masks.shape
        assert cells.shape == (T, 8, 8) and cells.dtype == torch.bool
        assert per_object.shape == (T, N, 8, 8) and torch.equal(per_object.any(1), cells)
        t, y, x = clip.masks.numpy().any(1).nonzero()  # every object pixel ...
        hit = {(a, b, c) for a, b, c in zip(t.tolist(), (y // (H // 8)).tolist(), (x // (W // 8)).tolist())}
        assert {tuple(c) for c in cells.nonzero().tolist()} == hit  # ... marks its cell, and only those


def test_small_objects_cover_few_cells(clips):
    for clip in clips[:100]:
        per_object = syn.object_token_mask(clip, per_object=True)
        for i, obj in enumerate(clip.objects):
            cells = per_object[obj.visible.start, i].sum().item()
            assert 1 <= cells <= (4 if obj.size == "small" else 9)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        syn.make_clip(0, num_frames=0)
    with pytest.raises(ValueError):
        syn.make_clip(0, counts=(7,), count_weights=(1,))
    with pytest.raises(ValueError):
        syn.object_token_mask(syn.make_clip(0), grid=(7, 7))
    moving = next(c for c in (syn.make_clip(s) for s in range(100)) if all(o.motion != "still" for o in c.objects))
    with pytest.raises(ValueError, match="position"):
        syn.make_question(moving, 0, "position")
