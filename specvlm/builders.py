"""Build tiny video-LLM checkpoints of the real transformers classes, offline.

`make_tiny_pair(folder)` writes `folder/target` and `folder/draft`: two randomly initialised
LLaVA-OneVision models (SigLIP vision tower, Qwen2 language model) of different sizes that
share one tokenizer (a byte-level BPE trained here on a small corpus, with the chat template
and the `<video>` special token) and one processor. Loading them back goes through
`from_pretrained`, exactly as a real checkpoint does. The Qwen2.5-VL family has its own
builder beside this one. Not handled: images, the real checkpoints' vocabularies.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] if c['type'] == 'video' %}<video>\n{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_CORPUS = (
    "user assistant system describe the video what happens in this clip a red green blue square circle "
    "moves left right up down stays still appears disappears briefly near the top bottom middle corner "
    "how many objects are there one two three what colour is the shape it is a small big triangle. "
)

TARGET_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
DRAFT_SIZES = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
VISION_SIZES = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=4)


def make_tokenizer(corpus: str = DEFAULT_CORPUS, vocab_size: int = 400):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `corpus`: any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([corpus, CHAT_TEMPLATE], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_template=CHAT_TEMPLATE,
    )


def llava_onevision_config(tokenizer, text_sizes: dict, vision_sizes: dict = VISION_SIZES, max_positions: int = 8192):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    text = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **text_sizes,
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
    if family == "qwen2_5_vl":
        from .builders_qwen import make_tiny_qwen_pair

        return make_tiny_qwen_pair(folder, seed, corpus, target_sizes, draft_sizes)
    if family != "llava_onevision":
        raise ValueError(f"unknown family {family!r}; choose 'llava_onevision' or 'qwen2_5_vl'.")
    tokenizer = make_tokenizer(corpus)
    processor = llava_onevision_processor(tokenizer)
    folder = Path(folder)
    paths = []
    for offset, (role, sizes) in enumerate(
        [("target", {**TARGET_SIZES, **(target_sizes or {})}), ("draft", {**DRAFT_SIZES, **(draft_sizes or {})})]
    ):
        paths.append(save_checkpoint(folder / role, llava_onevision_config(tokenizer, sizes), processor, seed + offset))
    return tuple(paths)
