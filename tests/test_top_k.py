"""`top_k`: the Triton top-k of a few rows (run on the CPU in Triton's interpreter, which conftest
turns on) against `torch.topk` and a stable sort, and the fast path's tree picks through it
($SPECVLM_PICKS=triton): the same tokens and accepted counts, and the kernels really run."""

import pytest
import torch

import specvlm as sv
from specvlm import bench as bench_module, decoding, fast, synthetic, top_k
from specvlm.__main__ import recorded_environment
from specvlm.bench import bench
from specvlm.trees import MC_SIM_7B_63

from .test_draft_vocab import scattered_vocabulary

pytestmark = pytest.mark.skipif(not top_k.available(torch.device("cpu")), reason="needs Triton's interpreter")


def stable_top(x: torch.Tensor, k: int) -> torch.Tensor:
    """The reference order: values descending, equal values lowest index first."""
    return torch.sort(-x.float(), dim=-1, stable=True).indices[:, :k]


@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize("columns,k", [(columns, k) for columns in (7, 1000, 4097, 32768) for k in (1, 2, 4, 8)
                                       if k <= columns])  # V less than a chunk, one, two and one column, sixteen
def test_distinct_values_give_torch_topks_indices(rows, columns, k):
    x = torch.randn(rows, columns, generator=torch.Generator().manual_seed(rows * columns + k))
    got = top_k.top_k_indices(x, k)
    expected = x.topk(k)
    assert got.dtype == torch.long and got.shape == (rows, k)
    assert torch.equal(got, expected.indices)
    assert torch.equal(x.gather(1, got), expected.values)


def test_the_docstrings_example():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert top_k.top_k_indices(x, 2).tolist() == [[1, 2]]
    assert top_k.top_k_indices(x, 2, ids=torch.tensor([5, 6, 7, 8])).tolist() == [[6, 7]]


@pytest.mark.parametrize("columns,block", [(40, 16), (300, 16), (40, top_k.BLOCK), (3 * top_k.BLOCK + 5, top_k.BLOCK)])
def test_ties_go_to_the_lowest_index_within_and_across_chunks(columns, block):
    """A handful of integer values: every pick is a tie, most of them between chunks."""
    x = torch.randint(0, 4, (5, columns), generator=torch.Generator().manual_seed(columns)).float()
    x[1] = 0.0  # one value everywhere: the first k columns
    x[2, -1] = 9.0  # the largest in the last, partial chunk
    x[3, 3::block] = 9.0  # tied maxima in every chunk, at the same offset
    for k in (1, 5, 16):
        got = top_k.top_k_indices(x, k, block=block)
        assert torch.equal(got, stable_top(x, k)), k
    assert top_k.top_k_indices(x, 3, block=block)[1].tolist() == [0, 1, 2]


def test_infinities_and_nans_keep_the_picks_real_columns():
    """-inf logits (a masked vocabulary) are ranked like any value, lowest index first; a NaN ranks as -inf."""
    x = torch.full((3, 50), float("-inf"))
    x[0, [7, 30]] = torch.tensor([1.0, 2.0])
    x[1, 10] = float("nan")
    x[1, 20] = float("inf")
    x[2] = float("nan")
    x[2, [30, 40]] = torch.tensor([1.0, float("-inf")])
    assert top_k.top_k_indices(x, 4, block=16).tolist() == [[30, 7, 0, 1], [20, 0, 1, 2], [30, 0, 1, 2]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_equals_the_float32_reference(dtype):
    x = (torch.randn(4, 5000, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)  # rounding makes ties
    assert len(x[0].unique()) < 5000
    assert torch.equal(top_k.top_k_indices(x, 8), top_k.top_k_indices(x.float(), 8))
    assert torch.equal(top_k.top_k_indices(x, 8), stable_top(x, 8))


def test_ids_map_the_columns_and_strided_rows_are_read():
    x = torch.randn(3, 3000, generator=torch.Generator().manual_seed(4))
    ids = torch.randperm(100_000, generator=torch.Generator().manual_seed(5))[:3000]
    index = top_k.top_k_indices(x, 6)
    assert torch.equal(top_k.top_k_indices(x, 6, ids=ids), ids[index])
    wide = torch.randn(3, 4000)
    wide[:, :3000] = x
    assert torch.equal(top_k.top_k_indices(wide[:, :3000], 6), index)  # rows 4000 apart
    assert torch.equal(top_k.top_k_indices(x.T.contiguous().T, 6), index)  # columns apart: copied


def test_bad_inputs_are_refused_with_what_to_do():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"logits \[rows, V\] with rows and V at least 1, got \(10,\)"):
        top_k.top_k_indices(x[0], 2)
    with pytest.raises(ValueError, match=r"got \(0, 10\)"):
        top_k.top_k_indices(x[:0], 2)
    with pytest.raises(ValueError, match=r"1 to min\(MAX_K=16, V=10\) per row, got k=0"):
        top_k.top_k_indices(x, 0)
    with pytest.raises(ValueError, match="V=3.*got k=4"):
        top_k.top_k_indices(x[:, :3], 4)
    with pytest.raises(ValueError, match="got k=17; use torch.topk"):
        top_k.top_k_indices(torch.randn(2, 100), top_k.MAX_K + 1)
    with pytest.raises(ValueError, match=r"a long tensor \[10\] on cpu; got torch.int64 \(9,\)"):
        top_k.top_k_indices(x, 2, ids=torch.arange(9))
    with pytest.raises(ValueError, match=r"got torch.int32 \(10,\)"):
        top_k.top_k_indices(x, 2, ids=torch.arange(10, dtype=torch.int32))
    with pytest.raises(ValueError, match="got torch.float64"):
        top_k.top_k_indices(x.double(), 2)
    with pytest.raises(ValueError, match="power of two"):
        top_k.top_k_indices(x, 2, block=1000)
    with pytest.raises(ValueError, match="4097 chunks of 16 columns x k=2 make 8194: take a larger block"):
        top_k.top_k_indices(torch.randn(1, 16 * 4097), 2, block=16)


def test_only_a_recent_card_or_the_interpreter(monkeypatch):
    assert top_k.available(torch.device("cpu"), torch.bfloat16)
    assert not top_k.available(torch.device("cpu"), torch.float64)
    monkeypatch.setattr(top_k, "INTERPRETED", False)
    assert not top_k.available(torch.device("cpu"))
    monkeypatch.setenv("SPECVLM_PICKS", "triton")
    with pytest.raises(ValueError, match="set SPECVLM_PICKS=torch or unset it"):
        fast.picks_kernel(torch.device("cpu"))
    assert fast.picks_kernel() == "triton"  # no device: the setting only


class NoLaunch:
    """A kernel stand-in: `kernel[grid](...)` does nothing (only the checks before the launch are tested)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_fits_says_what_top_k_indices_takes(monkeypatch):
    monkeypatch.setattr(top_k, "_chunk_top_k", NoLaunch())
    monkeypatch.setattr(top_k, "_merge_top_k", NoLaunch())
    edge = top_k.MAX_CANDIDATES // 16 * top_k.BLOCK  # the most columns at 16 picks
    for columns, k in [(151_936, 16), (10, 10), (edge, 16), (3, 4), (10, 0), (edge + 1, 16), (edge + 1, 8),
                       (100, top_k.MAX_K + 1)]:
        try:
            top_k.top_k_indices(torch.zeros(1, columns), k)
            taken = True
        except ValueError:
            taken = False
        assert top_k.fits(columns, k) is taken, (columns, k)
    assert not top_k.fits(151_936, 16, block=16)  # 9,496 chunks x 16: a block of 16 is too small there


def test_forced_triton_picks_say_which_bound_the_tree_passes(monkeypatch):
    monkeypatch.setattr(top_k, "available", lambda device, dtype=torch.float32: True)
    monkeypatch.setenv("SPECVLM_PICKS", "triton")
    cuda, most = torch.device("cuda"), top_k.MAX_CANDIDATES // 16 * top_k.BLOCK
    for top, columns, says in [(16, most + 1, f"at most {most:,} token ids and the draft has {most + 1:,}"),
                               (top_k.MAX_K + 1, None, f"the kernels pick at most {top_k.MAX_K}"),
                               (top_k.MAX_K + 1, 151_936, f"the kernels pick at most {top_k.MAX_K}"),
                               (8, 5, "from only 5 token ids")]:
        with pytest.raises(ValueError, match=f"cannot take this tree's picks: .*{says}.*set SPECVLM_PICKS=torch"):
            fast.picks_kernel(cuda, top, columns)
    assert fast.picks_kernel(cuda, 16, 151_936) == fast.picks_kernel(cuda, 16, most) == "triton"


def test_auto_picks_take_the_kernels_only_on_a_cuda_card_they_run_on(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(top_k, "available", lambda device, dtype=torch.float32: True)
    for unset_or_auto in ("", "auto"):
        monkeypatch.setenv("SPECVLM_PICKS", unset_or_auto)
        assert fast.picks_kernel() == "auto"
        assert fast.picks_kernel(cuda, 4) == fast.picks_kernel(cuda) == "triton"
        assert fast.picks_kernel(cuda, top_k.MAX_K + 1) == "torch"  # wider than the kernels pick: no error, torch
        assert fast.picks_kernel(cuda, 16, 151_936) == "triton"  # Qwen2's vocabulary: 75 chunks x 16 candidates
        too_many = top_k.MAX_CANDIDATES // 16 * top_k.BLOCK + 1  # one chunk more than the merge holds at 16 picks
        assert fast.picks_kernel(cuda, 16, too_many) == "torch"
        assert fast.picks_kernel(cuda, 4, too_many) == "triton"  # fewer picks a chunk: the merge holds them
        assert fast.picks_kernel(cpu, 4) == "torch"  # the interpreter is for tests, never a default
    monkeypatch.setattr(top_k, "available", lambda device, dtype=torch.float32: False)  # an older card, or no Triton
    assert fast.picks_kernel(cuda, 4) == "torch"
    monkeypatch.setenv("SPECVLM_PICKS", "torch")
    monkeypatch.setattr(top_k, "available", lambda device, dtype=torch.float32: True)
    assert fast.picks_kernel(cuda, 4) == "torch"


class Resolved(Exception):
    """Raised by a spy once the picks are resolved for a device: the test needs no further step."""


def test_picks_are_resolved_for_the_drafts_device_and_the_trees_widest_level(embedded, monkeypatch):
    """The draft's logits decide where the picks run, not the target's; the tree's widest rank count
    decides whether the kernels can take them. Here the draft says it is on a second card."""
    draft_card = torch.device("cuda", 1)
    model_class, original = type(embedded.draft), type(embedded.draft).device
    monkeypatch.setattr(model_class, "device",
                        property(lambda self: draft_card if self is embedded.draft else original.fget(self)))
    seen = []

    def spy(device=None, top=None, columns=None):
        seen.append((device, top, columns))
        if device is not None:
            raise Resolved
        return "auto"

    monkeypatch.setattr(fast, "picks_kernel", spy)
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    with pytest.raises(Resolved):
        fast.generate_fast(embedded, prompt, tree=MC_SIM_7B_63, compile=False)
    widest = max(fast.DraftLevels.of(MC_SIM_7B_63).top)
    rows = embedded.draft.model.get_output_embeddings().weight.shape[0]
    assert seen == [(None, None, None), (draft_card, widest, rows)]  # the setting checked first, then resolved
    seen.clear()
    with pytest.raises(Resolved):
        bench_module.picks_of(embedded.draft, MC_SIM_7B_63)
    assert seen == [(draft_card, widest, rows)]  # a bench row records what the run resolved
    monkeypatch.setenv("SPECVLM_DRAFT_VOCAB", "100")  # a cut vocabulary: the picks rank its ids only
    seen.clear()
    with pytest.raises(Resolved):
        fast.generate_fast(embedded, prompt, tree=MC_SIM_7B_63, compile=False)
    with pytest.raises(Resolved):
        bench_module.picks_of(embedded.draft, MC_SIM_7B_63)
    assert seen == [(None, None, None), (draft_card, widest, 100), (draft_card, widest, 100)]


def test_by_default_a_cpu_run_picks_with_torch(embedded, monkeypatch):
    monkeypatch.delenv("SPECVLM_PICKS", raising=False)
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    calls = counting(monkeypatch)
    result = fast.generate_fast(embedded, prompt, method="specvlm", ratio=0.5, tree=MC_SIM_7B_63, max_new_tokens=8,
                                compile=False)
    assert not calls and result.tokens == decoding.generate_ar(embedded.target, prompt, 8).tokens


# ----------------------------------------------------------------------------------------
# the fast path's picks


@pytest.fixture(scope="module")
def embedded():
    return sv.load_pair("tiny", device="cpu")


def counting(monkeypatch) -> list:
    calls = []

    def counted(logits, k, ids=None, original=top_k.top_k_indices, **kwargs):
        calls.append(ids)
        return original(logits, k, ids, **kwargs)

    monkeypatch.setattr(top_k, "top_k_indices", counted)
    return calls


@pytest.mark.parametrize("clip", ["bikes", "bigbuckbunny"])
def test_triton_picks_give_torchs_tokens_and_accepted_counts(embedded, clip, monkeypatch):
    prompt = embedded.target.prepare(sv.sample_video(clip, 3))
    options = dict(method="specvlm", ratio=0.5, tree=MC_SIM_7B_63, max_new_tokens=16, compile=False)
    monkeypatch.setenv("SPECVLM_PICKS", "torch")
    calls = counting(monkeypatch)
    torch_picks = fast.generate_fast(embedded, prompt, **options)
    assert not calls
    monkeypatch.setenv("SPECVLM_PICKS", "triton")  # read once per generation: it may change between runs
    triton_picks = fast.generate_fast(embedded, prompt, **options)
    assert triton_picks.tokens == torch_picks.tokens == decoding.generate_ar(embedded.target, prompt, 16).tokens
    assert triton_picks.accepted == torch_picks.accepted and sum(triton_picks.accepted) > 0
    assert calls and len(calls) % MC_SIM_7B_63.depth == 0  # every tree round picks each level once
    assert all(ids is None for ids in calls)  # the whole vocabulary: the columns are the token ids


def test_triton_picks_map_a_scattered_vocabulary_back_to_its_tokens(embedded, monkeypatch):
    """Kept ids that are not 0..N-1 (as in test_draft_vocab): the kernel's ids mapping gives what
    torch.topk and `StaticLM.token_ids` give, round for round."""
    prompt = embedded.target.prepare(sv.sample_video("bikes", 3))
    answer = decoding.generate_ar(embedded.target, prompt, 16).tokens
    ids = scattered_vocabulary(embedded.draft, answer)
    options = dict(method="specvlm", ratio=0.5, tree=MC_SIM_7B_63, max_new_tokens=16, compile=False, draft_vocab=ids)
    monkeypatch.setenv("SPECVLM_PICKS", "torch")
    torch_picks = fast.generate_fast(embedded, prompt, **options)
    calls = counting(monkeypatch)
    monkeypatch.setenv("SPECVLM_PICKS", "triton")
    triton_picks = fast.generate_fast(embedded, prompt, **options)
    assert triton_picks.tokens == torch_picks.tokens == answer
    assert triton_picks.accepted == torch_picks.accepted and sum(triton_picks.accepted) > 0
    assert calls and all(torch.equal(got, ids) for got in calls)


def test_a_bad_setting_is_refused_before_any_prefill(embedded, monkeypatch):
    calls = []
    monkeypatch.setattr(fast, "prefill_target", lambda *a, **k: calls.append(a))
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    monkeypatch.setenv("SPECVLM_PICKS", "cuda")
    with pytest.raises(ValueError, match="SPECVLM_PICKS must be 'auto', 'torch' or 'triton', got 'cuda'"):
        fast.generate_fast(embedded, prompt, tree=MC_SIM_7B_63, compile=False)
    monkeypatch.setenv("SPECVLM_PICKS", "triton")
    wide = sv.Tree.from_paths([[rank] for rank in range(top_k.MAX_K + 1)])
    with pytest.raises(ValueError, match="ranks up to 17 tokens at a node and the kernels pick at most 16"):
        fast.generate_fast(embedded, prompt, tree=wide, compile=False)
    monkeypatch.setattr(top_k, "INTERPRETED", False)
    with pytest.raises(ValueError, match="Triton's interpreter"):
        fast.generate_fast(embedded, prompt, tree=MC_SIM_7B_63, compile=False)
    monkeypatch.setenv("SPECVLM_PICKS", "cuda")
    with pytest.raises(ValueError, match="SPECVLM_PICKS must be"):  # checked for AR too, as every setting is
        fast.generate_fast(embedded, prompt, method="ar", compile=False)
    assert not calls


def test_a_chain_never_picks_by_top_k_so_the_setting_does_not_stop_it(embedded, monkeypatch):
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    monkeypatch.setenv("SPECVLM_PICKS", "triton")
    monkeypatch.setattr(top_k, "INTERPRETED", False)  # the kernels could not run here
    result = fast.generate_fast(embedded, prompt, k=3, max_new_tokens=8, compile=False)
    assert result.tokens == decoding.generate_ar(embedded.target, prompt, 8).tokens


def test_fast_rows_record_their_picks_kernel(embedded, monkeypatch):
    monkeypatch.setenv("SPECVLM_PICKS", "triton")
    video_for = lambda frames: sv.from_array(synthetic.make_clip(0, num_frames=frames).frames, fps=8.0)
    result = bench(embedded, video_for, [1], max_new_tokens=6, repeats=1, step_repeats=1, paths=("plain", "fast"),
                   only=["specvlm-tree-0.5", "specvlm-chain-0.9"])
    picks = {(r["path"], r["method"], r["draft"]): r["draft_picks_kernel"] for r in result["rows"]}
    assert picks == {("plain", "ar", None): None, ("plain", "specvlm", "tree"): None, ("plain", "specvlm", "chain"): None,
                     ("fast", "ar", None): None, ("fast", "specvlm", "tree"): "triton", ("fast", "specvlm", "chain"): None}
    assert all(r["equal_to_ar"] for r in result["rows"])
    assert "SPECVLM_PICKS=triton " in recorded_environment()
    monkeypatch.delenv("SPECVLM_PICKS")
    result = bench(embedded, video_for, [1], max_new_tokens=6, repeats=1, step_repeats=1, paths=("fast",),
                   only=["specvlm-tree-0.5"])
    assert [r["draft_picks_kernel"] for r in result["rows"] if r["method"] != "ar"] == ["torch"]  # "auto" on a CPU
