"""How this package measures a merge: device, loop, host and idle time, and peak extra memory.

- device time: GPU time of one call with L2 flushed, without host gaps. Each rep queues a spin kernel
  (``torch.cuda._sleep``) long enough for the host to enqueue the flush and the call behind it, so the
  events time the GPU work alone (the call's kernels back to back), not the host's launch latency.
- loop time: wall time per call in a back-to-back loop, synchronized at the end: what a caller pays when
  host overhead and device time overlap (the larger of the two, roughly).
- host time: wall time of the Python call itself while the GPU is kept busy (the enqueue cost).
- peak extra memory: ``max_memory_allocated`` during one call minus what was allocated before it.
- idle time: GPU time of one call with nothing queued before it, L2 flushed: the host work before the call's
  first launch shows as GPU time, as for a caller whose GPU waits on it.
Figures that are compared with each other (a path and the copy of the same bytes it is divided by) are taken
in interleaved rounds (``interleaved``, ``measure``): one value per round, the calls round-robin within a round,
and the median of the rounds kept, so that drift on a shared machine hits every call alike.
On the CPU there is no device clock and no asynchronous launch: "device" and host time are the median wall
time of one call, loop time the wall time per call back to back (median of 5 loops), each after a warm-up (the
first calls pay page faults, allocator growth and lazy initialization: a cold 0.5 MB copy once took 6.9 ms).
On a shared host the scheduler still adds a few ms to some calls; CPU figures are a smoke test of the tooling,
not a speed claim.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

_FLUSH: dict[int, torch.Tensor] = {}
_CYCLES_PER_US: dict[int, float] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer twice the L2 size: writing it evicts whatever the timed call would find cached."""
    found = _FLUSH.get(device.index)
    if found is None:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
        found = _FLUSH[device.index] = torch.empty(2 * max(l2, 8 << 20), dtype=torch.uint8, device=device)
    return found


def _cycles_per_us(device: torch.device) -> float:
    """Spin-kernel cycles per microsecond, measured once (the clock varies between cards)."""
    found = _CYCLES_PER_US.get(device.index)
    if found is None:
        with torch.cuda.device(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1000)
            start.record()
            torch.cuda._sleep(2_000_000)
            end.record()
            end.synchronize()
            found = _CYCLES_PER_US[device.index] = 2_000_000 / (start.elapsed_time(end) * 1e3)
    return found


CPU_WARMUP_S = 0.02  # at least this long (and 3 calls) of untimed calls before any CPU timing


def _warm_up(fn: Callable[[], object], min_calls: int = 3) -> None:
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < CPU_WARMUP_S:
        fn()
        calls += 1


def _wall_median_us(fn: Callable[[], object], budget_s: float, min_calls: int) -> float:
    """CPU: median wall time of one call (µs) after a warm-up; the median, as one slow call on a shared
    host would move a mean."""
    _warm_up(fn)
    samples, start = [], time.perf_counter()
    while len(samples) < min_calls or time.perf_counter() - start < budget_s:
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e6)
    return statistics.median(samples)


def _wall_loop_us(fn: Callable[[], object], budget_s: float, min_calls: int, rounds: int = 5) -> float:
    """CPU: wall time per call of a back-to-back loop (µs) after a warm-up; the median of ``rounds`` loops,
    so that a loop the scheduler preempted (a few ms on a busy host) does not set the figure."""
    _warm_up(fn)
    per_call = []
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while calls < max(1, min_calls // rounds) or time.perf_counter() - start < budget_s / rounds:
            fn()
            calls += 1
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(per_call)


def device_time_us(fn: Callable[[], object], device: torch.device, reps: int = 15, flush: bool = True) -> float:
    """Median GPU time of ``fn`` in µs, L2 flushed before each rep, host gaps excluded (see module doc)."""
    if device.type != "cuda":
        return _wall_median_us(fn, 0.05, 3)
    fn()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    host_us = (time.perf_counter() - start) * 1e6
    torch.cuda.synchronize(device)
    spin = int((2 * host_us + 50) * _cycles_per_us(device))
    buffer = _flush_buffer(device) if flush else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for begin, end in zip(starts, ends):
        torch.cuda._sleep(spin)
        if buffer is not None:
            buffer.zero_()
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(b.elapsed_time(e) for b, e in zip(starts, ends)) * 1e3


def loop_time_us(fn: Callable[[], object], device: torch.device, budget_s: float = 0.03, min_calls: int = 10) -> float:
    """Wall time per call of ``fn`` called back to back (µs), synchronized before and after."""
    if device.type != "cuda":
        return _wall_loop_us(fn, budget_s, min_calls)
    for _ in range(3):
        fn()
    torch.cuda.synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < budget_s:
        fn()
        calls += 1
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e6


def host_time_us(fn: Callable[[], object], device: torch.device, calls: int = 20) -> float:
    """Median wall time of the call itself (µs) while a spin kernel keeps the GPU busy, so neither a full
    launch queue nor an idle GPU shapes it."""
    if device.type != "cuda":
        return _wall_median_us(fn, 0.05, 3)
    fn()
    torch.cuda.synchronize(device)
    torch.cuda._sleep(int(20_000 * _cycles_per_us(device)))  # 20 ms of GPU work ahead of the calls
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize(device)
    return statistics.median(samples)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak device memory allocated during one call of ``fn`` beyond what was allocated before it
    (None on the CPU, where PyTorch keeps no such statistic)."""
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


CPU_CLOCK = ("wall: on a CPU device_us is the median wall time of one call and loop_us the wall time per call "
             "back to back (median of 5 loops), after a warm-up, each the median of its rounds (*_rounds); host_us "
             "and peak_extra_bytes are null")
"""What a JSON written on a CPU says its figures are (its ``clock`` field)."""

CPU_NOTICE = ("CPU run: every figure is wall time on the host (no device clock), after a warm-up; a smoke test "
              "of the tooling, not a speed claim.")


ROUNDS = 5
"""Rounds of an interleaved measurement: the median of 5 is not moved by two rounds a neighbour slowed."""
ROUND_REPS = 7  # flushed calls per round for device time: 5 rounds x 7, the median of the rounds' medians
ROUND_LOOP_S = 0.01  # loop-time budget per round (at least 10 calls)


def interleaved(calls: dict[str, Callable[[], object]], figures: dict[str, Callable[[Callable[[], object]], float]],
                rounds: int = ROUNDS) -> dict[str, dict[str, list[float]]]:
    """Each figure of each call, taken once per round: the calls round-robin within a round, the order rotated
    from one round to the next (no call always first). A baseline that a ratio divides by (the copy) goes
    through the very same rounds as what it is compared with. Returns {call: {figure: [a value per round]}}."""
    names = list(calls)
    taken = {name: {figure: [] for figure in figures} for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            for figure, take in figures.items():
                taken[name][figure].append(take(calls[name]))
    return taken


def idle_time_us(fn: Callable[[], object], device: torch.device, reps: int = 15, flush: bool = True) -> float:
    """Median GPU time of ``fn`` in µs with nothing queued before it, L2 flushed before each rep: the events
    bracket the host work before the first launch too (see module doc). On a CPU: the median wall time."""
    if device.type != "cuda":
        return _wall_median_us(fn, 0.05, 3)
    fn()
    buffer = _flush_buffer(device) if flush else None
    samples = []
    for _ in range(reps):
        if buffer is not None:
            buffer.zero_()
        torch.cuda.synchronize(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) * 1e3)
    return statistics.median(samples)


def measure(calls: dict[str, Callable[[], object]], device: torch.device, rounds: int = ROUNDS) -> dict[str, dict]:
    """Every figure of each call, as the benchmark and the suites record them: device and loop time taken in
    ``rounds`` interleaved rounds (``interleaved``), the median of the rounds kept and the rounds' values
    recorded (``device_us_rounds``, ``loop_us_rounds``); host time and peak memory once per call. On a CPU the
    host time (the enqueue cost while a GPU is busy) and the peak device memory have no meaning: null."""
    cuda = device.type == "cuda"
    taken = interleaved(calls, {
        "device_us": lambda fn: device_time_us(fn, device, reps=ROUND_REPS),
        "loop_us": lambda fn: loop_time_us(fn, device, budget_s=ROUND_LOOP_S),
    }, rounds)
    return {name: {"device_us": statistics.median(taken[name]["device_us"]),
                   "loop_us": statistics.median(taken[name]["loop_us"]),
                   "host_us": host_time_us(fn, device) if cuda else None,
                   "peak_extra_bytes": peak_extra_bytes(fn, device) if cuda else None,
                   "device_us_rounds": taken[name]["device_us"], "loop_us_rounds": taken[name]["loop_us"]}
            for name, fn in calls.items()}
