"""Loading pairs through from_pretrained, the adapter interface, and clear refusals."""

import re

import pytest
import torch

import specvlm as sv
from specvlm import builders


def test_round_trip_prefill_equals_the_models_own_forward(tiny_pair):
    lm = tiny_pair.target
    prompt = lm.prepare(sv.sample_video("bikes", 3), "what colour is the square?")
    assert prompt.grid == (3, 8, 8)
    assert prompt.num_video_tokens == 3 * 8 * 8 + 1  # one newline token after the grid
    assert prompt.video_index.tolist() == (prompt.input_ids[0] == lm.config.video_token_id).nonzero().flatten().tolist()
    ours = lm.forward(lm.embed(prompt), prompt.position_ids, lm.new_cache())
    with torch.no_grad():
        theirs = lm.model(**prompt.inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_video_token_id_comes_from_the_config(tiny_pair):
    lm = tiny_pair.target
    assert lm.video_token_id == lm.config.video_token_id == lm.processor.video_token_id


def test_step_after_prefill_equals_one_long_forward(tiny_pair):
    lm = tiny_pair.target
    prompt = lm.prepare(sv.sample_video("bigbuckbunny", 2))
    cache = lm.new_cache()
    lm.forward(lm.embed(prompt), prompt.position_ids, cache)
    new = [7, 8, 9]
    logits = lm.step(new, torch.arange(prompt.next_position, prompt.next_position + 3), cache)
    ids = torch.cat([prompt.input_ids, torch.tensor([new])], dim=1)
    with torch.no_grad():
        full = lm.model(input_ids=ids, pixel_values_videos=prompt.inputs["pixel_values_videos"]).logits[:, -3:]
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_cuda_without_cuda_is_a_clear_error(tiny_paths, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA"):
        sv.load_pair(str(tiny_paths[0]), str(tiny_paths[1]), device="cuda")


def test_missing_draft_is_a_clear_error(tiny_paths):
    with pytest.raises(ValueError, match="draft"):
        sv.load_pair(str(tiny_paths[0]))


@pytest.fixture
def nothing_loads(monkeypatch):
    monkeypatch.setattr(sv.models, "load_lm", lambda *a, **k: pytest.fail("a checkpoint was loaded"))


@pytest.mark.parametrize("name", ["{tmp}/nowhere", "./nowhere-specvlm", "../nowhere-specvlm", "~/nowhere-specvlm",
                                  "nowhere/specvlm/model"])
def test_missing_checkpoint_folder_is_named_before_loading(tmp_path, nothing_loads, name):
    name = name.format(tmp=tmp_path)
    draft = str(sv.models.embedded_paths()[1])
    with pytest.raises(FileNotFoundError, match=f"checkpoint folder {re.escape(name)} does not exist"):
        sv.load_pair(name, draft)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sv.load_pair(draft, name)  # the draft is checked before the target loads
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sv.load_lm(tmp_path / "nowhere")


def test_a_file_is_not_a_checkpoint_folder(tmp_path, nothing_loads):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="model.bin is a file, not a checkpoint folder"):
        sv.load_pair(str(tmp_path / "model.bin"), str(tmp_path))


def test_hub_ids_are_left_to_transformers():
    assert sv.models.checked_checkpoint("llava-hf/llava-onevision-qwen2-0.5b-ov-hf") == \
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"


@pytest.mark.parametrize("target,draft", [("tiny", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"), ("x/y", "tiny")])
def test_tiny_is_the_whole_embedded_pair(nothing_loads, target, draft):
    with pytest.raises(ValueError, match="'tiny' is the embedded pair as a whole .* no draft"):
        sv.load_pair(target, draft)


def test_unsupported_model_type_is_refused(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        sv.load_lm(str(tmp_path), device="cpu")


def test_different_tokenizers_are_refused(tmp_path, tiny_pair):
    other = builders.make_tokenizer(builders.DEFAULT_CORPUS + " zebra giraffe elephant " * 3, vocab_size=420)
    folder = builders.save_checkpoint(
        tmp_path / "other", builders.llava_onevision_config(other, builders.DRAFT_SIZES),
        builders.llava_onevision_processor(other), seed=3,
    )
    with pytest.raises(ValueError, match="different tokenizers"):
        sv.Pair(tiny_pair.target, sv.load_lm(str(folder), device="cpu"))


def test_different_video_grids_are_refused(tmp_path, tiny_pair):
    tokenizer = tiny_pair.target.tokenizer
    vision = {**builders.VISION_SIZES, "patch_size": 8}  # 8x8 patches -> 4x4 pooled grid
    folder = builders.save_checkpoint(
        tmp_path / "coarse", builders.llava_onevision_config(tokenizer, builders.DRAFT_SIZES, vision),
        builders.llava_onevision_processor(tokenizer, vision), seed=4,
    )
    with pytest.raises(ValueError, match="video-token grid"):
        sv.Pair(tiny_pair.target, sv.load_lm(str(folder), device="cpu"))


@pytest.mark.parametrize("device_map", ["cuda:0", {"": 0}, {"model.language_model": "cuda:1", "lm_head": "cpu"}])
def test_a_device_map_naming_gpus_without_cuda_is_refused_before_loading(tiny_paths, monkeypatch, device_map):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sv.models, "load_lm", lambda *args, **kwargs: pytest.fail("loaded a model"))
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        sv.models.load_pair(str(tiny_paths[0]), str(tiny_paths[1]), device="cpu", target_device_map=device_map)
