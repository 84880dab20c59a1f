"""The draft's steps compiled for programmatic dependent launch ($SPECVLM_DRAFT_PDL): the arguments
torch.compile gets, which model's steps get them, the setting's checks and where runs record it.
The kernels themselves run only on a GPU (compute capability 9.0 or newer), in the benchmark. The bad
setting's refusal and the bench rows' record are tested beside combo kernels' (test_draft_combo.py)."""

import pytest
import torch

import specvlm as sv
from specvlm import decoding, fast
from specvlm.bench import pdl_of
from specvlm.trees import MC_SIM_7B_63

from .test_draft_combo import FAST_OPTIONS, compiles, embedded, roles_compiled  # noqa: F401 (fixtures)


@pytest.mark.parametrize("pdl, combo", [("1", "1"), ("1", "0"), ("0", "1"), (None, "0")])
def test_only_the_drafts_steps_ask_inductor_for_pdl(embedded, compiles, monkeypatch, pdl, combo):
    if pdl is not None:
        monkeypatch.setenv("SPECVLM_DRAFT_PDL", pdl)
    monkeypatch.setenv("SPECVLM_DRAFT_COMBO", combo)
    wanted = fast.DRAFT_PDL if pdl is None else pdl == "1"
    prompt = embedded.target.prepare(sv.sample_video("bikes", 3))
    got = fast.generate_fast(embedded, prompt, method="specvlm", ratio=0.5, tree=MC_SIM_7B_63, max_new_tokens=10,
                             compile=True)
    assert got.tokens == decoding.generate_ar(embedded.target, prompt, 10).tokens
    compiled = roles_compiled(embedded, compiles)
    assert compiled["target"] and all(kwargs == FAST_OPTIONS for kwargs in compiled["target"])
    extra = {**({"combo_kernels": True} if combo == "1" else {}), **({"triton.enable_pdl": True} if wanted else {})}
    wanted_draft = fast.with_inductor_options(FAST_OPTIONS, extra) if extra else FAST_OPTIONS
    assert compiled["draft"] and all(kwargs == wanted_draft for kwargs in compiled["draft"])
    assert fast._ENGINES[embedded.draft]["draft"].pdl is wanted


def test_a_changed_setting_compiles_the_drafts_steps_anew_and_keeps_the_targets(embedded, compiles, monkeypatch):
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    options = dict(method="sd", k=3, max_new_tokens=8, compile=True)
    first = fast.generate_fast(embedded, prompt, **options)
    draft, target = fast._ENGINES[embedded.draft]["draft"], fast._ENGINES[embedded.target]["target"]
    monkeypatch.setenv("SPECVLM_DRAFT_PDL", "1")
    compiles.clear()
    assert fast.generate_fast(embedded, prompt, **options).tokens == first.tokens
    assert fast._ENGINES[embedded.draft]["draft"] is not draft
    assert fast._ENGINES[embedded.target]["target"] is target
    compiled = roles_compiled(embedded, compiles)
    assert compiled["draft"] and not compiled["target"]
    assert all(kwargs["options"]["triton.enable_pdl"] for kwargs in compiled["draft"])


def test_the_record_says_no_pdl_where_inductor_emits_none(embedded, compiles, monkeypatch):
    """Asked for, but on a CPU (inductor emits PDL on CUDA cards of compute capability 9.0 or newer only)
    or through another backend: the capture report and bench's record say False."""
    monkeypatch.setenv("SPECVLM_DRAFT_PDL", "1")
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    for compile in (True, {"backend": "eager"}, False):
        fast.generate_fast(embedded, prompt, method="sd", k=3, max_new_tokens=6, compile=compile)
        engine = fast._ENGINES[embedded.draft]["draft"]
        assert engine.pdl and not engine.compiled_with_pdl and not pdl_of(embedded.draft)
        assert fast.capture_report(embedded)["models"]["draft"]["pdl"] is False


def test_the_record_follows_the_card(embedded, compiles, monkeypatch):
    """On a card of compute capability 9.0 the draft's compiled steps say PDL; on 8.0 they do not."""
    monkeypatch.setenv("SPECVLM_DRAFT_PDL", "1")
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    fast.generate_fast(embedded, prompt, method="sd", k=3, max_new_tokens=6, compile=True)
    engine = fast._ENGINES[embedded.draft]["draft"]
    monkeypatch.setattr(type(engine.lm), "device", property(lambda self: torch.device("cuda", 0)))
    for capability, says in (((9, 0), True), ((8, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert engine.compiled_with_pdl is says and pdl_of(embedded.draft) is says
        assert fast.capture_report(embedded)["models"]["draft"]["pdl"] is says
        assert fast._ENGINES[embedded.target]["target"].compiled_with_pdl is False  # never asked for a target
