"""Every $SPECVLM_* setting the fast path reads is checked before any prefill (`fast.check_settings`),
whichever method runs: the list comes from the one a bench run records (FAST_PATH_ENVIRONMENT), so a
setting added there without a check fails here. Settings that need a card are checked against where
each model runs; a value given as an argument is taken over its environment variable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import specvlm as sv
from specvlm import __main__ as cli
from specvlm import fast, flash_decode
from specvlm.__main__ import FAST_PATH_ENVIRONMENT
from specvlm.trees import MC_SIM_7B_63

# SPECVLM_SPLIT_MERGE is read when specvlm.split_merge is imported: a bad value set afterwards is its CHOICE's
SETTINGS = [name for name in FAST_PATH_ENVIRONMENT if name.startswith("SPECVLM_") and name != "SPECVLM_SPLIT_MERGE"]
METHODS = ["ar", "sd", "specvlm"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedded():
    return sv.load_pair("tiny", device="cpu")


@pytest.fixture
def no_prefill(monkeypatch):
    """Any prefill fails the test (speculative methods prefill through `prefill_target`, AR through
    `prefill_pruned`); every setting cleared."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for prefill in ("prefill_target", "prefill_pruned"):
        monkeypatch.setattr(fast, prefill, lambda *args, **kwargs: pytest.fail("prefilled"))


@pytest.fixture
def prompt(embedded):
    return embedded.target.prepare(sv.sample_video("bikes", 2))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", SETTINGS)
def test_a_bad_value_of_any_setting_is_refused_before_any_prefill_naming_it(embedded, prompt, no_prefill,
                                                                            monkeypatch, name, method):
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=name):
        fast.generate_fast(embedded, prompt, method=method, compile=False)


def test_a_bad_split_merge_choice_is_refused_too(monkeypatch):
    monkeypatch.setattr(fast.split_merge, "CHOICE", "yes")  # what $SPECVLM_SPLIT_MERGE=yes at import gives
    with pytest.raises(ValueError, match="SPECVLM_SPLIT_MERGE"):
        fast.check_settings()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name, value", [
    ("SPECVLM_FAST_ATTENTION", "flex/grouped"), ("SPECVLM_CUDA_GRAPHS", "trees"), ("SPECVLM_FUSE_DRAFT", "1"),
    ("SPECVLM_FEW_ROWS", "0"), ("SPECVLM_DRAFT_VOCAB", "0"), ("SPECVLM_PICKS", "torch"),
    ("SPECVLM_L2_PREFETCH", "0"), ("SPECVLM_DRAFT_COMBO", "0"), ("SPECVLM_DRAFT_PDL", "1"),
    ("SPECVLM_FLEX_MIN_SLOTS", "0"), ("SPECVLM_SPLIT_MIN_SLOTS", "0")])
def test_a_good_value_of_any_setting_passes_the_checks(embedded, prompt, monkeypatch, name, value, method):
    for other in SETTINGS:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, value)
    assert name in SETTINGS  # every setting has a good value here
    fast.check_settings(target=fast.placement(embedded.target), draft=fast.placement(embedded.draft))
    options = {} if method == "ar" else {"tree": MC_SIM_7B_63} if method == "specvlm" else {"k": 3}
    result = fast.generate_fast(embedded, prompt, method=method, max_new_tokens=4, compile=False, **options)
    assert len(result.tokens) >= 1


def test_every_setting_has_a_good_value_in_the_test_above():
    names = {name for mark in test_a_good_value_of_any_setting_passes_the_checks.pytestmark
             if mark.name == "parametrize" and mark.args[0] == "name, value" for name, _ in mark.args[1]}
    assert names == set(SETTINGS)


def test_arguments_are_taken_over_a_bad_environment_variable(embedded, prompt, no_prefill, monkeypatch):
    monkeypatch.setenv("SPECVLM_FAST_ATTENTION", "xformers")
    monkeypatch.setenv("SPECVLM_DRAFT_VOCAB", "lots")
    fast.check_settings("sdpa", torch.arange(64))  # neither variable is read
    with pytest.raises(ValueError, match="^unknown fast-path attention 'grouped/xformers'"):
        fast.check_settings("grouped/xformers", torch.arange(64))  # a bad argument is refused without naming a variable
    with pytest.raises(ValueError, match="SPECVLM_DRAFT_VOCAB must be a whole number"):
        fast.check_settings("sdpa")
    with pytest.raises(pytest.fail.Exception, match="prefilled"):  # the checks passed: it went on to the prefill
        fast.generate_fast(embedded, prompt, method="specvlm", compile=False, attention="sdpa",
                           draft_vocab=torch.arange(64))


def test_settings_that_need_a_card_are_checked_against_where_each_model_runs(embedded, prompt, no_prefill,
                                                                              monkeypatch):
    monkeypatch.setattr(flash_decode, "INTERPRETED", False)  # as on a CPU without Triton's interpreter
    cpu = fast.placement(embedded.draft)
    monkeypatch.setenv("SPECVLM_FAST_ATTENTION", "sdpa/flash")
    fast.check_settings(target=cpu)  # the target's attention is sdpa
    with pytest.raises(ValueError, match="the draft is float32 on cpu"):
        fast.check_settings(target=cpu, draft=cpu)
    with pytest.raises(ValueError, match="the draft is float32 on cpu"):
        fast.generate_fast(embedded, prompt, method="sd", k=2, compile=False)
    monkeypatch.setenv("SPECVLM_FAST_ATTENTION", "sdpa")
    monkeypatch.setenv("SPECVLM_FEW_ROWS", "1")
    with pytest.raises(ValueError, match="SPECVLM_FEW_ROWS=1 runs Triton kernels"):
        fast.generate_fast(embedded, prompt, method="ar", compile=False)
    monkeypatch.setenv("SPECVLM_FEW_ROWS", "0")
    monkeypatch.setenv("SPECVLM_L2_PREFETCH", "1")
    with pytest.raises(ValueError, match="SPECVLM_L2_PREFETCH=1"):
        fast.generate_fast(embedded, prompt, method="ar", compile=False)


class Loaded(Exception):
    """Raised where `bench` would load the pair."""


def test_bench_refuses_a_bad_setting_before_loading_the_pair(monkeypatch, capsys):
    monkeypatch.setattr(cli, "bench_pair", lambda args: (_ for _ in ()).throw(Loaded()))
    monkeypatch.setenv("SPECVLM_CUDA_GRAPHS", "yes")
    with pytest.raises(SystemExit) as exit:
        cli.main(["bench", "--target", "tiny", "--paths", "plain", "fast", "--only", "ar", "--device", "cpu"])
    assert exit.value.code == 2
    assert "argument --paths fast: the fast path's settings: SPECVLM_CUDA_GRAPHS must be one of" in capsys.readouterr().err
    with pytest.raises(Loaded):  # the plain path reads no fast-path setting
        cli.main(["bench", "--target", "tiny", "--paths", "plain", "--only", "ar", "--device", "cpu"])


def test_drafts_ab_refuses_a_bad_entry_setting_before_loading_anything():
    done = subprocess.run([sys.executable, "benchmarks/drafts_ab.py", "no/such/folder@SPECVLM_FEW_ROWS=yes",
                           "--target", "no/such/target"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0
    assert ("draft entry 'no/such/folder@SPECVLM_FEW_ROWS=yes' (its settings over the process's environment): "
            "SPECVLM_FEW_ROWS must be '0' or '1', got 'yes'.") in done.stderr
    assert "Traceback" not in done.stderr  # refused before it looked for the folders


def test_flash_is_refused_with_one_message_by_the_command_line_and_the_fast_path(monkeypatch):
    from specvlm.__main__ import flash_refusal

    monkeypatch.setattr(flash_decode, "INTERPRETED", False)  # as on a CPU without Triton's interpreter
    assert flash_decode.refusal(["cpu"], torch.float32) == flash_refusal("cpu", "float32")
    with pytest.raises(ValueError) as refused:
        fast.check_flash({torch.device("cpu")}, torch.float32, "draft")
    assert str(refused.value) == "attention " + flash_decode.refusal(["cpu"], torch.float32, "the draft") + "."
    assert "the draft is float32 on cpu; use 'flex' or 'grouped'" in str(refused.value)
    monkeypatch.setattr(flash_decode, "INTERPRETED", True)
    assert flash_decode.refusal(["cpu"], torch.float32) is None and flash_refusal("cpu", "float32") is None
    assert "this run is bfloat16 on cpu;" in flash_decode.refusal(["cpu"], torch.bfloat16)
    monkeypatch.setattr(flash_decode, "triton", None)
    missing = "'flash' needs Triton, which is not installed; use 'flex' or 'grouped'"
    assert flash_decode.refusal(["cpu"], torch.float32) == missing
