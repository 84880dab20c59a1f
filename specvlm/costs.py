"""Step costs at real language-model shapes: what one decoding step costs against context length.

Speculative decoding trades target steps for draft steps and verifications, so its speedup is
a ratio of step costs (see `cost_model.py`). This module measures those costs on a card
without downloading a checkpoint: it builds the *language model* of a real video LLM with
random weights (same shapes, same transformers class, so the same kernels), fills its KV cache
with random keys and values of the right length, and times three kinds of forward pass at
each context length:

    step   1 new token          the target's AR step, and the draft's step when the shape is a draft's
    chain  k + 1 new tokens     the target's chain verification (k = 5: 6 tokens)
    tree   26 new tokens        the target's verification of `MC_SIM_7B_63` with the tree mask

(A draft step and a target AR step are the same computation, one token; which one a row is
depends only on the shape: `llava-ov-0.5b` drafts for `llava-ov-7b`.)

Beside each time stands its *floor*: the bytes the pass must read from memory, all weights
once (the input embedding table excepted: only the new tokens' rows are read, unless it is
tied to the output layer) plus the whole KV cache, over the card's copy bandwidth measured
in the same run (`measure_bandwidth`). At one token a step is memory-bound, so the floor is
what a perfect kernel would take; the gap above it is launch overhead and attention kernels
that scale badly with a long cache.

A *path* is how a step is executed: a factory `make_step(model, context_len, query_len,
tree=None) -> step`. `step()` runs one forward pass of `query_len` new tokens after
`context_len` cached ones (with `tree`'s mask when given; then `query_len == tree.num_nodes`),
returns its logits (the harness ignores them) and leaves everything as it found it, so it can
be called again with the same result. `PATHS` holds transformers' own paths ("eager", "sdpa":
dynamic cache, uncompiled) and the project's fast path (`fast_step`: a static `SlotCache`,
fixed-shape steps compiled into CUDA graphs on a GPU) with its three attentions: "fast" (sdpa
with an additive mask over the whole capacity, `fast.py`'s default), "fast-flex"
(FlexAttention's split-KV decode kernel, `fast.flex_block_mask`, for short steps) and
"fast-grouped" (`fast.grouped_attention`: two batched matmuls, no repeated KV heads). Other
paths come with `factories=`.

    python -m specvlm costs --shapes llava-ov-7b llava-ov-0.5b --contexts 1024 4096 16384 65536 \\
        --paths eager sdpa fast fast-flex --out "figures/costs_{card}.json"
    python -m specvlm costs --shapes llava-ov-72b llava-ov-7b --devices cuda:0 cuda:1 ...

A shape too large for one card (the 72B in bf16) is spread over several GPUs (`devices=`,
`placement`, `balanced_map`): whole layers per card, run one card after the other, so its
floor is still all its bytes over one card's bandwidth.

Not handled: the vision tower (its cost is in the prefill, not in decoding steps); Qwen2.5-VL's
3-D rotary positions (its language model is built as Qwen2 with 1-D positions, which changes
only the few rotary multiplications, not the bytes or the kernels).
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from collections import Counter
from datetime import date

import torch
import transformers
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from . import fast
from .bench import card_name, save  # one JSON writer and one card name for every measurement
from .cost_model import load
from .models import VideoLM, resolved_dtype
from .trees import MC_SIM_7B_63, Tree, tree_attention_bias

# Language-model fields of the checkpoints' config.json files (the `text_config` of the
# llava-hf checkpoints; the top level of Qwen2.5-VL's). The llava-hf conversion adds <image>
# and <video> to Qwen2's vocabulary and pads it to a multiple of 64, so their vocab_size is
# Qwen2's plus 64 (7B: 152064 -> 152128; 0.5B: 151936 -> 152000).
_QWEN2_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 intermediate_size=18944, tie_word_embeddings=False)
_QWEN2_72B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                  intermediate_size=29568, tie_word_embeddings=False)
SHAPES = {
    "llava-ov-0.5b": dict(source="llava-hf/llava-onevision-qwen2-0.5b-ov-hf (Qwen2-0.5B-Instruct)",
                          hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                          intermediate_size=4864, vocab_size=152000, tie_word_embeddings=True),
    "llava-ov-7b": dict(source="llava-hf/llava-onevision-qwen2-7b-ov-hf (Qwen2-7B-Instruct)",
                        vocab_size=152128, **_QWEN2_7B),
    "llava-ov-72b": dict(source="llava-hf/llava-onevision-qwen2-72b-ov-hf (Qwen2-72B-Instruct)",
                         vocab_size=152128, **_QWEN2_72B),
    "qwen2.5-vl-3b": dict(source="Qwen/Qwen2.5-VL-3B-Instruct", hidden_size=2048, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, intermediate_size=11008,
                          vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-vl-7b": dict(source="Qwen/Qwen2.5-VL-7B-Instruct", vocab_size=152064, **_QWEN2_7B),
    "qwen2.5-vl-32b": dict(source="Qwen/Qwen2.5-VL-32B-Instruct", hidden_size=5120, num_hidden_layers=64,
                           num_attention_heads=40, num_key_value_heads=8, intermediate_size=27648,
                           vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-vl-72b": dict(source="Qwen/Qwen2.5-VL-72B-Instruct", vocab_size=152064, **_QWEN2_72B),
    "tiny": dict(source="a tiny shape for tests on a CPU", hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                 tie_word_embeddings=True),
}

KINDS = ("step", "chain", "tree")


def lm_config(shape: str) -> Qwen2Config:
    """The Qwen2 config of a named shape: lm_config("llava-ov-7b").hidden_size -> 3584."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}.")
    fields = {key: value for key, value in SHAPES[shape].items() if key != "source"}
    return Qwen2Config(**fields, rope_theta=1e6, max_position_embeddings=131072)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def num_params(config: Qwen2Config) -> int:
    """Parameters of a Qwen2ForCausalLM (the output layer counted once when tied)."""
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head_dim = h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * config.intermediate_size + 2 * h
    embeddings = vocab * h * (1 if config.tie_word_embeddings else 2)
    return layers * per_layer + h + embeddings


def weight_bytes(config: Qwen2Config, dtype: torch.dtype = torch.bfloat16, output_rows: int | None = None) -> int:
    """Weight bytes one forward pass reads: every layer, the final norm and the output layer;
    not the input embedding table (a pass reads only its new tokens' rows), unless tied.
    `output_rows`: the output layer's rows the pass reads, for a draft vocabulary (`draft_vocab.py`:
    its cut layer is a copy, so a tied table is then not read as a whole either); None: all."""
    untied_input_table = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    if output_rows is not None and not 1 <= output_rows <= config.vocab_size:
        raise ValueError(f"output_rows must lie in 1..{config.vocab_size} (the output layer's rows), got {output_rows}.")
    unread_rows = 0 if output_rows is None else config.vocab_size - output_rows
    return (num_params(config) - untied_input_table - unread_rows * config.hidden_size) * _itemsize(dtype)


def kv_bytes(config: Qwen2Config, tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of keys and values for `tokens` cached tokens, all layers."""
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * _itemsize(dtype)


def build_lm(shape: str | Qwen2Config, device="cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A Qwen2ForCausalLM of `shape` with random weights, made directly on `device`: built on
    the meta device (no memory), materialised empty on `device`, then filled there: matrices,
    embeddings and biases from normal(0, 0.02), norm weights 1 (so activations keep their
    scale). Never all zeros: timings must not depend on special values. Each parameter has its
    own generator, seeded from `seed` and its index, so the weights do not depend on where they lie.

    `device` may be a list of devices: the model is then spread over them as
    `from_pretrained(device_map="balanced")` spreads a checkpoint (`balanced_map`) and dispatched
    with accelerate's hooks, which move each layer's inputs to its device."""
    config = lm_config(shape) if isinstance(shape, str) else shape
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config).to(dtype)
    devices = [torch.device(d) for d in device] if isinstance(device, (list, tuple)) else [torch.device(device)]
    device_map = balanced_map(model, devices) if len(devices) > 1 else {"": devices[0]}
    for name, where in device_map.items():
        model.get_submodule(name).to_empty(device=where)
    model.tie_weights()  # to_empty replaces parameters, which unties a tied output layer
    # the rotary frequencies are buffers computed at construction: compute them again for real
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config).to(rotary.inv_freq.device)
    with torch.no_grad():
        for index, (name, p) in enumerate(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=torch.Generator(device=p.device).manual_seed(seed * 100_003 + index))
    if len(devices) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map=device_map, skip_keys=model._skip_keys_device_placement)
    return model.eval()


def balanced_map(model, devices, memory: int | None = None) -> dict[str, torch.device]:
    """A device_map spreading `model` (on the meta device) evenly over the GPUs `devices`, as
    `from_pretrained(device_map="balanced")` computes one: transformers' `get_balanced_memory`
    and `infer_auto_device_map`, whole decoder layers per device, in order. `memory`: bytes per
    device (default: each card's total memory). E.g. the 72B shape over two 80 GB cards: the input
    embeddings and the first 40 layers on the first, the other 40 layers, the final norm and the
    output layer on the second. Needs accelerate."""
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    devices = [torch.device(d) for d in devices]
    if any(d.type != "cuda" for d in devices) or len({d.index or 0 for d in devices}) < len(devices):
        raise ValueError(f"a model is spread over distinct GPUs (cuda:0, cuda:1, ...), got {[str(d) for d in devices]}.")
    indices = [d.index or 0 for d in devices]
    budget = {i: memory or torch.cuda.get_device_properties(i).total_memory for i in indices}
    no_split = model._no_split_modules
    budget = get_balanced_memory(model, max_memory=budget, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
    return {name: torch.device("cuda", index) for name, index in device_map.items()}


def layer_devices(model) -> list[torch.device]:
    """The device of each decoder layer of a Qwen2ForCausalLM (several when `build_lm` spread it)."""
    return _BareLM(model).layer_devices


def random_kv(config: Qwen2Config, context_len: int, device, dtype, seed: int = 0):
    """Per layer, random (keys, values) of shape [1, kv_heads, context_len, head_dim], on
    `device` (one, or one per layer)."""
    return list(_random_kv_layers(config, context_len, device, dtype, seed))


def _random_kv_layers(config: Qwen2Config, context_len: int, device, dtype, seed: int = 0):
    """`random_kv` one layer at a time (the same numbers), so a filler holds one layer's worth.
    Layer i draws from its own generator seeded with (seed, i): the numbers do not depend on
    the devices."""
    head_dim = config.hidden_size // config.num_attention_heads
    shape = (1, config.num_key_value_heads, context_len, head_dim)
    for layer, where in enumerate(fast.per_layer(device, config.num_hidden_layers)):
        generator = torch.Generator(device=where).manual_seed(seed * 100_003 + layer)
        yield (torch.empty(shape, device=where, dtype=dtype).normal_(generator=generator),
               torch.empty(shape, device=where, dtype=dtype).normal_(generator=generator))


def step_inputs(model, context_len: int, query_len: int, tree: Tree | None, generator=None):
    """(input ids [1, q], position ids [1, q], additive tree mask or None) for one pass after
    `context_len` cached tokens: positions continue the context (tree nodes at root + depth)."""
    device, vocab = model.device, model.config.vocab_size
    ids = torch.randint(vocab, (1, query_len), device=device, generator=generator)
    if tree is None:
        return ids, torch.arange(context_len, context_len + query_len, device=device)[None], None
    if query_len != tree.num_nodes:
        raise ValueError(f"a tree pass feeds all {tree.num_nodes} nodes; got query_len={query_len}.")
    positions = (context_len + tree.depths).to(device)[None]
    return ids, positions, tree_attention_bias(tree, context_len, model.dtype, device=device)


def transformers_step(attn_implementation: str):
    """The factory of transformers' own path: a DynamicCache (each step concatenates the new
    keys and values onto the whole cache, as `generate` does) and the given attention kernel."""

    def make_step(model, context_len: int, query_len: int, tree: Tree | None = None):
        model.set_attn_implementation(attn_implementation)
        generator = torch.Generator(device=model.device).manual_seed(context_len)
        cache = DynamicCache(config=model.config)
        for layer, (keys, values) in enumerate(_random_kv_layers(model.config, context_len, layer_devices(model),
                                                                  model.dtype, seed=context_len)):
            cache.update(keys, values, layer)
        ids, positions, mask = step_inputs(model, context_len, query_len, tree, generator)

        @torch.no_grad()
        def step():
            logits = model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache, use_cache=True).logits
            cache.crop(-query_len)
            return logits

        return step

    return make_step


class _BareLM(VideoLM):
    """The fast path's view of a bare Qwen2ForCausalLM: no processor, 1-D positions."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    @property
    def language_model(self):
        return self.model.model

    def position_ids_for(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.reshape(1, -1)


SLACK = 32  # free slots after the context in a fast path's cache: room for the widest step (26)


def fast_step(attention: str = "sdpa", compile=None, vocabulary: int | None = None):
    """The factory of the project's fast path (`fast.py`): a `SlotCache` holding `context_len`
    random cached tokens (the same numbers `transformers_step` uses, so the logits agree) and
    `StaticLM.step` (host inputs copied in, the fixed-shape step compiled with
    `fast.compile_options(compile)`: CUDA graphs on CUDA, plain eager elsewhere).

    One engine (cache + compiled steps) per model and attention is kept on the model and
    reused across points: "sdpa" and "grouped" read their whole capacity, so their capacity is
    the context plus `SLACK` rounded up to 128 (a new engine, and new graphs, per context
    length); "flex" visits
    only the blocks up to the last visible slot, so one engine as large as the largest context
    (measure_costs times the largest first) serves them all, with no recompilation; steps wider
    than `fast.FLEX_MAX_QUERY` (the tree verification) take `fast.grouped_attention` under
    "flex" (`fast.split_attention` from `fast.split_min_slots()` slots on), which reads the whole
    capacity too, so they get their own engine, sized per context like "sdpa"'s. The engines here
    serve no role, so a short cache under "flex" keeps FlexAttention (`fast.flex_min_slots` is a
    draft's). `vocabulary`: the step's logits cover only the first that many token ids, as a draft
    vocabulary's do on the fast path (`draft_vocab.py`: the output layer cut to those rows)."""
    if attention not in fast.ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; choose one of {fast.ATTENTIONS}.")

    def make_step(model, context_len: int, query_len: int, tree: Tree | None = None):
        if tree is not None and query_len != tree.num_nodes:
            raise ValueError(f"a tree pass feeds all {tree.num_nodes} nodes; got query_len={query_len}.")
        if attention == "sdpa":
            model.set_attn_implementation("sdpa")
        capacity = fast.round_up(context_len + max(query_len, SLACK), 128)
        # a step wider than FLEX_MAX_QUERY takes the grouped masked attention even under "flex": it
        # reads its whole capacity, so it gets an engine of its own, sized for this context
        masked = attention != "flex" or query_len > fast.FLEX_MAX_QUERY
        key = (attention, str(compile), masked, fast.split_min_slots(), vocabulary)
        engines = model.__dict__.setdefault("_specvlm_fast_engines", {})
        engine = engines.get(key)
        options = fast.compile_options(compile, model.device)
        fits = (engine is not None and engine.graphs == fast.graphs_for(_BareLM(model), options)  # $SPECVLM_CUDA_GRAPHS
                and (engine.cache.capacity == capacity if masked else engine.cache.capacity >= capacity))
        if not fits:
            engines.pop(key, None)
            engine = None
            _free(model.device)  # the old engine's cache and graphs go before the new cache comes
            ids = None if vocabulary is None else torch.arange(vocabulary)
            engine = fast.StaticLM(_BareLM(model), options, attention, vocabulary=ids)
            config = model.config
            head_dim = config.hidden_size // config.num_attention_heads
            shapes = [(config.num_key_value_heads, head_dim, head_dim)] * config.num_hidden_layers
            engine.cache = fast.SlotCache(shapes, capacity, model.dtype, layer_devices(model))
            engines[key] = engine
        generator = torch.Generator(device=model.device).manual_seed(context_len)
        cache = engine.cache
        for layer, (keys, values) in enumerate(_random_kv_layers(model.config, context_len, layer_devices(model),
                                                                  model.dtype, seed=context_len)):
            cache.keys[layer][:, :, :context_len].copy_(keys)
            cache.values[layer][:, :, :context_len].copy_(values)
        ids, positions, _ = step_inputs(model, context_len, query_len, tree, generator)
        tokens, where = ids[0].tolist(), positions[0].tolist()
        if tree is None:
            pattern = engine.constant(("causal", query_len), lambda: fast.causal_pattern(query_len))
        else:
            pattern = engine.constant(tree, lambda: tree.mask)  # the key and mask `fast.tree_round` uses
        engine.length = context_len

        def step():
            logits = engine.step(tokens, where, pattern)
            engine.length = context_len
            return logits[None]

        step.engine = engine  # its `last_graph`: `profile.py` times the step's graph replayed alone
        return step

    return make_step


PATHS = {"eager": transformers_step("eager"), "sdpa": transformers_step("sdpa"),
         "fast": fast_step("sdpa"), "fast-flex": fast_step("flex"), "fast-flash": fast_step("flash"),
         "fast-grouped": fast_step("grouped")}


def _sync(device) -> None:
    """Wait for `device` (or each of a list of devices)."""
    for where in device if isinstance(device, (list, tuple)) else [device]:
        if torch.device(where).type == "cuda":
            torch.cuda.synchronize(where)


def time_ms(fn, device, repeats: int = 10, warmup: int = 2, queued: int = 1) -> float:
    """Median wall-clock milliseconds of `fn()` after `warmup` calls, the device synchronised
    before and after each sample (as in a loop where each step's token is needed on the host
    next). A sample is `queued` calls in a row, divided by `queued`: with more than one, the
    host prepares a call while the device runs the last (as the fast path's loops do)."""
    if repeats < 1 or queued < 1:
        raise ValueError(f"time_ms needs repeats >= 1 and queued >= 1, got {repeats} and {queued}.")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(queued):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / queued)
    return 1000 * statistics.median(times)


def measure_bandwidth(device="cuda", nbytes: int | None = None, repeats: int = 10) -> float:
    """Copy bandwidth in bytes/s: a large device-to-device copy, bytes read + written over its
    median time. Default size 1 GiB on a GPU (far beyond its caches), 16 MiB elsewhere."""
    device = torch.device(device)
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**24)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats, warmup=2)
    return 2 * nbytes / (ms / 1000)


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _free(device: torch.device) -> None:
    """Return freed GPU memory to the allocator's pool (after an out-of-memory error or a model)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def available_host_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def too_big_for_host(weights: int, where: list[torch.device], available: int | None = None) -> str | None:
    """Why a model of `weights` bytes is not built on the CPU (it would not fit in 90% of the
    memory this machine can still give), or None (it fits, is built on a GPU, or the memory is
    unknown). A GPU's shortfall shows up as torch's OutOfMemoryError instead."""
    if where[0].type != "cpu":
        return None
    available = available_host_memory() if available is None else available
    if available is None or weights <= 0.9 * available:
        return None
    return (f"model does not fit: its weights need {weights / 2**30:.1f} GiB and this machine can give "
            f"{available / 2**30:.1f} GiB; measure it on a GPU, or choose smaller --shapes")


def placement(config: Qwen2Config, dtype: torch.dtype, devices, max_context: int,
              memory: int | None = None) -> list[torch.device]:
    """Where `measure_costs` builds a shape: on the first of `devices` alone when its weights and
    two caches of `max_context` tokens (one path's and the next's) fit in 90% of that card's
    memory (`memory` bytes, default its total), else spread over all of them (`build_lm`), as a
    user would place a checkpoint. Off CUDA, always the first device."""
    devices = [torch.device(d) for d in devices]
    first = devices[0]
    if len(devices) == 1 or first.type != "cuda":
        return [first]
    memory = memory or torch.cuda.get_device_properties(first.index or 0).total_memory
    needed = weight_bytes(config, dtype) + 2 * kv_bytes(config, max_context + SLACK, dtype)
    return [first] if needed <= 0.9 * memory else devices


def measure_costs(shapes, contexts, paths=("eager", "sdpa"), device=None, dtype=None, k: int = 5,
                  tree: Tree = MC_SIM_7B_63, repeats: int = 10, warmup: int = 2, seed: int = 0,
                  factories: dict | None = None, progress=None, devices=None) -> dict:
    """Time every kind of pass (`KINDS`) for each shape, context length and path; JSON-ready.

    One model per shape is built and reused across contexts and paths; contexts are timed
    largest first (rows come back in increasing order). Each row: shape, path, kind, context,
    query_len, ms (median), floor_ms, weight_bytes, kv_bytes (read by the pass: context + new
    tokens), setup_s (making the step and its warm-up calls: compilation included), skipped
    (None, or why the point has no time, e.g. out of memory).
    `factories` adds or replaces paths ({name: make_step}); `progress(row)` sees each row.
    `devices` (several GPUs, e.g. ["cuda:0", "cuda:1"]): a shape too large for the first card
    is spread over all of them (`placement`); its layers then run one card after the other, so
    its floor is still all bytes over one card's bandwidth. `device` is then the first.
    """
    device = torch.device(devices[0] if devices else device or ("cuda" if torch.cuda.is_available() else "cpu"))
    devices = [torch.device(d) for d in devices] if devices else [device]
    dtype = resolved_dtype(dtype, device)
    available = {**PATHS, **(factories or {})}
    unknown = [p for p in paths if p not in available]
    if unknown:
        raise ValueError(f"unknown path(s) {unknown}; choose from {sorted(available)} or pass factories=.")
    for shape in shapes:
        lm_config(shape)  # fails early on a wrong name
    if k < 1 or any(int(c) < 1 for c in contexts):
        raise ValueError(f"k and every context length must be >= 1; got k={k}, contexts={list(contexts)}.")
    bandwidth = measure_bandwidth(device)
    queries = {"step": (1, None), "chain": (k + 1, None), "tree": (tree.num_nodes, tree)}
    rows, shape_info = [], {}
    for shape in shapes:
        config = lm_config(shape)
        weights = weight_bytes(config, dtype)
        where = placement(config, dtype, devices, max(int(c) for c in contexts))
        shape_info[shape] = {**SHAPES[shape], "params": num_params(config), "weight_bytes": weights,
                             "devices": [str(d) for d in where]}
        model, build_error = None, too_big_for_host(weights, where)
        if build_error is None:
            try:
                model = build_lm(shape, where, dtype, seed)
                shape_info[shape]["layers_per_device"] = {str(d): n for d, n in Counter(layer_devices(model)).items()}
            except (torch.OutOfMemoryError, MemoryError) as error:
                model, build_error = None, f"model does not fit: {str(error).splitlines()[0]}"
                _free(device)
            except RuntimeError as error:  # the CPU allocator's refusal
                if "can't allocate memory" not in str(error):
                    raise
                model, build_error = None, f"model does not fit: {str(error).splitlines()[0]}"
        for context in sorted(contexts, reverse=True):  # largest first: see `fast_step`
            for path in paths:
                for kind, (query_len, kind_tree) in queries.items():
                    kv = kv_bytes(config, context + query_len, dtype)
                    row = {"shape": shape, "path": path, "kind": kind, "context": int(context),
                           "query_len": query_len, "ms": None, "floor_ms": 1000 * (weights + kv) / bandwidth,
                           "weight_bytes": weights, "kv_bytes": kv, "setup_s": None, "skipped": build_error}
                    if model is not None:
                        try:
                            began = time.perf_counter()
                            step = available[path](model, int(context), query_len, kind_tree)
                            row["ms"] = time_ms(step, where, repeats, warmup)
                            row["setup_s"] = time.perf_counter() - began - repeats * row["ms"] / 1000
                        except torch.OutOfMemoryError as error:
                            row["skipped"] = f"out of memory: {str(error).splitlines()[0]}"
                            step = None
                            _free(device)
                        step = None  # frees this point's cache before the next is made
                    rows.append(row)
                    if progress:
                        progress(row)
        model = None
        _free(device)
    order = {name: i for i, name in enumerate(shapes)}
    rows.sort(key=lambda r: (order[r["shape"]], r["context"]))  # stable: paths and kinds keep their order
    return {
        "device": card_name(device), "devices": len(devices), "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__, "date": str(date.today()),
        "bandwidth_GBps": bandwidth / 1e9, "k": k, "tree_nodes": tree.num_nodes,
        "repeats": repeats, "warmup": warmup,
        "timing": "median wall clock per pass, device synchronised before and after each",
        "floor": "(weight bytes + KV bytes read) / copy bandwidth of one card, measured in this run",
        "weights": "random: matrices, embeddings, biases normal(0, 0.02), norms 1; KV cache random",
        "shapes": shape_info, "rows": rows,
    }


def table(result: dict) -> str:
    lines = [f"{result['device']} ({result['dtype']}), copy bandwidth {result['bandwidth_GBps']:.0f} GB/s, "
             f"{result['date']}",
             f"{'shape':<15} {'path':<9} {'kind':<5} {'context':>7} {'q':>3} {'ms':>9} {'floor ms':>9} {'x floor':>7}"]
    for r in result["rows"]:
        ms = "skipped" if r["ms"] is None else f"{r['ms']:.3f}"
        ratio = "-" if r["ms"] is None else f"{r['ms'] / r['floor_ms']:.1f}"
        lines.append(f"{r['shape']:<15} {r['path']:<9} {r['kind']:<5} {r['context']:>7} {r['query_len']:>3} "
                     f"{ms:>9} {r['floor_ms']:>9.3f} {ratio:>7}")
    return "\n".join(lines)




def plot_costs(json_path):
    """Milliseconds per pass against context length (log-log), one panel per shape: a colour
    per path, a marker per kind, the floor of a one-token step dashed. Returns the Figure (its legend
    sits right of the panels: save with `bbox_inches="tight"`)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    result = load(json_path)
    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    paths = list(dict.fromkeys(r["path"] for r in result["rows"]))
    colours = dict(zip(paths, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    markers = {"step": "o", "chain": "s", "tree": "^"}
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.6 * len(shapes), 3.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in result["rows"] if r["shape"] == shape]
        for path in paths:
            for kind in KINDS:
                points = sorted((r["context"], r["ms"]) for r in rows
                                if r["path"] == path and r["kind"] == kind and r["ms"] is not None)
                if points:
                    ax.plot(*zip(*points), color=colours[path], marker=markers.get(kind, "x"), lw=1.2)
        floor = sorted((r["context"], r["floor_ms"]) for r in rows if r["kind"] == "step" and r["path"] == paths[0])
        ax.plot(*zip(*floor), color="black", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        contexts = sorted({r["context"] for r in rows})
        ax.set_xticks(contexts, [f"{c / 1024:g}k" if c >= 1024 else str(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context length (cached tokens)")
        ax.set_ylabel("ms per forward pass")
        params = result["shapes"][shape]["params"]
        size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
        ax.set_title(f"{shape} ({size} params)", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], color=colours[p], lw=1.5, label=p) for p in paths]
    handles += [Line2D([], [], color="0.4", marker=markers[k], ls="",
                       label={"step": "1 token", "chain": f"chain {result['k'] + 1}",
                              "tree": f"tree {result['tree_nodes']}"}[k]) for k in KINDS]
    handles.append(Line2D([], [], color="black", ls="--", label="floor: bytes / bandwidth"))
    fig.suptitle(f"Step cost on {result['device']} ({result['dtype']}): random weights at "
                 f"{', '.join(shapes)} LM shapes", fontsize=11)
    fig.tight_layout()
    fig.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig
