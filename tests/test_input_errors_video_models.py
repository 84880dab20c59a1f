"""Bad input to `video.py` and `models.py` gets a clear error before any work, and input that is
fine but unusual (a ~ path, PIL images, frames 1 or 3 pixels high) is read as meant."""

import io
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import specvlm as sv
from specvlm.video import sample_video_path


@pytest.fixture(scope="module")
def embedded():
    return sv.load_pair("tiny", device="cpu")


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    target, draft = sv.make_tiny_pair(tmp_path_factory.mktemp("tiny_qwen"), seed=0, family="qwen2_5_vl")
    return sv.load_pair(str(target), str(draft), device="cpu")


@pytest.fixture
def nothing_loads(monkeypatch):
    monkeypatch.setattr(sv.models.AutoModelForImageTextToText, "from_pretrained",
                        lambda *args, **kwargs: pytest.fail("a model was loaded"))


# --- 1. ~ in a video path ---

def test_load_video_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "clips").mkdir()
    shutil.copy(sample_video_path("bikes"), tmp_path / "clips" / "b.mp4")
    video = sv.load_video("~/clips/b.mp4", 2)
    assert video.indices.tolist() == [0, 249] and video.source == str(tmp_path / "clips" / "b.mp4")
    with pytest.raises(FileNotFoundError, match="no video file at ~/clips/nowhere.mp4"):
        sv.load_video("~/clips/nowhere.mp4", 2)
    with pytest.raises(IsADirectoryError, match="~/clips is a folder"):
        sv.load_video("~/clips", 2)


def test_a_video_path_must_be_a_path():
    with pytest.raises(TypeError, match=r"video path must be a str or a Path, got ndarray.*sv.from_array"):
        sv.load_video(np.zeros((2, 8, 8, 3), np.uint8), 2)


# --- 2. devices this machine lacks ---

def test_mps_without_mps_is_refused_before_loading(monkeypatch, nothing_loads):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device='mps' was asked for, but this PyTorch sees no MPS device.*"
                                           "Use device='cpu'"):
        sv.load_pair("tiny", device="mps")
    with pytest.raises(RuntimeError, match="no MPS device"):
        sv.models.load_pair("tiny", device="cpu", target_device_map={"": "mps"})


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("device", ["cuda:2", "cuda:7", torch.device("cuda", 7), 5])
def test_a_gpu_past_the_last_card_is_refused(two_gpus, device):
    with pytest.raises(RuntimeError, match=r"was asked for, but this machine has 2 visible CUDA devices "
                                           r"\(cuda:0 to cuda:1;.*Use one of those"):
        sv.models.resolve_device(device)


def test_a_device_map_past_the_last_card_is_refused_before_loading(two_gpus, nothing_loads):
    with pytest.raises(RuntimeError, match="'cuda:3' was asked for, but this machine has 2 visible CUDA devices"):
        sv.models.load_pair("tiny", device="cpu", target_device_map={"model": 0, "lm_head": 3})


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1", 1])
def test_cards_this_machine_has_are_accepted(two_gpus, device):
    assert sv.models.resolve_device(device).type == "cuda"


def test_cuda_without_cuda_keeps_its_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device='cuda:1' was asked for, but this PyTorch sees no CUDA device"):
        sv.models.resolve_device("cuda:1")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", 2.0, True])
def test_a_device_that_is_no_device_name(device):
    with pytest.raises(RuntimeError, match=r"is not a device: use 'cpu', 'cuda', 'cuda:N'"):
        sv.models.resolve_device(device)


# --- 3. dtype names ---

@pytest.mark.parametrize("dtype", ["fp16", "half", "torch.float16", torch.int8, 16])
def test_an_unknown_dtype_is_refused_before_loading(nothing_loads, dtype):
    with pytest.raises(ValueError, match=r"is not a weight dtype: use one of \('float32', 'float16', 'bfloat16'\)"):
        sv.load_pair("tiny", device="cpu", dtype=dtype)


@pytest.mark.parametrize("dtype,expected", [("float16", torch.float16), ("bfloat16", torch.bfloat16),
                                            (torch.float64, torch.float64), (None, torch.float32)])
def test_dtype_names_and_dtypes(dtype, expected):
    assert sv.models.resolved_dtype(dtype, torch.device("cpu")) is expected
    assert sv.models.resolved_dtype(None, torch.device("cuda")) is torch.bfloat16


def test_a_dtype_name_loads_that_dtype():
    assert sv.load_lm(sv.models.embedded_paths()[1], device="cpu", dtype="bfloat16").dtype == torch.bfloat16


# --- 4. what a Pair holds ---

@pytest.mark.parametrize("make", [lambda p: ("a", "b"), lambda p: ((p.target, p.draft), p.draft),
                                  lambda p: (p, p), lambda p: (p.target, p.draft.model), lambda p: (p.target, None)],
                         ids=["names", "tuple", "pairs", "bare model", "none"])
def test_a_pair_holds_loaded_models(embedded, make):
    with pytest.raises(TypeError, match=r"of a Pair must be a model loaded by specvlm \(a VideoLM\).*sv.load_pair"):
        sv.Pair(*make(embedded))


def test_a_pair_inside_a_pair_is_named(embedded):
    with pytest.raises(TypeError, match="got a Pair .*pass the Pair itself"):
        sv.Pair(embedded, embedded.draft)


# --- 5. from_array: PIL images, fps ---

def test_from_array_takes_pil_images():
    frames = np.random.default_rng(0).integers(0, 256, (3, 6, 10, 3), dtype=np.uint8)
    video = sv.from_array([Image.fromarray(frame) for frame in frames], 8.0)
    assert torch.equal(video.frames, torch.from_numpy(frames)) and video.fps == 8.0
    gray = sv.from_array((Image.new("L", (4, 2), 7), Image.new("RGBA", (4, 2), (1, 2, 3, 4))), 8)
    assert gray.frames.shape == (2, 2, 4, 3) and gray.frames[0].unique().tolist() == [7]
    assert gray.frames[1, 0, 0].tolist() == [1, 2, 3]


def test_pil_images_of_different_sizes_or_mixed_with_arrays_are_refused():
    with pytest.raises(ValueError, match=r"different sizes \(width, height\) \[\(4, 6\), \(6, 4\)\]: resize"):
        sv.from_array([Image.new("RGB", (6, 4)), Image.new("RGB", (4, 6))], 8.0)
    with pytest.raises(ValueError, match="mixes PIL images with other things: frame 1 is a ndarray"):
        sv.from_array([Image.new("RGB", (6, 4)), np.zeros((4, 6, 3), np.uint8)], 8.0)


@pytest.mark.parametrize("fps", [None, "8", True, [8.0]])
def test_from_array_needs_a_number_for_fps(fps):
    with pytest.raises(ValueError, match=r"fps must be a positive number \(frames per second, e.g. 8.0\), got"):
        sv.from_array(np.zeros((2, 4, 4, 3), np.uint8), fps)


def test_from_array_takes_numpy_numbers_for_fps():
    assert sv.from_array(np.zeros((2, 4, 4, 3), np.uint8), np.float32(12.5)).fps == 12.5


# --- 6. a container with no frames ---

def chunk(fourcc: bytes, body: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(body)) + body + b"\0" * (len(body) % 2)


def mjpeg_avi(frames: list, size: int = 16, fps: int = 10) -> bytes:
    """An MJPEG AVI of PIL `frames` (none: a valid container with zero frames)."""
    main = struct.pack("<10I4I", 1000000 // fps, 0, 0, 0x10, len(frames), 0, 1, 0, size, size, 0, 0, 0, 0)
    stream = struct.pack("<4s4sIHHIIIIIIIIhhhh", b"vids", b"MJPG", 0, 0, 0, 0, 1, fps, 0, len(frames), 0,
                         0xFFFFFFFF, 0, 0, 0, size, size)
    bitmap = struct.pack("<IiiHH4sIiiII", 40, size, size, 1, 24, b"MJPG", size * size * 3, 0, 0, 0, 0)
    header = chunk(b"LIST", b"hdrl" + chunk(b"avih", main) + chunk(b"LIST", b"strl" + chunk(b"strh", stream)
                                                                    + chunk(b"strf", bitmap)))
    movi = b""
    for frame in frames:
        jpeg = io.BytesIO()
        frame.save(jpeg, "JPEG")
        movi += chunk(b"00dc", jpeg.getvalue())
    return chunk(b"RIFF", b"AVI " + header + chunk(b"LIST", b"movi" + movi))


def test_a_container_without_frames_is_reported_as_such(tmp_path):
    """decord cannot open a container with no frames; the error names that case among its causes."""
    path = tmp_path / "empty.avi"
    path.write_bytes(mjpeg_avi([]))
    with pytest.raises(ValueError, match=r"empty.avi as a video: the file is truncated, holds no frames, or is not"):
        sv.load_video(path, 4)


# --- 7. frames 1 or 3 pixels high are channels-last ---

def channels_first_inputs(lm, video):
    """The processor's output for `video` given channels-first, which transformers cannot misread."""
    frames = video.frames.permute(0, 3, 1, 2).numpy()
    return lm.processor(text=lm.chat(sv.models.DEFAULT_QUESTION), videos=[frames], video_metadata=[video.metadata()],
                        videos_kwargs={"input_data_format": "channels_first"}, return_tensors="pt")


@pytest.mark.parametrize("shape", [(2, 1, 48, 3), (2, 3, 48, 3), (3, 3, 3, 3), (2, 40, 56, 3)])
@pytest.mark.parametrize("which", ["llava", "qwen"])
def test_short_frames_are_read_channels_last(embedded, qwen_pair, which, shape):
    lm = (embedded if which == "llava" else qwen_pair).target
    if which == "qwen" and shape[1] == 1:
        shape = (2, 1, 150, 3)  # Qwen2.5-VL refuses aspect ratios of 200 and more
    video = sv.from_array(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8), fps=8.0)
    prompt, expected = lm.prepare(video), channels_first_inputs(lm, video)
    for key in ("input_ids", "pixel_values_videos"):
        assert torch.equal(prompt.inputs[key], expected[key]), key
    if which == "qwen":
        _, height, width = prompt.grid
        assert height <= width  # a wide strip, not read as 3 channels of a tall picture
