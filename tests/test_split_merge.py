"""`split_merge`: a wide step's own slots and the merge of `split_attention` in one Triton kernel,
run on the CPU in Triton's interpreter (conftest turns it on), against the torch operations it
replaces, and inside the fast path against the plain path's tokens."""

import weakref

import pytest
import torch

import specvlm as sv
from specvlm import decoding, fast, flash_decode as fd, split_merge, step_attention as sa
from specvlm.models import head_dim

from .test_fast import SMALL_TREE, embedded  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not fd.available(torch.device("cpu"), torch.float32), reason="needs Triton's interpreter")


def inputs(heads, kv_heads, dim, q, capacity, start, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed + capacity + start)
    query = torch.randn(1, q, heads, dim, generator=generator).transpose(1, 2)  # as the layers hand it over
    key, value = (torch.randn(1, kv_heads, capacity, dim, generator=generator) for _ in range(2))
    pattern = (torch.rand(q, q, generator=generator) < 0.4) | torch.eye(q, dtype=torch.bool)  # rows see themselves
    start = torch.tensor(start)
    return (query.to(dtype), key.to(dtype), value.to(dtype), start,
            sa.visibility_bias(start, pattern, capacity, torch.float32).to(dtype))


@pytest.mark.parametrize("heads,kv_heads,dim,q,capacity,start,chunk", [
    (28, 4, 16, 26, 384, 300, 64),  # a 7B-like tree verification: 182 stacked rows per KV head
    (14, 2, 32, 5, 256, 0, 64),  # nothing committed: every chunk empty, the own slots alone
    (8, 2, 16, 5, 256, 253, 100),  # own slots 256 and 257 lie past the cache's end; a last chunk of 156 slots
    (8, 8, 64, 3, 200, 64, 64),  # one query head per KV head; start on a chunk's edge
    (6, 2, 16, 17, 4200, 4000, 128),  # 32 chunks, the last one partly used
    (4, 2, 16, 6, 1024, 1000, 16),  # 64 chunks: the most the kernel takes (MAX_CHUNKS)
])
def test_the_kernel_equals_the_torch_operations(heads, kv_heads, dim, q, capacity, start, chunk, monkeypatch):
    query, key, value, start, bias = inputs(heads, kv_heads, dim, q, capacity, start)
    expected = sa.split_attention(query, key, value, bias, start, q, 0.3, chunk, merge="torch")
    launched = []
    real = sa.own_slots_and_merge
    monkeypatch.setattr(sa, "own_slots_and_merge", lambda *args: launched.append(args[-2]) or real(*args))
    got = sa.split_attention(query, key, value, bias, start, q, 0.3, chunk, merge="triton")
    assert launched == [q]
    assert got.shape == expected.shape == (1, heads, q, dim)
    assert got.transpose(1, 2).is_contiguous()  # written as [1, q, Hq, d], the output projection's layout
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, sa.grouped_attention(query, key, value, bias, 0.3), rtol=1e-5, atol=1e-5)


def test_more_chunks_than_the_kernel_takes_keep_the_torch_operations(monkeypatch):
    query, key, value, start, bias = inputs(4, 2, 16, 6, 1600, 1500)  # 100 chunks of 16 slots
    assert 1600 // 16 > split_merge.MAX_CHUNKS
    real = sa.own_slots_and_merge
    monkeypatch.setattr(sa, "own_slots_and_merge", lambda *args: pytest.fail("the kernel took 100 chunks"))
    got = sa.split_attention(query, key, value, bias, start, 6, 0.3, 16, merge="triton")
    torch.testing.assert_close(got, sa.grouped_attention(query, key, value, bias, 0.3), rtol=1e-5, atol=1e-5)
    rows = query.reshape(2, 12, 16)
    bounds = torch.arange(0, 1601, 16)
    used = torch.minimum((start - bounds[:-1]).clamp(min=0), bounds[1:] - bounds[:-1])
    out, lse = sa.chunked_prefix_attention(rows, key[0], value[0], bounds, used, 16, 0.3)
    with pytest.raises(ValueError, match="at most 64 chunks; got strided \\[\\], used of shape \\(100,\\) for 100 chunks"):
        real(rows, key[0], value[0], bias[0, 0], start, 6, out, lse, used, 6, 0.3)


def test_half_precision_rounds_where_the_torch_operations_round():
    """The own part's probabilities and output are rounded to the value dtype before the merge, as
    the torch operations round them: in float16 both give the same numbers but for a handful one unit
    in the last place apart (skipping either rounding changes about a tenth of them)."""
    query, key, value, start, bias = inputs(28, 4, 16, 26, 384, 300, dtype=torch.float16)
    expected = sa.split_attention(query, key, value, bias, start, 26, 0.3, 64, merge="torch")
    got = sa.split_attention(query, key, value, bias, start, 26, 0.3, 64, merge="triton")
    assert (got != expected).float().mean() < 1e-3
    ulp = torch.finfo(torch.float16).eps * expected.abs().float().clamp(min=2 ** -14)  # one unit in the last place
    assert ((got.float() - expected.float()).abs() <= ulp).all()


def merge_parts(heads=8, kv_heads=2, dim=16, q=4, capacity=256, start=90, chunk=64):
    """split_attention's pieces, computed apart: (merge(prefix_out, prefix_lse), prefix_out, prefix_lse, used)."""
    query, key, value, start, bias = inputs(heads, kv_heads, dim, q, capacity, start)
    rows = query.reshape(kv_heads, heads // kv_heads * q, dim)
    bounds = torch.arange(0, capacity + 1, chunk)
    used = torch.minimum((start - bounds[:-1]).clamp(min=0), bounds[1:] - bounds[:-1])
    out, lse = sa.chunked_prefix_attention(rows, key[0], value[0], bounds, used, chunk, 0.3)
    merge = lambda out, lse: split_merge.own_slots_and_merge(rows, key[0], value[0], bias[0, 0], start, q, out, lse,
                                                             used, q, 0.3)
    return merge, out, lse, used


def test_the_flash_kernels_layouts_are_read_in_place():
    """The variable-length flash kernel's outputs, as `chunked_prefix_attention` views them: the
    outputs [chunks * M, Hkv, d] seen as [chunks, Hkv, M, d], the log-sum-exps a slice of a padded
    [Hkv, total] buffer seen as [chunks, Hkv, M]; the same result as from contiguous tensors."""
    merge, out, lse, _ = merge_parts()
    chunks, heads, m, dim = out.shape
    flash_out = out.transpose(1, 2).contiguous().view(chunks * m, heads, dim).view(chunks, m, heads, dim).transpose(1, 2)
    padded = torch.full((heads, chunks * m + 7), float("nan"))
    padded[:, :chunks * m] = lse.transpose(0, 1).reshape(heads, chunks * m)
    flash_lse = padded[:, :chunks * m].reshape(heads, chunks, m).transpose(0, 1)
    assert not flash_out.is_contiguous() and not flash_lse.is_contiguous()
    torch.testing.assert_close(merge(flash_out, flash_lse), merge(out.contiguous(), lse.contiguous()))


def test_empty_chunks_weigh_nothing_whatever_they_hold():
    """An empty chunk (`used` 0) adds nothing, even NaN outputs or +inf log-sum-exps (the flash kernel
    writes +inf as an empty chunk's log-sum-exp)."""
    merge, out, lse, used = merge_parts()
    assert (used == 0).any() and (used > 0).any()
    assert torch.isinf(lse[used == 0]).all()  # the case this guards
    clean = merge(out, lse)
    noisy_out, noisy_lse = out.clone(), lse.clone()
    noisy_out[used == 0], noisy_lse[used == 0] = float("nan"), float("nan")
    torch.testing.assert_close(merge(noisy_out, noisy_lse), clean)
    assert torch.isfinite(clean).all()


@pytest.mark.parametrize("bad", ["key", "value", "prefix_out", "used"])
def test_the_wrapper_refuses_layouts_the_kernel_cannot_read(bad):
    query, key, value, start, bias = inputs(8, 2, 16, 4, 256, 90)
    rows = query.reshape(2, 16, 16)
    bounds = torch.arange(0, 257, 64)
    used = torch.minimum((start - bounds[:-1]).clamp(min=0), bounds[1:] - bounds[:-1])
    out, lse = sa.chunked_prefix_attention(rows, key[0], value[0], bounds, used, 64, 0.3)
    column_major = lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)  # the same values, d strided
    args = {"key": key[0], "value": value[0], "prefix_out": out, "used": used}
    args[bad] = used[:-1] if bad == "used" else column_major(args[bad])
    message = r"used of shape \(3,\) for 4 chunks" if bad == "used" else rf"strided \['{bad}'\]"
    with pytest.raises(ValueError, match=message):
        split_merge.own_slots_and_merge(rows, args["key"], args["value"], bias[0, 0], start, 4, args["prefix_out"], lse,
                                        args["used"], 4, 0.3)


def test_which_merge_runs_follows_the_chunk_count_and_the_choice(monkeypatch):
    monkeypatch.setattr(split_merge, "CHOICE", None)
    assert sa.merge_kernel("cuda", torch.bfloat16, 128, 12416) == "triton"
    assert sa.merge_kernel("cuda", torch.bfloat16, 128, 64 * 512 + 511) == "triton"  # the last chunk takes the rest
    assert sa.merge_kernel("cuda", torch.bfloat16, 128, 65 * 512) == "torch"  # more than MAX_CHUNKS chunks
    assert sa.merge_kernel("cuda", torch.bfloat16, 128, 65 * 512, chunk=1024) == "triton"
    assert sa.merge_kernel("cuda", torch.bfloat16, 128, 12416, merge="torch") == "torch"
    assert sa.merge_kernel("cpu", torch.float32, 128, 12416) == "torch"
    assert sa.merge_kernel("cpu", torch.float32, 128, 12416, merge="triton") == "triton"
    with pytest.raises(ValueError, match="merge must be 'triton', 'torch' or None, got 'fused'"):
        sa.merge_kernel("cuda", torch.bfloat16, 128, 12416, merge="fused")


def test_split_attention_traces_without_a_graph_break(monkeypatch):
    """The choice of merge is made while dynamo traces (`available`, `merge_kernel`): no graph break,
    and under compile on a CPU the torch operations (dynamo cannot trace Triton's interpreter)."""
    monkeypatch.setattr(split_merge, "CHOICE", "triton")
    monkeypatch.setattr(sa, "own_slots_and_merge", lambda *args: pytest.fail("the interpreter under dynamo"))
    query, key, value, start, bias = inputs(28, 4, 16, 26, 384, 300)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *args: sa.split_attention(*args, 26, 0.3, 64), fullgraph=True, backend="eager")
    got = compiled(query, key, value, bias, start)
    torch.testing.assert_close(got, sa.split_attention(query, key, value, bias, start, 26, 0.3, 64, merge="torch"))


def test_where_the_kernel_serves(monkeypatch):
    monkeypatch.setattr(split_merge, "CHOICE", None)
    assert not split_merge.available("cpu", torch.float32)  # the interpreter is slow: torch by default on a CPU
    assert split_merge.available("cuda", torch.bfloat16) and split_merge.available("cuda", torch.float16)
    assert not split_merge.available("cuda", torch.float32)  # the flash part runs in half precision only
    monkeypatch.setattr(split_merge, "CHOICE", "triton")
    assert split_merge.available("cpu", torch.float32)
    assert not split_merge.available("cpu", torch.bfloat16)  # the interpreter runs float32 here
    assert not split_merge.available("cpu", torch.float32, dim=24)  # head sizes the kernel cannot take
    assert not split_merge.available("cpu", torch.float32, dim=8)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not split_merge.available("cpu", torch.float32)  # dynamo cannot trace the interpreter
    assert split_merge.available("cuda", torch.bfloat16)  # on a card the kernel is compiled into the step
    monkeypatch.setattr(split_merge, "CHOICE", "torch")
    assert not split_merge.available("cuda", torch.bfloat16)


def test_the_choice_comes_from_the_environment_and_a_bad_one_is_refused_before_any_prefill(embedded, monkeypatch):
    assert [split_merge.choice_from(env) for env in ({}, {"SPECVLM_SPLIT_MERGE": ""},
                                                     {"SPECVLM_SPLIT_MERGE": "torch"})] == [None, None, "torch"]
    monkeypatch.setattr(split_merge, "CHOICE", split_merge.choice_from({"SPECVLM_SPLIT_MERGE": "fused"}))
    message = "SPECVLM_SPLIT_MERGE must be 'triton' or 'torch' \\(or unset\\), got 'fused'"
    with pytest.raises(ValueError, match=message):
        split_merge.available("cuda", torch.bfloat16)
    monkeypatch.setattr(fast, "_ENGINES", weakref.WeakKeyDictionary())
    monkeypatch.setattr(decoding, "prefill_target", lambda *args, **kwargs: pytest.fail("prefilled"))
    monkeypatch.setattr(fast, "prefill_target", lambda *args, **kwargs: pytest.fail("prefilled"))
    with pytest.raises(ValueError, match=message):
        fast.generate_fast(embedded, embedded.target.prepare(sv.sample_video("bikes", 2)), method="sd", k=2,
                           max_new_tokens=4, compile=False)


def test_a_head_size_the_kernel_cannot_take_keeps_the_torch_operations(monkeypatch):
    query, key, value, start, bias = inputs(8, 2, 8, 5, 256, 100)
    monkeypatch.setattr(split_merge, "CHOICE", "triton")
    monkeypatch.setattr(sa, "own_slots_and_merge", lambda *args: pytest.fail("the kernel took head size 8"))
    got = sa.split_attention(query, key, value, bias, start, 5, 0.3, 64)
    torch.testing.assert_close(got, sa.grouped_attention(query, key, value, bias, 0.3), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="merge must be 'triton', 'torch' or None, got 'fused'"):
        sa.split_attention(query, key, value, bias, start, 5, 0.3, 64, merge="fused")


def test_tree_verifications_through_the_kernel_keep_the_plain_path_tokens(embedded, monkeypatch):
    """Every wide verification through `split_attention` and this kernel: the plain path's tokens
    and accepted counts. A 7-node tree counts as wide here (FLEX_MAX_QUERY lowered), so the
    interpreter has few rows to run. Uncompiled: dynamo cannot trace Triton's interpreter (on CUDA
    the GPU benchmark compiles the kernel into every tree verification's graph)."""
    monkeypatch.setenv("SPECVLM_SPLIT_MIN_SLOTS", "1")
    monkeypatch.setattr(split_merge, "CHOICE", "triton")
    monkeypatch.setattr(fast, "FLEX_MAX_QUERY", 4)
    monkeypatch.setattr(fast, "_ENGINES", weakref.WeakKeyDictionary())  # step functions made under these settings
    merged = []
    real = sa.own_slots_and_merge
    monkeypatch.setattr(sa, "own_slots_and_merge", lambda *args: merged.append(args[-2]) or real(*args))
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    options = dict(method="specvlm", ratio=0.5, tree=SMALL_TREE, max_new_tokens=10)
    reference = decoding.generate_sd(embedded, prompt, **options)
    result = fast.generate_fast(embedded, prompt, compile=False, attention="flex", **options)
    assert result.tokens == reference.tokens and result.accepted == reference.accepted
    assert set(merged) == {SMALL_TREE.num_nodes}
    target = fast.capture_report(embedded)["models"]["target"]
    assert (target["split_wide_steps"], target["split_merge"], head_dim(embedded.target.language_model.config)) == (
        True, "triton", 128)
