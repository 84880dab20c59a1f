"""Build tiny video-LLM checkpoints of the real transformers classes, offline.

`make_tiny_pair(folder, family=...)` writes `folder/target` and `folder/draft`: two randomly
initialised models of one family and different sizes that share one tokenizer (a byte-level
BPE trained here on a small corpus, with the family's chat template and video special
tokens) and one processor. Loading them back goes through `from_pretrained`, exactly as a
real checkpoint does. Families:

- "llava_onevision": SigLIP vision tower, 2x2-pooled patches, Qwen2 language model;
- "qwen2_5_vl": Qwen2.5-VL's windowed vision tower (4-pixel patches, 2 frames per temporal
  patch, 2x2 merge: a 64x64 frame pair gives an 8x8 token grid) and its language model with
  3-D rotary positions.

Not handled: images, the real checkpoints' vocabularies.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]


def chat_template(video: str) -> str:
    """A ChatML template that writes `video` where a message holds a video."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] if c['type'] == 'video' %}" + video + "{% endfor %}"
        "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


CHAT_TEMPLATE = chat_template("<video>\n")
QWEN_CHAT_TEMPLATE = chat_template("<|vision_start|><|video_pad|><|vision_end|>")

# per family: special tokens, the image and video placeholder tokens, chat template
FAMILY_TOKENS = {
    "llava_onevision": (SPECIAL_TOKENS, "<image>", "<video>", CHAT_TEMPLATE),
    "qwen2_5_vl": (QWEN_SPECIAL_TOKENS, "<|image_pad|>", "<|video_pad|>", QWEN_CHAT_TEMPLATE),
}

DEFAULT_CORPUS = (
    "user assistant system describe the video what happens in this clip a red green blue square circle "
    "moves left right up down stays still appears disappears briefly near the top bottom middle corner "
    "how many objects are there one two three what colour is the shape it is a small big triangle. "
)

TARGET_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
DRAFT_SIZES = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
VISION_SIZES = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=4)
# Qwen2.5-VL: one windowed and one full-attention block; 32-pixel windows hold 4x4 merged tokens
# (as the real 112-pixel windows of 14-pixel patches do); tokens_per_second as in the real configs
QWEN_VISION_SIZES = dict(hidden_size=32, depth=2, num_heads=2, intermediate_size=64, patch_size=4,
                         temporal_patch_size=2, spatial_merge_size=2, window_size=32, fullatt_block_indexes=[1],
                         tokens_per_second=2)
QWEN_FRAME_PIXELS = (16 * 16, 64 * 64)  # (min, max) pixels per frame after resizing


def make_tokenizer(corpus: str = DEFAULT_CORPUS, vocab_size: int = 400, family: str = "llava_onevision"):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `corpus`: any text encodes.
    `family` picks the special tokens and chat template (see `FAMILY_TOKENS`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special, image, video, template = FAMILY_TOKENS[family]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([corpus, template], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": image, "video_token": video},
        chat_template=template,
    )


def text_token_ids(tokenizer) -> dict:
    """The language model's vocabulary size and bos/eos/pad ids, all inside the tiny vocabulary."""
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def llava_onevision_config(tokenizer, text_sizes: dict, vision_sizes: dict = VISION_SIZES, max_positions: int = 8192):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    text = Qwen2Config(
        max_position_embeddings=max_positions, tie_word_embeddings=False, **text_token_ids(tokenizer), **text_sizes
    )
    vision = SiglipVisionConfig(vision_use_head=False, **vision_sizes)
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def llava_onevision_processor(tokenizer, vision_sizes: dict = VISION_SIZES):
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    side = vision_sizes["image_size"]
    size = {"height": side, "width": side}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[[side, side]]),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(side // vision_sizes["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )


def qwen2_5_vl_config(tokenizer, text_sizes: dict, vision_sizes: dict = QWEN_VISION_SIZES, max_positions: int = 8192):
    """A tiny Qwen2.5-VL config; the 3-D rotary sections split the head's frequencies about
    1:1.5:1.5 over (time, height, width), as the real [16, 24, 24] does for head_dim 128."""
    from transformers import Qwen2_5_VLConfig

    head_dim = text_sizes["hidden_size"] // text_sizes["num_attention_heads"]
    spatial = head_dim // 2 * 3 // 8
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [head_dim // 2 - 2 * spatial, spatial, spatial]}
    text = dict(max_position_embeddings=max_positions, rope_parameters=rope, **text_token_ids(tokenizer), **text_sizes)
    vision = dict(out_hidden_size=text_sizes["hidden_size"], **vision_sizes)
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
           for name in ("image_pad", "video_pad", "vision_start", "vision_end")}
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=False,
    )


def qwen2_5_vl_processor(tokenizer, vision_sizes: dict = QWEN_VISION_SIZES, pixels: tuple = QWEN_FRAME_PIXELS):
    """Image and video processors that resize frames to `pixels` = (min, max) pixels, so a
    small frame is not upscaled to the real checkpoints' 3136..1M pixels."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    patches = dict(
        patch_size=vision_sizes["patch_size"],
        temporal_patch_size=vision_sizes["temporal_patch_size"],
        merge_size=vision_sizes["spatial_merge_size"],
        min_pixels=pixels[0],
        max_pixels=pixels[1],
    )
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**patches),
        video_processor=Qwen2VLVideoProcessor(cap_pixels_per_frame=False, **patches),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


# per family: config(tokenizer, text sizes), processor(tokenizer)
FAMILIES = {
    "llava_onevision": (llava_onevision_config, llava_onevision_processor),
    "qwen2_5_vl": (qwen2_5_vl_config, qwen2_5_vl_processor),
}


def save_checkpoint(folder, config, processor, seed: int, init_std: float = 0.2) -> Path:
    """Randomly initialise a model from `config` (weights ~ N(0, init_std), so that random
    models have confident, tie-free logits) and save it with `processor`."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    torch.manual_seed(seed)
    config.text_config.initializer_range = init_std
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id, pad_token_id=config.text_config.pad_token_id
    )
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_pair(folder, seed: int = 0, family: str = "llava_onevision", corpus: str = DEFAULT_CORPUS,
                   target_sizes: dict | None = None, draft_sizes: dict | None = None) -> tuple[Path, Path]:
    """Write a tiny random target/draft pair to `folder/target` and `folder/draft`.

    make_tiny_pair(tmp_path) -> (tmp_path/"target", tmp_path/"draft"); both load with
    `specvlm.load_pair(str(target), str(draft))`. Sizes override `TARGET_SIZES`/`DRAFT_SIZES`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}.")
    make_config, make_processor = FAMILIES[family]
    tokenizer = make_tokenizer(corpus, family=family)
    processor = make_processor(tokenizer)
    folder = Path(folder)
    paths = []
    for offset, (role, sizes) in enumerate(
        [("target", {**TARGET_SIZES, **(target_sizes or {})}), ("draft", {**DRAFT_SIZES, **(draft_sizes or {})})]
    ):
        paths.append(save_checkpoint(folder / role, make_config(tokenizer, sizes), processor, seed + offset))
    return tuple(paths)
