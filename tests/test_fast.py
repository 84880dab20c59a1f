"""The fast path (static caches, fixed-shape steps): the plain path's tokens and accepted
counts, exactly; and the cache logic on its own."""

import copy
import functools
import os
import weakref

import pytest
import torch

import specvlm as sv
from specvlm import decoding, fast, step_attention, synthetic
from specvlm.fast import DraftLevels, SlotCache, path_moves, visibility_bias
from specvlm.trees import MC_SIM_7B_63, Tree, chain, tree_attention_bias

from .conftest import random_video

SMALL_TREE = Tree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
FLAT_TREE = Tree.from_paths([[0], [1], [2]])  # depth 1: no draft level is fed


def assert_same(pair, prompt, max_new_tokens=20, **options):
    """generate_fast == decoding's loop: tokens, accepted counts, cache lengths, laps."""
    plain = {key: value for key, value in options.items() if key != "attention"}
    if options.get("method") == "ar":
        reference = decoding.generate_ar(pair.target, prompt, max_new_tokens)
    else:
        reference = decoding.generate_sd(pair, prompt, max_new_tokens=max_new_tokens, **plain)
    result = fast.generate_fast(pair, prompt, max_new_tokens=max_new_tokens, compile=False, **options)
    label = (pair.name, options)
    assert result.tokens == reference.tokens, label
    assert result.accepted == reference.accepted, label
    assert (result.target_cache_len, result.draft_cache_len) == (reference.target_cache_len, reference.draft_cache_len)
    assert result.draft_video_tokens == reference.draft_video_tokens
    assert result.timings.keys() == reference.timings.keys()
    return result


# --- the cache on its own ----------------------------------------------------------------


def small_cache(capacity=8):
    return SlotCache([(2, 4, 4), (2, 4, 4)], capacity, torch.float32, "cpu")


def write(cache, position, values):
    """One forward's worth of writes: every layer gets entries `values` (one float each)."""
    cache.position.fill_(position)
    entries = torch.tensor(values, dtype=torch.float32)[None, None, :, None].expand(1, 2, len(values), 4)
    for layer in range(len(cache.keys)):
        cache.update(entries, -entries, layer)
    cache.length = position + len(values)


def slots(cache, layer=0):
    return cache.keys[layer][0, 0, :, 0].tolist()


def test_a_rejection_only_moves_the_write_position():
    cache = small_cache()
    addresses = [t.data_ptr() for t in cache.keys + cache.values]
    write(cache, 0, [1, 2, 3])
    write(cache, 3, [4, 5, 6, 7])  # a verification of 4 tokens
    cache.length = 4  # 1 accepted: slots 4..6 are stale now
    assert cache.get_seq_length() == 4 and slots(cache)[:7] == [1, 2, 3, 4, 5, 6, 7]
    write(cache, cache.length, [8, 9])  # the next step overwrites them
    assert slots(cache) == [1, 2, 3, 4, 8, 9, 7, 0] and slots(cache, 1) == slots(cache)
    assert cache.values[1][0, 1, :6, 2].tolist() == [-1, -2, -3, -4, -8, -9]
    assert [t.data_ptr() for t in cache.keys + cache.values] == addresses


def test_an_accepted_tree_path_moves_to_consecutive_slots():
    cache = small_cache(10)
    write(cache, 0, [1, 2])
    write(cache, 2, [10, 11, 12, 13, 14, 15])  # root + 5 nodes; nodes 2 and 5 are accepted
    source, dest = path_moves(2, [2, 5], depth=3)
    assert (source, dest) == ([4, 7, 5], [3, 4, 5])
    cache.move(torch.tensor(source), torch.tensor(dest))
    assert slots(cache)[:6] == [1, 2, 10, 12, 15, 13]  # slot 5 copied onto itself: the padding
    assert slots(cache, 1)[:6] == slots(cache)[:6] and cache.values[0][0, 0, :5, 0].tolist() == [-1, -2, -10, -12, -15]


def test_the_compiled_move_equals_the_eager_one_for_overlapping_slots():
    """`StaticLM.move` compiles `move_slots` (inductor here, as on a GPU without the CUDA graph):
    every source must be read before any destination is written, as in `SlotCache.move`."""
    eager, compiled = small_cache(16), small_cache(16)
    for cache in (eager, compiled):
        for buffer in (*cache.keys, *cache.values):
            buffer.copy_(torch.arange(16.0)[None, None, :, None].expand_as(buffer))
    move = torch.compile(functools.partial(fast.move_slots, compiled), fullgraph=True, dynamic=False)
    for start, accepted in ((2, [2, 7]), (5, [1, 3, 4]), (0, [6])):
        source, dest = path_moves(start, accepted, 4)
        eager.move(torch.tensor(source), torch.tensor(dest))
        move(torch.tensor([source, dest]))
        assert all(torch.equal(a, b) for a, b in zip((*eager.keys, *eager.values), (*compiled.keys, *compiled.values)))
    assert slots(eager) != list(range(16))


def test_path_moves_example():
    assert path_moves(10, [2, 7], 4) == ([12, 17, 13, 14], [11, 12, 13, 14])
    assert path_moves(0, [], 2) == ([1, 2], [1, 2])


def test_loading_a_prefill_and_overflow(tiny_pair):
    lm = tiny_pair.target
    prompt = lm.prepare(random_video(0, 1))
    _, dynamic = decoding.prefill_pruned(lm, prompt, None)
    n = dynamic.get_seq_length()
    cache = SlotCache.like(dynamic, n + 4)
    cache.load(dynamic)
    assert cache.length == n and cache.fits(dynamic)
    torch.testing.assert_close(cache.keys[1][:, :, :n], dynamic.layers[1].keys, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        SlotCache.like(dynamic, n - 1).load(dynamic)
    engine = fast.StaticLM(lm, None)
    engine.load(dynamic, n + 2)
    with pytest.raises(RuntimeError, match="static cache overflow"):
        engine.extend([1], prompt.next_position, width=engine.cache.capacity - n + 1)


def test_last_graph_is_the_graph_of_the_step_run_last(tiny_pair):
    lm = tiny_pair.target
    prompt = lm.prepare(random_video(0, 1))
    _, dynamic = decoding.prefill_pruned(lm, prompt, None)
    engine = fast.StaticLM(lm, None)
    engine.load(dynamic, dynamic.get_seq_length() + 8)
    assert engine.last_graph is None
    engine.extend([1], prompt.next_position, 1)
    assert engine.last_graph is None  # on a CPU nothing is captured

    class Captured:  # stands for `fast.CapturedGraph`: a step function with its graph
        def __init__(self, fn, graph):
            self.fn, self.graph = fn, graph

        def __call__(self, *args):
            return self.fn(*args)

    plain = engine._step_fn
    graphs = {1: "graph of one row", 2: "graph of two rows"}
    engine._step_fn = lambda shape: Captured(plain(shape), graphs[shape[0]])
    engine.extend([1, 2], prompt.next_position + 1, 2)
    assert engine.last_graph == "graph of two rows"
    engine.extend([3], prompt.next_position + 3, 1)
    assert engine.last_graph == "graph of one row"


# --- masks ---------------------------------------------------------------------------------


def test_visibility_bias_example():
    bias = visibility_bias(torch.tensor(2), torch.tensor([[1, 0], [1, 1]], dtype=torch.bool), 5, torch.float32)
    seen = (bias[0, 0] == 0).int().tolist()
    assert bias.shape == (1, 1, 2, 5) and seen == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert bias.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("tree", [MC_SIM_7B_63, SMALL_TREE, chain(4)], ids=["mc_sim_7b_63", "small", "chain4"])
def test_tree_mask_equals_the_plain_paths(tree):
    prefix, capacity = 7, 64
    expected = tree_attention_bias(tree, prefix, cache_len=capacity)
    assert torch.equal(visibility_bias(torch.tensor(prefix), tree.mask, capacity, torch.float32), expected)


def test_draft_levels_example():
    levels = DraftLevels.of(Tree.from_paths([[0], [1], [0, 0], [0, 0, 0]]))
    assert levels.nodes == ((1,), (3,)) and levels.offsets == (0, 1) and levels.width == 1
    assert levels.patterns.int().tolist() == [[[1, 0]], [[1, 1]]]
    assert levels.picks == (((0, 1, 0), (0, 2, 1)), ((0, 3, 0),), ((0, 4, 0),)) and levels.top == (2, 1, 1)


@pytest.mark.parametrize("tree", [MC_SIM_7B_63, SMALL_TREE, FLAT_TREE], ids=["mc_sim_7b_63", "small", "flat"])
def test_draft_levels_pick_every_node_once_from_its_parents_row(tree):
    levels = DraftLevels.of(tree)
    assert len(levels.picks) == tree.depth
    picked = [node for level in levels.picks for _, node, _ in level]
    assert sorted(picked) == list(range(1, tree.num_nodes))
    for depth, level in enumerate(levels.picks, start=1):
        fed = (0,) if depth == 1 else levels.nodes[depth - 2]
        for row, node, rank in level:
            assert tree.depths[node] == depth and fed[row] == tree.parents[node] and tree.ranks[node] == rank
        assert levels.top[depth - 1] == max(rank for _, _, rank in level) + 1


@pytest.mark.parametrize("tree", [MC_SIM_7B_63, SMALL_TREE], ids=["mc_sim_7b_63", "small"])
def test_draft_levels_see_exactly_their_ancestors(tree):
    """Level patterns, read through the slots the fed nodes occupy, are the tree mask."""
    levels = DraftLevels.of(tree)
    fed = [node for level in levels.nodes for node in level]  # fed nodes in slot order
    assert levels.width == max(len(level) for level in levels.nodes)
    for i, level in enumerate(levels.nodes):
        for row, node in enumerate(level):
            assert levels.offsets[i] + row == fed.index(node)
            seen = levels.patterns[i, row, :len(fed)]
            assert torch.equal(seen, tree.mask[node, fed])
        for row in range(len(level), levels.width):  # padding rows see only themselves
            assert levels.patterns[i, row].nonzero().flatten().tolist() == [levels.offsets[i] + row]


def test_a_padded_static_step_equals_the_dynamic_step(tiny_pair):
    lm = tiny_pair.target
    prompt = lm.prepare(random_video(1, 2))
    new = [5, 9, 17, 3]
    _, dynamic = decoding.prefill_pruned(lm, prompt, None)
    engine = fast.StaticLM(lm, None)
    engine.load(dynamic, dynamic.get_seq_length() + 16)
    expected = lm.step(new, decoding.positions(prompt, 0, len(new)), dynamic)[0]
    got = engine.extend(new, prompt.next_position, width=7)  # 3 padding rows
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert engine.length == dynamic.get_seq_length()


# --- the same tokens and accepted counts as the plain path ---------------------------------


@pytest.fixture(scope="module")
def embedded():
    return sv.load_pair("tiny", device="cpu")


@pytest.fixture(scope="module")
def embedded_prompt(embedded):
    return embedded.target.prepare(sv.sample_video("bikes", 2))


@pytest.mark.parametrize("method,ratio,seed", [
    ("sd", 0.0, 0), ("specvlm", 0.5, 0), ("specvlm", 0.9, 0), ("uniform", 0.5, 0), ("uniform", 0.9, 0),
    ("random", 0.5, 0), ("random", 0.9, 1), ("top", 0.5, 0), ("top", 0.9, 0),
])
def test_chain_on_the_embedded_pair(embedded, embedded_prompt, method, ratio, seed):
    result = assert_same(embedded, embedded_prompt, method=method, ratio=ratio, seed=seed, k=3)
    if method == "sd":
        assert 0 < result.mean_accepted < 3  # partial acceptance: every rewind path runs


@pytest.mark.parametrize("k", [1, 5])
def test_chain_lengths(embedded, embedded_prompt, k):
    assert_same(embedded, embedded_prompt, method="specvlm", ratio=0.9, k=k, max_new_tokens=24)


@pytest.mark.parametrize("tree,method,ratio", [
    (MC_SIM_7B_63, "sd", 0.0), (MC_SIM_7B_63, "specvlm", 0.9), (MC_SIM_7B_63, "uniform", 0.5),
    (MC_SIM_7B_63, "top", 0.9), (SMALL_TREE, "specvlm", 0.5), (SMALL_TREE, "random", 0.9),
    (FLAT_TREE, "specvlm", 0.9),
], ids=["mc-sd", "mc-specvlm", "mc-uniform", "mc-top", "small-specvlm", "small-random", "flat-specvlm"])
def test_tree_on_the_embedded_pair(embedded, embedded_prompt, tree, method, ratio):
    assert_same(embedded, embedded_prompt, method=method, ratio=ratio, tree=tree, max_new_tokens=24)


@pytest.mark.parametrize("clip,frames,method,ratio,tree,min_slots", [
    ("bikes", 2, "sd", 0.0, MC_SIM_7B_63, "0"), ("bikes", 2, "specvlm", 0.9, MC_SIM_7B_63, ""),
    ("bigbuckbunny", 4, "uniform", 0.5, MC_SIM_7B_63, "0"), ("bigbuckbunny", 4, "specvlm", 0.75, SMALL_TREE, ""),
    ("bikes", 6, "top", 0.9, chain(4), "0"),
])
def test_flex_attention_on_the_embedded_pair(embedded, clip, frames, method, ratio, tree, min_slots, monkeypatch):
    """attention="flex": short steps through FlexAttention, the 26-node verifications through
    `grouped_attention`, the draft's short cache through either ($SPECVLM_FLEX_MIN_SLOTS=0: flex);
    the same tokens, accepted counts and cache lengths as the plain path."""
    monkeypatch.setenv("SPECVLM_FLEX_MIN_SLOTS", min_slots)
    prompt = embedded.target.prepare(sv.sample_video(clip, frames))
    assert_same(embedded, prompt, method=method, ratio=ratio, tree=tree, max_new_tokens=20, attention="flex")


def test_under_flex_a_short_draft_cache_takes_the_grouped_attention(embedded, monkeypatch):
    """Under "flex" a draft whose cache holds at most `fast.flex_min_slots()` slots runs every step
    through `grouped_attention` (its rounding never reaches the output); a target keeps FlexAttention
    whatever its capacity; $SPECVLM_FLEX_MIN_SLOTS moves the bound, and the engine follows it."""
    steps = []  # (is the draft, the attention its step function was made with)
    real = fast.step_logits
    monkeypatch.setattr(fast, "_ENGINES", weakref.WeakKeyDictionary())  # no step function made before this test
    monkeypatch.setattr(fast, "step_logits", lambda lm, cache, inputs, pattern, attention="sdpa", **kwargs:
                        steps.append((lm is embedded.draft, attention)) or real(lm, cache, inputs, pattern, attention,
                                                                                **kwargs))
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    reference = decoding.generate_sd(embedded, prompt, method="specvlm", ratio=0.9, k=3, max_new_tokens=12)

    def run(min_slots: str) -> dict[bool, set[str]]:
        monkeypatch.setenv("SPECVLM_FLEX_MIN_SLOTS", min_slots)
        steps.clear()
        result = fast.generate_fast(embedded, prompt, method="specvlm", ratio=0.9, k=3, max_new_tokens=12,
                                    compile=False, attention="flex")
        assert result.tokens == reference.tokens and result.accepted == reference.accepted
        return {role: {attention for draft, attention in steps if draft == role} for role in (True, False)}

    assert run("") == {True: {"grouped"}, False: {"flex"}}  # the default bound, far above this small cache
    capacity = fast.capture_report(embedded)["models"]["draft"]["capacity"]
    assert capacity <= fast.FLEX_MIN_SLOTS
    assert run(str(capacity)) == {True: {"grouped"}, False: {"flex"}}
    assert run(str(capacity - 1)) == {True: {"flex"}, False: {"flex"}}
    assert run("0") == {True: {"flex"}, False: {"flex"}}
    assert run("100000") == {True: {"grouped"}, False: {"flex"}}  # never the target

    # a draft pruned harder than the last run's gets a cache of its own size, and with it "grouped"
    full = embedded.target.prepare(sv.sample_video("bikes", 2))
    monkeypatch.setenv("SPECVLM_FLEX_MIN_SLOTS", str(capacity + 64))
    fast.generate_fast(embedded, full, method="sd", k=3, max_new_tokens=12, compile=False, attention="flex")
    assert fast.capture_report(embedded)["models"]["draft"]["step_attention"] == "flex"
    assert fast.capture_report(embedded)["models"]["draft"]["capacity"] > capacity + 64
    assert run(str(capacity + 64)) == {True: {"grouped"}, False: {"flex"}}
    assert fast.capture_report(embedded)["models"]["draft"]["capacity"] == capacity


def test_the_wide_steps_kernel_follows_each_runs_own_cache(embedded, monkeypatch):
    """A target keeps its static cache across runs while it is large enough, but the kernel of its
    wide steps follows the run's own needs: after a long video, a short one whose cache would fall
    below the split bound gets a cache of its own size and `grouped_attention` again."""
    long, short = (embedded.target.prepare(sv.sample_video("bikes", frames)) for frames in (6, 2))
    sizes = {}
    for name, prompt in (("long", long), ("short", short)):
        monkeypatch.setenv("SPECVLM_SPLIT_MIN_SLOTS", "0")
        monkeypatch.setattr(fast, "_ENGINES", weakref.WeakKeyDictionary())  # each run's own size
        fast.generate_fast(embedded, prompt, method="sd", tree=MC_SIM_7B_63, max_new_tokens=8, compile=False,
                           attention="flex")
        sizes[name] = fast.capture_report(embedded)["models"]["target"]["capacity"]
    assert sizes["short"] < sizes["long"]
    monkeypatch.setenv("SPECVLM_SPLIT_MIN_SLOTS", str(sizes["long"]))
    for prompt, capacity, split in ((long, sizes["long"], True), (short, sizes["short"], False), (long, sizes["long"], True)):
        reference = decoding.generate_sd(embedded, prompt, method="sd", tree=MC_SIM_7B_63, max_new_tokens=8)
        result = fast.generate_fast(embedded, prompt, method="sd", tree=MC_SIM_7B_63, max_new_tokens=8, compile=False,
                                    attention="flex")
        assert result.tokens == reference.tokens and result.accepted == reference.accepted
        target = fast.capture_report(embedded)["models"]["target"]
        assert (target["capacity"], target["split_wide_steps"]) == (capacity, split)


@pytest.mark.parametrize("value", ["-1", "many", "1.5"])
@pytest.mark.parametrize("name", ["SPECVLM_FLEX_MIN_SLOTS", "SPECVLM_SPLIT_MIN_SLOTS"])
def test_slot_bounds_must_be_whole_numbers(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        fast.flex_min_slots() if name == "SPECVLM_FLEX_MIN_SLOTS" else fast.split_min_slots()


@pytest.mark.parametrize("bound", ["1", "0", ""], ids=["always", "never", "default"])
def test_tree_verifications_on_a_long_cache_take_the_split_attention(embedded, bound, monkeypatch):
    """Under "flex" a step wider than FLEX_MAX_QUERY (here the 26-node verification) on a cache of
    at least `fast.split_min_slots()` slots goes to `split_attention`, in every layer; the tokens
    and accepted counts stay the plain path's, with no graph break under dynamo. The embedded
    pair's caches are far below the default bound."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("SPECVLM_SPLIT_MIN_SLOTS", bound)
    widths = []
    real = step_attention.split_attention
    monkeypatch.setattr(step_attention, "split_attention", lambda query, *args: widths.append(query.shape[2])
                        or real(query, *args))
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    reference = decoding.generate_sd(embedded, prompt, method="specvlm", ratio=0.5, tree=MC_SIM_7B_63,
                                     max_new_tokens=16)
    torch._dynamo.reset()
    counters.clear()
    result = fast.generate_fast(embedded, prompt, method="specvlm", ratio=0.5, tree=MC_SIM_7B_63, max_new_tokens=16,
                                compile={"backend": "eager"}, attention="flex")
    assert result.tokens == reference.tokens and result.accepted == reference.accepted
    report = fast.capture_report(embedded)
    assert report["graph_breaks"] == 0
    assert report["models"]["target"]["split_wide_steps"] == (bound == "1")
    assert report["models"]["target"]["split_merge"] == ("torch" if bound == "1" else None)  # the CPU's default
    layers = embedded.target.language_model.config.num_hidden_layers
    if bound == "1":
        assert set(widths) == {MC_SIM_7B_63.num_nodes} and len(widths) % layers == 0
    else:
        assert widths == []


@pytest.mark.parametrize("tree", [None, MC_SIM_7B_63], ids=["chain", "tree"])
@pytest.mark.parametrize("attention", ["grouped", "flex/grouped"])
def test_grouped_attention_for_every_step(embedded, tree, attention):
    prompt = embedded.target.prepare(sv.sample_video("bigbuckbunny", 4))
    assert_same(embedded, prompt, method="ar", max_new_tokens=12, attention=attention)
    assert_same(embedded, prompt, method="specvlm", ratio=0.9, k=4, tree=tree, max_new_tokens=20, attention=attention)
    models = fast.capture_report(embedded)["models"]
    assert (models["target"]["attention"], models["draft"]["attention"]) == tuple(fast.fast_attention(attention, role)
                                                                               for role in ("target", "draft"))


def test_another_clip(embedded):
    prompt = embedded.target.prepare(sv.sample_video("bigbuckbunny", 4))
    assert_same(embedded, prompt, method="ar", max_new_tokens=16)
    assert_same(embedded, prompt, method="specvlm", ratio=0.9, k=4, max_new_tokens=16)
    assert_same(embedded, prompt, method="specvlm", ratio=0.9, tree=MC_SIM_7B_63, max_new_tokens=16)


@pytest.mark.parametrize("which", ["tiny_pair", "self_pair", "noisy_pair"])
def test_random_pairs(request, which):
    pair = request.getfixturevalue(which)
    prompt = pair.target.prepare(random_video(2, 3))
    assert_same(pair, prompt, method="ar")
    assert_same(pair, prompt, method="specvlm", ratio=0.9, k=3)
    assert_same(pair, prompt, method="random", ratio=0.5, tree=MC_SIM_7B_63, seed=3)
    assert_same(pair, prompt, method="sd", tree=SMALL_TREE)


@pytest.mark.parametrize("tree,max_new_tokens", [
    (None, 1), (None, 2), (None, 9), (MC_SIM_7B_63, 3), (MC_SIM_7B_63, 11),
])
def test_max_new_tokens_cuts_mid_round(self_pair, tree, max_new_tokens):
    """Self-speculation accepts whole rounds of 6, so these limits end inside a round."""
    prompt = self_pair.target.prepare(random_video(3, 2))
    result = assert_same(self_pair, prompt, method="sd", k=5, tree=tree, max_new_tokens=max_new_tokens)
    assert len(result.tokens) == max_new_tokens


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 9])
def test_ar_queued_one_step_ahead_stops_at_the_limit(self_pair, max_new_tokens):
    """AR queues the step after the one it reads: the limit is still met exactly, and the
    cache holds prompt + out[:-1]."""
    prompt = self_pair.target.prepare(random_video(3, 2))
    result = assert_same(self_pair, prompt, method="ar", max_new_tokens=max_new_tokens)
    assert len(result.tokens) == max_new_tokens


def test_ar_drops_the_step_queued_past_an_end_token(embedded, embedded_prompt):
    target = embedded.target
    tokens = decoding.generate_ar(target, embedded_prompt, 30).tokens
    stop = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    ending = copy.copy(target)
    ending.eos_token_ids = frozenset({tokens[stop]})
    result = assert_same(sv.Pair(ending, ending, name="early end"), embedded_prompt, method="ar", max_new_tokens=30)
    assert result.tokens == tokens[:stop + 1]
    assert result.target_cache_len == len(embedded_prompt.input_ids[0]) + stop


@pytest.mark.parametrize("end_early", [True, False], ids=["end token", "limit"])
def test_ar_passes_counts_the_fast_ar_steps(embedded, embedded_prompt, end_early, monkeypatch):
    """`cost_model.ar_passes` is the number of target steps `_generate_ar` really runs: with an
    end token before the limit, one more than the tokens after the prefill's."""
    from specvlm import cost_model

    target = embedded.target
    tokens = decoding.generate_ar(target, embedded_prompt, 30).tokens
    stop = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    ending = copy.copy(target)
    if end_early:
        ending.eos_token_ids = frozenset({tokens[stop]})
    steps = []
    extend = fast.StaticLM.extend
    monkeypatch.setattr(fast.StaticLM, "extend", lambda self, *a, **k: steps.append(1) or extend(self, *a, **k))
    result = fast.generate_fast(sv.Pair(ending, ending, name="ar"), embedded_prompt, method="ar",
                                max_new_tokens=30 if end_early else stop + 1, compile=False)
    assert result.tokens == tokens[:stop + 1]
    assert len(steps) == cost_model.ar_passes(stop + 1, 30 if end_early else stop + 1, queued_ahead=True) == stop + end_early


@pytest.mark.parametrize("tree", [None, MC_SIM_7B_63], ids=["chain", "tree"])
def test_an_end_token_mid_round(embedded, embedded_prompt, tree):
    """Declare a token that first appears at index 7 or later an end token: generation stops
    there, past the first round of a self-speculation that accepts 5 + 1 tokens per round,
    and the round that produced it is cut."""
    target = embedded.target
    tokens = decoding.generate_ar(target, embedded_prompt, 30).tokens
    stop = next(i for i in range(7, len(tokens)) if tokens[i] not in tokens[:i])
    ending = copy.copy(target)
    ending.eos_token_ids = frozenset({tokens[stop]})
    pair = sv.Pair(ending, ending, name="self, early end")
    result = assert_same(pair, embedded_prompt, method="sd", k=5, tree=tree, max_new_tokens=30)
    assert result.tokens == tokens[:stop + 1]
    assert sum(result.accepted) + result.rounds + 1 > len(result.tokens)  # the last round was cut


# --- Qwen2.5-VL: 3-D rotary positions -------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    target, draft = sv.make_tiny_pair(tmp_path_factory.mktemp("fast_qwen"), seed=0, family="qwen2_5_vl")
    return sv.load_pair(str(target), str(draft), device="cpu")


def test_qwen(qwen_pair):
    prompt = qwen_pair.target.prepare(sv.sample_video("bikes", 6))
    assert prompt.position_ids.dim() == 3
    self_pair = sv.Pair(qwen_pair.target, qwen_pair.target, name="qwen self")
    for pair in (qwen_pair, self_pair):
        assert_same(pair, prompt, method="ar", max_new_tokens=12)
        assert_same(pair, prompt, method="specvlm", ratio=0.9, k=3, max_new_tokens=12)
        assert_same(pair, prompt, method="uniform", ratio=0.5, tree=MC_SIM_7B_63, max_new_tokens=12)
        assert_same(pair, prompt, method="specvlm", ratio=0.9, tree=MC_SIM_7B_63, max_new_tokens=12,
                    attention="flex")
    result = assert_same(self_pair, prompt, method="sd", tree=SMALL_TREE, max_new_tokens=12)
    assert result.accepted[0] == SMALL_TREE.depth


# --- engines, options, errors ----------------------------------------------------------------


def test_static_caches_are_reused_across_runs_and_remade_only_for_a_longer_prompt(embedded, embedded_prompt):
    fast._ENGINES.clear()  # a cache sized for this prompt, whatever earlier tests left
    fast.generate_fast(embedded, embedded_prompt, method="specvlm", tree=MC_SIM_7B_63, max_new_tokens=8, compile=False)
    engine = fast.static_lm(embedded.target, "target", None)
    addresses = [t.data_ptr() for t in engine.cache.keys + engine.cache.values]
    fast.generate_fast(embedded, embedded_prompt, method="specvlm", tree=MC_SIM_7B_63, max_new_tokens=8, compile=False)
    assert [t.data_ptr() for t in engine.cache.keys + engine.cache.values] == addresses
    longer = embedded.target.prepare(sv.sample_video("bikes", 4))
    assert engine.cache.capacity < longer.input_ids.shape[1] + 4
    fast.generate_fast(embedded, longer, method="specvlm", k=2, max_new_tokens=4, compile=False)
    grown = fast.static_lm(embedded.target, "target", None)
    assert grown is engine and engine.cache.capacity >= longer.input_ids.shape[1] + 4
    assert [t.data_ptr() for t in engine.cache.keys + engine.cache.values] != addresses  # remade: it was too small
    grown_addresses = [t.data_ptr() for t in engine.cache.keys + engine.cache.values]
    fast.generate_fast(embedded, embedded_prompt, method="specvlm", tree=MC_SIM_7B_63, max_new_tokens=8, compile=False)
    assert [t.data_ptr() for t in engine.cache.keys + engine.cache.values] == grown_addresses  # the shorter fits it


def test_compile_options():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fast.compile_options(None, cpu) is None and fast.compile_options(False, cuda) is None
    assert fast.compile_options(None, cuda)["mode"] == "reduce-overhead"
    assert fast.compile_options("max-autotune", cpu)["mode"] == "max-autotune"
    assert fast.compile_options({"backend": "eager"}, cpu) == {"fullgraph": False, "dynamic": False, "backend": "eager"}


def test_traced_steps_have_no_graph_breaks(noisy_pair):
    """Dynamo traces every step kind in one graph (backend "eager": tracing without code
    generation, so this runs in seconds); the tokens stay the same."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    prompt = noisy_pair.target.prepare(random_video(4, 1))
    options = {"backend": "eager"}
    for kwargs in ({"k": 3}, {"tree": SMALL_TREE}):
        reference = decoding.generate_sd(noisy_pair, prompt, method="specvlm", ratio=0.5, max_new_tokens=12, **kwargs)
        result = fast.generate_fast(noisy_pair, prompt, method="specvlm", ratio=0.5, max_new_tokens=12,
                                    compile=options, **kwargs)
        assert result.tokens == reference.tokens and result.accepted == reference.accepted
    report = fast.capture_report(noisy_pair)
    shapes = sum(len(engine["step_shapes"]) for engine in report["models"].values() if engine["compile"])
    assert report["models"]["target"]["compiled_move"] and not report["models"]["draft"]["compiled_move"]
    # one graph per step shape, and the target's KV move (the draft's cache is never moved)
    assert report["graph_breaks"] == 0 and report["unique_graphs"] == shapes + 1 >= 6
    target = report["models"]["target"]
    assert target["compile"]["backend"] == "eager" and not target["cuda_graphs"]
    assert [SMALL_TREE.num_nodes] * 2 in target["step_shapes"] and [4, 4] in target["step_shapes"]


@pytest.mark.skipif(not os.environ.get("SPECVLM_TEST_INDUCTOR"),
                    reason="inductor compiles each step shape on the CPU in minutes; set SPECVLM_TEST_INDUCTOR=1")
def test_inductor_on_the_cpu(noisy_pair):
    prompt = noisy_pair.target.prepare(random_video(4, 1))
    reference = decoding.generate_sd(noisy_pair, prompt, method="specvlm", ratio=0.5, k=3, max_new_tokens=12)
    result = fast.generate_fast(noisy_pair, prompt, method="specvlm", ratio=0.5, k=3, max_new_tokens=12, compile=True)
    assert result.tokens == reference.tokens and result.accepted == reference.accepted


def test_bad_requests(tiny_pair):
    prompt = tiny_pair.target.prepare(random_video(0, 1))
    with pytest.raises(ValueError, match="greedy only"):
        fast.generate_fast(tiny_pair, prompt, temperature=0.7)
    with pytest.raises(ValueError, match="unknown method"):
        fast.generate_fast(tiny_pair, prompt, method="magic")
    with pytest.raises(ValueError, match="k \\(draft tokens per round\\)"):
        fast.generate_fast(tiny_pair, prompt, k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        fast.generate_fast(tiny_pair, prompt, max_new_tokens=0)


def test_host_copy_holds_the_values_the_tensor_had_when_it_started():
    token = torch.tensor([7])
    copy = fast.HostCopy(token)
    token.fill_(3)  # e.g. a step's static output buffer, overwritten by the next replay
    assert copy.on_device is token and copy.wait().tolist() == [7]


@pytest.mark.parametrize("max_new_tokens", [7, 8, 9])
def test_a_chain_round_after_a_tree_round_reads_the_moved_cache(embedded, embedded_prompt, max_new_tokens):
    """Near the limit a tree too deep for the tokens left gives way to a chain, whose verification
    must come after the last tree round's (deferred) KV move."""
    assert_same(embedded, embedded_prompt, method="specvlm", ratio=0.5, tree=MC_SIM_7B_63,
                max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("max_new_tokens", range(6, 15))
def test_the_targets_cache_holds_the_committed_text_after_generation(embedded, embedded_prompt, max_new_tokens):
    """After generate_fast the target's static cache is prompt + out[:-1], as one forward over
    those tokens writes it: the last tree round's KV move is not left pending."""
    target = embedded.target
    result = fast.generate_fast(embedded, embedded_prompt, method="specvlm", ratio=0.5, tree=MC_SIM_7B_63,
                                max_new_tokens=max_new_tokens, compile=False)
    engine = fast.static_lm(target, "target", None)
    _, cache = decoding.prefill_pruned(target, embedded_prompt, None)
    start = cache.get_seq_length()
    target.step(result.tokens[:-1], decoding.positions(embedded_prompt, 0, len(result.tokens) - 1), cache)
    assert engine.length == cache.get_seq_length()
    for layer, keys in zip(cache.layers, engine.cache.keys):
        torch.testing.assert_close(keys[:, :, start:engine.length], layer.keys[:, :, start:], atol=1e-4, rtol=1e-4)


def test_cuda_graphs_are_captured_by_hand_unless_asked_for_torch_compiles_own(monkeypatch):
    cuda = torch.device("cuda")  # only the device's type is read: no GPU needed
    assert fast.cuda_graphs(None, cuda) is None
    assert fast.cuda_graphs({"mode": "reduce-overhead"}, torch.device("cpu")) is None
    assert fast.cuda_graphs({"mode": "default"}, cuda) is None
    monkeypatch.delenv("SPECVLM_CUDA_GRAPHS", raising=False)
    assert fast.cuda_graphs({"mode": "reduce-overhead"}, cuda) == "manual"
    monkeypatch.setenv("SPECVLM_CUDA_GRAPHS", "")  # empty is unset, as for every other setting
    assert fast.cuda_graphs({"mode": "reduce-overhead"}, cuda) == "manual"
    monkeypatch.setenv("SPECVLM_CUDA_GRAPHS", "trees")
    assert fast.cuda_graphs({"mode": "reduce-overhead"}, cuda) == "trees"
    monkeypatch.setenv("SPECVLM_CUDA_GRAPHS", "none")
    with pytest.raises(ValueError, match="SPECVLM_CUDA_GRAPHS"):
        fast.cuda_graphs({"mode": "reduce-overhead"}, cuda)


# ----------------------------------------------------------------------------------------
# CUDA graphs captured by hand, on a CPU: a fake graph whose replay reruns the captured
# function on the static buffers into the same output tensor, and which (the worst case of a
# shared memory pool) leaves garbage in every later-captured output of its pool when it replays


class _FakeGraph:
    replays = 0

    def __init__(self):
        self.owner = None

    def replay(self):
        owner = self.owner
        pool = _FAKE_POOLS[id(owner.pool)]
        for other in pool[pool.index(owner) + 1:]:
            if isinstance(other.output, torch.Tensor):
                other.output.fill_(float("nan"))
        with torch.no_grad():  # a real replay runs no Python at all: no dynamo guard to check
            out = owner.fn(*owner.static)
        if isinstance(out, torch.Tensor):
            owner.output.copy_(out)
        _FakeGraph.replays += 1


_FAKE_POOLS: dict[int, list] = {}
SMALL_TREE = Tree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])


@pytest.fixture
def fake_graphs(monkeypatch):
    import contextlib

    class Stream:
        def __init__(self, *args):
            pass

        def wait_stream(self, other):
            pass

    pools = iter(range(10**6))
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, pool=None, stream=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: [next(pools)])
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the capture logic, not inductor
    monkeypatch.setattr(fast, "cuda_graphs", lambda options, device: "manual" if options else None)
    capture = fast.CapturedGraph._capture

    def fake_capture(self, args):
        capture(self, args)
        self.graph.owner = self
        _FAKE_POOLS.setdefault(id(self.pool), []).append(self)
        if isinstance(self.output, torch.Tensor):
            self.output.fill_(float("nan"))  # a captured graph has not run yet

    monkeypatch.setattr(fast.CapturedGraph, "_capture", fake_capture)
    fast._ENGINES.clear()
    _FAKE_POOLS.clear()
    _FakeGraph.replays = 0
    yield
    fast._ENGINES.clear()


def _committed_keys(pair):
    engine = fast._ENGINES[pair.target]["target"]
    return [keys[:, :, :engine.length].clone() for keys in engine.cache.keys]


@pytest.mark.parametrize("method,kwargs", [("ar", {}), ("sd", {"k": 3}), ("specvlm", {"tree": SMALL_TREE, "ratio": 0.5}),
                                           ("specvlm", {"tree": SMALL_TREE, "ratio": 0.5, "attention": "grouped"})])
def test_captured_graphs_in_the_decoding_loops_give_the_eager_fast_paths_tokens_and_caches(fake_graphs, method, kwargs):
    pair = sv.load_pair("tiny", device="cpu")
    prompt = pair.target.prepare(sv.from_array(synthetic.make_clip(3, num_frames=2).frames, fps=8.0),
                                 "Describe the video.")
    eager = fast.generate_fast(pair, prompt, method, max_new_tokens=24, compile=False, **kwargs)
    reference = _committed_keys(pair)
    fast._ENGINES.clear()
    for _ in range(2):  # the second generation only replays the graphs the first captured
        got = fast.generate_fast(pair, prompt, method, max_new_tokens=24, compile={"backend": "eager"}, **kwargs)
        assert got.tokens == eager.tokens and got.accepted == eager.accepted
        assert (got.target_cache_len, got.draft_cache_len) == (eager.target_cache_len, eager.draft_cache_len)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(_committed_keys(pair), reference))
    engines = fast._ENGINES[pair.target]
    assert all(isinstance(step, fast.CapturedGraph) for step in engines["target"].steps.values())
    assert _FakeGraph.replays > 0
    if "tree" in kwargs:
        assert all(isinstance(move, fast.CapturedGraph) for move in engines["target"]._moves.values())
        assert engines["target"]._moves


def test_trees_of_different_depths_share_an_engine_with_captured_graphs(fake_graphs):
    """A captured graph keeps its first call's shapes: a tree of another depth accepts paths of
    another length, whose KV move needs a graph of its own (one run of `bench --tree` drafts two trees)."""
    pair = sv.load_pair("tiny", device="cpu")
    prompt = pair.target.prepare(sv.from_array(synthetic.make_clip(3, num_frames=2).frames, fps=8.0),
                                 "Describe the video.")
    shallow = sv.Tree.from_paths([[0], [1], [0, 0], [1, 0]])
    runs = {}
    for tree in (SMALL_TREE, shallow, SMALL_TREE):
        got = fast.generate_fast(pair, prompt, "specvlm", tree=tree, ratio=0.5, max_new_tokens=24,
                                 compile={"backend": "eager"})
        assert got.tokens == runs.setdefault(tree, got).tokens
    assert runs[SMALL_TREE].tokens == runs[shallow].tokens == fast.generate_fast(
        pair, prompt, "ar", max_new_tokens=24, compile={"backend": "eager"}).tokens
    assert SMALL_TREE.depth != shallow.depth
    assert sorted(fast._ENGINES[pair.target]["target"]._moves) == sorted({SMALL_TREE.depth, shallow.depth})


def test_a_graph_captured_with_grad_enabled_compiles_nothing_again(fake_graphs, monkeypatch):
    """A step compiled inside a generation (no grad) and captured again later with grad enabled
    (as `bench.fast_steps` captures the shapes a run did not need) is not compiled again: dynamo
    guards the grad mode, and at the 7B/0.5B shapes every such compile took tens of seconds (a
    benchmark row ran past its time limit)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", real_compile)  # dynamo itself, with the eager backend: no inductor
    pair = sv.load_pair("tiny", device="cpu")
    prompt = pair.target.prepare(sv.from_array(synthetic.make_clip(3, num_frames=2).frames, fps=8.0),
                                 "Describe the video.")
    fast.generate_fast(pair, prompt, "sd", k=3, max_new_tokens=12, compile={"backend": "eager"})
    draft = fast._ENGINES[pair.draft]["draft"]
    graphs = counters["stats"]["unique_graphs"]
    with torch.enable_grad():
        draft.steps[(1, 1)].graph = None  # captured again at its next call
        draft.extend([5], 40, 1)
    assert draft.steps[(1, 1)].graph is not None
    assert counters["stats"]["unique_graphs"] == graphs


real_compile = torch.compile


def test_a_kv_move_warmed_up_on_its_real_arguments_would_corrupt_the_cache(fake_graphs, monkeypatch):
    """Why `StaticLM.move` passes `neutral`: the warm-up runs a graph's function before the capture,
    and a move whose sources overlap its destinations (this clip's first tree round accepts
    [2, 5]: slot s+2 -> s+1, s+5 -> s+2) moved again leaves the wrong entry at s+1."""
    pair = sv.load_pair("tiny", device="cpu")
    prompt = pair.target.prepare(sv.from_array(synthetic.make_clip(0, num_frames=2).frames, fps=8.0),
                                 "Describe the video.")
    kwargs = {"tree": SMALL_TREE, "ratio": 0.5, "max_new_tokens": 24}
    fast.generate_fast(pair, prompt, "specvlm", compile=False, **kwargs)
    reference = _committed_keys(pair)
    fast._ENGINES.clear()
    init = fast.CapturedGraph.__init__
    monkeypatch.setattr(fast.CapturedGraph, "__init__", lambda self, fn, pool, neutral=None: init(self, fn, pool))
    fast.generate_fast(pair, prompt, "specvlm", compile={"backend": "eager"}, **kwargs)
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(_committed_keys(pair), reference))
