"""Stress run: threads x streams x devices merging far ahead of the GPU, every result checked bit for bit.

    python tests/gpu/stress.py [--threads 6] [--seconds 45] [--per-round 24] [--devices 2]

Each thread works in rounds on its own stream, on the shared default stream, or on a raw CUDA stream that
PyTorch does not own (created per round with cudaStreamCreate and destroyed at its end while its merges are
still queued). A round queues a sleep kernel (so the host runs laps of the staging ring ahead of the GPU),
then ``--per-round`` merges of random kinds (CPU mask, GPU mask, item lists read in place, plans reused
for a second accumulate, as deepstack does), shapes, dtype pairs and modes, each with torch's
``index_put_`` on the same inputs as its reference, then compares every result bit for bit. Prints a summary;
exits 1 on any mismatch or exception. tests/gpu/test_threads.py runs the same jobs under pytest.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import random
import sys
import threading
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton import dispatch, staging  # noqa: E402

from gpu_helpers import gpu_sleep, random_mask  # noqa: E402

KINDS = ("cpu_mask", "gpu_mask", "items_cpu_mask", "items_gpu_mask", "plan_cpu_mask", "plan_gpu_mask")
EXTERNAL_KINDS = ("cpu_mask", "items_cpu_mask")  # nothing allocated on a stream that is destroyed mid-flight
SHAPES = ((30000, 24000), (8000, 6000))  # (N, K): a two-launch device mask (a 96 KB row map), a one-launch one
BIG_SHAPE = (300000, 280000)  # a 1.1 MB row map: more than a quarter of the default ring, which grows
H = 128
DTYPE_PAIRS = ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32))
ITEMS = 4  # items per list (one binary-search depth: no compile per list length)
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


class Call:
    """One merge queued on the current stream, with its reference: ``out`` must equal ``expected`` bit for
    bit once the stream has run. Inputs are kept alive here until then."""

    def __init__(self, rng: random.Random, kind: str, device: torch.device, shape=None, pair=None, accumulate=None):
        n, k = shape or rng.choice(SHAPES)
        src_dtype, dst_dtype = pair or rng.choice(DTYPE_PAIRS)
        self.kind = kind
        self.accumulate = (rng.random() < 0.5) if accumulate is None else accumulate
        if kind.startswith("items"):
            self.accumulate = False  # merge_multimodal_embeddings overwrites
        self.label = f"{kind} N={n} K={k} {src_dtype}->{dst_dtype} acc={self.accumulate}"
        self.mask = random_mask((n,), k, seed=rng.randrange(1 << 30))
        self.dst = torch.randn(n, H, device=device).to(dst_dtype)
        self.src = torch.randn(k, H, device=device).to(src_dtype)
        self.expected = self.dst.clone()
        values = self.src.to(dst_dtype)
        self.expected.index_put_((self.mask,), values, accumulate=self.accumulate)  # a CPU mask: no sync
        self.plan = None
        if kind.startswith("plan"):  # deepstack: the same plan again, accumulating
            self.expected.index_put_((self.mask,), values, accumulate=True)
            self.plan = mt.MergePlan(self._mask_on(device) if kind == "plan_gpu_mask" else self.mask, device=device)

    def _mask_on(self, device):
        return self.mask.pin_memory().to(device, non_blocking=True)  # pinned: the copy does not block

    def run(self) -> None:
        kind, dst, src = self.kind, self.dst, self.src
        if kind == "cpu_mask":
            mt.masked_row_scatter_(dst, self.mask, src, accumulate=self.accumulate, path="triton")
        elif kind == "gpu_mask":
            mt.masked_row_scatter_(dst, self._mask_on(dst.device), src, accumulate=self.accumulate, path="triton")
        elif kind.startswith("items"):
            cuts = sorted(random.Random(self.mask.numel()).sample(range(1, src.shape[0]), ITEMS - 1))
            items = [src[a:b] for a, b in zip([0, *cuts], [*cuts, src.shape[0]])]
            mask = self.mask if kind == "items_cpu_mask" else self._mask_on(dst.device)
            mt.merge_multimodal_embeddings(dst, items, mask, path="triton")
        else:
            mt.masked_row_scatter_(dst, src=src, plan=self.plan, accumulate=self.accumulate, path="triton")
            mt.masked_row_scatter_(dst, src=src, plan=self.plan, accumulate=True, path="triton")

    def matches(self) -> bool:
        """Whether the result is torch's, bit for bit (syncs the current stream)."""
        bits = _BITS[self.dst.dtype]
        return torch.equal(self.dst.view(bits), self.expected.view(bits))


@contextlib.contextmanager
def items_in_place():
    """Lists of items take the in-place kernel whatever their size (the loop-time rule would concatenate
    some): the kernel and its staged tables are what is under test. (tests/gpu/conftest.py does the same
    for every GPU test.)"""
    rule = dispatch.items_in_place_pays
    dispatch.items_in_place_pays = lambda *args: True
    try:
        yield
    finally:
        dispatch.items_in_place_pays = rule


def warm_up(device: torch.device, big: bool = True) -> None:
    """Compile every kernel the jobs launch, in this thread (the jobs then exercise the ring, not the JIT)."""
    rng = random.Random(0)
    shapes = SHAPES + ((BIG_SHAPE,) if big else ())
    with torch.cuda.device(device), items_in_place():
        for kind in KINDS:
            for shape in shapes:
                for pair in DTYPE_PAIRS:
                    for accumulate in (False, True):
                        call = Call(rng, kind, device, shape, pair, accumulate)
                        call.run()
                        assert call.matches(), f"warm-up: {call.label}"
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def raw_stream(device: torch.device):
    """A CUDA stream PyTorch does not own (another library's, in effect), as a torch.cuda.ExternalStream;
    destroyed (cudaStreamDestroy) on exit, whatever is still queued on it."""
    cudart = torch.cuda.cudart()
    handle = ctypes.c_ulonglong(0)
    with torch.cuda.device(device):
        assert int(cudart.cudaStreamCreate(ctypes.addressof(handle))) == 0 and handle.value
        try:
            yield torch.cuda.ExternalStream(handle.value, device=device)
        finally:
            assert int(cudart.cudaStreamDestroy(handle.value)) == 0


def has_raw_streams() -> bool:
    cudart = torch.cuda.cudart()
    return hasattr(cudart, "cudaStreamCreate") and hasattr(cudart, "cudaStreamDestroy")


class Tally:
    """Counts and failures of every thread (lists and Counters are appended to under one lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.merges = Counter()
        self.rounds = Counter()  # "ahead": rounds whose stream was still busy once all their merges were queued
        self.failures: list[str] = []
        self.errors: list[str] = []

    def add(self, calls: list[Call], where: str, ahead: bool) -> None:
        bad = [f"{where}: {c.label}" for c in calls if not c.matches()]
        with self.lock:
            self.merges.update(c.kind for c in calls)
            self.rounds.update(["all"] + (["ahead"] if ahead else []))
            self.failures += bad


def run_round(rng: random.Random, streams: str, device: torch.device, per_round: int, sleep_cycles: int,
              tally: Tally, where: str, big_every: int = 0, kinds: tuple[str, ...] = KINDS) -> None:
    """One round of one thread on ``device``: ``streams`` is "own" (a fresh torch stream made current by the
    caller), "default" or "external" (a raw stream made here and destroyed while its merges are queued, which
    takes only the kinds of EXTERNAL_KINDS among ``kinds``)."""
    with torch.cuda.device(device):
        current = torch.cuda.current_stream(device)
        if streams != "external":
            gpu_sleep(sleep_cycles)  # this round queues far ahead of the GPU
            calls = []
            for i in range(per_round):
                big = big_every and rng.randrange(big_every) == 0
                call = Call(rng, rng.choice(kinds), device, BIG_SHAPE if big else None)
                call.run()
                calls.append(call)
            tally.add(calls, where, ahead=not current.query())
            return
        allowed = [k for k in kinds if k in EXTERNAL_KINDS] or list(EXTERNAL_KINDS)
        calls = [Call(rng, rng.choice(allowed), device) for _ in range(per_round)]  # inputs made on `current`
        with raw_stream(device) as ext:
            ext.wait_stream(current)
            with torch.cuda.stream(ext):
                gpu_sleep(sleep_cycles)
                for call in calls:
                    call.run()
            ahead = not ext.query()
            current.wait_stream(ext)  # the checks below (on `current`) see the merges
        # The stream is destroyed now, its merges still queued behind the sleep.
        tally.add(calls, where, ahead)


def worker(index: int, streams: str, device: torch.device, deadline: float, rounds: int, per_round: int,
           tally: Tally, big_every: int = 0, kinds: tuple[str, ...] = KINDS) -> None:
    """Rounds until ``deadline`` (time.monotonic) or ``rounds`` rounds, whichever comes first."""
    rng = random.Random(1000 + index)
    try:
        with torch.cuda.device(device):
            own = torch.cuda.Stream(device) if streams == "own" else None
            with torch.cuda.stream(own) if own is not None else contextlib.nullcontext():
                for r in range(rounds):
                    if time.monotonic() > deadline:
                        break
                    # ~50-150 ms of GPU time: six threads' host work (sharing the GIL) must not outrun it
                    sleep = rng.randrange(100_000_000, 300_000_000)
                    run_round(rng, streams, device, per_round, sleep, tally,
                              f"thread {index} ({streams} stream, {device}) round {r}", big_every, kinds)
    except Exception as e:  # noqa: BLE001 - every exception is a failure of the run
        with tally.lock:
            tally.errors.append(f"thread {index} ({streams}, {device}): {type(e).__name__}: {e}")


def run_threads(n_threads: int, stream_kinds: list[str], devices: list[torch.device], seconds: float,
                rounds: int, per_round: int, big_every: int = 0, kinds: tuple[str, ...] = KINDS) -> Tally:
    """``n_threads`` workers, thread i on stream kind ``stream_kinds[i % len]`` and device ``devices[i % len]``,
    merging random ``kinds``; every result checked. Returns the tally of merges, mismatches and exceptions."""
    tally = Tally()
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=worker, daemon=True,
                                args=(i, stream_kinds[i % len(stream_kinds)], devices[i % len(devices)], deadline,
                                      rounds, per_round, tally, big_every, kinds))
               for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    stuck = sum(t.is_alive() for t in threads)
    if stuck:
        tally.errors.append(f"{stuck} threads still running 120 s after the deadline (deadlock?)")
    for d in devices:
        torch.cuda.synchronize(d)
    return tally


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=45.0,
                        help="rounds start until then (default 45: with a cold compile cache's warm-up, ~90 s)")
    parser.add_argument("--per-round", type=int, default=24, help="merges queued per round (default 24)")
    parser.add_argument("--devices", type=int, default=torch.cuda.device_count(), help="GPUs to use (default all)")
    parser.add_argument("--big-every", type=int, default=50, help="one call in this many has a 1.1 MB row map")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("stress: needs a CUDA GPU")
        return 2
    devices = [torch.device("cuda", i) for i in range(max(1, min(args.devices, torch.cuda.device_count())))]
    kinds = ["own", "default", "own", "external"] if has_raw_streams() else ["own", "default"]
    started = time.monotonic()
    for d in devices:
        warm_up(d)
    warm = time.monotonic() - started
    print(f"stress: {args.threads} threads on {[str(d) for d in devices]}, streams {kinds}, "
          f"{args.per_round} merges per round, {args.seconds:.0f} s (warm-up {warm:.0f} s)", flush=True)
    started = time.monotonic()
    with items_in_place():
        tally = run_threads(args.threads, kinds, devices, args.seconds, 1 << 30, args.per_round, args.big_every)
    wall = time.monotonic() - started
    total = sum(tally.merges.values())
    print(f"merges checked bit for bit: {total} in {wall:.1f} s ({dict(sorted(tally.merges.items()))})")
    for d in devices:
        ring = staging._ARENAS.get(d.index)
        if ring is not None:
            print(f"staging ring {d}: {ring.switches} quarter switches ({ring.switches / 4:.0f} laps), "
                  f"{ring.growths} growths, quarter {ring.quarter_bytes >> 10} KiB")
    print(f"rounds: {tally.rounds['all']}, of which {tally.rounds['ahead']} were queued entirely ahead of the GPU")
    print(f"mismatches: {len(tally.failures)}; exceptions: {len(tally.errors)}")
    for line in (tally.failures + tally.errors)[:20]:
        print("  " + line)
    ok = not tally.failures and not tally.errors and total > 0
    print("stress: PASS" if ok else "stress: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
