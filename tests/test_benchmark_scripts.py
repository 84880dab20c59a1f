"""The GPU benchmark scripts' host-side helpers (the scripts themselves need a GPU): how a
failed launch is recorded, how --flash-launches reads its values, and graph_gaps' refusals."""

import argparse
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "attention_kernels.py"


@pytest.fixture(scope="module")
def attention_kernels():
    spec = importlib.util.spec_from_file_location("attention_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OutOfResources(Exception):
    pass


class InductorError(Exception):  # as torch._inductor wraps a failed build: its cause in inner_exception
    def __init__(self, inner):
        super().__init__(f"RuntimeError: No valid triton configs.\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal "
                         f"stack trace (please do this especially if you're reporting a bug to PyTorch).")
        self.inner_exception = inner


def test_a_failed_build_is_recorded_by_its_cause_not_inductors_advice(attention_kernels):
    cause = OutOfResources("out of resource: shared memory, Required: 262144, Hardware limit: 232448. "
                           "Reducing block sizes or `num_stages` may help.")
    said = attention_kernels.reason(InductorError(cause))
    assert said.startswith("OutOfResources: out of resource: shared memory, Required: 262144")
    try:
        try:
            raise KeyError("tile")
        except KeyError as inner:
            raise RuntimeError("Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace") from inner
    except RuntimeError as error:
        assert attention_kernels.reason(error) == "KeyError: 'tile'"  # the advice line is skipped
    assert attention_kernels.reason(ValueError("plain")) == "ValueError: plain"


def test_flash_launches_flag_keeps_the_reason_of_a_refusal(attention_kernels):
    assert attention_kernels.launch_flag("64-32-128-8").name == "64-32-128-8"
    for text, message in (("64-32", "rows-programs-tile-warps"), ("48-32-128-8", "rows a power of two")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            attention_kernels.launch_flag(text)


def test_graph_gaps_refuses_to_run_without_a_card(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("graph_gaps", SCRIPT.parent / "graph_gaps.py")
    graph_gaps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph_gaps)  # every name it imports exists
    monkeypatch.setattr(graph_gaps.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        graph_gaps.main(["--samples", "3"])
    assert stop.value.code == 2 and "run it on a CUDA card" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        graph_gaps.main(["--samples", "0"])  # refused by argparse, before any model is built


def test_graph_gaps_widened_draft_computes_the_tiny_drafts_logits():
    """The bare causal LM graph_gaps times for 'widened_draft' is the widened draft's: on token ids,
    in float32, its logits over the tiny vocabulary are the tiny draft's."""
    import torch
    from transformers import Qwen2Config

    from specvlm.models import head_dim, load_lm

    spec = importlib.util.spec_from_file_location("graph_gaps", SCRIPT.parent / "graph_gaps.py")
    graph_gaps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph_gaps)
    tiny = load_lm(graph_gaps.DRAFT, device="cpu", dtype=torch.float32).model
    text = tiny.config.text_config
    group = text.num_attention_heads // text.num_key_value_heads  # one more kv head, with its q heads
    heads = text.num_attention_heads + group
    shape = Qwen2Config(hidden_size=heads * head_dim(text), num_hidden_layers=text.num_hidden_layers + 1,
                        num_attention_heads=heads,
                        num_key_value_heads=text.num_key_value_heads + 1, head_dim=head_dim(text),
                        intermediate_size=text.intermediate_size + 64, vocab_size=text.vocab_size + 24)
    bare = graph_gaps.widened_lm(graph_gaps.DRAFT, shape, torch.device("cpu"), torch.float32)
    assert type(bare).__name__ == "Qwen2ForCausalLM" and bare.config.hidden_size == shape.hidden_size
    config = bare.model.config
    assert config.hidden_size // config.num_attention_heads == head_dim(text)  # the head size fast_step reads
    ids = torch.randint(text.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        small = tiny.lm_head(tiny.model.language_model(input_ids=ids).last_hidden_state)
        big = bare(input_ids=ids).logits[..., : text.vocab_size]
    assert (big - small).abs().max() / small.abs().max() < 1e-4
    assert torch.equal(big.argmax(-1), small.argmax(-1))
