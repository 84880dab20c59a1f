"""Load a target/draft pair of video LLMs behind one small interface.

Everything above this module speaks to a model through `VideoLM`, an adapter around a
transformers model and its processor:

    prompt = lm.prepare(video, "Describe the video.")   # token ids, positions, video slots
    embeds = lm.embed(prompt)                           # [1, L, D], video features scattered in
    logits = lm.forward(embeds, positions, cache)       # the language model on any rows
    logits = lm.step(token_ids, positions, cache)       # decode / verify new tokens

A pruned prefill is `lm.forward(embeds[:, rows], prompt.position_ids[..., rows], cache)`:
kept video tokens keep their original positions (1-D for LLaVA-OneVision, 3-D rotary for
Qwen2.5-VL), and generated tokens continue at `prompt.next_position`, so the cache length and
the positions differ by the number of pruned tokens (and, for Qwen2.5-VL, by the gap its 3-D
layout leaves: `next_position` is not the prompt length). Position ids always come last-dim-first
(`[1, q]` or `[3, 1, q]`), so selecting rows is one indexing step for every family.

Real checkpoints load with `from_pretrained` (hub id or folder): LLaVA-OneVision and
Qwen2.5-VL, one adapter each, chosen from `ADAPTERS` by the config's `model_type`.
`make_tiny_pair` builds a tiny random pair of the same classes, with an offline tokenizer and
processor, and saves it, so that tests exercise the very `from_pretrained` path users take.
Not handled: batches (one prompt at a time), images, several videos in one prompt.
"""

from __future__ import annotations

import math
import os
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, DynamicCache

if TYPE_CHECKING:
    from .video import Video


DEFAULT_QUESTION = "Describe the video."
# a `Video`'s frames are always [T, H, W, 3]: said outright, since transformers guesses the channel axis
# from the shape and takes a frame 1 or 3 pixels high for channels-first
VIDEOS_KWARGS = {"input_data_format": "channels_last"}


@dataclass(frozen=True)
class Prompt:
    """One prepared prompt.

    `input_ids` [1, L]; `position_ids` [1, L] (or [3, 1, L] for 3-D rotary positions);
    `video_index` [n] the slots of the n video tokens in `input_ids` (increasing);
    `grid` (T, h, w) with T*h*w <= n (LLaVA-OneVision adds one newline token after the grid);
    `next_position` the position of the first generated token; `inputs` the processor output.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    video_index: torch.Tensor
    grid: tuple[int, int, int]
    next_position: int
    inputs: dict = field(repr=False)

    @property
    def num_video_tokens(self) -> int:
        return len(self.video_index)

    @property
    def text_index(self) -> torch.Tensor:
        """Slots of the non-video tokens, e.g. L=6, video_index=[1, 2, 3] -> [0, 4, 5]."""
        is_text = torch.ones(self.input_ids.shape[1], dtype=torch.bool)
        is_text[self.video_index] = False
        return is_text.nonzero().flatten()

    def rows(self, keep: torch.Tensor | None) -> torch.Tensor:
        """Prompt slots the model prefills when only video tokens `keep` (indices into
        `video_index`) are kept: all text slots plus the kept video slots, in order."""
        if keep is None:
            return torch.arange(self.input_ids.shape[1])
        return torch.cat([self.text_index, self.video_index[keep]]).sort().values


class VideoLM:
    """Adapter base: the language-model calls shared by every family.

    Subclasses set `family` and implement `prepare`, `video_features` and `position_ids_for`.
    """

    family = "base"

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = model.config
        self.video_token_id = int(self.config.video_token_id)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos or [])

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def layer_devices(self) -> list[torch.device]:
        """The device of each decoder layer: one device, unless the model was loaded with a
        `device_map` that spreads it over several GPUs."""
        return [next(layer.parameters()).device for layer in self.language_model.layers]

    @property
    def language_model(self):
        return self.model.model.language_model

    def chat(self, question: str) -> str:
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"the question must be a non-empty string, got {question!r}.")
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.language_model.config)

    @torch.no_grad()
    def forward(self, embeds, position_ids, cache, attention_mask=None, logits_rows=slice(None), head=None, **kwargs):
        """Run the language model on `embeds` [1, q, D] at `position_ids`, appending to
        `cache`; return logits [1, q', V] for `logits_rows` of the q rows, through `head` in
        place of the output layer where given (`draft_vocab.output_head`: V is then its rows).
        Extra keyword arguments reach the attention functions (see `attention.py`)."""
        hidden = self.language_model(
            inputs_embeds=embeds,
            position_ids=position_ids.to(self.device),
            cache=cache,
            attention_mask=attention_mask,
            use_cache=True,
            **kwargs,
        ).last_hidden_state
        if head is None:
            return self.model.lm_head(hidden[:, logits_rows]).float()
        return head(hidden[:, logits_rows].to(head.weight.device)).float()  # no accelerate hook moves it there

    def step(self, token_ids, positions, cache, attention_mask=None):
        """Logits [1, q, V] for new tokens `token_ids` (list or [q]) at absolute `positions` [q]."""
        ids = torch.as_tensor(token_ids, device=self.device).reshape(1, -1)
        embeds = self.model.get_input_embeddings()(ids)
        return self.forward(embeds, self.position_ids_for(torch.as_tensor(positions)), cache, attention_mask)

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # family-specific -------------------------------------------------------------------
    def prepare(self, video: Video, question: str = DEFAULT_QUESTION) -> Prompt:
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, prompt: Prompt) -> torch.Tensor:
        """Token embeddings [1, L, D] with the video features [n, D] scattered into the video slots."""
        embeds = self.model.get_input_embeddings()(prompt.input_ids.to(self.device))
        embeds[0, prompt.video_index.to(self.device)] = self.video_features(prompt).to(embeds.dtype)
        return embeds

    def video_features(self, prompt: Prompt) -> torch.Tensor:
        """[n, D]: the projected video tokens of the prompt's video, in slot order."""
        raise NotImplementedError

    def position_ids_for(self, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LlavaOnevisionLM(VideoLM):
    """LLaVA-OneVision: SigLIP patches, projected, 2x2 bilinear-pooled per frame, then one
    newline token after the whole video; a Qwen2 language model with 1-D rotary positions."""

    family = "llava_onevision"

    def _grid(self, num_frames: int) -> tuple[int, int, int]:
        vision = self.config.vision_config
        side = math.ceil(vision.image_size // vision.patch_size / 2)
        return num_frames, side, side

    def prepare(self, video: Video, question: str = DEFAULT_QUESTION) -> Prompt:
        text = self.chat(question)
        # metadata too, only so that transformers does not guess the channel axis for it either
        inputs = self.processor(text=text, videos=[video.frames.numpy()], video_metadata=[video.metadata()],
                                videos_kwargs=VIDEOS_KWARGS, return_tensors="pt")
        input_ids = inputs["input_ids"]
        video_index = (input_ids[0] == self.video_token_id).nonzero().flatten()
        length = input_ids.shape[1]
        return Prompt(
            input_ids=input_ids,
            position_ids=torch.arange(length).unsqueeze(0),
            video_index=video_index,
            grid=self._grid(len(video.frames)),
            next_position=length,
            inputs=dict(inputs),
        )

    def video_features(self, prompt: Prompt) -> torch.Tensor:
        features = self.model.model.get_video_features(
            prompt.inputs["pixel_values_videos"].to(self.device, self.dtype),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        ).pooler_output
        return features.flatten(0, 1)

    def position_ids_for(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.reshape(1, -1)


class Qwen25VLLM(VideoLM):
    """Qwen2.5-VL: frames are cut into patches of 2 frames x p x p pixels (an odd frame count
    repeats the last frame), 2x2 neighbouring patches are merged into one token, and the
    language model uses 3-D rotary positions (time, height, width).

    A video token at merged grid cell (t, i, j) after `s` prompt tokens gets position
    (s + floor(t * tokens_per_second * 2 / fps), s + i, s + j); text tokens get the same
    value in all three rows. So the prompt's positions depend on the frame rate, and the
    first generated token sits one past the prompt's last token, not at the prompt length.

    Which "last": transformers 5.24 resumes the text after a video at s + max(h, w), not
    after the video's largest (temporal) position as Qwen's original code did, so for a long
    or slow video the question sits below the video's temporal positions. `generate` then
    continues from the last prompt token (`position_ids[..., -1] + 1`), while a forward
    without position ids continues from the stored `rope_deltas` (max + 1): the two disagree.
    We follow `generate`; with the original layout both are max + 1. Positions are always
    passed explicitly, never left to the model's stateful `rope_deltas`.
    """

    family = "qwen2_5_vl"

    def prepare(self, video: Video, question: str = DEFAULT_QUESTION) -> Prompt:
        text = self.chat(question)
        # frame timing sets the temporal positions; without metadata the processor assumes 24 fps
        inputs = self.processor(
            text=text, videos=[video.frames.numpy()], video_metadata=[video.metadata()], videos_kwargs=VIDEOS_KWARGS,
            return_tensors="pt",
        )
        input_ids = inputs["input_ids"]
        position_ids, _ = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            video_grid_thw=inputs["video_grid_thw"],
            second_per_grid_ts=inputs["second_per_grid_ts"],
        )  # [3, 1, L]
        merge = self.config.vision_config.spatial_merge_size
        t, h, w = inputs["video_grid_thw"][0].tolist()
        return Prompt(
            input_ids=input_ids,
            position_ids=position_ids,
            video_index=(input_ids[0] == self.video_token_id).nonzero().flatten(),
            grid=(t, h // merge, w // merge),
            next_position=int(position_ids[:, 0, -1].max()) + 1,  # as `generate` continues
            inputs=dict(inputs),
        )

    def video_features(self, prompt: Prompt) -> torch.Tensor:
        features = self.model.model.get_video_features(
            prompt.inputs["pixel_values_videos"].to(self.device, self.dtype),
            prompt.inputs["video_grid_thw"].to(self.device),
        ).pooler_output  # one [t*h*w, D] tensor per video
        return torch.cat(features)

    def position_ids_for(self, positions: torch.Tensor) -> torch.Tensor:
        """Text positions in all three rotary rows: [q] -> [3, 1, q]. (Three rows, not the four
        `generate` uses: a fourth, leading row would only feed the mask's packed-sequence check.)"""
        return positions.reshape(1, 1, -1).expand(3, 1, -1)


ADAPTERS = {adapter.family: adapter for adapter in (LlavaOnevisionLM, Qwen25VLLM)}


def resolve_device(device=None) -> torch.device:
    """`None` -> cuda when available, else cpu; a device this machine lacks (CUDA without CUDA, a card
    number past the last card, MPS without MPS) is an error, before any model loads."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parsed_device(device)
    if device.type == "cuda":
        check_cuda_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(
            f"device={str(device)!r} was asked for, but this PyTorch sees no MPS device (Apple-silicon GPU; "
            f"torch {torch.__version__}, mps built: {torch.backends.mps.is_built()}). Use device='cpu', or 'cuda' "
            "on a GPU machine."
        )
    return device


def parsed_device(device) -> torch.device:
    """`device` (a torch.device, a name such as "cpu" or "cuda:1", or a card number) as a torch.device;
    RuntimeError, as torch's own, for anything else."""
    try:
        if isinstance(device, bool):
            raise TypeError("a bool is not a device")
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise RuntimeError(f"device={device!r} is not a device: use 'cpu', 'cuda', 'cuda:N' (N a card number) "
                           f"or 'mps' (torch: {str(error).splitlines()[0]})") from error


def check_cuda_device(device: torch.device) -> None:
    """Refuse a CUDA `device` when this PyTorch sees no CUDA, or when its card number is past the last card."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device={str(device)!r} was asked for, but this PyTorch sees no CUDA device "
            f"(torch {torch.__version__}, cuda build: {torch.version.cuda}). Use device='cpu' or run on a GPU machine."
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise RuntimeError(
            f"device={str(device)!r} was asked for, but this machine has {count} visible CUDA "
            f"device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1}; CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Use one of those, or device='cuda'."
        )


def check_device_map(device_map) -> None:
    """`resolve_device`'s error for a `device_map` that places weights on a GPU this machine lacks
    (a "cuda..." or "mps" string, a card number, or such values in a dict); "auto" is left to accelerate."""
    for place in (device_map.values() if isinstance(device_map, dict) else [device_map]):
        if isinstance(place, int) and not isinstance(place, bool) or str(place).startswith(("cuda", "mps")):
            resolve_device(f"cuda:{place}" if isinstance(place, int) else place)


def checked_checkpoint(name_or_path):
    """`name_or_path` as `from_pretrained` should get it: a hub id ("org/name") unchanged; a path
    (a Path, absolute, starting with ./ ../ or ~, or with more than one slash) with ~ expanded,
    which must be an existing folder: "/tmp/nowhere" -> FileNotFoundError, not a hub-id error."""
    text = str(name_or_path)
    separators = text.count(os.sep) + (text.count(os.altsep) if os.altsep else 0)
    if not (isinstance(name_or_path, Path) or os.path.isabs(text) or text in (".", "..") or separators > 1
            or text.startswith(("~", "./", "../", "." + os.sep, ".." + os.sep))):
        return name_or_path
    path = Path(text).expanduser()
    if not path.is_dir():
        what = "is a file, not a checkpoint folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"checkpoint folder {text} {what}: give the folder that holds config.json, "
                                "or a hub id such as 'llava-hf/llava-onevision-qwen2-0.5b-ov-hf'.")
    return path


DTYPE_NAMES = ("float32", "float16", "bfloat16")


def head_dim(config) -> int:
    """A language-model config's attention head size: `head_dim` where the config sets it, else
    hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def resolved_dtype(dtype, device: torch.device) -> torch.dtype:
    """The weights' dtype: `None` -> bfloat16 on CUDA, else float32; a floating torch.dtype or one of
    `DTYPE_NAMES` as given. "fp16" or torch.int8 is an error naming the choices, before any model loads."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return getattr(torch, dtype)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(f"dtype={dtype!r} is not a weight dtype: use one of {DTYPE_NAMES} (or torch.float32, "
                     "torch.float16, torch.bfloat16), or leave it out (bfloat16 on CUDA, float32 otherwise).")


def load_lm(name_or_path, device=None, dtype=None, device_map=None) -> VideoLM:
    """Load one checkpoint (hub id or folder) and wrap it in its family's adapter.
    `device_map` (e.g. "auto", which needs accelerate) spreads a model too large for one card
    over the visible GPUs, as transformers' `from_pretrained` does; `device` is then ignored."""
    from transformers import AutoConfig

    name_or_path = checked_checkpoint(name_or_path)
    check_device_map(device_map)
    device = resolve_device(device if device_map is None else None)
    dtype = resolved_dtype(dtype, device)
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type not in ADAPTERS:
        raise ValueError(
            f"{name_or_path}: model type {config.model_type!r} is not supported; "
            f"specvlm has adapters for {sorted(ADAPTERS)}."
        )
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, attn_implementation="sdpa",
                                                            device_map=device_map)
    finally:
        if bars:
            logging.enable_progress_bar()
    processor = AutoProcessor.from_pretrained(name_or_path)
    return ADAPTERS[config.model_type](model if device_map is not None else model.to(device), processor)


@dataclass(frozen=True)
class Pair:
    """A target (verifier) and a draft that share tokenizer and video-token layout."""

    target: VideoLM
    draft: VideoLM
    name: str = ""

    def __post_init__(self):
        for role in ("target", "draft"):
            check_is_model(getattr(self, role), role)
        check_compatible(self.target, self.draft)


def check_is_model(lm, role: str) -> None:
    """Raise TypeError unless `lm` is a loaded model (`VideoLM`, as `load_lm` returns): not a
    checkpoint name, a bare transformers model, a tuple or a `Pair`."""
    if isinstance(lm, VideoLM):
        return
    hint = " (a Pair already holds both models: pass the Pair itself)" if isinstance(lm, Pair) else ""
    given = repr(lm) if isinstance(lm, (str, Path)) or lm is None else f"a {type(lm).__name__} object"
    raise TypeError(f"the {role} of a Pair must be a model loaded by specvlm (a VideoLM), got {given}{hint}: "
                    "load both with sv.load_pair(target, draft), or each with sv.load_lm(checkpoint).")


def _probe_video(frames: int) -> Video:
    from .video import from_array

    return from_array(np.zeros((frames, 32, 32, 3), dtype=np.uint8), fps=1.0)


def check_compatible(target: VideoLM, draft: VideoLM) -> None:
    """Raise ValueError unless target and draft tokenize text and videos identically, and the draft's
    output layer has no more rows than the target's."""
    if target.family != draft.family:
        raise ValueError(
            f"target is {target.family} but draft is {draft.family}: their video-token layouts differ; "
            "use a draft of the target's family."
        )
    if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
        raise ValueError(
            "target and draft have different tokenizers (vocabularies differ): speculative decoding "
            "needs a draft that shares the target's tokenizer."
        )
    target_rows = target.model.get_output_embeddings().weight.shape[0]
    draft_rows = draft.model.get_output_embeddings().weight.shape[0]
    if draft_rows > target_rows:
        raise ValueError(
            f"the draft's output layer has {draft_rows} rows, more than the target's {target_rows}: it could propose "
            "token ids the target cannot read; use a draft whose output layer is no larger than the target's.")
    for frames in (1, 2):
        t, d = target.prepare(_probe_video(frames)), draft.prepare(_probe_video(frames))
        if not torch.equal(t.input_ids, d.input_ids):
            raise ValueError(
                f"target and draft lay out a {frames}-frame video differently "
                f"(target {t.num_video_tokens} video tokens, grid {t.grid}; draft {d.num_video_tokens}, "
                f"grid {d.grid}): the draft must see the same video-token grid as the target."
            )


def embedded_paths() -> tuple[Path, Path]:
    """Folders of the embedded pair inside the installed package (read-only is fine)."""
    root = Path(str(resources.files("specvlm") / "tiny"))
    return root / "target", root / "draft"


def pair_checkpoints(target="tiny", draft=None):
    """(target, draft, name) that `load_pair` loads, both checked (`checked_checkpoint`) before
    either is loaded: "tiny" alone is the embedded pair; otherwise two checkpoints."""
    if target == "tiny" and draft is None:
        return (*embedded_paths(), "embedded tiny pair (stand-in)")
    if "tiny" in (target, draft):
        raise ValueError(f"'tiny' is the embedded pair as a whole (target='tiny' with no draft), not one checkpoint; "
                         f"got target={target!r}, draft={draft!r}: give two checkpoints or target='tiny' alone "
                         "(its folders: specvlm.models.embedded_paths()).")
    if draft is None:
        raise ValueError("load_pair needs a draft checkpoint besides the target (or target='tiny').")
    return checked_checkpoint(target), checked_checkpoint(draft), f"{target} / {draft}"


def load_pair(target="tiny", draft=None, device=None, dtype=None, target_device_map=None) -> Pair:
    """Load a target/draft pair: `load_pair("tiny")` is the embedded pair shipped with the
    package; otherwise two checkpoints, e.g.
    `load_pair("llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf")`.
    `target_device_map="auto"` spreads the target over the visible GPUs (a 72B target on two
    cards) while the draft goes to `device`."""
    target, draft, name = pair_checkpoints(target, draft)
    check_device_map(target_device_map)  # before the draft loads
    # the draft first: a device_map such as "auto" budgets each card's free memory, so the target's
    # layers then leave room for the draft on its card
    draft_lm = load_lm(draft, device, dtype)
    return Pair(load_lm(target, device, dtype, device_map=target_device_map), draft_lm, name=str(name))
