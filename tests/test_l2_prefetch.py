"""`l2_prefetch`: the chunk tables that cover a layer's weights, which weights each layer asks for,
and the fast path's wiring ($SPECVLM_L2_PREFETCH=1). The prefetch instruction itself runs only on a
Hopper card (the GPU benchmark checks the tokens there); here a spy stands in for the kernel."""

import pytest
import torch

import specvlm as sv
from specvlm import decoding, fast, fusion, l2_prefetch
from specvlm.__main__ import recorded_environment
from specvlm.bench import bench
from specvlm.trees import MC_SIM_7B_63


def covered_bytes(table: torch.Tensor) -> list[tuple[int, int]]:
    """The table's chunks merged into (start, end) byte ranges."""
    ranges = []
    for address, size in table.tolist():
        if ranges and ranges[-1][1] == address:
            ranges[-1] = (ranges[-1][0], address + size)
        else:
            ranges.append((address, address + size))
    return ranges


@pytest.mark.parametrize("chunk", [16, 48, 4096, 16384])
def test_a_table_covers_each_tensors_bytes_exactly_in_chunks(chunk):
    tensors = [torch.zeros(1000, dtype=torch.bfloat16), torch.zeros(3, 7), torch.zeros(5, dtype=torch.int8),
               torch.zeros(4096, dtype=torch.bfloat16)]
    table = l2_prefetch.chunk_table(tensors, chunk)
    assert table.dtype == torch.int64 and table.shape[1] == 2
    sizes = table[:, 1]
    assert bool((sizes > 0).all() and (sizes <= chunk).all() and (sizes % 16 == 0).all())
    assert bool((table[:, 0] % 16 == 0).all())
    expected = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size() // 16 * 16) for t in tensors]
    assert covered_bytes(table) == [(start, end) for start, end in expected if end > start]  # 5 bytes: nothing
    assert int(sizes.sum()) == sum(end - start for start, end in expected)


def test_a_table_keeps_to_the_aligned_units_inside_a_tensor():
    """The instruction reads 16-byte units from 16-byte aligned addresses: a view that starts off the
    grid is shrunk to the units inside it, never widened past its bytes."""
    base = torch.zeros(100, dtype=torch.bfloat16)
    assert base.data_ptr() % 16 == 0
    view = base[1:-3]  # bytes 2 .. 194
    table = l2_prefetch.chunk_table([view], chunk=32)
    assert covered_bytes(table) == [(base.data_ptr() + 16, base.data_ptr() + 192)]
    assert l2_prefetch.chunk_table([base[1:8]]).shape == (0, 2)  # no whole unit inside


def test_bad_tables_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="contiguous"):
        l2_prefetch.chunk_table([torch.zeros(4, 8).t()])
    with pytest.raises(ValueError, match="multiple of 16 bytes from 16 to 1,048,560 .* got 24"):
        l2_prefetch.chunk_table([torch.zeros(8)], chunk=24)
    with pytest.raises(ValueError, match="size field\\), got 1048576"):  # 2**20 bytes would encode as nothing
        l2_prefetch.chunk_table([torch.zeros(8)], chunk=2**20)
    with pytest.raises(ValueError, match="at least one tensor"):
        l2_prefetch.chunk_table([])


def test_only_a_hopper_card_runs_it(monkeypatch):
    assert not l2_prefetch.available(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, runs in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert l2_prefetch.available(torch.device("cuda")) == runs


BUILD_FOR_HOPPER = """
import json, triton
from triton.backends.compiler import GPUTarget
from specvlm import l2_prefetch
source = triton.compiler.ASTSource(
    fn=l2_prefetch._prefetch_kernel, constexprs={"LANES": l2_prefetch.LANES},
    signature={"table_ptr": "*i64", "count": "i32", "after_ptr": "*bf16", "token_ptr": "*i32", "LANES": "constexpr"})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
print(json.dumps({"ptx": compiled.asm["ptx"], "ttgir": compiled.asm["ttgir"]}))
"""


def test_the_kernel_compiles_for_hopper_to_one_warp_issuing_bulk_prefetches():
    """Built for sm_90 on this CPU (Triton's compiler and its ptxas, no card; in a process of its own, since
    the tests' Triton interpreter would stand in for the compiler): the PTX holds the bulk prefetch,
    predicated on a non-empty chunk, with one warp per program (each lane's chunk issued once) and a
    relaxed atomic."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    built = subprocess.run([sys.executable, "-c", BUILD_FOR_HOPPER], capture_output=True, text=True, env=environment)
    if built.returncode:
        pytest.skip(f"Triton cannot build for sm_90 here: {built.stderr.strip().splitlines()[-1:]}")
    asm = json.loads(built.stdout.strip().splitlines()[-1])
    assert "setp.ne.s32 p, " in asm["ptx"] and "@p cp.async.bulk.prefetch.L2.global [" in asm["ptx"]
    assert any("atom.global" in line and ".relaxed" in line and ".max" in line for line in asm["ptx"].splitlines())
    assert "warpsPerCTA = [1]" in asm["ttgir"]


@pytest.fixture
def fused_draft():
    draft = sv.load_pair("tiny", device="cpu").draft
    fusion.fuse_projections(draft)
    return draft


def test_each_layer_asks_for_its_later_weights_and_the_next_layers_first(fused_draft, monkeypatch):
    monkeypatch.setattr(l2_prefetch, "available", lambda device: True)
    layers = fused_draft.language_model.layers
    l2_prefetch.attach(layers)
    for index, layer in enumerate(layers):
        weights = [layer.self_attn.o_proj.weight, layer.mlp.fused_weight, layer.mlp.down_proj.weight]
        if index + 1 < len(layers):
            weights.append(layers[index + 1].self_attn.fused_weight)
        assert torch.equal(layer.l2_table, l2_prefetch.chunk_table(weights))
    assert l2_prefetch.attached(fused_draft)
    assert l2_prefetch.detach(layers) and not l2_prefetch.attached(fused_draft)
    assert all(getattr(layer, "l2_table", None) is None for layer in layers)


def test_an_unfused_layer_asks_for_its_projections_one_by_one():
    draft = sv.load_pair("tiny", device="cpu").draft
    layer = draft.language_model.layers[0]
    assert l2_prefetch.first_weights(layer) == [layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                                layer.self_attn.v_proj.weight]
    assert l2_prefetch.layer_weights(layer) == [layer.self_attn.o_proj.weight, layer.mlp.gate_proj.weight,
                                                layer.mlp.up_proj.weight, layer.mlp.down_proj.weight]


def test_attaching_again_keeps_the_buffers_a_captured_graph_reads(fused_draft, monkeypatch):
    """A CUDA graph keeps reading the table it was captured with: a second `attach` keeps the same
    tensor, and writes new addresses into it where the weights moved."""
    monkeypatch.setattr(l2_prefetch, "available", lambda device: True)
    layers = fused_draft.language_model.layers
    l2_prefetch.attach(layers)
    tables = [layer.l2_table for layer in layers]
    l2_prefetch.attach(layers)
    assert all(layer.l2_table is table for layer, table in zip(layers, tables))
    moved = layers[0].mlp.down_proj.weight
    moved.data = moved.data.clone()  # elsewhere, the same size
    l2_prefetch.attach(layers)
    assert layers[0].l2_table is tables[0]
    assert moved.data_ptr() in layers[0].l2_table[:, 0].tolist()


def test_attaching_where_it_cannot_run_says_what_to_do(fused_draft):
    with pytest.raises(ValueError, match="compute capability 9.0 .* unset it or set it to 0"):
        l2_prefetch.attach(fused_draft.language_model.layers)


# ----------------------------------------------------------------------------------------
# the fast path


@pytest.fixture
def embedded():
    return sv.load_pair("tiny", device="cpu")


def spied(monkeypatch) -> list:
    """Let the prefetch 'run' on the CPU: record (table, layer input) per call instead of launching."""
    calls = []
    monkeypatch.setattr(l2_prefetch, "available", lambda device: True)
    monkeypatch.setattr(l2_prefetch, "prefetch", lambda table, after, token: calls.append((table, after.shape)))
    return calls


def test_a_prefetching_draft_keeps_ars_tokens_and_prefetches_every_layer_of_every_pass(embedded, monkeypatch):
    prompt = embedded.target.prepare(sv.sample_video("bikes", 3))
    options = dict(method="specvlm", ratio=0.5, tree=MC_SIM_7B_63, max_new_tokens=12, compile=False)
    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "1")
    calls = spied(monkeypatch)
    plain = fast.generate_fast(embedded, prompt, **options)
    assert not calls and not l2_prefetch.attached(embedded.draft)
    monkeypatch.setenv("SPECVLM_L2_PREFETCH", "1")
    prefetched = fast.generate_fast(embedded, prompt, **options)
    assert prefetched.tokens == plain.tokens == decoding.generate_ar(embedded.target, prompt, 12).tokens
    assert prefetched.accepted == plain.accepted
    layers = embedded.draft.language_model.layers
    assert calls and len(calls) % len(layers) == 0  # every draft pass (the prefill's too) runs each layer's
    assert [table for table, _ in calls[:len(layers)]] == [layer.l2_table for layer in layers]  # in layer order
    assert fast._ENGINES[embedded.draft]["draft"].l2_prefetch
    monkeypatch.setenv("SPECVLM_L2_PREFETCH", "0")  # off again: the hooks go and the engine is made anew
    calls.clear()
    assert fast.generate_fast(embedded, prompt, **options).tokens == plain.tokens
    assert not calls and not l2_prefetch.attached(embedded.draft)


def test_a_model_drafting_for_itself_and_an_unfused_draft_do_not_prefetch(embedded, monkeypatch):
    """Only a draft the fast path fuses prefetches: a target's layers read far more than L2 holds."""
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    calls = spied(monkeypatch)
    monkeypatch.setenv("SPECVLM_L2_PREFETCH", "1")
    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "0")
    fast.generate_fast(embedded, prompt, k=3, max_new_tokens=6, compile=False)
    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "1")
    own = sv.Pair(embedded.target, embedded.target, name="self")
    fast.generate_fast(own, prompt, method="specvlm", k=3, max_new_tokens=6, compile=False)
    assert not calls and not l2_prefetch.attached(embedded.target)


def test_a_bad_or_impossible_setting_is_refused_before_any_prefill(embedded, monkeypatch):
    calls = []
    monkeypatch.setattr(fast, "prefill_target", lambda *a, **k: calls.append(a))
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    monkeypatch.setenv("SPECVLM_L2_PREFETCH", "yes")
    with pytest.raises(ValueError, match="SPECVLM_L2_PREFETCH must be '0' or '1', got 'yes'"):
        fast.generate_fast(embedded, prompt, tree=MC_SIM_7B_63, compile=False)
    monkeypatch.setenv("SPECVLM_L2_PREFETCH", "1")
    for method in ("specvlm", "ar"):  # checked for AR too, as every setting is
        with pytest.raises(ValueError, match="compute capability 9.0 .* draft lies on cpu"):
            fast.generate_fast(embedded, prompt, method=method, compile=False)
    assert not calls


def test_fast_rows_record_whether_the_draft_prefetched(embedded, monkeypatch):
    spied(monkeypatch)
    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "1")
    monkeypatch.setenv("SPECVLM_L2_PREFETCH", "1")
    video_for = lambda frames: sv.from_array(sv.synthetic.make_clip(0, num_frames=frames).frames, fps=8.0)
    result = bench(embedded, video_for, [1], max_new_tokens=6, repeats=1, step_repeats=1, paths=("plain", "fast"),
                   only=["specvlm-tree-0.5"])
    recorded = {(r["path"], r["method"]): r["draft_l2_prefetch"] for r in result["rows"]}
    assert recorded == {("plain", "ar"): None, ("plain", "specvlm"): None, ("fast", "ar"): None,
                        ("fast", "specvlm"): True}
    assert all(r["equal_to_ar"] for r in result["rows"])
    assert "SPECVLM_L2_PREFETCH=1 " in recorded_environment()


def test_one_warp_per_32_chunks_is_launched(monkeypatch):
    launches = []

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    monkeypatch.setattr(l2_prefetch, "_prefetch_kernel", Launcher())
    table, after, token = torch.zeros(65, 2, dtype=torch.int64), torch.zeros(3), torch.zeros(1, dtype=torch.int32)
    l2_prefetch.prefetch(table, after, token)
    [(grid, args, kwargs)] = launches
    assert grid == (3,) and args == (table, 65, after, token)
    assert kwargs == {"LANES": 32, "num_warps": 1}


def test_run_eagerly_a_layer_skips_its_prefetch_once_its_weights_moved(fused_draft, monkeypatch):
    calls = spied(monkeypatch)
    layers = fused_draft.language_model.layers
    l2_prefetch.attach(layers)
    hidden = torch.zeros(1, 1, fused_draft.language_model.config.hidden_size)
    l2_prefetch.prefetch_hook(layers[0], (hidden,), {})
    assert len(calls) == 1
    moved = layers[0].mlp.down_proj.weight
    moved.data = moved.data.clone()  # as `.to()` moves it: the table would name freed memory
    l2_prefetch.prefetch_hook(layers[0], (hidden,), {})
    l2_prefetch.prefetch_hook(layers[-1], (hidden,), {})  # the last layer names no next layer
    assert len(calls) == 2 and calls[-1][0] is layers[-1].l2_table
    layers[1].self_attn.fused_weight.data = layers[1].self_attn.fused_weight.data.clone()  # the next layer's q/k/v
    l2_prefetch.attach(layers)  # the fast path attaches again before its steps: the table follows
    l2_prefetch.prefetch_hook(layers[0], (hidden,), {})
    assert len(calls) == 3


def test_unfusing_takes_the_prefetches_off_so_the_plain_path_never_prefetches(embedded, monkeypatch):
    calls = spied(monkeypatch)
    prompt = embedded.target.prepare(sv.sample_video("bikes", 2))
    monkeypatch.setenv("SPECVLM_FUSE_DRAFT", "1")
    monkeypatch.setenv("SPECVLM_L2_PREFETCH", "1")
    fast.generate_fast(embedded, prompt, k=3, max_new_tokens=6, compile=False)
    assert calls and l2_prefetch.attached(embedded.draft)
    fusion.unfuse_projections(embedded.draft)  # as bench does before the plain path and transformers' rows
    assert not l2_prefetch.attached(embedded.draft)
    calls.clear()
    decoding.generate_sd(embedded, prompt, method="specvlm", k=3, max_new_tokens=6)
    assert not calls
