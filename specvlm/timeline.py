"""Where a whole decode's time goes: one fast-path generation under `torch.profiler`, its
device timeline cut into the phases of a round and the idle gaps between them.

`profile.py` profiles one pass at a time; the cost model adds passes up. What neither sees is
what happens *between* passes in a real decode: the host reading the verification, accepting,
and launching the next round while the device waits. `fast.py` marks each part of a round with
`phase(name)` (a `torch.profiler.record_function` range, a few microseconds when no profiler
runs):

    draft      the draft catching up on committed tokens and proposing (a chain, or tree levels)
    move       the target's KV move of the last tree round's accepted path
    verify     the target's pass over the proposals
    accept     copying the argmaxes to the host, accepting, rewinding the caches
    ar         one step of plain autoregressive decoding

and the whole loop with `phase("decode")`. `decode_timeline` reads the profiler's trace:
every device kernel (and memcpy / memset) is attributed to the phase whose range was open on
the host when it was *launched* (through the trace's correlation ids), its busy time summed
per phase, and the device's idle time inside the decode cut into gaps, each named by the
phases of the kernels before and after it ("accept>draft": the device waiting while the host
accepted a round and launched the next). So a per-round time above the cost model's sum of
passes is split into kernels that ran longer than their isolated timings and time the device
sat idle, and where.

    timeline = profile_decode(pair, prompt, "specvlm", ratio=0.5, tree=MC_SIM_7B_63)
    timeline["idle_ms"], timeline["idle_by_transition"]

On a CPU there are no device kernels: the timeline has the decode's wall time and no busy time.
"""

from __future__ import annotations

import bisect
import json
import os
import tempfile

import torch

PREFIX = "specvlm."
PHASES = ("draft", "move", "verify", "accept", "ar")
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")  # triton kernels launch through the driver API
TOP_GAPS = 5


def phase(name: str):
    """A profiler range named "specvlm.<name>" (see the module docstring)."""
    if name not in PHASES + ("decode",):
        raise ValueError(f"unknown phase {name!r}; choose one of {PHASES + ('decode',)}.")
    return torch.profiler.record_function(PREFIX + name)


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals, in the trace's microseconds / 1000."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total / 1000


def decode_timeline(events: list[dict], gap_us: float = 5.0) -> dict:
    """The decode's timeline from a Chrome trace's events (`torch.profiler`'s export; pure).

    events: dicts with "ph", "cat", "name", "ts", "dur" (microseconds) and for kernels and
    launches "args": {"correlation": id}. The decode is the last "specvlm.decode" range; phase
    ranges are "specvlm.<phase>" host ranges (category "user_annotation"). A device event
    belongs to the phase open on the host when the runtime call with its correlation id ran
    (a CUDA-graph launch carries all its kernels), else to "other".
    Returns {"decode_ms": the range's wall time, "kernels", "busy_ms" (union of device events
    within the decode), "idle_ms" (decode_ms - busy_ms), "phases": {phase: {"kernels", "busy_ms",
    "host_ms" (summed host ranges)}}, "idle_by_transition": {"before>after": {"ms", "gaps"}} for
    idle gaps longer than `gap_us` between device events (and from the decode's start to the
    first), "largest_gaps": the TOP_GAPS longest [{"ms", "after", "before"}], "phase_counts"}.
    Times in ms. No device events (a CPU run): busy_ms and idle_ms None."""
    ranges = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
              and str(e.get("name", "")).startswith(PREFIX)]
    decodes = [e for e in ranges if e["name"] == PREFIX + "decode"]
    if not decodes:
        raise ValueError("the trace has no 'specvlm.decode' range: profile a fast-path generation "
                         "(fast.generate_fast) with torch.profiler, e.g. through profile_decode.")
    decode = max(decodes, key=lambda e: e["ts"])
    begin, end = decode["ts"], decode["ts"] + decode["dur"]
    inside = [e for e in ranges if e is not decode and begin <= e["ts"] <= end]
    phase_ranges = sorted((e["ts"], e["ts"] + e["dur"], e["name"][len(PREFIX):]) for e in inside)
    starts = [r[0] for r in phase_ranges]

    def phase_at(ts: float) -> str:
        i = bisect.bisect_right(starts, ts) - 1
        while i >= 0:  # innermost: the latest-starting range that still covers ts
            if phase_ranges[i][0] <= ts <= phase_ranges[i][1]:
                return phase_ranges[i][2]
            i -= 1
        return "other"

    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    device = sorted((e["ts"], e["ts"] + e["dur"], phase_at(launches.get(e.get("args", {}).get("correlation"), -1)))
                    for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES)
    device = [d for d in device if d[1] >= begin and d[0] <= end]
    names = PHASES + ("other",)
    phases = {name: {"kernels": 0, "busy_ms": 0.0, "host_ms": 0.0} for name in names}
    for start, stop, name in phase_ranges:
        if name in phases:
            phases[name]["host_ms"] += (stop - start) / 1000
    counts = {name: sum(1 for r in phase_ranges if r[2] == name) for name in PHASES}
    result = {"decode_ms": decode["dur"] / 1000, "kernels": len(device), "phases": phases, "phase_counts": counts}
    if not device:
        return {**result, "busy_ms": None, "idle_ms": None, "idle_by_transition": {}, "largest_gaps": []}
    for name in names:
        own = [(max(s, begin), min(e, end)) for s, e, p in device if p == name]
        phases[name]["kernels"] = len(own)
        phases[name]["busy_ms"] = _union_ms(own)
    busy = _union_ms([(max(s, begin), min(e, end)) for s, e, _ in device])
    gaps, reach, last = [], begin, "start"
    for start, stop, name in device:
        if start - reach > gap_us:
            gaps.append({"ms": (start - reach) / 1000, "after": last, "before": name})
        if stop > reach:
            reach, last = stop, name
    transitions: dict[str, dict] = {}
    for gap in gaps:
        entry = transitions.setdefault(f"{gap['after']}>{gap['before']}", {"ms": 0.0, "gaps": 0})
        entry["ms"] += gap["ms"]
        entry["gaps"] += 1
    largest = sorted(gaps, key=lambda g: -g["ms"])[:TOP_GAPS]
    return {**result, "busy_ms": busy, "idle_ms": result["decode_ms"] - busy,
            "idle_by_transition": dict(sorted(transitions.items(), key=lambda kv: -kv[1]["ms"])),
            "largest_gaps": largest}


def trace_events(profiler) -> list[dict]:
    """The Chrome-trace events of a finished `torch.profiler.profile` (written to a temporary file
    and read back: the export is the profiler's one stable format)."""
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        profiler.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]
    finally:
        os.unlink(path)


def profile_decode(pair, prompt, method: str = "specvlm", warmup: int = 1, **generate_kwargs) -> dict:
    """Run `fast.generate_fast(pair, prompt, method, **generate_kwargs)` `warmup` times (compiling,
    capturing graphs), then once under `torch.profiler`; its `decode_timeline` plus "rounds",
    "tokens", "new_tokens" and "per_round_ms" (decode_ms / rounds; one step per round for "ar")."""
    from .fast import generate_fast

    device = pair.target.device
    for _ in range(warmup):
        generate_fast(pair, prompt, method, **generate_kwargs)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as profiler:
        result = generate_fast(pair, prompt, method, **generate_kwargs)
    timeline = decode_timeline(trace_events(profiler))
    rounds = len(result.accepted) if method != "ar" else len(result.tokens) - 1
    return {**timeline, "method": method, "rounds": rounds, "tokens": result.tokens, "new_tokens": len(result.tokens),
            "per_round_ms": timeline["decode_ms"] / max(rounds, 1)}

