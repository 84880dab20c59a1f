"""The embedded pair's tools: the card matches its measured files, training draws the asked frame counts."""

import json
from pathlib import Path

import pytest
import torch

from specvlm.tiny import card, evaluate, train

TINY = Path(card.__file__).parent


def test_committed_card_is_rendered_from_the_committed_measurements():
    assert (TINY / "README.md").read_text() == card.render(TINY)


def test_card_shows_the_long_clip_measurements_only_when_they_exist(tmp_path):
    for name in ("metrics.json", "train_log.jsonl"):
        (tmp_path / name).write_text((TINY / name).read_text())
    for role in ("target", "draft"):
        (tmp_path / role).mkdir()
        (tmp_path / role / "config.json").write_text((TINY / role / "config.json").read_text())
    assert "## Long clips" not in card.render(tmp_path)
    long = json.loads((TINY / "metrics_long.json").read_text())
    (tmp_path / "metrics_long.json").write_text(json.dumps(long))
    text = card.render(tmp_path)
    assert f"## Long clips: {long['clips']} held-out clips of {long['frames']} frames" in text
    assert f"Unpruned speculative decoding: {long['mean_accepted']['sd@0.0']:.2f}." in text


def test_training_batches_use_the_asked_frame_counts():
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(TINY / "target")
    batches = train.Batches(processor, tokens_per_batch=400, seed=0, workers=1, frames=(2, 3), frame_weights=(1, 0))
    batch = next(batches)
    assert batch["frames"].shape[1] == 2
    assert len(batch["slots"]) == 2 * batches.per_frame + 1
    with pytest.raises(ValueError, match="must pair up"):
        train.Batches(processor, 400, 0, 1, frames=(2, 3), frame_weights=(1,))


def test_evaluate_rejects_an_unknown_selection_method():
    with pytest.raises(ValueError, match="unknown selection method"):
        evaluate.evaluate(TINY, clips=1, frames=2, k=2, max_new_tokens=2, methods=("specvlm", "nearest"))


def test_evaluate_command_line_refuses_a_device_it_cannot_use(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--clips", "1", "--out", "unused.json", "--device", "mps"])
    assert "use cpu (with --workers processes) or cuda" in capsys.readouterr().err


def test_training_plans_the_steps_that_fit_its_minutes():
    assert train.planned_steps(1000, budget_s=100, before_warm_s=10, per_step_s=0.5, done=40) == 180
    assert train.planned_steps(150, budget_s=100, before_warm_s=10, per_step_s=0.5, done=40) == 150  # the cap
    assert train.planned_steps(1000, budget_s=100, before_warm_s=10, per_step_s=5.0, done=40) == 41  # never less


def test_distilled_loss_mixes_the_caption_and_the_targets_distribution():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 11), torch.randn(6, 11)
    answers = torch.randint(0, 11, (6,))
    ce = torch.nn.functional.cross_entropy(student, answers)
    assert torch.allclose(train.distilled_loss(student, teacher, answers, 0.0), ce)
    assert train.distilled_loss(teacher, teacher, answers, 1.0).abs() < 1e-6  # no divergence from itself
    kl = train.distilled_loss(student, teacher, answers, 1.0)
    assert kl > 0.1
    assert torch.allclose(train.distilled_loss(student, teacher, answers, 0.25), 0.75 * ce + 0.25 * kl)


def test_training_refuses_a_distillation_weight_outside_0_1(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--distill", "1.5"])
    assert "--distill must lie in [0, 1]" in capsys.readouterr().err


def test_training_cuts_a_draft_only_from_a_trained_target(tmp_path, capsys):
    for argv in (["--draft-from-target"], ["--draft-from-target", "--init", "specvlm/tiny", "--target-steps", "10"]):
        with pytest.raises(SystemExit):
            train.main(["--out", str(tmp_path), *argv])
        assert "--draft-from-target cuts the draft from a trained target" in capsys.readouterr().err
