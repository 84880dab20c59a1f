"""The draft's steps compiled with inductor's combo kernels ($SPECVLM_DRAFT_COMBO): the arguments
torch.compile gets, which model's steps get them, the setting's checks and where runs record it
(the checks and the bench record also for $SPECVLM_DRAFT_PDL, whose other tests are in test_draft_pdl.py).
Inductor's own kernels run only in the GPU benchmark, where `bench` checks every row against AR."""

import pytest
import torch

import specvlm as sv
from specvlm import decoding, fast
from specvlm.__main__ import recorded_environment
from specvlm.bench import bench, combo_of
from specvlm.trees import MC_SIM_7B_63

FAST_OPTIONS = {"fullgraph": False, "dynamic": False, "mode": "reduce-overhead"}  # compile_options(True, ...)


@pytest.fixture(scope="module")
def embedded():
    return sv.load_pair("tiny", device="cpu")


@pytest.fixture
def compiles(monkeypatch):
    """torch.compile replaced by a spy: each call's function and keyword arguments; steps run eagerly."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append((fn, kwargs)) or fn)
    monkeypatch.delenv("SPECVLM_DRAFT_COMBO", raising=False)
    monkeypatch.delenv("SPECVLM_DRAFT_PDL", raising=False)
    fast._ENGINES.clear()
    yield calls
    fast._ENGINES.clear()


def roles_compiled(pair, calls) -> dict[str, list[dict]]:
    """The compile arguments of every step (and KV move) by the role of the cache it writes."""
    role_of = {}
    for lm in {pair.target, pair.draft}:
        for role, engine in fast._ENGINES[lm].items():
            role_of[id(engine.cache)] = role
    compiled = {"target": [], "draft": []}
    for fn, kwargs in calls:
        [cache] = [arg for arg in fn.args if isinstance(arg, fast.SlotCache)]
        compiled[role_of[id(cache)]].append(kwargs)
    return compiled


def test_combo_kernels_take_the_place_of_the_mode():
    got = fast.with_combo_kernels(FAST_OPTIONS)
    assert got == {"fullgraph": False, "dynamic": False,
                   "options": {"triton.cudagraphs": True, "combo_kernels": True}}
    assert fast.with_combo_kernels({**FAST_OPTIONS, "mode": "default"}) == {
        "fullgraph": False, "dynamic": False, "options": {"combo_kernels": True}}
    assert fast.with_combo_kernels({"options": {"max_autotune": True}}) == {
        "options": {"max_autotune": True, "combo_kernels": True}}
    assert fast.with_combo_kernels({"backend": "eager", "mode": "x"}) == {"backend": "eager", "mode": "x"}
    torch.compile(lambda x: x, **got)  # accepted as it is; the mode beside the options is not:
    with pytest.raises(RuntimeError, match="mode or options"):
        torch.compile(lambda x: x, **FAST_OPTIONS, options={"combo_kernels": True})


@pytest.mark.parametrize("setting", ["1", "0", None])
@pytest.mark.parametrize("self_drafting", [False, True])
def test_only_the_drafts_steps_compile_with_combo_kernels(embedded, compiles, monkeypatch, setting, self_drafting):
    """A target's steps (AR's, the verifications, the KV moves) compile as they always did; a
    draft's take combo kernels where the setting asks (default: fast.DRAFT_COMBO), also where the
    target drafts for itself (its two roles are two engines)."""
    pair = sv.Pair(embedded.target, embedded.target, name="self") if self_drafting else embedded
    if setting is not None:
        monkeypatch.setenv("SPECVLM_DRAFT_COMBO", setting)
    wanted = fast.DRAFT_COMBO if setting is None else setting == "1"
    prompt = pair.target.prepare(sv.sample_video("bikes", 3))
    got = fast.generate_fast(pair, prompt, method="specvlm", ratio=0.5, tree=MC_SIM_7B_63, max_new_tokens=12,
                             compile=True)
    assert got.tokens == decoding.generate_ar(pair.target, prompt, 12).tokens
    compiled = roles_compiled(pair, compiles)
    assert compiled["target"] and compiled["draft"]
    assert all(kwargs == FAST_OPTIONS for kwargs in compiled["target"])
    wanted_draft = fast.with_combo_kernels(FAST_OPTIONS) if wanted else FAST_OPTIONS
    assert all(kwargs == wanted_draft for kwargs in compiled["draft"])
    models = fast.capture_report(pair)["models"]
    assert (models["target"]["combo_kernels"], models["draft"]["combo_kernels"]) == (False, wanted)
    assert combo_of(pair.draft) == wanted


def test_a_changed_setting_compiles_the_drafts_steps_anew(embedded, compiles, monkeypatch):
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    options = dict(method="sd", k=3, max_new_tokens=8, compile=True)
    monkeypatch.setenv("SPECVLM_DRAFT_COMBO", "0")
    first = fast.generate_fast(embedded, prompt, **options)
    engines = dict(fast._ENGINES[embedded.draft]), dict(fast._ENGINES[embedded.target])
    monkeypatch.setenv("SPECVLM_DRAFT_COMBO", "1")
    compiles.clear()
    assert fast.generate_fast(embedded, prompt, **options).tokens == first.tokens
    assert fast._ENGINES[embedded.draft]["draft"] is not engines[0]["draft"]
    assert fast._ENGINES[embedded.target]["target"] is engines[1]["target"]  # the target's graphs are kept
    compiled = roles_compiled(embedded, compiles)
    assert compiled["draft"] and not compiled["target"]
    assert all(kwargs["options"]["combo_kernels"] for kwargs in compiled["draft"])
    draft = fast._ENGINES[embedded.draft]["draft"]
    fast.generate_fast(embedded, prompt, **options)  # the same setting again: the same engine, its steps kept
    assert fast._ENGINES[embedded.draft]["draft"] is draft


def test_hand_captured_graphs_compile_the_drafts_steps_with_combo_kernels_too(embedded, compiles, monkeypatch):
    """Under manual CUDA graphs the steps compile in mode "default" (the graph is captured by hand):
    the draft's then take {"combo_kernels": True} as their only inductor option."""
    monkeypatch.setattr(fast, "cuda_graphs", lambda options, device: "manual" if options else None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(fast, "CapturedGraph", lambda fn, pool, neutral=None: fn)  # the capture itself needs CUDA
    monkeypatch.setenv("SPECVLM_DRAFT_COMBO", "1")
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    got = fast.generate_fast(embedded, prompt, method="specvlm", ratio=0.5, tree=MC_SIM_7B_63, max_new_tokens=8,
                             compile=True)
    assert got.tokens == decoding.generate_ar(embedded.target, prompt, 8).tokens
    compiled = roles_compiled(embedded, compiles)
    assert compiled["target"] and all(kwargs == {**FAST_OPTIONS, "mode": "default"} for kwargs in compiled["target"])
    assert compiled["draft"] and all(kwargs == {"fullgraph": False, "dynamic": False, "options": {"combo_kernels": True}}
                                     for kwargs in compiled["draft"])


def test_the_record_says_what_the_steps_were_compiled_with(embedded, compiles, monkeypatch):
    """Another backend than inductor takes no combo kernels, whatever the setting; inductor's process-wide
    flag (`bench --combo-kernels`) gives them to every compiled function, whatever the setting."""
    import torch._inductor.config as inductor_config

    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    monkeypatch.setenv("SPECVLM_DRAFT_COMBO", "1")
    fast.generate_fast(embedded, prompt, method="sd", k=3, max_new_tokens=6, compile={"backend": "eager"})
    assert all(kwargs == {"backend": "eager", "fullgraph": False, "dynamic": False} for _, kwargs in compiles)
    assert not combo_of(embedded.draft) and not fast.capture_report(embedded)["models"]["draft"]["combo_kernels"]
    monkeypatch.setenv("SPECVLM_DRAFT_COMBO", "0")
    monkeypatch.setattr(inductor_config, "combo_kernels", True)
    fast.generate_fast(embedded, prompt, method="sd", k=3, max_new_tokens=6, compile=True)
    models = fast.capture_report(embedded)["models"]
    assert combo_of(embedded.draft) and models["draft"]["combo_kernels"] and models["target"]["combo_kernels"]


def test_uncompiled_steps_take_no_combo_kernels(embedded, monkeypatch):
    monkeypatch.setenv("SPECVLM_DRAFT_COMBO", "1")
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    fast.generate_fast(embedded, prompt, method="sd", k=3, max_new_tokens=6, compile=False)
    engine = fast._ENGINES[embedded.draft]["draft"]
    assert engine.combo_kernels and not engine.compiled_with_combo
    assert not combo_of(embedded.draft)


@pytest.mark.parametrize("name", ["SPECVLM_DRAFT_COMBO", "SPECVLM_DRAFT_PDL"])
def test_a_bad_setting_is_refused_before_any_prefill(embedded, monkeypatch, name):
    calls = []
    monkeypatch.setattr(fast, "prefill_target", lambda *a, **k: calls.append(a))
    monkeypatch.setenv(name, "yes")
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    for method in ("specvlm", "ar"):  # checked for AR too, as every setting is
        with pytest.raises(ValueError, match=f"{name} must be '0' or '1', got 'yes'"):
            fast.generate_fast(embedded, prompt, method=method, compile=False)
    assert not calls


@pytest.mark.parametrize("name, field", [("SPECVLM_DRAFT_COMBO", "draft_combo_kernels"),
                                         ("SPECVLM_DRAFT_PDL", "draft_pdl")])
def test_bench_rows_record_the_setting_and_what_it_did(embedded, monkeypatch, name, field):
    monkeypatch.setenv(name, "1")
    video_for = lambda frames: sv.from_array(sv.synthetic.make_clip(0, num_frames=frames).frames, fps=8.0)
    result = bench(embedded, video_for, [1], max_new_tokens=6, repeats=1, step_repeats=1, paths=("plain", "fast"),
                   only=["specvlm-tree-0.5"])
    recorded = {(r["path"], r["method"]): r[field] for r in result["rows"]}
    # the CPU's steps are not compiled: asked for, not taken
    assert recorded == {("plain", "ar"): None, ("plain", "specvlm"): None, ("fast", "ar"): None,
                        ("fast", "specvlm"): False}
    assert all(r["equal_to_ar"] for r in result["rows"])
    assert f"{name}=1 " in recorded_environment()
