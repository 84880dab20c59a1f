"""`flash_decode`: the Triton split-KV kernel for short steps (attention "flash"), run on the CPU
in Triton's interpreter (conftest turns it on), against `grouped_attention` with the same
visibility, and inside the fast path against the plain path's tokens."""

import weakref

import pytest
import torch

import specvlm as sv
from specvlm import fast, flash_decode as fd, step_attention as sa
from specvlm.trees import MC_SIM_7B_63, chain

from .test_fast import SMALL_TREE, assert_same, embedded  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not fd.available(torch.device("cpu"), torch.float32), reason="needs Triton's interpreter")


def reference(query, key, value, start, pattern, scale):
    bias = sa.visibility_bias(start, pattern, key.shape[2], torch.float32)
    return sa.grouped_attention(query, key, value, bias, scale).transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads,dim,q,capacity,start,width", [
    (14, 2, 64, 1, 320, 200, 1),  # a draft step: 7 query heads per KV head, one row each
    (14, 2, 64, 6, 384, 150, 6),  # a catch-up feed, causal
    (8, 4, 32, 5, 256, 17, 9),  # a tree level: its pattern spans more slots than it has rows
    (4, 1, 16, 3, 130, 0, 3),  # nothing committed yet; a capacity that is no whole number of tiles
    (6, 2, 16, 2, 192, 126, 2),  # the step's own slots straddle two tiles
    (4, 2, 16, 16, 4096, 3000, 16),  # many splits, most of them past the visible slots
    (8, 8, 16, 2, 2200, 2000, 2),  # splits of two tiles: the online softmax rescales across tiles
    (28, 4, 32, 26, 512, 300, 26),  # a 7B-like tree verification: 182 stacked rows in three row blocks
    (14, 2, 16, 10, 640, 90, 12),  # two row blocks, the second mostly padding; a pattern wider than the step
])
def test_flash_decode_equals_grouped_attention(heads, kv_heads, dim, q, capacity, start, width):
    generator = torch.Generator().manual_seed(capacity + start)
    query = torch.randn(1, q, heads, dim, generator=generator).transpose(1, 2)  # as the layers hand it over
    key, value = (torch.randn(1, kv_heads, capacity, dim, generator=generator) for _ in range(2))
    pattern = torch.rand(q, width, generator=generator) < 0.5
    pattern[torch.arange(q), torch.arange(q)] = True  # every row sees itself
    start = torch.tensor(start)
    out = fd.flash_decode(query, key, value, start, pattern, dim ** -0.5)
    assert out.shape == (1, q, heads, dim)
    torch.testing.assert_close(out, reference(query, key, value, start, pattern, dim ** -0.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("launch", ["16-8-16-4", "32-64-32-8-2", "64-2-128-4", "128-512-16-4-1"])
def test_every_launch_gives_the_same_attention_and_is_the_one_launched(launch, monkeypatch):
    """How the work is cut (rows per program, splits, tile, warps, stages) changes only rounding:
    a 26-node tree on 7 query heads per KV head, 182 rows, over several splits or one; and the
    kernel is launched as asked (its grid and block sizes recorded on the way)."""
    launch = fd.Launch.parse(launch)
    launched = []
    kernel = fd._flash_decode_partials

    class Recorder:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append((grid, kwargs))
                return kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(fd, "_flash_decode_partials", Recorder())
    generator = torch.Generator().manual_seed(launch.block_rows)
    query = torch.randn(1, 26, 28, 32, generator=generator).transpose(1, 2)
    key, value = (torch.randn(1, 4, 700, 32, generator=generator) for _ in range(2))
    pattern = torch.rand(26, 26, generator=generator) < 0.3
    pattern[torch.arange(26), torch.arange(26)] = True
    start = torch.tensor(610)
    out = fd.flash_decode(query, key, value, start, pattern, 32 ** -0.5, launch)
    torch.testing.assert_close(out, reference(query, key, value, start, pattern, 32 ** -0.5), atol=1e-5, rtol=1e-5)
    (grid, kwargs), = launched
    split = fd.split_size(700, 4, launch.block_n, launch.programs)
    assert grid == (-(-182 // launch.block_rows), 4, -(-700 // split))
    assert (kwargs["BLOCK_R"], kwargs["BLOCK_N"], kwargs["SPLIT"], kwargs["num_warps"]) == \
        (launch.block_rows, launch.block_n, split, launch.num_warps)
    assert kwargs.get("num_stages") == launch.num_stages


def test_launch_parse_names_and_refuses():
    assert fd.Launch.parse("64-256-64-8-2") == fd.Launch(64, 256, 64, 8, 2)
    assert fd.Launch.parse("32-128-64-4").name == "32-128-64-4"
    assert fd.default_launch(182, 128) == fd.Launch(64, 256, 64, 8)  # three row blocks of 64
    assert fd.default_launch(64, 128) == fd.Launch(64, 256, 64, 8)  # one block
    assert fd.default_launch(7, 64) == fd.Launch(16, 256, 64, 4)
    assert fd.default_launch(17, 64) == fd.Launch(32, 256, 64, 4)
    for text in ("64-256", "64-256-64-8-2-1", "a-b-c-d"):
        with pytest.raises(ValueError, match="rows-programs-tile-warps"):
            fd.Launch.parse(text)
    for bad, what in (((48,), "rows a power of two"), ((8,), "rows a power of two"), ((64, 0), "programs"),
                      ((64, 256, 24), "tile"), ((64, 256, 0), "tile"), ((64, 256, 64, 3), "warps"),
                      ((64, 256, 64, 4, 0), "stages")):
        with pytest.raises(ValueError, match=what):
            fd.Launch(*bad)


def test_flash_decode_reads_nothing_past_the_visible_slots():
    """Garbage (here: NaN) in slots no row sees never reaches the output: later splits end at once,
    and masked tiles are never loaded."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 2, 16, generator=generator)
    key, value = (torch.randn(1, 2, 512, 16, generator=generator) for _ in range(2))
    start, pattern = torch.tensor(100), torch.tensor([[True, False], [True, True]])
    expected = reference(query, key, value, start, pattern, 0.25)
    key[:, :, 102:], value[:, :, 102:] = float("nan"), float("nan")
    torch.testing.assert_close(fd.flash_decode(query, key, value, start, pattern, 0.25), expected)


def test_flash_decode_refuses_what_it_cannot_serve():
    one = torch.ones(1, 1, dtype=torch.bool)
    query, key = torch.zeros(2, 4, 1, 16), torch.zeros(2, 2, 64, 16)
    with pytest.raises(ValueError, match="one sequence"):
        fd.flash_decode(query, key, key, torch.tensor(3), one, 0.25)
    for heads, dim, value_dim in ((3, 16, 16), (4, 24, 24), (4, 8, 8), (4, 16, 32)):
        query, key = torch.zeros(1, heads, 1, dim), torch.zeros(1, 2, 64, dim)
        with pytest.raises(ValueError, match="power of two"):
            fd.flash_decode(query, key, torch.zeros(1, 2, 64, value_dim), torch.tensor(3), one, 0.25)


def test_flash_decode_is_offered_only_where_it_is_exact():
    """On a CPU only float32 in the interpreter (which multiplies bfloat16 as raw integers); on
    CUDA only half precision (a float32 dot would run in TF32)."""
    cpu = torch.device("cpu")
    assert fd.available(cpu, torch.float32)
    assert not fd.available(cpu, torch.bfloat16) and not fd.available(cpu, torch.float16)


@pytest.mark.parametrize("split_at,capacity,kv_heads", [(64, 1792, 2), (256, 12416, 4), (64, 64, 1), (64, 100, 8), (640, 40960, 1)])
def test_split_size_spreads_the_cache_over_about_one_program_per_sm(split_at, capacity, kv_heads):
    assert fd.split_size(capacity, kv_heads) == split_at
    assert split_at % fd.BLOCK_N == 0


@pytest.mark.parametrize("clip,frames,method,ratio,tree,attention", [
    ("bikes", 2, "specvlm", 0.9, MC_SIM_7B_63, "flash"), ("bigbuckbunny", 4, "sd", 0.0, SMALL_TREE, "flex/flash"),
    ("bikes", 6, "top", 0.75, chain(4), "flash"), ("bikes", 2, "ar", 0.0, None, "flash"),
])
def test_flash_attention_on_the_embedded_pair(embedded, clip, frames, method, ratio, tree, attention, monkeypatch):
    """attention="flash": short steps (AR, draft steps, feeds, tree levels, chain and small tree
    verifications) through `flash_decode`, wide ones (the 26-node verification) as under "flex",
    here through `split_attention`; the plain path's tokens and accepted counts."""
    monkeypatch.setenv("SPECVLM_SPLIT_MIN_SLOTS", "1")  # every wide step takes `split_attention`
    monkeypatch.setattr(fast, "_ENGINES", weakref.WeakKeyDictionary())  # step functions made under this setting
    widths, splits = [], []  # the rows of every step `flash_decode` served; `split_attention`'s
    real, real_split = sa.flash_decode, sa.split_attention
    monkeypatch.setattr(sa, "flash_decode", lambda query, *args: widths.append(query.shape[2]) or real(query, *args))
    monkeypatch.setattr(sa, "split_attention", lambda query, *args: splits.append(query.shape[2]) or real_split(query, *args))
    prompt = embedded.target.prepare(sv.sample_video(clip, frames))
    options = {"method": method, "attention": attention}
    if method != "ar":
        options.update(ratio=ratio, tree=tree)
    assert_same(embedded, prompt, max_new_tokens=20, **options)
    short = [tree.num_nodes] if method != "ar" and tree.num_nodes <= sa.FLEX_MAX_QUERY else []
    widest = 1 if method == "ar" else max([tree.depth + 1] + short) if attention == "flash" else tree.depth + 1
    assert max(widths) == widest  # a short tree's verification under "flash"; the draft's catch-up feed otherwise
    wide = method != "ar" and tree.num_nodes > sa.FLEX_MAX_QUERY
    assert set(splits) == ({tree.num_nodes} if wide else set())  # the wide verifications, and nothing else
    models = fast.capture_report(embedded)["models"]
    roles = ("target", "draft") if attention == "flash" and method != "ar" else (
        "draft" if method != "ar" else "target",)
    for role in roles:
        assert models[role]["step_attention"] == "flash" and models[role]["split_wide_steps"]


def test_flash_needs_a_card_that_runs_it(embedded, monkeypatch):
    monkeypatch.setattr(fd, "INTERPRETED", False)
    monkeypatch.setattr(fast, "_ENGINES", weakref.WeakKeyDictionary())  # none kept from the tests above
    with pytest.raises(ValueError, match="compute capability 8.0"):
        fast.StaticLM(embedded.draft, None, "flash")
    with pytest.raises(ValueError, match="compute capability 8.0"):
        fast.generate_fast(embedded, embedded.target.prepare(sv.sample_video("bikes", 2)), method="sd", k=2,
                           max_new_tokens=4, compile=False, attention="flex/flash")
