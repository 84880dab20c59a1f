"""A draft vocabulary (`draft_vocab.py`) on the fast path: the output layer's rows, the ids it keeps,
the target's own tokens whatever it keeps, and clear errors."""

import numpy as np
import pytest
import torch

import specvlm as sv
from specvlm import decoding, draft_vocab, fast, few_rows, fusion, synthetic
from specvlm.trees import MC_SIM_7B_63, Tree

from .test_fast import _FakeGraph, fake_graphs  # noqa: F401 (a fixture)

SMALL_TREE = Tree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])


@pytest.fixture(scope="module")
def embedded():
    return sv.load_pair("tiny", device="cpu")


def scattered_vocabulary(draft, answer, first: int = 1) -> torch.Tensor:
    """Sorted kept ids that are not 0..N-1: the answer's own tokens, the special tokens and every third id
    from `first`."""
    specials = set(draft.tokenizer.all_special_ids) | set(draft.eos_token_ids)
    return torch.tensor(sorted(set(answer) | specials | set(range(first, 512, 3))))


def test_first_tokens_keeps_the_lowest_ids_and_every_special_token(embedded):
    draft = embedded.draft
    specials = set(draft.tokenizer.all_special_ids) | set(draft.eos_token_ids)
    ids = draft_vocab.first_tokens(draft, 10)
    assert ids.dtype == torch.long and ids.tolist() == sorted(set(range(10)) | specials)
    assert draft_vocab.first_tokens(draft, 10**6).tolist() == list(range(draft_vocab.output_rows(draft)))
    assert torch.equal(draft_vocab.first_tokens(draft, np.int64(10)), ids)
    for size in (2.5, True, "8"):
        with pytest.raises(ValueError, match="whole number of tokens"):
            draft_vocab.first_tokens(draft, size)
    for size in (0, -3):
        with pytest.raises(ValueError, match="at least one token"):
            draft_vocab.first_tokens(draft, size)


def test_the_cut_output_layer_scores_exactly_its_tokens(embedded):
    draft = embedded.draft
    ids = torch.tensor([0, 5, 17, 200, 511])
    head = draft_vocab.output_head(draft, ids)
    hidden = torch.randn(1, 3, head.in_features, generator=torch.Generator().manual_seed(0))
    full = draft.model.get_output_embeddings()
    assert head.weight.shape == (5, full.in_features) and not head.weight.requires_grad
    with torch.no_grad():  # the same products, up to the rounding of a matmul of another size
        torch.testing.assert_close(head(hidden), full(hidden)[..., ids], rtol=1e-6, atol=1e-6)
    assert head.weight.data_ptr() != full.weight.data_ptr()  # a copy: the draft's own layer is untouched


@pytest.mark.parametrize("ids,message", [
    ([3, 1, 2], "sorted"), ([1, 1, 2], "distinct"), ([-1, 2], r"\[0, 512\)"), ([0, 512], r"\[0, 512\)"),
    (torch.tensor([], dtype=torch.long), "at least one"), ([[1, 2]], "1-D"), ([0.0, 1.0], "integer"),
])
def test_bad_vocabularies_are_refused_before_any_prefill(embedded, ids, message, monkeypatch):
    calls = []
    monkeypatch.setattr(fast, "prefill_target", lambda *a, **k: calls.append(a))
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    with pytest.raises(ValueError, match=message):
        fast.generate_fast(embedded, prompt, tree=SMALL_TREE, compile=False, draft_vocab=torch.as_tensor(ids))
    assert not calls


@pytest.mark.parametrize("clip,method,ratio,tree,k", [
    ("bikes", "specvlm", 0.5, MC_SIM_7B_63, 5), ("bigbuckbunny", "specvlm", 0.9, SMALL_TREE, 5),
    ("bikes", "uniform", 0.75, None, 3), ("bigbuckbunny", "sd", 0.0, None, 5),
])
def test_a_vocabulary_holding_every_token_changes_nothing(embedded, clip, method, ratio, tree, k):
    """The embedded pair's 512 rows all kept: the plain path's tokens and accepted counts."""
    prompt = embedded.target.prepare(sv.sample_video(clip, 3))
    ids = draft_vocab.first_tokens(embedded.draft, 512)
    reference = decoding.generate_sd(embedded, prompt, method=method, ratio=ratio, tree=tree, k=k, max_new_tokens=24)
    result = fast.generate_fast(embedded, prompt, method=method, ratio=ratio, tree=tree, k=k, max_new_tokens=24,
                                compile=False, draft_vocab=ids)
    assert (result.tokens, result.accepted) == (reference.tokens, reference.accepted)
    assert fast._ENGINES[embedded.draft]["draft"].head.out_features == 512


class _MaskedOutput(torch.nn.Module):
    """An output layer whose logits outside `ids` are -inf: the whole vocabulary's draft restricted by a
    mask, the plain path's equivalent of a cut output layer."""

    def __init__(self, layer, ids):
        super().__init__()
        self.layer, self.outside = layer, torch.ones(layer.weight.shape[0], dtype=torch.bool)
        self.outside[ids] = False

    def forward(self, hidden):
        return self.layer(hidden).masked_fill(self.outside, float("-inf"))


@pytest.mark.parametrize("clip,tree,k", [("bikes", MC_SIM_7B_63, 5), ("bigbuckbunny", None, 4),
                                         ("bikes", SMALL_TREE, 5), ("bigbuckbunny", MC_SIM_7B_63, 5)])
def test_a_scattered_vocabulary_maps_every_pick_back_to_its_token(embedded, clip, tree, k, monkeypatch):
    """Kept ids that are not 0..N-1 (every third id, the specials and the answer's own tokens): index j
    of the cut logits is token ids[j]. The fast path's draft then proposes what the plain path's draft
    proposes with every other logit masked to -inf, round for round; a draft that did not map its
    picks back would propose other tokens and be accepted far less."""
    prompt = embedded.target.prepare(sv.sample_video(clip, 3))
    options = dict(method="specvlm", ratio=0.5, tree=tree, k=k, max_new_tokens=24)
    answer = decoding.generate_ar(embedded.target, prompt, 24).tokens
    ids = scattered_vocabulary(embedded.draft, answer)
    assert not torch.equal(ids, torch.arange(len(ids)))
    result = fast.generate_fast(embedded, prompt, compile=False, draft_vocab=ids, **options)
    monkeypatch.setattr(embedded.draft.model, "lm_head", _MaskedOutput(embedded.draft.model.lm_head, ids))
    masked = decoding.generate_sd(embedded, prompt, **options)
    assert result.tokens == masked.tokens == answer
    assert result.accepted == masked.accepted and sum(result.accepted) > 0


def test_a_target_drafting_for_itself_from_part_of_its_vocabulary_keeps_its_whole_output(embedded):
    self_pair = sv.Pair(embedded.target, embedded.target, name="self")
    prompt = self_pair.target.prepare(sv.sample_video("bikes", 3))
    answer = decoding.generate_ar(embedded.target, prompt, 24).tokens
    ids = draft_vocab.first_tokens(self_pair.draft, 300)
    result = fast.generate_fast(self_pair, prompt, tree=MC_SIM_7B_63, max_new_tokens=24, compile=False, draft_vocab=ids)
    assert result.tokens == answer
    engines = fast._ENGINES[embedded.target]
    assert engines["target"].head is None and engines["draft"].head.out_features == len(ids)


def test_a_cut_output_layer_follows_the_drafts_weights(embedded):
    """The cut layer is a copy: weights changed in place (a training step, load_state_dict) make a
    new engine, whose cut layer holds them."""
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    ids = draft_vocab.first_tokens(embedded.draft, 200)
    fast.generate_fast(embedded, prompt, tree=SMALL_TREE, max_new_tokens=6, compile=False, draft_vocab=ids)
    engine = fast._ENGINES[embedded.draft]["draft"]
    output = embedded.draft.model.get_output_embeddings().weight
    saved = output.detach().clone()
    try:
        with torch.no_grad():
            output.mul_(2.0)
        fast.generate_fast(embedded, prompt, tree=SMALL_TREE, max_new_tokens=6, compile=False, draft_vocab=ids)
        renewed = fast._ENGINES[embedded.draft]["draft"]
        assert renewed is not engine and torch.equal(renewed.head.weight, output.detach()[ids])
    finally:
        with torch.no_grad():
            output.copy_(saved)


@pytest.mark.parametrize("picks", ["", "torch", "triton"])  # whichever picks: the vocabulary is what to change
def test_a_vocabulary_narrower_than_the_trees_picks_is_refused_before_any_prefill(embedded, monkeypatch, picks):
    monkeypatch.setenv("SPECVLM_PICKS", picks)
    calls = []
    monkeypatch.setattr(fast, "prefill_target", lambda *a, **k: calls.append(a))
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    top = max(fast.DraftLevels.of(MC_SIM_7B_63).top)
    with pytest.raises(ValueError, match=f"ranks up to {top} of the draft's tokens at a node, and its vocabulary has 2"):
        fast.generate_fast(embedded, prompt, tree=MC_SIM_7B_63, compile=False, draft_vocab=torch.tensor([2, 5]))
    with pytest.raises(ValueError, match="sorted"):  # AR drafts nothing, but a bad vocabulary is still an error
        fast.generate_fast(embedded, prompt, method="ar", compile=False, draft_vocab=torch.tensor([5, 2]))
    assert not calls


@pytest.mark.parametrize("size", [1, 20, 100, 300])
@pytest.mark.parametrize("clip,frames", [("bikes", 3), ("bigbuckbunny", 4)])
def test_a_smaller_vocabulary_keeps_the_targets_tokens(embedded, size, clip, frames):
    """Kept rows that leave out tokens the target writes: every method still gives AR's tokens. With
    one row and the special tokens kept, the draft can propose no token of the answer but its end, so
    no round accepts more than that one."""
    prompt = embedded.target.prepare(sv.sample_video(clip, frames))
    ar = decoding.generate_ar(embedded.target, prompt, 24)
    ids = draft_vocab.first_tokens(embedded.draft, size)
    for method, tree in (("specvlm", MC_SIM_7B_63), ("specvlm", None), ("random", SMALL_TREE)):
        result = fast.generate_fast(embedded, prompt, method=method, ratio=0.5, tree=tree, k=4, max_new_tokens=24,
                                    compile=False, draft_vocab=ids)
        assert result.tokens == ar.tokens, (size, method, tree)
        if size == 1:
            assert set(ar.tokens[:-1]).isdisjoint(ids.tolist()) and sum(result.accepted) <= 1


def test_the_setting_picks_the_first_tokens(embedded, monkeypatch):
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    monkeypatch.setenv("SPECVLM_DRAFT_VOCAB", "40")
    result = fast.generate_fast(embedded, prompt, tree=SMALL_TREE, max_new_tokens=12, compile=False)
    engine = fast._ENGINES[embedded.draft]["draft"]
    assert torch.equal(engine.vocabulary, draft_vocab.first_tokens(embedded.draft, 40))
    assert result.tokens == decoding.generate_ar(embedded.target, prompt, 12).tokens
    assert fast._ENGINES[embedded.target]["target"].head is None  # a target keeps its whole output layer
    monkeypatch.setenv("SPECVLM_DRAFT_VOCAB", "0")  # the whole vocabulary again: a new engine
    fast.generate_fast(embedded, prompt, tree=SMALL_TREE, max_new_tokens=4, compile=False)
    assert fast._ENGINES[embedded.draft]["draft"] is not engine
    assert fast._ENGINES[embedded.draft]["draft"].vocabulary is None
    monkeypatch.setenv("SPECVLM_DRAFT_VOCAB", "half")
    with pytest.raises(ValueError, match="SPECVLM_DRAFT_VOCAB must be a whole number of tokens"):
        fast.generate_fast(embedded, prompt, tree=SMALL_TREE, max_new_tokens=4, compile=False)


def test_qwen_pair_with_a_draft_vocabulary(tmp_path_factory):
    target, draft = sv.make_tiny_pair(tmp_path_factory.mktemp("vocab_qwen"), seed=0, family="qwen2_5_vl")
    pair = sv.load_pair(str(target), str(draft), device="cpu")
    prompt = pair.target.prepare(sv.sample_video("bikes", 6))
    ar = decoding.generate_ar(pair.target, prompt, 12)
    for size in (64, draft_vocab.output_rows(pair.draft)):
        ids = draft_vocab.first_tokens(pair.draft, size)
        for tree in (MC_SIM_7B_63, None):
            result = fast.generate_fast(pair, prompt, method="specvlm", ratio=0.5, tree=tree, k=3,
                                        max_new_tokens=12, compile=False, draft_vocab=ids)
            assert result.tokens == ar.tokens


def test_captured_graphs_with_a_draft_vocabulary_give_the_eager_tokens(fake_graphs):  # noqa: F811
    pair = sv.load_pair("tiny", device="cpu")
    prompt = pair.target.prepare(sv.from_array(synthetic.make_clip(3, num_frames=2).frames, fps=8.0),
                                 "Describe the video.")
    ids = draft_vocab.first_tokens(pair.draft, 100)
    options = dict(method="specvlm", ratio=0.5, max_new_tokens=24, draft_vocab=ids)
    for kwargs in ({"tree": SMALL_TREE}, {"k": 3}):
        eager = fast.generate_fast(pair, prompt, compile=False, **options, **kwargs)
        fast._ENGINES.clear()
        got = fast.generate_fast(pair, prompt, compile={"backend": "eager"}, **options, **kwargs)
        assert (got.tokens, got.accepted) == (eager.tokens, eager.accepted)
        engine = fast._ENGINES[pair.draft]["draft"]
        assert engine.steps and all(isinstance(step, fast.CapturedGraph) for step in engine.steps.values())
    assert _FakeGraph.replays > 0


@pytest.mark.skipif(not few_rows.available(torch.device("cpu"), torch.float32), reason="needs Triton's interpreter")
def test_a_draft_vocabulary_with_the_few_rows_kernels_keeps_the_tokens_and_the_rounds(embedded, monkeypatch):
    """$SPECVLM_FEW_ROWS=1 (a fused draft's products as Triton kernels) with a scattered vocabulary: the
    tokens and accepted counts are those of the fused draft with cuBLAS's products and the same vocabulary."""
    import copy

    pair = sv.models.Pair(embedded.target, copy.deepcopy(embedded.draft), name="embedded copy")
    prompt = embedded.target.prepare(sv.sample_video("bikes", 3))
    answer = decoding.generate_ar(embedded.target, prompt, 20).tokens
    ids = scattered_vocabulary(pair.draft, answer, first=2)
    options = dict(method="specvlm", ratio=0.5, tree=MC_SIM_7B_63, max_new_tokens=20, compile=False, draft_vocab=ids)
    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "1")
    monkeypatch.setenv("SPECVLM_FEW_ROWS", "0")
    cublas = fast.generate_fast(pair, prompt, **options)
    monkeypatch.setenv("SPECVLM_FEW_ROWS", "1")
    kernels = fast.generate_fast(pair, prompt, **options)
    assert fusion.uses_few_rows(pair.draft)
    assert kernels.tokens == cublas.tokens == answer
    assert kernels.accepted == cublas.accepted and sum(kernels.accepted) > 0
