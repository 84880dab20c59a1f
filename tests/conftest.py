"""Shared fixtures: tiny random pairs of the real transformers classes, saved and loaded back
through `from_pretrained` (built once per test session)."""

import copy
import os

# `flash_decode`'s Triton kernels run on a CPU only in Triton's interpreter, which Triton picks
# when a kernel is defined (at import): on before specvlm is imported. The tests run on the CPU and
# nothing else in them uses Triton (flash_decode given CUDA tensors would run interpreted too; no
# test does that).
os.environ.setdefault("TRITON_INTERPRET", "1")
# read at import too (`split_merge.CHOICE`): the tests pick the merge themselves, under the default
os.environ.pop("SPECVLM_SPLIT_MERGE", None)

import numpy as np
import pytest
import torch

import specvlm as sv


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    return sv.make_tiny_pair(tmp_path_factory.mktemp("tiny_llava"), seed=0)


@pytest.fixture(scope="session")
def tiny_pair(tiny_paths):
    target, draft = tiny_paths
    return sv.load_pair(str(target), str(draft), device="cpu")


@pytest.fixture(scope="session")
def self_pair(tiny_pair):
    """The target drafting for itself (self-speculation): proposals agree unless pruning bites."""
    return sv.Pair(tiny_pair.target, tiny_pair.target, name="self")


@pytest.fixture(scope="session")
def noisy_pair(tiny_pair, tiny_paths):
    """A draft that is the target with noise on its language-model weights: partial acceptance."""
    draft = sv.load_lm(str(tiny_paths[0]), device="cpu")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.language_model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return sv.Pair(tiny_pair.target, draft, name="noisy")


def random_video(seed: int, frames: int, size: int = 40):
    rng = np.random.default_rng(seed)
    return sv.from_array(rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8), fps=8.0)
