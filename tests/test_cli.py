"""The command lines refuse bad flags at once: argparse's one-line error (exit 2) naming the
flag, before any model is loaded or any step is timed."""

import json
import re

import pytest
import torch

import specvlm as sv
from specvlm import costs, models, profile
from specvlm.__main__ import main, out_file, positive_int, ratio


class Loaded(Exception):
    pass


@pytest.fixture
def nothing_loads(monkeypatch):
    def fail(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for module, name in [(models, "load_lm"), (models, "load_pair"), (sv, "load_pair"), (costs, "measure_costs"),
                         (costs, "build_lm"), (profile, "profile_shapes")]:
        monkeypatch.setattr(module, name, fail)


def refused(capsys, run, argv, message):
    with pytest.raises(SystemExit) as stop:
        run(argv)
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(message, last), last


@pytest.fixture
def tmp(tmp_path):
    (tmp_path / "notes.txt").write_text("not a video\n")
    return tmp_path


@pytest.mark.parametrize("argv,message", [
    (["--ratio", "1.0"], r"argument --ratio: expected a share .* in \[0, 1\), e.g. 0.9; got '1.0'"),
    (["--ratio", "nan"], r"argument --ratio: .* got 'nan'"),
    (["--frames", "0"], r"argument --frames: expected an integer >= 1, got '0'"),
    (["--k", "0"], r"argument --k: expected an integer >= 1"),
    (["--max-new-tokens", "-1"], r"argument --max-new-tokens: expected an integer >= 1"),
    (["--clip", "cats"], r"argument --clip: invalid choice: 'cats'"),
    (["--clip", "bikes", "--clip-seed", "3"], r"argument --clip-seed: it picks a synthetic clip"),
    (["--video", "{tmp}/notes.txt", "--clip-seed", "3"], r"argument --clip-seed: it picks a synthetic clip"),
    (["--video", "{tmp}/missing.mp4"], r"argument --video: no video file at .*missing.mp4"),
    (["--video", "{tmp}"], r"argument --video: .* is a folder, not a video file"),
    (["--video", "{tmp}/notes.txt"], r"argument --video: could not read .*notes.txt as a video: the file is truncated"),
    (["--draft", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"], r"argument --target/--draft: 'tiny' is the embedded pair"),
    (["--target", "{tmp}/t", "--draft", "{tmp}/d"], r"argument --target/--draft: checkpoint folder .*t does not exist"),
    (["--device", "cuda"], r"argument --device: device='cuda' was asked for, but this PyTorch sees no CUDA"),
    (["--question", "  "], r"argument --question: expected a question about the video"),
])
def test_demo_refuses_bad_flags_before_loading(capsys, tmp, nothing_loads, argv, message):
    refused(capsys, main, ["demo", *(a.format(tmp=tmp) for a in argv)], message)


@pytest.mark.parametrize("argv,message", [
    (["--frames", "2", "0"], r"argument --frames: expected an integer >= 1, got '0'"),
    (["--out", "/nodir-specvlm/x.json"], r"argument --out: folder /nodir-specvlm does not exist; create it first"),
    (["--out", "{tmp}"], r"argument --out: .* is a folder; give a file path in it"),
    (["--k", "0"], r"argument --k: expected an integer >= 1"),
    (["--step-repeats", "0"], r"argument --step-repeats: expected an integer >= 1"),
    (["--repeats", "0"], r"argument --repeats: expected an integer >= 1"),
    (["--max-new-tokens", "0"], r"argument --max-new-tokens: expected an integer >= 1"),
    (["--dtype", "float8"], r"argument --dtype: invalid choice: 'float8' \(choose from 'float32', 'bfloat16'"),
    (["--clip-seed", "-5"], r"argument --clip-seed: expected an integer >= 0, got '-5'"),
    (["--clip", "cats"], r"argument --clip: invalid choice: 'cats'"),
    (["--target", "./nowhere-specvlm", "--draft", "x/y"], r"argument --target/--draft: checkpoint folder"),
    (["--widen", "llava-ov-7b", "llava-0.5b"], r"argument --widen: invalid choice: 'llava-0.5b'"),
    (["--only", "specvlm-tree-0.3"], r"argument --only: \['specvlm-tree-0.3'\] name no row of this call"),
    (["--only", "hf-generate"], r"argument --only: \['hf-generate'\] name no row"),  # needs --transformers
    (["--only", "specvlm-tree-0.75"], r"argument --only: .*name no row"),  # needs --selection
    (["--only", "self-specvlm-tree-0.9"], r"argument --only: .*name no row"),  # needs --self
    (["--only", "self-sd-chain-0", "--self"], r"argument --only: .*name no row"),  # not a self row
    (["--only", "specvlm-tree:grown-0.5"], r"argument --only: .*name no row"),  # needs --tree grown=...
    (["--tree", "grown"], r"argument --tree: expected NAME=FILE"),
    (["--question", "  "], r"argument --question: expected a question about the video"),
    (["--tree", "a:b={tmp}/t.json"], r"argument --tree: expected NAME=FILE"),
    (["--tree", "grown=/nowhere-specvlm/t.json"], r"argument --tree: /nowhere-specvlm/t.json: .*No such file"),
])
def test_bench_refuses_bad_flags_before_loading(capsys, tmp, nothing_loads, argv, message):
    refused(capsys, main, ["bench", *(a.format(tmp=tmp) for a in argv)], message)


@pytest.mark.parametrize("argv,message", [
    (["--contexts", "16", "0"], r"argument --contexts: expected an integer >= 1"),
    (["--repeats", "0"], r"argument --repeats: expected an integer >= 1"),
    (["--warmup", "-1"], r"argument --warmup: expected an integer >= 0"),
    (["--dtype", "bf16"], r"argument --dtype: invalid choice: 'bf16'"),
    (["--device", "cuda"], r"argument --device: .*no CUDA"),
    (["--devices", "cpu", "cuda:1"], r"argument --devices: .*no CUDA"),
    (["--out", "/nodir-specvlm/costs_{{card}}.json"], r"argument --out: folder /nodir-specvlm does not exist"),
])
def test_costs_refuses_bad_flags_before_measuring(capsys, tmp, nothing_loads, argv, message):
    refused(capsys, main, ["costs", *(a.format(tmp=tmp) for a in argv)], message)


@pytest.mark.parametrize("argv,message", [
    (["--contexts", "0"], r"argument --contexts: expected an integer >= 1"),
    (["--repeats", "0"], r"argument --repeats: expected an integer >= 1"),
    (["--device", "cuda"], r"argument --device: device='cuda' was asked for, but this PyTorch sees no CUDA"),
    (["--device", "gpu"], r"argument --device: .*gpu"),
    (["--out", "/nodir-specvlm/p.json"], r"argument --out: folder /nodir-specvlm does not exist"),
    (["--out", "{tmp}/p.json", "--png", "/nodir-specvlm/p.png"], r"argument --png: folder /nodir-specvlm"),
    (["--dtype", "bf16"], r"argument --dtype: invalid choice: 'bf16'"),
    (["--draft-vocab", "0"], r"argument --draft-vocab: expected an integer >= 1"),
    (["--shapes", "tiny", "--draft-vocab", "10000000"], r"argument --draft-vocab: 10000000 token ids, more than .* tiny"),
])
def test_profile_refuses_bad_flags_before_profiling(capsys, tmp, nothing_loads, argv, message):
    refused(capsys, profile.main, [a.format(tmp=tmp) for a in argv], message)


def test_flash_is_refused_before_building_where_it_cannot_run(capsys, nothing_loads, monkeypatch):
    """attention 'flash' needs Triton on a recent CUDA card in half precision (or the interpreter)."""
    from specvlm import flash_decode

    monkeypatch.setattr(flash_decode, "available", lambda device, dtype: False)
    refused(capsys, profile.main, ["--shapes", "tiny", "--attention", "flash"],
            r"argument --attention: 'flash' runs a Triton kernel .* this run is float32 on cpu; use 'flex' or 'grouped'")
    refused(capsys, main, ["costs", "--shapes", "tiny", "--paths", "sdpa", "fast-flash", "--dtype", "bfloat16"],
            r"argument --paths: fast-flash: .* this run is bfloat16 on cpu")
    monkeypatch.setattr(flash_decode, "available", lambda device, dtype: True)
    with pytest.raises(Loaded):
        profile.main(["--shapes", "tiny", "--attention", "flash"])


def test_good_flags_reach_the_loader(tmp, nothing_loads):
    tree = tmp / "tree.json"
    tree.write_text('{"paths": [[0], [0, 0]]}')
    with pytest.raises(Loaded):
        main(["demo", "--frames", "2", "--ratio", "0", "--device", "cpu", "--clip", "bikes"])
    with pytest.raises(Loaded):
        main(["bench", "--frames", "1", "2", "--clip-seed", "0", "--dtype", "float32", "--out", str(tmp / "b.json")])
    for only in (["--only", "hf-generate", "--transformers"], ["--only", "specvlm-tree-0.75", "--selection"],
                 ["--only", "self-specvlm-tree-0.9", "--self"], ["--widen", "llava-ov-7b", "llava-ov-0.5b"],
                 ["--tree", f"grown={tree}", "--only", "specvlm-tree:grown-0.5"]):
        with pytest.raises(Loaded):
            main(["bench", "--frames", "1", *only])


def test_flag_types():
    assert positive_int("3") == 3 and ratio("0") == 0.0 and ratio("0.95") == 0.95
    assert out_file("result.json") == "result.json"


def test_profile_records_its_command_code_and_inductor_settings(tmp, monkeypatch):
    """A profile JSON says how it was made: the command, with the environment variables that
    change the compiled steps (inductor's autotuning among them), and the code's commit."""
    monkeypatch.setattr(profile, "profile_shapes", lambda *args, **kwargs: {"card": "Test Card", "rows": []})
    monkeypatch.setattr(profile, "table", lambda result: "")
    monkeypatch.setenv("TORCHINDUCTOR_MAX_AUTOTUNE_GEMM", "1")
    monkeypatch.setenv("SPECVLM_CODE", "abc1234")
    assert profile.main(["--shapes", "tiny", "--contexts", "8", "--out", str(tmp / "p_{card}.json")]) == 0
    result = json.loads((tmp / "p_test-card.json").read_text())
    assert result["command"] == ("TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 python -m specvlm.profile --shapes tiny "
                                 "--contexts 8 --out 'p_{card}.json'")
    assert result["code"] == "abc1234"
    assert result["combo_kernels"] is False


def test_profile_passes_a_draft_vocabulary_on(tmp, monkeypatch):
    seen = {}
    monkeypatch.setattr(profile, "profile_shapes",
                        lambda *args, **kwargs: seen.update(kwargs) or {"card": "Test Card", "rows": []})
    monkeypatch.setattr(profile, "table", lambda result: "")
    assert profile.main(["--shapes", "tiny", "--draft-vocab", "64"]) == 0
    assert seen["vocabulary"] == 64
    assert profile.main(["--shapes", "tiny"]) == 0 and seen["vocabulary"] is None


@pytest.mark.parametrize("flag", [[], ["--combo-kernels"]])
def test_bench_compiles_with_combo_kernels_only_when_asked(tmp, monkeypatch, flag):
    """`bench --combo-kernels` sets inductor's flag before anything is compiled, and the JSON says
    whether it was on (a run without the flag says False)."""
    import torch._inductor.config as inductor

    from specvlm import bench as bench_module

    monkeypatch.setattr(inductor, "combo_kernels", False)  # restored after the test: the flag sets it for the process
    seen = []

    def run(*args, **kwargs):
        seen.append(inductor.combo_kernels)
        return {"card": "Test Card", "rows": []}

    monkeypatch.setattr(bench_module, "bench", run)
    monkeypatch.setattr(bench_module, "table", lambda result: "")
    out = tmp / "b.json"
    assert main(["bench", "--frames", "1", "--device", "cpu", *flag, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert seen == [bool(flag)] and result["combo_kernels"] is bool(flag)
    assert ("--combo-kernels" in result["command"]) is bool(flag)


def test_bench_passes_its_question_on_and_records_it(tmp, monkeypatch):
    from specvlm import bench as bench_module

    seen = {}
    monkeypatch.setattr(bench_module, "bench", lambda *args, **kwargs: seen.update(kwargs) or {"card": "Test Card", "rows": []})
    monkeypatch.setattr(bench_module, "table", lambda result: "")
    out = tmp / "b.json"
    assert main(["bench", "--frames", "1", "--device", "cpu", "--question", "What moves?", "--out", str(out)]) == 0
    assert seen["question"] == "What moves?" and "--question 'What moves?'" in json.loads(out.read_text())["command"]
    assert main(["bench", "--frames", "1", "--device", "cpu", "--out", str(out)]) == 0
    assert seen["question"] == "Describe the video."


def test_profile_compiles_with_combo_kernels_when_asked(tmp, monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "combo_kernels", False)  # restored after the test: the flag sets it for the process
    seen = []
    monkeypatch.setattr(profile, "profile_shapes",
                        lambda *args, **kwargs: seen.append(inductor.combo_kernels) or {"card": "Test Card", "rows": []})
    monkeypatch.setattr(profile, "table", lambda result: "")
    out = tmp / "combo_{card}.json"
    assert profile.main(["--shapes", "tiny", "--contexts", "8", "--combo-kernels", "--out", str(out)]) == 0
    result = json.loads((tmp / "combo_test-card.json").read_text())
    assert seen == [True] and result["combo_kernels"] is True
    assert "--combo-kernels" in result["command"]


def test_profile_sets_inductor_keys_before_profiling_and_records_them(tmp, monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.triton, "enable_pdl", False)  # restored after the test: --inductor sets it for the process
    monkeypatch.setattr(inductor.triton, "cudagraph_trees", True)
    seen = []
    monkeypatch.setattr(profile, "profile_shapes", lambda *args, **kwargs: seen.append(
        (inductor.triton.enable_pdl, inductor.triton.cudagraph_trees)) or {"card": "Test Card", "rows": []})
    monkeypatch.setattr(profile, "table", lambda result: "")
    out = tmp / "pdl_{card}.json"
    assert profile.main(["--shapes", "tiny", "--contexts", "8", "--inductor", "triton.enable_pdl=True",
                         "triton.cudagraph_trees=0", "--out", str(out)]) == 0
    result = json.loads((tmp / "pdl_test-card.json").read_text())
    assert seen == [(True, False)]
    assert result["inductor"] == {"triton.enable_pdl": True, "triton.cudagraph_trees": False}
    assert "triton.enable_pdl=True" in result["command"]


@pytest.mark.parametrize("text, says", [
    ("triton.enable_pdl", "KEY=VALUE"),
    ("triton.enable_pld=True", "no 'triton.enable_pld'; similar: triton.enable_pdl"),
    ("triton.enable_pdl=yes please", "is a flag: give True or False"),
    ("max_autotune_gemm_search_space=", None),  # a text key takes any text
    ("fx_graph_remote_cache=False", None),  # a key whose default is None: a flag where the text reads as one
    ("triton.cudagraph_unexpected_rerecord_limit=three", "takes a number (int)"),
])
def test_profile_refuses_a_bad_inductor_setting_naming_it(text, says, capsys, monkeypatch):
    monkeypatch.setattr(profile, "profile_shapes", lambda *args, **kwargs: pytest.fail("profiled after a bad setting"))
    if says is None:
        key, _, value = text.partition("=")
        assert profile.inductor_setting(text) == (key, {"False": False}.get(value, value))
        return
    with pytest.raises(SystemExit):
        profile.main(["--shapes", "tiny", "--contexts", "8", "--inductor", text])
    assert says in capsys.readouterr().err


def test_a_bench_command_records_every_fast_path_setting_the_code_reads():
    """Each $SPECVLM_* setting the package reads (but the commit name) is in the recorded prefix, so a
    JSON's "command" reproduces its run."""
    from pathlib import Path

    from specvlm.__main__ import FAST_PATH_ENVIRONMENT

    package = Path(sv.__file__).parent
    read = {name for path in package.glob("*.py") for name in re.findall(r"SPECVLM_[A-Z0-9_]+", path.read_text())}
    assert read - {"SPECVLM_CODE"} == {name for name in FAST_PATH_ENVIRONMENT if name.startswith("SPECVLM_")}
