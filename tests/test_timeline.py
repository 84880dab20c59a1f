import pytest
import torch

import specvlm as sv
from specvlm import synthetic, timeline
from specvlm.trees import MC_SIM_7B_63


def _range(name, ts, dur):
    return {"ph": "X", "cat": "user_annotation", "name": timeline.PREFIX + name, "ts": ts, "dur": dur}


def _launch(correlation, ts):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": ts, "dur": 2,
            "args": {"correlation": correlation}}


def _kernel(correlation, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": f"k{correlation}", "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def test_device_time_goes_to_the_phase_that_launched_it_and_idle_gaps_are_named_by_their_neighbours():
    """One round on a made-up timeline (microseconds): the host launches the draft (two graphs)
    and the verification, then waits in accept; the device idles 100 us before the first draft
    kernel, 20 us between drafts, 300 us after the verification (the host accepting) and then
    runs a copy launched in accept."""
    events = [
        _range("decode", 0, 1000),
        _range("draft", 10, 50), _launch(1, 20), _launch(2, 40),
        _range("verify", 70, 30), _launch(3, 80),
        _range("accept", 110, 800), _launch(4, 150),
        _kernel(1, 100, 100), _kernel(2, 220, 100),  # 20 us gap between the two draft graphs
        _kernel(3, 320, 200),  # verify right after, overlapping nothing
        _kernel(4, 820, 10, cat="gpu_memcpy"),  # 300 us idle first
        _kernel(9, 2000, 50),  # after the decode: ignored
        _range("decode", -5000, 10),  # an earlier generation's (warm-up) range: not the last one
    ]
    result = timeline.decode_timeline(events)
    assert result["decode_ms"] == pytest.approx(1.0)
    assert result["kernels"] == 4
    assert result["busy_ms"] == pytest.approx(0.41)
    assert result["idle_ms"] == pytest.approx(0.59)
    assert result["phases"]["draft"]["busy_ms"] == pytest.approx(0.2) and result["phases"]["draft"]["kernels"] == 2
    assert result["phases"]["verify"]["busy_ms"] == pytest.approx(0.2)
    assert result["phases"]["accept"]["busy_ms"] == pytest.approx(0.01)
    assert result["phases"]["draft"]["host_ms"] == pytest.approx(0.05)
    assert result["idle_by_transition"] == {
        "verify>accept": {"ms": pytest.approx(0.3), "gaps": 1},
        "start>draft": {"ms": pytest.approx(0.1), "gaps": 1},
        "draft>draft": {"ms": pytest.approx(0.02), "gaps": 1}}
    assert result["largest_gaps"][0] == {"ms": pytest.approx(0.3), "after": "verify", "before": "accept"}
    assert result["phase_counts"] == {"draft": 1, "move": 0, "verify": 1, "accept": 1, "ar": 0}


def test_overlapping_device_events_count_once_and_unknown_launches_are_other():
    events = [_range("decode", 0, 100), _kernel(1, 10, 50), _kernel(2, 30, 50), _launch(2, 5)]
    result = timeline.decode_timeline(events)
    assert result["busy_ms"] == pytest.approx(0.07)  # [10, 80), not 0.1
    assert result["phases"]["other"]["kernels"] == 2  # launched outside any phase range


def test_a_trace_without_a_decode_range_says_what_to_profile():
    with pytest.raises(ValueError, match="specvlm.decode"):
        timeline.decode_timeline([_kernel(1, 0, 10)])
    with pytest.raises(ValueError, match="unknown phase"):
        timeline.phase("prefill")


@pytest.mark.parametrize("method,kwargs", [("ar", {}), ("specvlm", {"tree": MC_SIM_7B_63, "ratio": 0.5}),
                                           ("sd", {"k": 3})])
def test_profiling_a_cpu_decode_finds_one_range_per_round_and_keeps_the_tokens(method, kwargs):
    pair = sv.load_pair("tiny", device="cpu")
    prompt = pair.target.prepare(sv.from_array(synthetic.make_clip(3, num_frames=2).frames, fps=8.0),
                                 "Describe the video.")
    reference = sv.generate_ar(pair.target, prompt, 12).tokens
    result = timeline.profile_decode(pair, prompt, method, warmup=0, max_new_tokens=12, compile=False, **kwargs)
    assert result["tokens"] == reference and result["new_tokens"] == len(reference)
    assert result["busy_ms"] is None and result["decode_ms"] > 0  # no device timeline on a CPU
    counts = result["phase_counts"]
    if method == "ar":
        assert counts["ar"] == result["rounds"] == len(reference) - 1 and counts["draft"] == 0
    else:
        assert counts["draft"] == counts["verify"] == counts["accept"] == result["rounds"] > 0
        assert result["phases"]["verify"]["host_ms"] > 0
