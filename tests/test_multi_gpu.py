"""A model too large for one card, spread over several GPUs with a device_map.

This machine has no GPU: these tests check the placement arithmetic (on models on the meta
device) and the per-layer plumbing that a spread model needs (caches with one device per layer,
the fast path's refusals); `python -m specvlm costs --devices cuda:0 cuda:1` runs the real thing
on two GPUs."""

import types
from collections import Counter

import pytest
import torch
from transformers import Qwen2ForCausalLM

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
    shapes = [(2, 4, 4)] * 3
    cache = fast.SlotCache(shapes, 16, torch.float32, [torch.device("cpu")] * 3)
    keys = torch.randn(1, 2, 2, 4)
    cache.position.fill_(5)
    written, _ = cache.update(keys, keys + 1, layer_idx=2)
    assert torch.equal(written[:, :, 5:7], keys)
    with pytest.raises(ValueError, match="one device per layer"):
        fast.SlotCache(shapes, 16, torch.float32, ["cpu", "cpu"])


def spread_lm():
    """A stand-in for a VideoLM whose layers sit on two devices (no second device here)."""
    return types.SimpleNamespace(layer_devices=[torch.device("cpu"), torch.device("meta")], device=torch.device("cpu"))


def test_the_fast_path_runs_a_spread_model_uncompiled_and_without_flex():
    lm = spread_lm()
    assert fast.spread_over_devices(lm)
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
