"""`split_merge`: a wide step's own slots and the merge of `split_attention` in one Triton kernel,
run on the CPU in Triton's interpreter (conftest turns it on), against the torch operations it
replaces, and inside the fast path against the plain path's tokens."""

import weakref

import pytest
import torch

import specvlm as sv
from specvlm import decoding, fast, flash_decode as fd, split_merge, step_attention as sa

from .test_fast import SMALL_TREE, embedded  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not fd.available(torch.device("cpu"), torch.float32), reason="needs Triton's interpreter")


def inputs(heads, kv_heads, dim, q, capacity, start, seed=0):
    generator = torch.Generator().manual_seed(seed + capacity + start)
    query = torch.randn(1, q, heads, dim, generator=generator).transpose(1, 2)  # as the layers hand it over
    key, value = (torch.randn(1, kv_heads, capacity, dim, generator=generator) for _ in range(2))
    pattern = (torch.rand(q, q, generator=generator) < 0.4) | torch.eye(q, dtype=torch.bool)  # rows see themselves
    start = torch.tensor(start)
    return query, key, value, start, sa.visibility_bias(start, pattern, capacity, torch.float32)


def split(query, key, value, start, bias, chunk, merge, monkeypatch):
    monkeypatch.setattr(split_merge, "CHOICE", merge)
    return sa.split_attention(query, key, value, bias, start, query.shape[2], 0.3, chunk)


@pytest.mark.parametrize("heads,kv_heads,dim,q,capacity,start,chunk", [
    (28, 4, 16, 26, 384, 300, 64),  # a 7B-like tree verification: 182 stacked rows per KV head
    (14, 2, 32, 5, 256, 0, 64),  # nothing committed: every chunk empty, the own slots alone
    (8, 2, 16, 5, 256, 251, 100),  # the own slots reach past the cache's end; a last chunk of 156 slots
    (8, 8, 64, 3, 200, 64, 64),  # one query head per KV head; start on a chunk's edge
    (6, 2, 16, 17, 4200, 4000, 128),  # 32 chunks, 31 used: the merge reads them all at once
])
def test_the_kernel_equals_the_torch_operations(heads, kv_heads, dim, q, capacity, start, chunk, monkeypatch):
    query, key, value, start, bias = inputs(heads, kv_heads, dim, q, capacity, start)
    expected = split(query, key, value, start, bias, chunk, "torch", monkeypatch)
    launched = []
    real = sa.own_slots_and_merge
    monkeypatch.setattr(sa, "own_slots_and_merge", lambda *args: launched.append(args[-2]) or real(*args))
    got = split(query, key, value, start, bias, chunk, "triton", monkeypatch)
    assert launched == [q]
    assert got.shape == expected.shape == (1, heads, q, dim)
    assert got.transpose(1, 2).is_contiguous()  # written as [1, q, Hq, d], the output projection's layout
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, sa.grouped_attention(query, key, value, bias, 0.3), rtol=1e-5, atol=1e-5)


def test_empty_chunks_and_unseen_slots_weigh_nothing(monkeypatch):
    """Whatever an empty chunk (`used` 0) holds, and whatever lies in slots no row sees, the result
    is the same: the flash kernel writes +inf as an empty chunk's log-sum-exp."""
    query, key, value, start, bias = inputs(8, 2, 16, 4, 256, 90)
    q, rows = 4, query.reshape(2, 16, 16)
    bounds = torch.tensor([0, 64, 128, 192, 256])
    used = torch.minimum((start - bounds[:-1]).clamp(min=0), bounds[1:] - bounds[:-1])
    out, lse = sa.chunked_prefix_attention(rows, key[0], value[0], bounds, used, 64, 0.3)
    merge = lambda out, lse, key=key: split_merge.own_slots_and_merge(rows, key[0], value[0], bias[0, 0], start, q,
                                                                       out, lse, used, q, 0.3)
    clean = merge(out, lse)
    noisy_out, noisy_lse = out.clone(), lse.clone()
    noisy_out[used == 0], noisy_lse[used == 0] = 1e4, 50.0
    garbage = key.clone()
    garbage[:, :, int(start) + q:] = 1e4
    torch.testing.assert_close(merge(noisy_out, noisy_lse, garbage), clean)
    assert torch.isfinite(lse[used == 0]).logical_not().all()  # the case this guards: +inf there


def test_where_the_kernel_serves(monkeypatch):
    monkeypatch.setattr(split_merge, "CHOICE", None)
    assert not split_merge.available("cpu", torch.float32)  # the interpreter is slow: torch by default on a CPU
    monkeypatch.setattr(split_merge, "CHOICE", "triton")
    assert split_merge.available("cpu", torch.float32)
    assert not split_merge.available("cpu", torch.bfloat16)  # the interpreter runs float32 only
    assert not split_merge.available("cpu", torch.float32, dim=24)  # head sizes the kernel cannot take
    assert not split_merge.available("cpu", torch.float32, dim=8)
    monkeypatch.setattr(split_merge, "CHOICE", "torch")
    assert not split_merge.available("cpu", torch.float32)
    monkeypatch.setattr(split_merge, "CHOICE", "fused")
    with pytest.raises(ValueError, match="SPECVLM_SPLIT_MERGE must be 'triton' or 'torch', got 'fused'"):
        split_merge.available("cpu", torch.float32)


def test_the_choice_is_read_from_the_environment_at_import(monkeypatch):
    import importlib

    monkeypatch.setenv("SPECVLM_SPLIT_MERGE", "torch")
    try:
        assert importlib.reload(split_merge).CHOICE == "torch"
    finally:
        monkeypatch.delenv("SPECVLM_SPLIT_MERGE")
        importlib.reload(split_merge)
    assert split_merge.CHOICE is None


def test_a_head_size_the_kernel_cannot_take_keeps_the_torch_operations(monkeypatch):
    query, key, value, start, bias = inputs(8, 2, 8, 5, 256, 100)
    monkeypatch.setattr(sa, "own_slots_and_merge", lambda *args: pytest.fail("the kernel took head size 8"))
    got = split(query, key, value, start, bias, 64, "triton", monkeypatch)
    torch.testing.assert_close(got, sa.grouped_attention(query, key, value, bias, 0.3), rtol=1e-5, atol=1e-5)


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
    assert (target["split_wide_steps"], target["split_merge"], fast.head_size(embedded.target)) == (True, "triton", 128)
