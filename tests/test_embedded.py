"""The embedded trained pair: offline, read from the installed package, and lossless."""

import os
import subprocess
import sys

import pytest

import specvlm as sv
from specvlm import synthetic
from specvlm.trees import MC_SIM_7B_63


@pytest.fixture(scope="module")
def embedded():
    return sv.load_pair("tiny", device="cpu")


def test_embedded_pair_is_the_default_and_shares_its_layout(embedded):
    assert "stand-in" in embedded.name
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    assert prompt.grid == (2, 8, 8)
    assert embedded.target.language_model.config.head_dim == 128
    assert embedded.draft.language_model.config.head_dim == 64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lossless_on_the_trained_pair(embedded, seed):
    clip = synthetic.make_clip(seed, num_frames=(4, 9, 16)[seed])
    video = sv.from_array(clip.frames, fps=8.0)
    reference = sv.generate(embedded, video, method="ar", max_new_tokens=40)
    for method in ("sd",) + tuple(sv.pruning.METHODS):
        for ratio in (0.0, 0.5, 0.9, 0.99) if method != "sd" else (0.0,):
            result = sv.generate(embedded, video, method=method, ratio=ratio, max_new_tokens=40)
            assert result.tokens == reference.tokens, (seed, method, ratio)
    tree = sv.generate(embedded, video, method="specvlm", ratio=0.9, tree=MC_SIM_7B_63, max_new_tokens=40)
    assert tree.tokens == reference.tokens


def test_trained_draft_is_accepted_often(embedded):
    clip = synthetic.make_clip(5, num_frames=16)
    result = sv.generate(embedded, sv.from_array(clip.frames, fps=8.0), method="specvlm", ratio=0.9, max_new_tokens=40)
    assert result.mean_accepted > 1.0  # a random draft accepts almost nothing


def test_demo_runs_offline_from_an_empty_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HOME": str(home / "hf"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "specvlm", "demo", "--frames", "4", "--max-new-tokens", "12"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "specvlm" in done.stdout and "NO" not in done.stdout


@pytest.mark.parametrize("tree", [None, MC_SIM_7B_63], ids=["chain", "tree"])
def test_decoding_stops_in_the_round_that_commits_the_end_token(embedded, tree):
    clip = synthetic.make_clip(1, num_frames=8)
    result = sv.generate(embedded, sv.from_array(clip.frames, fps=8.0), method="specvlm", ratio=0.9, tree=tree,
                         max_new_tokens=80)
    assert result.tokens[-1] in embedded.target.eos_token_ids
    emitted_before_last_round = 1 + sum(n + 1 for n in result.accepted[:-1])
    assert emitted_before_last_round < len(result.tokens)
