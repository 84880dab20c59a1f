"""Fused projections (`fusion.py`): the same model, one matmul per group; a fused draft keeps
every decoding path lossless; the fast path fuses only a draft that is not also the target."""

import copy

import pytest
import torch

import specvlm as sv
from specvlm import costs, decoding, fast, fusion, profile, widen
from specvlm.trees import MC_SIM_7B_63, chain

from .conftest import random_video


@pytest.fixture(scope="module")
def embedded():
    return sv.load_pair("tiny", device="cpu")


@pytest.fixture(scope="module")
def fused_embedded(embedded):
    """A copy of the embedded pair whose draft is fused (the original pair stays as it was)."""
    pair = sv.models.Pair(embedded.target, copy.deepcopy(embedded.draft), name="embedded, fused draft")
    assert fusion.fuse_projections(pair.draft) == 2 * len(pair.draft.language_model.layers)
    return pair


def prompt_logits(lm, prompt):
    return widen.prompt_logits(lm, prompt)


def test_fusing_keeps_the_weights_and_the_logits(embedded, fused_embedded):
    before, after = embedded.draft.model.state_dict(), fused_embedded.draft.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    for clip, frames in [("bikes", 2), ("bigbuckbunny", 4)]:
        prompt = embedded.target.prepare(sv.sample_video(clip, frames))
        plain, fused = prompt_logits(embedded.draft, prompt), prompt_logits(fused_embedded.draft, prompt)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
        assert plain.abs().max() > 1  # not a vacuous comparison


def test_one_stacked_tensor_per_group_and_no_second_copy(fused_embedded):
    layer = fused_embedded.draft.language_model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    for module, names in ((attention, fusion.GROUPS["self_attn"]), (mlp, fusion.GROUPS["mlp"])):
        rows = sum(getattr(module, name).out_features for name in names)
        assert module.fused_weight.shape == (rows, getattr(module, names[0]).in_features)
        for name in names:  # each projection's weight is a view of the stacked one
            assert getattr(module, name).weight.untyped_storage().data_ptr() == module.fused_weight.untyped_storage().data_ptr()
    assert attention.fused_bias is not None and mlp.fused_bias is None  # Qwen2: biases on q/k/v only
    assert "fused_weight" not in "".join(fused_embedded.draft.model.state_dict())
    assert fusion.fuse_projections(fused_embedded.draft) == 0 and fusion.is_fused(fused_embedded.draft)
    assert not fusion.is_fused(fused_embedded.target)


def test_the_vision_tower_is_left_alone(fused_embedded):
    language = set(map(id, fused_embedded.draft.language_model.modules()))
    outside = [name for name, module in fused_embedded.draft.model.named_modules()
               if isinstance(module, fusion.FusedColumns) and id(module) not in language]
    assert outside == []


def test_a_fused_model_saves_and_reloads_unfused(fused_embedded, embedded, tmp_path):
    fused_embedded.draft.model.save_pretrained(tmp_path)
    reloaded = type(embedded.draft.model).from_pretrained(tmp_path)
    assert not any(isinstance(m, fusion.FusedColumns) for m in reloaded.modules())
    saved, original = reloaded.state_dict(), embedded.draft.model.state_dict()
    assert all(torch.equal(saved[name], original[name]) for name in original)


def test_projections_that_cannot_be_stacked_are_left_alone():
    module = torch.nn.Module()
    module.q_proj, module.k_proj, module.v_proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2), torch.nn.Linear(3, 2)
    assert not fusion.fuse_module(module, fusion.GROUPS["self_attn"])  # two input sizes
    module.v_proj = torch.nn.Linear(4, 2, bias=False)
    assert not fusion.fuse_module(module, fusion.GROUPS["self_attn"])  # biases on some only
    module.v_proj = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    expected = [module.q_proj(x), module.k_proj(x), module.v_proj(x)]
    assert fusion.fuse_module(module, fusion.GROUPS["self_attn"])
    stacked = torch.nn.functional.linear(x, module.fused_weight, module.fused_bias)
    got = [module.q_proj(stacked), module.k_proj(stacked), module.v_proj(stacked)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("clip,frames", [("bikes", 2), ("bigbuckbunny", 4), ("bikes", 6)])
@pytest.mark.parametrize("method,ratio,tree,seed", [
    ("sd", 0.0, None, 0), ("specvlm", 0.9, None, 0), ("random", 0.5, None, 1),
    ("specvlm", 0.5, MC_SIM_7B_63, 0), ("uniform", 0.9, MC_SIM_7B_63, 0), ("top", 0.75, chain(4), 0),
])
def test_a_fused_draft_is_lossless(embedded, fused_embedded, clip, frames, method, ratio, tree, seed):
    """The target's own greedy tokens (AR with the original pair) on the plain and the fast path
    with a fused draft; the fast path's accepted counts equal the plain path's with the same draft."""
    prompt = embedded.target.prepare(sv.sample_video(clip, frames))
    reference = decoding.generate_ar(embedded.target, prompt, 20).tokens
    options = dict(method=method, ratio=ratio, seed=seed, max_new_tokens=20, **({"tree": tree} if tree else {"k": 4}))
    plain = decoding.generate_sd(fused_embedded, prompt, **options)
    result = fast.generate_fast(fused_embedded, prompt, compile=False, **options)
    assert plain.tokens == result.tokens == reference
    assert result.accepted == plain.accepted


def test_the_fast_path_fuses_a_draft_only_when_asked_and_never_a_target(embedded, monkeypatch):
    draft = copy.deepcopy(embedded.draft)
    pair = sv.models.Pair(embedded.target, draft, name="embedded copy")
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    reference = decoding.generate_ar(embedded.target, prompt, 16).tokens
    monkeypatch.delenv("SPECVLM_FUSE_DRAFT", raising=False)
    assert not fast.fuse_draft(None, draft)  # default: only where the steps replay as CUDA graphs
    fast.generate_fast(pair, prompt, max_new_tokens=16, compile=False)
    assert not fusion.is_fused(draft)
    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "1")
    assert fast.generate_fast(pair, prompt, max_new_tokens=16, compile=False).tokens == reference
    assert fusion.is_fused(draft) and not fusion.is_fused(embedded.target)
    assert fast.capture_report(pair)["models"]["draft"]["fused_projections"]
    assert not fast.capture_report(pair)["models"]["target"]["fused_projections"]
    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "0")  # in the same process: the draft is transformers' own again
    assert fast.generate_fast(pair, prompt, max_new_tokens=16, compile=False).tokens == reference
    assert not fusion.is_fused(draft) and not fast.capture_report(pair)["models"]["draft"]["fused_projections"]
    # self-speculation: the model is the target too, so it stays as it is
    target = copy.deepcopy(embedded.target)
    itself = sv.models.Pair(target, target, name="drafting for itself")
    assert fast.generate_fast(itself, prompt, max_new_tokens=16, compile=False).tokens == reference
    assert not fusion.is_fused(target)
    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "yes")
    with pytest.raises(ValueError, match="SPECVLM_FUSE_DRAFT must be '0' or '1'"):
        fast.fuse_draft(None, draft)


def test_fused_steps_trace_in_one_graph(noisy_pair, monkeypatch):
    from torch._dynamo.utils import counters

    pair = sv.models.Pair(noisy_pair.target, copy.deepcopy(noisy_pair.draft), name="noisy, fused draft")
    fusion.fuse_projections(pair.draft)
    torch._dynamo.reset()
    counters.clear()
    prompt = pair.target.prepare(random_video(4, 1))
    reference = decoding.generate_sd(pair, prompt, method="specvlm", ratio=0.5, k=3, max_new_tokens=12)
    result = fast.generate_fast(pair, prompt, method="specvlm", ratio=0.5, k=3, max_new_tokens=12,
                                compile={"backend": "eager"})
    assert result.tokens == reference.tokens and result.accepted == reference.accepted
    assert sum(counters["graph_break"].values()) == 0


def test_qwen_language_model_fuses_too(tmp_path):
    target_path, draft_path = sv.make_tiny_pair(tmp_path, seed=0, family="qwen2_5_vl")
    pair = sv.load_pair(str(target_path), str(draft_path), device="cpu")
    prompt = pair.target.prepare(random_video(1, 4, size=64))
    plain = prompt_logits(pair.draft, prompt)
    reference = decoding.generate_ar(pair.target, prompt, 12).tokens
    assert fusion.fuse_projections(pair.draft) == 2 * len(pair.draft.language_model.layers)
    torch.testing.assert_close(prompt_logits(pair.draft, prompt), plain, rtol=1e-5, atol=1e-5)
    for options in ({"k": 3}, {"tree": MC_SIM_7B_63}):
        result = fast.generate_fast(pair, prompt, method="specvlm", ratio=0.5, max_new_tokens=12, compile=False,
                                    **options)
        assert result.tokens == reference


def test_a_fused_profile_runs_fewer_matmuls():
    rows = {fuse: profile.profile_shapes(["tiny"], [32], kinds=["step"], device="cpu", repeats=2, fuse=fuse)["rows"][0]
            for fuse in (False, True)}
    layers = costs.lm_config("tiny").num_hidden_layers
    matmuls = {fuse: row["categories"]["matmul"]["kernels_per_step"] for fuse, row in rows.items()}
    assert rows[True]["fused"] and not rows[False]["fused"]
    # q, k, v -> 1 and gate, up -> 1 (on a CPU the profiler also counts aten::linear around some of them)
    assert matmuls[False] - matmuls[True] >= 3 * layers


def test_a_results_command_records_the_fast_path_environment(monkeypatch):
    from specvlm.__main__ import FAST_PATH_ENVIRONMENT, recorded_environment

    for name in FAST_PATH_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    assert recorded_environment() == ""
    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "0")
    monkeypatch.setenv("SPECVLM_FAST_ATTENTION", "flex/grouped")
    assert recorded_environment() == "SPECVLM_FAST_ATTENTION=flex/grouped SPECVLM_FUSE_DRAFT=0 "


def test_a_draft_that_becomes_a_target_is_unfused_first(embedded, monkeypatch):
    """Fused while drafting, then the target of AR and of self-speculation: it computes exactly
    what an untouched copy computes, and stays unfused when it drafts again."""
    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "1")
    draft, untouched = copy.deepcopy(embedded.draft), copy.deepcopy(embedded.draft)
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    fast.generate_fast(sv.models.Pair(embedded.target, draft), prompt, max_new_tokens=8, compile=False)
    assert fusion.is_fused(draft)
    itself = sv.models.Pair(draft, draft, name="the draft as a target")
    reference = decoding.generate_ar(untouched, prompt, 12).tokens
    assert fast.generate_fast(itself, prompt, method="ar", max_new_tokens=12, compile=False).tokens == reference
    assert not fusion.is_fused(draft)
    assert torch.equal(prompt_logits(draft, prompt), prompt_logits(untouched, prompt))
    assert fast.generate_fast(itself, prompt, max_new_tokens=12, compile=False).tokens == reference
    fast.generate_fast(sv.models.Pair(embedded.target, draft), prompt, max_new_tokens=8, compile=False)
    assert not fusion.is_fused(draft)  # it has served as a target: never fused again


def test_every_prefill_sees_its_models_final_form(embedded, monkeypatch):
    """The draft is fused before its prefill; a fused draft turned target is unfused before its
    prefill (AR and speculative paths), so prefill and steps compute the same model."""
    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "1")
    draft = copy.deepcopy(embedded.draft)
    seen = []
    for name in ("prefill_pruned", "prefill_target"):
        original = getattr(fast, name)
        monkeypatch.setattr(fast, name, lambda lm, *args, _original=original, _name=name, **kwargs:
                            seen.append((_name, lm is draft, fusion.is_fused(lm))) or _original(lm, *args, **kwargs))
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    fast.generate_fast(sv.models.Pair(embedded.target, draft), prompt, max_new_tokens=8, compile=False)
    assert seen == [("prefill_target", False, False), ("prefill_pruned", True, True)]
    seen.clear()
    fast.generate_fast(sv.models.Pair(draft, draft), prompt, method="ar", max_new_tokens=8, compile=False)
    assert seen == [("prefill_pruned", True, False)]
    fusion.fuse_projections(draft)  # fused again by hand: the speculative path unfuses it before its prefill too
    seen.clear()
    fast.generate_fast(sv.models.Pair(draft, draft), prompt, max_new_tokens=8, compile=False)
    assert seen == [("prefill_target", True, False), ("prefill_pruned", True, False)]


def test_engines_are_kept_while_the_weights_stay_and_rebuilt_when_they_move(embedded, monkeypatch):
    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "1")
    draft = copy.deepcopy(embedded.draft)
    engine = fast.static_lm(draft, "draft", None)
    assert fusion.is_fused(draft) and fast.static_lm(draft, "draft", None) is engine
    count = fusion.changes(draft)
    fusion.unfuse_projections(draft)
    assert fusion.changes(draft) == count + 1
    rebuilt = fast.static_lm(draft, "draft", None)  # fuses again: new storage, new engine
    assert rebuilt is not engine and fusion.changes(draft) == count + 2 and fast.static_lm(draft, "draft", None) is rebuilt


def test_unfusing_restores_transformers_modules_exactly(embedded):
    draft = copy.deepcopy(embedded.draft)
    prompt = embedded.target.prepare(sv.sample_video("bigbuckbunny", 4))
    fusion.fuse_projections(draft)
    assert fusion.unfuse_projections(draft) == 2 * len(draft.language_model.layers)
    assert fusion.unfuse_projections(draft) == 0 and not fusion.is_fused(draft)
    attention = draft.language_model.layers[0].self_attn
    assert type(attention.q_proj) is torch.nn.Linear and not hasattr(attention, "fused_weight")
    assert len(attention._forward_pre_hooks) == 0
    assert torch.equal(prompt_logits(draft, prompt), prompt_logits(embedded.draft, prompt))


def test_a_copied_or_moved_fused_model_is_tied_again(fused_embedded):
    copied = copy.deepcopy(fused_embedded.draft)
    attention = copied.language_model.layers[0].self_attn
    assert not fusion._is_view_of(attention.q_proj, attention)  # deepcopy gave each tensor its own storage
    assert fusion.fuse_projections(copied) == 2 * len(copied.language_model.layers)
    assert fusion._is_view_of(attention.q_proj, attention) and len(attention._forward_pre_hooks) == 1
    with torch.no_grad():  # a change through the projection's weight is the stacked weight's change
        attention.k_proj.weight[0, 0] += 1.0
    assert attention.fused_weight[attention.k_proj.columns.start, 0] == attention.k_proj.weight[0, 0]


def test_a_fused_model_refuses_training_and_direct_projection_calls(fused_embedded):
    draft = copy.deepcopy(fused_embedded.draft)
    fusion.fuse_projections(draft)
    attention = draft.language_model.layers[0].self_attn
    hidden = torch.randn(1, 3, attention.q_proj.in_features)
    with pytest.raises(ValueError, match="this projection is fused"):
        attention.q_proj(hidden)
    mlp = draft.language_model.layers[0].mlp
    assert mlp(hidden).shape == hidden.shape  # in eval mode: fine
    mlp.train()
    with pytest.raises(RuntimeError, match="fused projections are for inference"):
        mlp(hidden)
    with torch.no_grad():
        assert mlp(hidden).shape == hidden.shape  # training mode without gradients: fine


def test_bench_records_which_rows_ran_a_fused_draft(embedded, monkeypatch):
    from specvlm.bench import bench

    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "1")
    pair = sv.models.Pair(embedded.target, copy.deepcopy(embedded.draft), name="embedded copy (stand-in)")
    result = bench(pair, lambda frames: sv.sample_video("bikes", frames), [2], max_new_tokens=8, repeats=1,
                   paths=("fast", "plain"), step_repeats=1, transformers_baselines=True,
                   only=["sd-chain-0", "specvlm-tree-0.9", "hf-assisted"])
    fused = [(r["path"], r["method"], r["draft"], r["draft_fused"]) for r in result["rows"]]
    # the plain path runs first (its AR is the reference); the fast path fuses, assisted generation unfuses
    assert fused == [("plain", "ar", None, None), ("plain", "sd", "chain", False), ("plain", "specvlm", "tree", False),
                     ("fast", "ar", None, None), ("fast", "sd", "chain", True), ("fast", "specvlm", "tree", True),
                     ("transformers", "hf-assisted", "assistant", False)]
    assert not sv.fusion.is_fused(pair.draft)
    assert all(r["equal_to_ar"] for r in result["rows"])
