"""The benchmark's bookkeeping (timings themselves are measured on a GPU, never asserted)."""

import json
import sys
import types

import pytest
import torch

import specvlm as sv
from specvlm import synthetic
from specvlm.__main__ import main
from specvlm.bench import RUNS, SELF_RUNS, bench, median_ms, save, table
from specvlm.cost_model import histogram, predicted_vs_measured


def test_bench_rows_compare_every_method_with_ar(tiny_pair, tmp_path):
    result = bench(tiny_pair, lambda frames: sv.sample_video("bikes", frames), [1], max_new_tokens=6, repeats=1)
    assert len(result["rows"]) == len(RUNS)
    assert all(row["equal_to_ar"] for row in result["rows"])
    assert all(row["speedup_vs_ar"] is not None and row["new_tokens"] <= 6 for row in result["rows"])
    assert {"device", "card", "torch", "transformers", "date", "pair"} <= set(result)
    assert result["stand_in"] is False  # random tiny checkpoints, not a stand-in for real ones
    save(result, tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["method"] == "ar"
    assert "specvlm" in table(result)


def test_bench_fast_path_rows_match_plain_ar_and_report_the_capture(tiny_pair):
    result = bench(tiny_pair, lambda frames: sv.sample_video("bikes", frames), [1], max_new_tokens=6, repeats=1,
                   paths=("plain", "fast"), timeline=True)
    assert [row["path"] for row in result["rows"]] == ["plain"] * len(RUNS) + ["fast"] * len(RUNS)
    for row in result["rows"]:  # one profiled generation per fast row, its rounds counted by phase
        if row["path"] == "plain":
            assert "timeline" not in row
        elif row["method"] == "ar":
            assert row["timeline"]["phase_counts"]["ar"] == row["new_tokens"] - 1
        else:
            assert row["timeline"]["phase_counts"]["verify"] == row["timeline"]["rounds"] == row["rounds"]
    assert all(row["equal_to_ar"] and row["speedup_vs_plain_ar"] is not None for row in result["rows"])
    plain = [row["mean_accepted"] for row in result["rows"] if row["path"] == "plain"]
    fast = [row["mean_accepted"] for row in result["rows"] if row["path"] == "fast"]
    assert plain == fast
    assert result["fast_path"]["models"]["target"]["cuda_graphs"] is False  # CPU: eager static steps


def test_bench_times_transformers_generate_and_assisted_generation_against_ar(tiny_pair):
    result = bench(tiny_pair, lambda frames: sv.sample_video("bikes", frames), [1], max_new_tokens=6, repeats=1,
                   transformers_baselines=True)
    hf = [row for row in result["rows"] if row["path"] == "transformers"]
    assert [(row["method"], row["cache"]) for row in hf] == [  # one output vocabulary: no padded row
        ("hf-generate", "dynamic"), ("hf-assisted", "dynamic"), ("hf-generate-static", "static")]
    assert all(row["equal_to_ar"] and row["speedup_vs_ar_total"] > 0 for row in hf)
    assert hf[1]["draft_video_tokens"] == hf[1]["video_tokens"]  # the assistant sees the whole video
    assert all(row["decode_s"] == pytest.approx(max(row["total_s"] - row["prefill_s"], 0.0)) and row["prefill_s"] > 0
               for row in hf)
    assert all(row["total_s"] > 0 for row in result["rows"])
    assert "hf-assisted" in table(result)


# ----------------------------------------------------------------------------------------
# self-speculation rows, per-row step timings and what the cost model reads

NEW_TOKENS = 8


def synthetic_video(frames):
    return sv.from_array(synthetic.make_clip(0, num_frames=frames).frames, fps=8.0)


@pytest.fixture(scope="module")
def embedded():
    return sv.load_pair("tiny", device="cpu")


@pytest.fixture(scope="module")
def embedded_run():
    """The embedded pair on both paths (fast: eager static steps on CPU), with self rows."""
    pair = sv.load_pair("tiny", device="cpu")
    return bench(pair, synthetic_video, [2], max_new_tokens=NEW_TOKENS, repeats=1, paths=("plain", "fast"),
                 self_speculation=True, step_repeats=2)


def test_self_speculation_rows_equal_ar_with_the_targets_own_pruned_video(embedded_run):
    rows = [row for row in embedded_run["rows"] if row["drafter"] == "self"]
    assert [(row["path"], row["method"], row["draft"], row["ratio"]) for row in rows] == \
        [(path, *run) for path in ("plain", "fast") for run in SELF_RUNS]
    assert all(row["equal_to_ar"] and row["speedup_vs_ar"] is not None for row in rows)
    for row in rows:
        pruned = row["video_tokens"] - row["draft_video_tokens"]
        assert pruned >= row["ratio"] * row["video_tokens"] - 1
        assert row["draft_prompt_tokens"] == row["prompt_tokens"] - pruned
        assert row["kv_bytes"]["draft"] < row["kv_bytes"]["target"]  # the target's own layers, fewer tokens
    assert embedded_run["stand_in"] is True and embedded_run["self_speculation"] is True


def test_accepted_histograms_count_rounds_and_tokens(embedded_run):
    speculative = [row for row in embedded_run["rows"] if row["method"] != "ar"]
    assert all(sum(row["accepted_hist"]) == row["rounds"] for row in speculative)
    assert all(row["accepted_hist"] is None for row in embedded_run["rows"] if row["method"] == "ar")
    # a round commits its accepted tokens and the bonus token, after the prefill's first token;
    # exact unless an end token cut a round short (then fewer than max_new_tokens come out)
    full = [row for row in speculative if row["new_tokens"] == NEW_TOKENS]
    assert full
    for row in full:
        assert 1 + sum((a + 1) * count for a, count in enumerate(row["accepted_hist"])) == row["new_tokens"]


def test_every_row_has_positive_step_timings_and_cache_sizes(embedded_run):
    for row in embedded_run["rows"]:
        expected = {"target_step"} if row["method"] == "ar" else {"draft_step", "verify"}
        if row["path"] == "fast":
            expected |= {"target_step_synced"} if row["method"] == "ar" else {"draft_step_synced"}
        if row["path"] == "fast" and row["draft"] == "tree":
            expected |= {"draft_feed", "draft_level", "draft_picks", "accept_synced", "target_move"}
        assert set(row["step_ms"]) == expected and all(ms > 0 for ms in row["step_ms"].values())
        assert row["prompt_tokens"] > row["video_tokens"] and row["kv_bytes"]["target"] > 0
        assert row["peak_memory_bytes"] is None  # CPU
    fast = [row for row in embedded_run["rows"] if row["path"] == "fast"]
    assert all(row["kv_bytes"]["allocated"]["target"] >= row["kv_bytes"]["target"] for row in fast)


def test_round_glue_times_what_a_tree_round_runs_and_leaves_the_caches_where_they_were(monkeypatch):
    """`fast_steps` on a tree row times the round's own picks (every depth, in order), acceptance
    (on float32 logits, as the draft's passes give them, also for a bfloat16 model) and KV move
    (of a real root-to-leaf path), and sets both caches' write positions back to where decoding
    starts."""
    from specvlm import bench as bench_module, fast
    from specvlm.trees import MC_SIM_7B_63

    embedded = sv.load_pair("tiny", device="cpu", dtype=torch.bfloat16)
    video = synthetic_video(2)
    prompt, draft_prompt = embedded.target.prepare(video, "Describe."), embedded.draft.prepare(video, "Describe.")
    res = bench_module.run_once("fast", embedded, prompt, draft_prompt, "specvlm", "tree", 0.5, 5, 4)
    seen = {"depths": [], "dtypes": set(), "accepted": 0, "moves": []}
    pick, accept, move = fast.pick_level, fast.accept_round, fast.StaticLM.move

    def pick_spy(draft, tree, levels, depth, logits, tokens, kernel):
        seen["depths"].append(depth)
        seen["dtypes"].add(logits.dtype)
        assert kernel == "torch"  # $SPECVLM_PICKS unset: the default, as the round itself picks
        return pick(draft, tree, levels, depth, logits, tokens, kernel)

    def accept_spy(tree, tokens, logits):
        seen["accepted"] += 1
        return accept(tree, tokens, logits)

    monkeypatch.setattr(fast, "pick_level", pick_spy)
    monkeypatch.setattr(fast, "accept_round", accept_spy)
    monkeypatch.setattr(fast.StaticLM, "move", lambda self, source, dest: seen["moves"].append((source, dest))
                        or move(self, source, dest))
    steps = bench_module.fast_steps(embedded, prompt, draft_prompt, res, "tree", 5, repeats=1)["step_ms"]
    depth = MC_SIM_7B_63.depth
    assert seen["depths"] and seen["depths"] == list(range(1, depth + 1)) * (len(seen["depths"]) // depth)
    assert seen["dtypes"] == {torch.float32} and seen["accepted"] >= 1
    start = prompt.input_ids.shape[1]
    path = [node for node in MC_SIM_7B_63.retrieve[0, 1:].tolist() if node > 0]
    assert seen["moves"] and set(map(str, seen["moves"])) == {str(fast.path_moves(start, path, depth))}
    assert all(steps[name] > 0 for name in ("draft_picks", "accept_synced", "target_move"))
    target, draft = (fast.static_lm(lm, role, None) for lm, role in ((embedded.target, "target"),
                                                                      (embedded.draft, "draft")))
    assert target.length == start and draft.length == len(draft_prompt.rows(res.kept))


def test_the_cost_model_predicts_every_speculative_row_from_the_run_itself(embedded_run):
    predictions = predicted_vs_measured(embedded_run)
    assert len(predictions) == sum(row["method"] != "ar" for row in embedded_run["rows"])
    assert all(p["source"] == "run" and p["predicted"] > 0 for p in predictions)


def test_table_shows_who_drafts(embedded_run):
    text = table(embedded_run)
    assert "self" in text and "draft" in text and "(stand-in)" in text


def test_cli_widens_the_pair_and_adds_self_rows(tmp_path, monkeypatch):
    monkeypatch.delenv("SPECVLM_FAST_ATTENTION", raising=False)
    calls = []

    def widen_pair(pair, target_shape, draft_shape, device=None, dtype=None):
        calls.append((target_shape, draft_shape, device, dtype))
        return sv.Pair(pair.target, pair.draft, name="widened stub")

    monkeypatch.setitem(sys.modules, "specvlm.widen", types.SimpleNamespace(widen_pair=widen_pair))
    out = tmp_path / "bench.json"
    code = main(["bench", "--widen", "llava-ov-7b", "llava-ov-0.5b", "--self", "--frames", "1",
                 "--max-new-tokens", "4", "--repeats", "1", "--step-repeats", "1", "--device", "cpu",
                 "--out", str(out)])
    assert code == 0
    assert calls == [("llava-ov-7b", "llava-ov-0.5b", "cpu", None)]
    result = json.loads(out.read_text())
    assert result["pair"] == "widened stub" and result["stand_in"] is True
    assert result["widened_to"] == {"target": "llava-ov-7b", "draft": "llava-ov-0.5b"}
    assert sum(row["drafter"] == "self" for row in result["rows"]) == len(SELF_RUNS)
    assert result["command"].startswith("python -m specvlm bench --widen llava-ov-7b llava-ov-0.5b --self")
    assert result["code"] is None or len(result["code"].split()[0]) == 40  # the checkout's commit, where there is one


def test_card_id_names_the_card_so_runs_on_one_card_can_be_told(monkeypatch):
    """A CUDA card's UUID (two results on the same card share it); None for a CPU."""
    import uuid

    from specvlm import bench as bench_module

    card = uuid.UUID("d63ecfc4-dc10-1992-d023-743d7dde9c5c")
    seen = []
    monkeypatch.setattr(bench_module.torch.cuda, "get_device_properties",
                        lambda device: seen.append(device) or types.SimpleNamespace(uuid=card))
    assert bench_module.card_id(torch.device("cuda", 1)) == "d63ecfc4-dc10-1992-d023-743d7dde9c5c"
    assert seen == [torch.device("cuda", 1)]
    assert bench_module.card_id(torch.device("cpu")) is None


def test_a_run_cut_short_still_says_where_and_how_it_ran(tmp_path, monkeypatch):
    """Every row's save carries the card, versions, command and code: a run stopped by a time
    limit leaves a usable partial JSON. $SPECVLM_CODE names the commit of a copied tree."""
    monkeypatch.setenv("SPECVLM_CODE", "abc123 (copied tree)")
    saved = []
    monkeypatch.setattr("specvlm.bench.save", lambda result, path: saved.append(json.loads(json.dumps(result))))
    assert main(["bench", "--frames", "1", "--max-new-tokens", "3", "--repeats", "1", "--step-repeats", "1",
                 "--device", "cpu", "--only", "sd-chain-0", "--out", str(tmp_path / "b.json")]) == 0
    *partials, final = saved
    assert partials and all(p["partial"] and p["card"] and p["torch"] and p["transformers"] and p["date"]
                            for p in partials)
    assert all("card_id" in p and p["card_id"] is None for p in saved)  # a CPU run: no card UUID
    assert {p["code"] for p in partials} == {final["code"]} == {"abc123 (copied tree)"}
    assert [len(p["rows"]) for p in partials] == list(range(1, len(final["rows"]) + 1))
    assert "partial" not in final and final["command"].startswith("python -m specvlm bench --frames 1")


def test_assisted_generation_goes_universal_when_the_output_vocabularies_differ(embedded):
    from transformers import Qwen2Config

    from specvlm import bench as bench_module, widen

    assert bench_module.assisted_mode(embedded) == "token"
    target = Qwen2Config(hidden_size=384, num_hidden_layers=5, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=1024, vocab_size=640, head_dim=128, tie_word_embeddings=False)
    draft = Qwen2Config(hidden_size=192, num_hidden_layers=3, num_attention_heads=14, num_key_value_heads=2,
                        intermediate_size=512, vocab_size=576, head_dim=64, tie_word_embeddings=False)
    wide = widen.widen_pair(embedded, target, draft)  # 640 vs 576 rows, one tokenizer: like llava-hf 7B / 0.5B
    assert bench_module.assisted_mode(wide) == "universal"
    prompt = wide.target.prepare(synthetic_video(2), "Describe the video.")
    reference = sv.generate_ar(wide.target, prompt, NEW_TOKENS).tokens
    rows = bench_module.hf_rows(wide, prompt, reference, {"decode_s": 1.0, "total_s": 1.0, "equal_to_ar": True}, 2,
                                NEW_TOKENS, 1)
    assert [(r["method"], r["assisted_mode"], r["equal_to_ar"]) for r in rows] == [
        ("hf-generate", None, True), ("hf-assisted", "universal", True), ("hf-assisted-padded", "token", True),
        ("hf-generate-static", None, True)]
    assert rows[2]["draft_output_rows"] == [576, 640] and rows[2]["new_tokens"] == len(reference)
    assert wide.draft.model.get_output_embeddings().weight.shape[0] == 576  # restored after the row
    assert wide.draft.model.config.text_config.vocab_size == 576
    assert "hf-assisted-padded" in bench_module.run_labels()
    assert "hf-assisted-padded" not in bench_module.run_labels(universal=False)
    with pytest.raises(ValueError, match="hf-assisted-padded only for a pair whose output layers differ"):
        bench(embedded, synthetic_video, [1], transformers_baselines=True, only=["hf-assisted-padded"])


def test_a_padded_output_layer_keeps_the_greedy_tokens_and_every_probability(embedded):
    import copy

    from specvlm.bench import PaddedOutput, padded_output_layer

    model = copy.deepcopy(embedded.draft.model)
    weight = model.get_output_embeddings().weight
    vocab, hidden_size = weight.shape
    with torch.no_grad():  # every row gets a positive first coordinate: hidden states with a large negative one
        weight[:, 0] = 1 + weight[:, 0].abs()  # make every real logit negative
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(4000, hidden_size, generator=generator)
    hidden[::2, 0] = -20.0
    with torch.no_grad():
        real = hidden @ weight.T
    assert real[::2].max() < 0  # where zero padding rows would win
    rows = 3 * vocab
    with padded_output_layer(model, rows) as padded:
        assert model.get_output_embeddings() is padded and isinstance(padded, PaddedOutput)
        with torch.no_grad():
            logits = padded(hidden)
        assert logits.shape == (4000, rows) and torch.equal(logits[:, :vocab], real)
        assert torch.equal(logits.argmax(-1), real.argmax(-1))
        assert torch.equal(logits.softmax(-1)[:, :vocab], real.softmax(-1))  # no probability moves to the padding
    # the same checks catch the paddings one might try instead: zero rows win an argmax, copies take probability
    image = model.config.image_token_id
    for filler, check in ((torch.zeros(rows - vocab, hidden_size), "argmax"),
                          (weight[image].detach().expand(rows - vocab, hidden_size), "softmax")):
        with torch.no_grad():
            other = hidden @ torch.cat([weight, filler]).T
        if check == "argmax":
            assert not torch.equal(other.argmax(-1), real.argmax(-1))
        else:
            assert not torch.allclose(other.softmax(-1)[:, :vocab], real.softmax(-1))


@pytest.mark.parametrize("tied", [False, True])
def test_padding_the_output_layer_restores_the_model_even_after_an_error(embedded, tied):
    import copy

    from specvlm.bench import padded_output_layer

    model = copy.deepcopy(embedded.draft.model)
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    layer, text = model.get_output_embeddings(), model.config.text_config
    weight, embeddings, vocab = layer.weight, model.get_input_embeddings(), text.vocab_size
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"):
        with padded_output_layer(model, vocab + 5):
            assert model.get_output_embeddings() is not layer and text.vocab_size == vocab + 5
            assert model.get_input_embeddings() is embeddings and embeddings.weight.shape[0] == vocab
            raise RuntimeError("inside")
    assert model.get_output_embeddings() is layer and layer.weight is weight and text.vocab_size == vocab
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="only adds rows"):
        with padded_output_layer(model, vocab - 1):
            pass
    assert model.get_output_embeddings() is layer


def test_a_baseline_transformers_refuses_is_a_row_with_its_error_and_no_speedup(embedded, monkeypatch):
    from specvlm import bench as bench_module

    def refuse(pair, prompt, max_new_tokens, assisted, static=False):
        if assisted:
            raise ValueError("The main and assistant models have different tokenizers.")
        return [1, 2][:max_new_tokens], 0.1 if max_new_tokens == 1 else 0.5  # prefill and first token: 0.1 s

    monkeypatch.setattr(bench_module, "hf_generate", refuse)
    prompt = embedded.target.prepare(synthetic_video(2), "Describe the video.")
    ar = {"decode_s": 0.2, "total_s": 1.0, "equal_to_ar": True}
    generate_row, assisted_row, static_row = bench_module.hf_rows(embedded, prompt, [1, 2], ar, 2, NEW_TOKENS, 1)
    assert static_row["equal_to_ar"] and static_row["cache"] == "static"
    assert generate_row["equal_to_ar"] and generate_row["speedup_vs_ar_total"] == pytest.approx(2.0)
    assert generate_row["prefill_s"] == pytest.approx(0.1) and generate_row["decode_s"] == pytest.approx(0.4)
    assert generate_row["speedup_vs_ar"] == pytest.approx(0.5)
    assert not assisted_row["equal_to_ar"] and assisted_row["speedup_vs_ar_total"] is None
    assert "different tokenizers" in assisted_row["error"]
    assert "failed" in table({"pair": "p", "device": "cpu", "dtype": "float32", "date": "d", "rows": [assisted_row]})


def test_bench_reports_progress_after_every_row(embedded):
    """After every row, the result so far: marked partial, with every fact the whole result records,
    so a run cut short by a time limit still says where and how it ran."""
    seen = []
    result = bench(embedded, synthetic_video, [1], max_new_tokens=4, repeats=1, step_repeats=1,
                   progress=lambda partial: seen.append(partial))
    assert [len(partial["rows"]) for partial in seen] == list(range(1, len(RUNS) + 1))
    assert all(partial["partial"] for partial in seen) and "partial" not in result
    assert all(partial.keys() == result.keys() | {"partial"} for partial in seen)
    assert seen[-1]["rows"] == result["rows"] and seen[-1]["dtype"] == result["dtype"] == "torch.float32"


def test_bench_runs_only_the_named_rows_and_always_ar(embedded):
    from specvlm.bench import run_labels

    assert "specvlm-tree-0.9" in run_labels() and "self-specvlm-chain-0.5" in run_labels()
    result = bench(embedded, synthetic_video, [1], max_new_tokens=4, repeats=1, step_repeats=1,
                   only=["specvlm-chain-0.9"])
    assert [(r["method"], r["draft"], r["ratio"]) for r in result["rows"]] == [("ar", None, 0.0), ("specvlm", "chain", 0.9)]
    assert all(r["row_s"] > r["decode_s"] + r["prefill_s"] for r in result["rows"])  # warm-up and step timings too
    with pytest.raises(ValueError, match="not among this call's rows"):
        bench(embedded, synthetic_video, [1], only=["specvlm-chain-0.8"])
    with pytest.raises(ValueError, match="--transformers"):  # a baseline row without the baselines
        bench(embedded, synthetic_video, [1], only=["hf-generate"])
    self_pair = sv.Pair(embedded.target, embedded.target)
    with pytest.raises(ValueError, match="self-sd-chain-0"):  # a target drafting for itself: every row is "self-"
        bench(self_pair, synthetic_video, [1], only=["sd-chain-0"])


def test_fast_rows_record_the_draft_vocabulary_they_drafted_from(embedded, monkeypatch):
    monkeypatch.setenv("SPECVLM_DRAFT_VOCAB", "100")
    result = bench(embedded, synthetic_video, [1], max_new_tokens=6, repeats=1, step_repeats=1, paths=("plain", "fast"),
                   only=["specvlm-tree-0.5"])
    vocab = {(r["path"], r["method"]): r["draft_vocab"] for r in result["rows"]}
    assert vocab == {("plain", "ar"): None, ("plain", "specvlm"): None, ("fast", "ar"): None, ("fast", "specvlm"): 100}
    assert all(r["equal_to_ar"] for r in result["rows"])
    monkeypatch.delenv("SPECVLM_DRAFT_VOCAB")
    assert sv.bench.draft_vocab_size(embedded.draft) is None


def test_median_ms_queues_calls_and_divides_by_their_number(monkeypatch):
    log = []

    class EightMs:  # every sample takes 8 ms, however many calls it queues
        def __init__(self, device):
            self.laps = {}
            log.append("start")

        def lap(self, name):
            self.laps[name] = 0.008
            log.append("lap")

    monkeypatch.setattr("specvlm.bench.Stopwatch", EightMs)
    call, reset = lambda: log.append("call"), lambda: log.append("reset")
    assert median_ms(torch.device("cpu"), call, reset, repeats=2, warmup=1, queued=4) == pytest.approx(2.0)
    assert log == ["start", *["reset", "call"] * 4, "lap"] * 3 + ["reset"]  # queued: resets timed with the calls
    log.clear()
    assert median_ms(torch.device("cpu"), call, reset, repeats=2, warmup=1) == pytest.approx(8.0)
    assert log == ["reset", "start", "call", "lap"] * 3 + ["reset"]  # one at a time: the reset is untimed
    with pytest.raises(ValueError, match="one call"):
        median_ms(torch.device("cpu"), lambda: None, lambda: None, repeats=1, queued=0)


def test_the_recorded_command_keeps_no_foreign_absolute_out_path(tmp_path, monkeypatch):
    from specvlm.__main__ import portable_out

    monkeypatch.chdir(tmp_path)
    assert portable_out(["bench", "--out", "/elsewhere/run.json"]) == ["bench", "--out", "run.json"]
    inside = str(tmp_path / "figures" / "run.json")
    assert portable_out(["bench", "--out", inside, "--frames", "8"]) == ["bench", "--out", inside, "--frames", "8"]
    assert portable_out(["bench", "--out", "figures/run.json"]) == ["bench", "--out", "figures/run.json"]


def test_selection_rows_cover_the_other_ratios_and_methods_and_equal_ar(embedded):
    from specvlm.bench import SELECTION_RUNS, run_label, run_labels

    labels = [run_label(*run, "draft") for run in SELECTION_RUNS]
    assert set(labels) <= set(run_labels(selection=True)) and not set(labels) & set(run_labels())
    result = bench(embedded, synthetic_video, [2], max_new_tokens=NEW_TOKENS, repeats=1, paths=("fast",),
                   selection=True, only=labels, step_repeats=1)
    rows = result["rows"]
    assert [(r["method"], r["ratio"]) for r in rows] == [("ar", 0.0)] + [(m, ratio) for m, _, ratio in SELECTION_RUNS]
    assert all(r["equal_to_ar"] for r in rows) and result["selection"] is True
    kept = {r["method"] + str(r["ratio"]): r["draft_video_tokens"] for r in rows[1:]}
    assert kept["specvlm0.95"] < kept["specvlm0.75"]  # more pruned, fewer video tokens for the draft
    with pytest.raises(ValueError, match="--selection"):
        bench(embedded, synthetic_video, [2], max_new_tokens=NEW_TOKENS, repeats=1, only=labels[:1])


def test_fast_path_step_timings_run_without_grad_whatever_the_caller_enabled(embedded, monkeypatch):
    """`bench.fast_steps` times steps compiled inside a generation, which runs without grad; dynamo
    guards the grad mode, so a timed pass with grad enabled would compile every step again (at the
    7B/0.5B shapes that took a benchmark row past its time limit)."""
    import specvlm.bench as bench_module

    grad_modes, timed = [], bench_module.median_ms

    def recording(device, call, reset, repeats, **kwargs):
        return timed(device, lambda: (grad_modes.append(torch.is_grad_enabled()), call()), reset, repeats, **kwargs)

    monkeypatch.setattr(bench_module, "median_ms", recording)
    with torch.enable_grad():
        result = bench(embedded, synthetic_video, [1], max_new_tokens=4, repeats=1, step_repeats=1, paths=("fast",),
                       only=["specvlm-tree-0.5"])
    steps = [row["step_ms"] for row in result["rows"]]
    assert {"target_step", "verify", "draft_step", "draft_feed", "draft_level"} <= {k for s in steps for k in s}
    assert grad_modes and not any(grad_modes)


def test_a_row_is_judged_on_every_call_and_says_where_it_left_ar(embedded, monkeypatch):
    """A row whose later repetition (not its first) gives other tokens gets no speedup, and records
    the first differing token and the target's top-2 margin there (README, Measuring speed)."""
    import dataclasses

    import specvlm.bench as bench_module

    calls, run_once = [], bench_module.run_once

    def flaky(path, pair, prompt, draft_prompt, method, *args):
        res = run_once(path, pair, prompt, draft_prompt, method, *args)
        if method == "specvlm":
            calls.append(method)
            if len(calls) == 3:  # warm-up, first timed call, then this one
                res = dataclasses.replace(res, tokens=res.tokens[:2] + [res.tokens[2] + 1] + res.tokens[3:])
        return res

    monkeypatch.setattr(bench_module, "run_once", flaky)
    result = bench(embedded, synthetic_video, [1], max_new_tokens=6, repeats=2, step_repeats=1,
                   only=["specvlm-chain-0.9"])
    ar, row = result["rows"]
    assert ar["equal_to_ar"] and ar["divergence"] is None and result["reference"] == "AR on the plain path"
    assert not row["equal_to_ar"] and row["speedup_vs_ar"] is None and row["speedup_vs_ar_total"] is None
    divergence = row["divergence"]
    assert divergence["index"] == 2 and divergence["token"] == divergence["reference_token"] + 1
    assert divergence["reference_margin"] > 0
    assert "NO at token 2" in table(result)


def test_first_divergence_margin_is_the_targets_top_two_gap_after_ar_prefix(embedded):
    from specvlm.bench import first_divergence
    from specvlm.decoding import generate_ar, positions, prefill_pruned

    prompt = embedded.target.prepare(synthetic_video(1), "Describe the video.")
    tokens = generate_ar(embedded.target, prompt, 6).tokens
    assert first_divergence(embedded.target, prompt, tokens, tokens) is None
    logits, cache = prefill_pruned(embedded.target, prompt, None)
    logits = embedded.target.step(tokens[:4], positions(prompt, 0, 4), cache)[0, -1]
    top = logits.topk(2).values
    found = first_divergence(embedded.target, prompt, tokens[:4] + [0, 0], tokens)
    assert found["index"] == 4 and found["reference_token"] == tokens[4] == int(logits.argmax())
    assert found["reference_margin"] == pytest.approx(float(top[0] - top[1]), abs=1e-4)  # AR's one-token steps
    shorter = first_divergence(embedded.target, prompt, tokens[:3], tokens)  # stopped early: no token there
    assert shorter["index"] == 3 and shorter["token"] is None


def test_the_plain_path_runs_first_and_is_every_rows_reference(embedded):
    result = bench(embedded, synthetic_video, [1], max_new_tokens=4, repeats=1, step_repeats=1,
                   paths=("fast", "plain"), only=["sd-chain-0"])
    assert [row["path"] for row in result["rows"]] == ["plain", "plain", "fast", "fast"]
    assert result["reference"] == "AR on the plain path"
    alone = bench(embedded, synthetic_video, [1], max_new_tokens=4, repeats=1, step_repeats=1, paths=("fast",),
                  only=["sd-chain-0"])
    assert alone["reference"] == "AR on the fast path"


def test_when_ars_own_calls_disagree_no_row_gets_a_speedup(embedded, monkeypatch):
    import dataclasses

    import specvlm.bench as bench_module

    calls, run_once = [], bench_module.run_once

    def flaky(path, pair, prompt, draft_prompt, method, *args):
        res = run_once(path, pair, prompt, draft_prompt, method, *args)
        if method == "ar":
            calls.append(method)
            if len(calls) == 3:  # AR's second timed call ends one token early
                res = dataclasses.replace(res, tokens=res.tokens[:-1])
        return res

    monkeypatch.setattr(bench_module, "run_once", flaky)
    result = bench(embedded, synthetic_video, [1], max_new_tokens=6, repeats=2, step_repeats=1,
                   transformers_baselines=True, only=["specvlm-chain-0.9", "hf-generate"])
    ar, row, hf = result["rows"]
    assert not ar["equal_to_ar"] and ar["divergence"]["token"] is None  # stopped before AR's last token
    for r in (row, hf):
        assert not r["equal_to_ar"] and r["speedup_vs_ar"] is None and r["speedup_vs_ar_total"] is None
    assert row["speedup_vs_plain_ar"] is None
    with pytest.raises(ValueError, match="paths must name"):
        bench(embedded, synthetic_video, [1], paths=())


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_a_named_tree_adds_rows_that_record_their_tree_and_equal_ar(embedded, path):
    from specvlm.bench import run_labels

    grown = sv.Tree.from_paths([[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0], [0] * 6])
    assert "specvlm-tree:grown-0.5" in run_labels(tree_names=("grown",))
    result = bench(embedded, synthetic_video, [2], max_new_tokens=NEW_TOKENS, repeats=1, step_repeats=1,
                   paths=(path,), only=["specvlm-tree-0.5", "specvlm-tree:grown-0.5"], trees={"grown": grown})
    ar, default, named = result["rows"]
    assert default["draft"] == named["draft"] == "tree" and default["tree"]["name"] == "mc_sim_7b_63"
    assert named["tree"] == {"name": "grown", "nodes": 8, "depth": 6, "paths": [list(p) for p in grown.paths]}
    assert named["equal_to_ar"] and named["speedup_vs_ar"] is not None
    prompt = embedded.target.prepare(synthetic_video(2), "Describe the video.")
    drafted = sv.decoding.generate_sd(embedded, prompt, "specvlm", 0.5, tree=grown, max_new_tokens=NEW_TOKENS)
    assert named["accepted_hist"] == histogram(drafted.accepted)  # the row drafted the named tree
    assert named["accepted_hist"] != default["accepted_hist"]  # which accepts differently from mc_sim_7b_63 here
    assert named["rounds"] == drafted.rounds
    if path == "fast":
        assert {"draft_feed", "draft_level", "draft_picks"} <= set(named["step_ms"])
    with pytest.raises(ValueError, match="names .* sv.Tree"):
        bench(embedded, synthetic_video, [2], trees={"a:b": grown})
    with pytest.raises(ValueError, match="not among this call's rows"):
        bench(embedded, synthetic_video, [2], only=["specvlm-tree:other-0.5"], trees={"grown": grown})


def test_bench_asks_every_prompt_the_question_it_is_given_and_records_it(embedded, monkeypatch):
    asked = []
    for model in (embedded.target, embedded.draft):
        prepare = model.prepare
        monkeypatch.setattr(model, "prepare", lambda video, question, prepare=prepare: asked.append(question)
                            or prepare(video, question))
    result = bench(embedded, synthetic_video, [1], max_new_tokens=4, repeats=1, step_repeats=1,
                   only=["specvlm-chain-0.9"], question="What moves in the video?")
    assert result["question"] == "What moves in the video?"
    assert asked and set(asked) == {"What moves in the video?"}
    assert all(r["equal_to_ar"] for r in result["rows"])
    default = bench(embedded, synthetic_video, [1], max_new_tokens=4, repeats=1, step_repeats=1, only=["ar"])
    assert default["question"] == sv.models.DEFAULT_QUESTION


def test_step_kernels_profile_each_queued_pass_of_a_fast_row_only(embedded):
    """`step_kernels`: each fast-path row records, per queued pass, what ran (on a CPU: operators),
    per pass; plain rows and rows without the option record nothing."""
    from specvlm.bench import QUEUED

    result = bench(embedded, synthetic_video, [1], max_new_tokens=4, repeats=1, step_repeats=2,
                   paths=("plain", "fast"), only=["specvlm-tree-0.5"], step_kernels=True)
    rows = {(r["path"], r["method"]): r for r in result["rows"]}
    assert all(r["equal_to_ar"] for r in rows.values())
    assert "step_kernels" not in rows["plain", "ar"] and "step_kernels" not in rows["plain", "specvlm"]
    assert set(rows["fast", "ar"]["step_kernels"]) == {"target_step"}
    spec = rows["fast", "specvlm"]
    assert set(spec["step_kernels"]) == {"verify", "draft_step", "draft_feed", "draft_level"}
    layers = embedded.draft.model.config.get_text_config().num_hidden_layers
    for name, kernels in spec["step_kernels"].items():
        assert kernels["wall_us_per_step"] == pytest.approx(1000 * spec["step_ms"][name])  # the queued timing
        assert kernels["kernels_per_step"] >= layers  # every decoder layer runs at least one operator per pass
        assert kernels["gpu_busy_us_per_step"] > 0 and kernels["top"]
        assert kernels["graph_kernels_visible"] is None  # no CUDA graphs on a CPU
        host = kernels["host"]
        assert 0 < host["host_us_per_step"] <= host["queued_us_per_step"]  # queued, then waited for
        assert host["replay_us_per_step"] is None  # no CUDA graph to replay alone on a CPU
        assert 0 < host["host_us_per_step_without_gc"] <= host["queued_us_per_step_without_gc"]
        own = [entry["own_us_per_step"] for entry in host["top"]]
        assert len(own) == 12 and own == sorted(own, reverse=True)  # the costliest functions, costliest first
    assert __import__("gc").isenabled()  # the collector, paused for a timing, runs again
    unprofiled = bench(embedded, synthetic_video, [1], max_new_tokens=4, repeats=1, step_repeats=1, paths=("fast",),
                       only=["specvlm-tree-0.5"])
    assert all("step_kernels" not in r for r in unprofiled["rows"])


@pytest.mark.parametrize("flag", [True, False])
def test_the_bench_cli_passes_step_kernels_on(flag, tmp_path, monkeypatch):
    seen = {}

    def fake_bench(pair, video_for, frames, *args, **kwargs):
        seen.update(kwargs)
        return {"pair": "p", "device": "cpu", "dtype": "float32", "date": "d", "rows": []}

    monkeypatch.setattr("specvlm.bench.bench", fake_bench)
    argv = ["bench", "--frames", "1", "--device", "cpu", "--out", str(tmp_path / "b.json")]
    assert main(argv + ["--step-kernels"] * flag) == 0
    assert seen["step_kernels"] is flag


class CountingPass:
    """A pass on a CPU: one `aten::mul` per call, writing at `position`, which `reset` sets back."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.position, self.fail_at = 0, 0, fail_at
        self.x = torch.ones(4)

    def call(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("a pass that fails")
        self.position += 1
        return self.x * 2

    def reset(self):
        self.position = 0


def test_pass_kernels_counts_per_call_and_leaves_the_position_where_it_was():
    from specvlm.bench import QUEUED, pass_kernels

    counting = CountingPass()
    kernels = pass_kernels(torch.device("cpu"), counting.call, counting.reset, repeats=3, wall_ms=0.5, layers=2)
    mul = next(entry for entry in kernels["top"] if entry["name"] == "aten::mul")
    assert mul["calls_per_step"] == 1.0  # 3 x QUEUED profiled calls, one mul each
    assert counting.position == 0 and kernels["wall_us_per_step"] == 500.0
    # 3 x QUEUED timed twice and once under cProfile by host_side, one warm-up, 3 x QUEUED profiled
    assert counting.calls == 3 * QUEUED * 3 + 1 + 3 * QUEUED
    assert kernels["graph_kernels_visible"] is None  # no CUDA graphs
    calls = {entry["function"].split(" (")[0]: entry["calls_per_step"] for entry in kernels["host"]["top"]}
    assert calls["call"] == 1.0 and calls["reset"] == 1.0


def test_host_side_times_a_given_replay_alone_queued_and_nothing_without_one():
    from specvlm.bench import QUEUED, STEP_WARMUP, host_side

    counting, replays = CountingPass(), CountingPass()
    host = host_side(torch.device("cpu"), counting.call, counting.reset, repeats=3, replay=replays.call)
    assert replays.calls == (STEP_WARMUP + 3) * QUEUED and counting.calls == 3 * 3 * QUEUED
    assert host["replay_us_per_step"] > 0 and counting.position == 0
    assert host_side(torch.device("cpu"), counting.call, counting.reset, repeats=3)["replay_us_per_step"] is None


def test_last_replay_finds_the_graph_the_pass_replayed():
    from types import SimpleNamespace

    from specvlm.bench import last_replay

    counting = CountingPass()
    graph = SimpleNamespace(replay=lambda: None)
    engine = SimpleNamespace(last_graph=None)
    assert last_replay(counting.call, counting.reset, engine) is None and counting.calls == 1 and counting.position == 0
    engine.last_graph = graph
    assert last_replay(counting.call, counting.reset, engine) is graph.replay


@pytest.mark.parametrize("fail_at", [1, 3 * 8 + 2, 2 * 3 * 8 + 5])
def test_host_side_restores_the_collector_the_profiler_and_the_position_when_a_pass_fails(fail_at):
    import gc

    from specvlm.bench import QUEUED, host_side

    assert QUEUED == 8  # fail_at counts in samples of 8 calls: the first timing, the one without gc, cProfile's
    counting = CountingPass(fail_at)
    with pytest.raises(RuntimeError, match="fails"):
        host_side(torch.device("cpu"), counting.call, counting.reset, repeats=3)
    assert gc.isenabled() and sys.getprofile() is None and counting.position == 0
