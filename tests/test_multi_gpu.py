"""A model too large for one card, spread over several GPUs with a device_map.

This machine has no GPU: these tests check the placement arithmetic (on models on the meta
device) and the per-layer plumbing that a spread model needs (caches with one device per layer,
the fast path's refusals); `python -m specvlm costs --devices cuda:0 cuda:1` runs the real thing
on two GPUs."""

import functools
import types
from collections import Counter

import pytest
import torch
from transformers import DynamicCache, Qwen2ForCausalLM

import specvlm as sv
from specvlm import costs, fast

GB = 10**9
TWO_CARDS = ["cuda:0", "cuda:1"]


def meta_model(shape: str):
    with torch.device("meta"):
        return Qwen2ForCausalLM(costs.lm_config(shape)).to(torch.bfloat16)


def test_the_72b_shape_is_spread_evenly_and_in_order_over_two_cards():
    model = meta_model("llava-ov-72b")
    device_map = costs.balanced_map(model, TWO_CARDS, memory=80 * GB)
    first, second = torch.device("cuda", 0), torch.device("cuda", 1)
    layers = [device_map[f"model.layers.{i}"] for i in range(model.config.num_hidden_layers)]
    assert layers == sorted(layers, key=lambda d: d.index)  # contiguous: the hidden state crosses once
    per_card = Counter(layers)
    assert set(per_card) == {first, second} and abs(per_card[first] - per_card[second]) <= 4
    assert device_map["model.embed_tokens"] == first and device_map["lm_head"] == second
    # what each card holds fits it, with room left for the caches
    bytes_on = Counter()
    for name, p in model.named_parameters():
        owner = max((key for key in device_map if name.startswith(key + ".")), key=len)
        bytes_on[device_map[owner]] += p.numel() * 2
    assert all(held < 80 * GB for held in bytes_on.values())
    assert sum(bytes_on.values()) == costs.num_params(model.config) * 2


def test_a_model_is_spread_only_over_distinct_gpus():
    model = meta_model("tiny")
    with pytest.raises(ValueError, match="distinct GPUs"):
        costs.balanced_map(model, ["cpu", "cpu"], memory=GB)
    with pytest.raises(ValueError, match="distinct GPUs"):
        costs.balanced_map(model, ["cuda:0", "cuda:0"], memory=GB)


@pytest.mark.parametrize("shape, spread", [("llava-ov-72b", True), ("qwen2.5-vl-72b", True),
                                           ("llava-ov-7b", False), ("qwen2.5-vl-3b", False)])
def test_a_shape_stays_on_one_card_unless_it_cannot_fit(shape, spread):
    config = costs.lm_config(shape)
    where = costs.placement(config, torch.bfloat16, TWO_CARDS, max_context=16384, memory=80 * GB)
    assert where == ([torch.device(d) for d in TWO_CARDS] if spread else [torch.device("cuda:0")])
    assert costs.placement(config, torch.bfloat16, ["cpu"], 16384) == [torch.device("cpu")]


def test_a_long_context_can_push_a_shape_onto_two_cards():
    config = costs.lm_config("qwen2.5-vl-32b")  # 65 GB of weights: two 16k caches (17 GB) do not fit beside them
    assert len(costs.placement(config, torch.bfloat16, TWO_CARDS, 1024, memory=80 * GB)) == 1
    assert len(costs.placement(config, torch.bfloat16, TWO_CARDS, 16384, memory=80 * GB)) == 2


def test_random_weights_and_caches_do_not_depend_on_the_device_list():
    config = costs.lm_config("tiny")
    one = costs.random_kv(config, 8, "cpu", torch.float32, seed=3)
    per_layer = costs.random_kv(config, 8, ["cpu"] * config.num_hidden_layers, torch.float32, seed=3)
    assert all(torch.equal(a, b) for pair_a, pair_b in zip(one, per_layer) for a, b in zip(pair_a, pair_b))
    assert not torch.equal(one[0][0], one[1][0])  # each layer has its own numbers
    a, b = (costs.build_lm("tiny", "cpu", torch.float32, seed=2) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert costs.layer_devices(a) == [torch.device("cpu")] * config.num_hidden_layers


def test_a_slot_cache_keeps_each_layer_on_its_own_device():
    # "meta" stands in for a second card: tensors there have shapes and devices but no values
    cpu, meta = torch.device("cpu"), torch.device("meta")
    prefilled = DynamicCache()
    for layer, where in enumerate((cpu, meta, cpu)):
        prefilled.update(torch.ones(1, 2, 4, 8, device=where), torch.ones(1, 2, 4, 8, device=where), layer)
    cache = fast.SlotCache.like(prefilled, 16)
    assert [k.device for k in cache.keys] == [v.device for v in cache.values] == [cpu, meta, cpu]
    assert cache.position.device == cpu
    cache.position.fill_(5)
    new = torch.randn(1, 2, 2, 8)
    written, _ = cache.update(new, new + 1, layer_idx=2)
    assert torch.equal(written[:, :, 5:7], new)
    written, _ = cache.update(new.to(meta), new.to(meta), layer_idx=1)
    assert written.device == meta and written.shape == (1, 2, 16, 8)
    cache.move(torch.tensor([5, 6]), torch.tensor([0, 1]))  # index tensors on the first device, every layer moved
    assert torch.equal(cache.keys[2][:, :, :2], new)
    with pytest.raises(ValueError, match="one device per layer"):
        fast.SlotCache([(2, 4, 4)] * 3, 16, torch.float32, ["cpu", "cpu"])


def spread_lm():
    """A stand-in for a VideoLM whose layers sit on two devices (no second device here)."""
    with torch.device("meta"):
        second = torch.nn.Linear(2, 2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), second)
    return types.SimpleNamespace(model=model, layer_devices=[torch.device("cpu"), torch.device("meta")],
                                 device=torch.device("cpu"))


def test_a_spread_target_decodes_with_uncompiled_steps_and_the_same_tokens(monkeypatch):
    pair = sv.load_pair("tiny")
    video = sv.video.from_array(sv.synthetic.make_clip(2, num_frames=8).frames, fps=8.0)
    prompt = pair.target.prepare(video, sv.models.DEFAULT_QUESTION)
    reference = fast.generate_fast(pair, prompt, "specvlm", tree=sv.trees.MC_SIM_7B_63, max_new_tokens=12,
                                   compile=False).tokens
    monkeypatch.setattr(fast, "spread_over_devices", lambda lm: lm is pair.target)
    # compile=True would compile every step with inductor; a spread target's steps must not be compiled
    result = fast.generate_fast(pair, prompt, "specvlm", tree=sv.trees.MC_SIM_7B_63, max_new_tokens=12,
                                compile={"backend": "eager"})
    assert result.tokens == reference
    report = fast.capture_report(pair)["models"]
    assert report["target"]["spread"] and not report["target"]["compiled_move"]
    assert not report["draft"]["spread"]
    target_steps = fast._ENGINES[pair.target]["target"].steps.values()
    draft_steps = fast._ENGINES[pair.draft]["draft"].steps.values()
    assert target_steps and all(isinstance(step, functools.partial) for step in target_steps)  # as they are
    assert draft_steps and not any(isinstance(step, functools.partial) for step in draft_steps)  # compiled
    with pytest.raises(ValueError, match="spread over"):
        fast.generate_fast(pair, prompt, "specvlm", max_new_tokens=4, attention="flex")


def test_load_pair_loads_the_draft_before_a_spread_target(monkeypatch):
    calls = []
    monkeypatch.setattr(sv.models, "load_lm", lambda name, device=None, dtype=None, device_map=None:
                        calls.append((name, device_map)) or object())
    monkeypatch.setattr(sv.models, "check_compatible", lambda target, draft: None)
    monkeypatch.setattr(sv.models, "check_is_model", lambda lm, role: None)
    sv.models.load_pair("big-target", "small-draft", target_device_map="auto")
    assert calls == [("small-draft", None), ("big-target", "auto")]


def test_the_fast_path_runs_a_spread_model_uncompiled_and_without_flex():
    lm = spread_lm()
    assert fast.spread_over_devices(lm)
    assert not fast.spread_over_devices(types.SimpleNamespace(model=torch.nn.Linear(2, 2)))
    assert fast.graphs_for(lm, {"mode": "reduce-overhead"}) is None
    with pytest.raises(ValueError, match="spread over"):
        fast.StaticLM(lm, {"mode": "reduce-overhead"}, attention="flex")
    engine = fast.StaticLM(lm, {"mode": "reduce-overhead"}, attention="sdpa")
    step = lambda inputs: inputs  # noqa: E731
    assert engine._compiled(step) is step and not engine._graph_trees


def test_load_lm_passes_a_device_map_to_from_pretrained(tmp_path, monkeypatch):
    target_dir, _ = sv.make_tiny_pair(tmp_path)
    auto = sv.models.AutoModelForImageTextToText
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return auto.from_pretrained(*args, **kwargs)

    monkeypatch.setattr(sv.models, "AutoModelForImageTextToText", types.SimpleNamespace(from_pretrained=recording))
    placed = sv.load_lm(target_dir, dtype=torch.float32, device_map={"": "cpu"})
    sv.load_lm(target_dir, "cpu", torch.float32)
    assert seen == [{"": "cpu"}, None]
    assert placed.layer_devices == [torch.device("cpu")] * len(placed.language_model.layers)
