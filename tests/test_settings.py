"""Every $SPECVLM_* setting the fast path reads is checked before any prefill (`fast.check_settings`),
whichever method runs: the list comes from the one a bench run records (FAST_PATH_ENVIRONMENT), so a
setting added there without a check fails here."""

import subprocess
import sys
from pathlib import Path

import pytest

import specvlm as sv
from specvlm import fast
from specvlm.__main__ import FAST_PATH_ENVIRONMENT

# SPECVLM_SPLIT_MERGE is read when specvlm.split_merge is imported (test_split_merge.py checks it)
SETTINGS = [name for name in FAST_PATH_ENVIRONMENT if name.startswith("SPECVLM_") and name != "SPECVLM_SPLIT_MERGE"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedded():
    return sv.load_pair("tiny", device="cpu")


@pytest.mark.parametrize("method", ["ar", "sd", "specvlm"])
@pytest.mark.parametrize("name", SETTINGS)
def test_a_bad_value_of_any_setting_is_refused_before_any_prefill_naming_it(embedded, monkeypatch, name, method):
    prefills = []
    monkeypatch.setattr(fast, "prefill_target", lambda *a, **k: prefills.append(a))
    for other in SETTINGS:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, "yes")
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    with pytest.raises(ValueError, match=name):
        fast.generate_fast(embedded, prompt, method=method, compile=False)
    assert not prefills


def test_an_attention_given_as_argument_is_not_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("SPECVLM_FAST_ATTENTION", "flash")
    assert fast.fast_attention("flex/grouped") == "flex/grouped"
    fast.check_settings("sdpa")  # the variable is valid and unused: nothing to refuse
    with pytest.raises(ValueError, match="^unknown fast-path attention 'xformers'"):
        fast.check_settings("xformers")


def test_drafts_ab_refuses_a_bad_entry_setting_before_loading_anything():
    done = subprocess.run([sys.executable, "benchmarks/drafts_ab.py", "specvlm/tiny/draft@SPECVLM_FEW_ROWS=yes",
                           "--target", "specvlm/tiny/target"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "draft entry 'specvlm/tiny/draft@SPECVLM_FEW_ROWS=yes': SPECVLM_FEW_ROWS must be '0' or '1'" in done.stderr
