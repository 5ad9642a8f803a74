"""The pinned staging ring (staging.py) on a fake GPU, and the host row map (rowmap.py).

The ring's protocol needs no GPU to be checked: ``FakeGpu`` stands in for the device (staging.CudaSide). Its
streams are queues of work that runs late (a background thread runs it slowly, an event's synchronize runs
its stream up to the event), so the host runs laps ahead. Each fake kernel compares, when it finally runs,
the bytes it reads with the values staged for it: a region rewritten before its kernel ran shows as a
mismatch. The real ring runs on the GPU in tests/gpu (test_staging.py, test_threads.py, stress.py).
"""
from __future__ import annotations

import ctypes
import random
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch

import mmmerge_triton as mm
from mmmerge_triton import items as items_mod
from mmmerge_triton import executor, rowmap, staging

from .conftest import INTERPRETED, assert_merged, randn

# ---------------------------------------------------------------------------------------------------------
# A fake GPU: streams that run their work late, events, dead external streams
# ---------------------------------------------------------------------------------------------------------


class DeadStream(RuntimeError):
    """A fence recorded on a destroyed stream: on a real GPU, a segfault."""


class FakeStream:
    def __init__(self, stream_id: int):
        self.stream_id = stream_id
        self.work: list = []  # callables, in stream order
        self.done = 0  # how many have run
        self.alive = True
        self.lock = threading.Lock()

    def enqueue(self, fn) -> None:
        with self.lock:
            self.work.append(fn)

    def run_until(self, position: int) -> None:
        with self.lock:
            while self.done < position:
                self.work[self.done]()
                self.work[self.done] = None
                self.done += 1

    def step(self) -> None:
        self.run_until(min(self.done + 1, len(self.work)))


class FakeEvent:
    def __init__(self, stream: FakeStream):
        self.stream, self.position = stream, len(stream.work)

    def synchronize(self) -> None:
        self.stream.run_until(self.position)

    def query(self) -> bool:
        return self.stream.done >= self.position


class FakeGpu(staging.CudaSide):
    """staging.CudaSide on host memory. A thread's current stream is ``use(stream_id)``'s (default 0: odd ids
    are native streams, even nonzero ones external, as in PyTorch's stream ids)."""

    def __init__(self):
        super().__init__(0)
        self.streams: dict[int, FakeStream] = {0: FakeStream(0)}  # the live stream of each id
        self.every_stream: list[FakeStream] = list(self.streams.values())  # destroyed ones too
        self.local = threading.local()
        self.fences = Counter()  # fences recorded, by stream id
        self.buffers: list[torch.Tensor] = []  # every allocation stays readable (a wrong read is a mismatch, not a crash)
        self.mismatches: list[str] = []
        self.lock = threading.Lock()

    # staging.CudaSide
    def pinned(self, nbytes):
        return self._keep(torch.zeros(nbytes, dtype=torch.uint8))

    def device_bytes(self, nbytes):
        return self._keep(torch.zeros(nbytes, dtype=torch.uint8))

    def current_stream(self):
        return (getattr(self.local, "stream_id", 0), 0, 1)

    def fence(self, stream):
        found = self.streams[stream[0]]
        if not found.alive:
            raise DeadStream(f"fence recorded on destroyed stream {stream[0]}")
        with self.lock:
            self.fences[stream[0]] += 1
        return FakeEvent(found)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.launch(lambda: dst.copy_(src))

    # the test's side
    def _keep(self, t):
        with self.lock:
            self.buffers.append(t)
        return t

    def use(self, stream_id: int) -> None:
        """Make ``stream_id`` this thread's current stream (created on first use)."""
        with self.lock:
            if stream_id not in self.streams or not self.streams[stream_id].alive:
                self.streams[stream_id] = FakeStream(stream_id)
                self.every_stream.append(self.streams[stream_id])
        self.local.stream_id = stream_id

    def destroy(self, stream_id: int) -> None:
        """cudaStreamDestroy: the work queued there still runs, but the handle must not be used again."""
        self.streams[stream_id].alive = False

    def launch(self, fn) -> None:
        self.streams[self.current_stream()[0]].enqueue(fn)

    def read_kernel(self, address: int, expected: np.ndarray, what: str) -> None:
        """Queue a kernel that reads ``expected.nbytes`` bytes at ``address`` and checks them."""
        expected = expected.copy()

        def kernel():
            got = np.frombuffer(ctypes.string_at(address, expected.nbytes), dtype=expected.dtype)
            if not np.array_equal(got, expected):
                self.mismatches.append(what)

        self.launch(kernel)

    def drain(self) -> None:
        for stream in list(self.every_stream):
            stream.run_until(len(stream.work))

    def run_slowly(self, stop: threading.Event) -> None:
        """The GPU: runs queued work in small steps, behind the host."""
        rng = random.Random(0)
        while not stop.is_set():
            streams = [s for s in list(self.every_stream) if s.done < len(s.work)]
            if streams:
                rng.choice(streams).step()
            time.sleep(0.0002)


QUARTER = 4096  # bytes: 1024 int32 per quarter, so that small maps lap the ring often


@pytest.fixture
def gpu():
    return FakeGpu()


@pytest.fixture
def ring(gpu):
    return staging.PinnedArena(0, QUARTER, gpu=gpu)


def stage_and_read(ring: staging.PinnedArena, gpu: FakeGpu, values: np.ndarray, what: str, device: bool = False):
    """One merge's worth: a session that stages ``values`` and launches a kernel that reads them."""
    with ring:
        if device:
            address, at = ring.put_device([values])
            gpu.read_kernel(address + at[0], values, what)
        else:
            gpu.read_kernel(ring.put_int32(values).ptr, values.astype(np.int32), what)


# ---------------------------------------------------------------------------------------------------------
# The protocol, one thread
# ---------------------------------------------------------------------------------------------------------

def test_a_launch_after_its_session_reads_rewritten_memory(ring, gpu):
    """The harness has teeth: a kernel launched after its session ended is not covered by the fence, and
    the ring rewrites its region on the next lap."""
    values = np.arange(300, dtype=np.int32)
    with ring:
        late = ring.put_int32(values)
    for i in range(40):  # more than a lap, the GPU keeping up
        stage_and_read(ring, gpu, np.full(300, i, dtype=np.int32), f"call {i}")
        gpu.drain()
    gpu.read_kernel(late.ptr, values, "late launch")
    gpu.drain()
    assert gpu.mismatches == ["late launch"]


def test_region_is_not_rewritten_before_its_kernel_ran(ring, gpu):
    """The GPU runs nothing until the ring waits on a fence: every kernel still reads its own values."""
    gpu.use(1)
    for i in range(200):
        stage_and_read(ring, gpu, np.arange(i, i + 1 + i % 700, dtype=np.int32), f"call {i}", device=i % 3 == 0)
    gpu.drain()
    assert ring.switches >= 15 and gpu.mismatches == []  # 5 laps


def test_native_streams_are_fenced_once_per_quarter_external_ones_at_each_launch(ring, gpu):
    gpu.use(1)  # native (odd id): fenced when the ring leaves the quarter
    for _ in range(5):
        stage_and_read(ring, gpu, np.zeros(10, dtype=np.int32), "native")
    assert gpu.fences[1] == 0
    gpu.use(1000)  # external (even id): fenced at the end of each session
    for _ in range(5):
        stage_and_read(ring, gpu, np.zeros(10, dtype=np.int32), "external")
    assert gpu.fences[1000] == 5
    gpu.use(1)
    stage_and_read(ring, gpu, np.zeros(1000, dtype=np.int32), "next quarter")
    assert ring.switches == 1 and gpu.fences[1] == 1 and gpu.fences[1000] == 5


def test_a_destroyed_external_stream_is_never_fenced_again(ring, gpu):
    gpu.use(1000)
    for i in range(3):
        stage_and_read(ring, gpu, np.full(100, i, dtype=np.int32), f"external {i}")
    gpu.destroy(1000)  # its three kernels are still queued
    gpu.use(1)
    for i in range(50):  # several laps over the quarter the dead stream read
        stage_and_read(ring, gpu, np.full(300, i, dtype=np.int32), f"native {i}")
    gpu.drain()
    assert gpu.mismatches == []


def test_a_reused_external_handle_still_waits_for_the_destroyed_streams_work(ring, gpu):
    """cudaStreamCreate may hand a destroyed stream's handle out again. The old stream's kernels are still
    queued: the fence of the new stream on that handle must not replace theirs."""
    gpu.use(1000)
    stage_and_read(ring, gpu, np.full(100, 7, dtype=np.int32), "old stream")
    gpu.destroy(1000)
    gpu.use(1000)  # a new stream, the same handle
    stage_and_read(ring, gpu, np.full(100, 8, dtype=np.int32), "new stream")
    gpu.streams[1000].run_until(len(gpu.streams[1000].work))  # the new stream is done; the old one is not
    gpu.use(1)
    for i in range(12):  # a lap: the first quarter is rewritten only after the old stream's kernel ran
        stage_and_read(ring, gpu, np.full(400, i, dtype=np.int32), f"native {i}")
    gpu.drain()
    assert gpu.mismatches == []


def test_growth_keeps_the_old_buffers_until_their_fences_complete(ring, gpu):
    gpu.use(1)
    stage_and_read(ring, gpu, np.full(100, 1, dtype=np.int32), "before", device=True)
    old = ring._buffer
    stage_and_read(ring, gpu, np.arange(5000, dtype=np.int32), "larger than a quarter")
    assert ring.growths == 1 and ring.quarter_bytes >= 5000 * 4
    assert any(old is kept[0][0] for kept in ring._retired), "the old ring was dropped while its kernel was queued"
    gpu.drain()
    stage_and_read(ring, gpu, np.arange(4 * ring.quarter_bytes // 4 + 1, dtype=np.int32), "grow again")
    assert not any(old is kept[0][0] for kept in ring._retired), "a retired ring whose fences completed is kept"
    gpu.drain()
    assert gpu.mismatches == []


def test_one_reservation_per_session_and_none_outside(ring):
    with pytest.raises(RuntimeError, match="once per session"):
        ring.put_int32(np.zeros(4, dtype=np.int32))
    with ring:
        ring.put_int32(np.zeros(4, dtype=np.int32))
        with pytest.raises(RuntimeError, match="once per session"):
            ring.put_int32(np.zeros(4, dtype=np.int32))
    assert not ring._lock.locked()


def test_a_session_that_raises_releases_the_ring(ring):
    with pytest.raises(ZeroDivisionError):
        with ring:
            ring.put_int32(np.zeros(4, dtype=np.int32))
            1 / 0
    assert not ring._lock.locked()
    with ring:  # usable again
        ring.put_int32(np.zeros(4, dtype=np.int32))


# ---------------------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------------------

def test_a_session_excludes_other_threads_until_its_launch(ring, gpu):
    """The race of the issue: thread B must not move the ring (and fence A's quarter) between A's
    reservation and A's launch."""
    entered, release = threading.Event(), threading.Event()
    order = []

    def first():
        with ring:
            ring.put_int32(np.zeros(1000, dtype=np.int32))
            entered.set()
            release.wait(5)
            order.append("A launches")

    def second():
        entered.wait(5)
        with ring:
            order.append("B reserves")
            ring.put_int32(np.zeros(1000, dtype=np.int32))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    entered.wait(5)
    time.sleep(0.05)  # B had the time to get in, were it allowed to
    assert order == []
    release.set()
    for t in threads:
        t.join(5)
    assert order == ["A launches", "B reserves"]


@pytest.mark.parametrize("streams", ["own_native", "one_shared_default", "own_external", "mixed"])
def test_threads_lap_the_ring_while_the_gpu_lags(ring, gpu, streams):
    """6 threads stage row maps and tables of random sizes (some larger than a quarter: the ring grows
    meanwhile) on their own streams or one shared stream, while the GPU runs their kernels slowly."""
    n_threads, calls = 6, 150
    stream_of = {"own_native": lambda t: 2 * t + 1, "one_shared_default": lambda t: 0,
                 "own_external": lambda t: 1000 + 2 * t, "mixed": lambda t: (0, 3, 1000 + 2 * t)[t % 3]}[streams]
    errors = []
    stop = threading.Event()
    gpu_thread = threading.Thread(target=gpu.run_slowly, args=(stop,))
    gpu_thread.start()

    def worker(t):
        try:
            gpu.use(stream_of(t))
            rng = np.random.default_rng(t)
            for i in range(calls):
                size = int(rng.integers(1, 1400 if i % 50 == 49 else 500))
                values = rng.integers(-2**31, 2**31 - 1, size, dtype=np.int64).astype(np.int32)
                stage_and_read(ring, gpu, values, f"thread {t} call {i}", device=i % 4 == 0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    gpu_thread.join()
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
    gpu.drain()
    assert errors == []
    assert gpu.mismatches == []
    assert ring.switches > 50


def test_threads_make_one_arena_per_device(monkeypatch):
    made = []

    def slow_make(index):
        time.sleep(0.05)  # every thread has reached the check by now
        made.append(index)
        return object()

    monkeypatch.setattr(staging, "_ARENAS", {})
    monkeypatch.setattr(staging, "_make_arena", slow_make)
    barrier = threading.Barrier(8)
    got = []

    def get():
        barrier.wait()
        got.append(staging.arena(3))

    threads = [threading.Thread(target=get) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == [3] and len(got) == 8 and all(a is got[0] for a in got)


def test_stream_ids_native_external_default():
    assert not staging.is_external(0)  # the default stream
    assert not staging.is_external((5 << 5) | (1 << 1) | 1)  # a pool stream id: low bit set
    assert staging.is_external(0x7F0012345600)  # a cudaStream_t pointer


# ---------------------------------------------------------------------------------------------------------
# The host row map
# ---------------------------------------------------------------------------------------------------------

def odd_bytes_mask(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(a bool mask viewed from uint8 bytes in {0, 1, 2, 255}, the same mask with 0/1 bytes)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.tensor([0, 1, 2, 255], dtype=torch.uint8)[torch.randint(0, 4, (n,), generator=g)]
    raw[0], raw[-1] = 2, 255
    return raw.view(torch.bool), raw != 0


@pytest.mark.parametrize("n", [1, 33, 4097])
def test_host_rows_count_any_nonzero_byte_as_true(n):
    odd, clean = odd_bytes_mask(n)
    assert odd.view(torch.uint8).max() == 255 and odd.view(torch.uint8)[0] in (2, 255)
    expected = clean.nonzero().flatten().numpy()
    rows = rowmap.host_rows(odd)
    assert rows.dtype == np.int32 and np.array_equal(rows, expected)
    strided = torch.stack([odd, odd], 1)[:, 0]  # a non-contiguous view of the same bytes
    assert np.array_equal(rowmap.host_rows(strided), expected)


@pytest.mark.parametrize("path", ["triton", "index_put", "index_copy", "masked_scatter", "auto"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
def test_merge_with_a_cpu_mask_of_bytes_2_and_255_is_as_pytorch(path, accumulate):
    if path == "triton" and not INTERPRETED:
        pytest.skip("the Triton path on CPU tensors needs TRITON_INTERPRET=1")
    odd, clean = odd_bytes_mask(50, seed=3)
    dst = randn(50, 19, dtype=torch.float32)
    src = randn(int(clean.sum()), 19, seed=4)
    out = mm.masked_row_scatter_(dst.clone(), odd, src, accumulate=accumulate, path=path)
    assert_merged(out, dst, clean, src, accumulate, path)
    expected = dst.clone().index_put_((odd,), src, accumulate=accumulate)  # PyTorch on the same bytes
    assert torch.equal(out, expected)


def test_host_rows_past_2_31_rows_are_int64():
    """An int32 row map wraps past 2**31 - 1 rows (a write 4 GiB before dst). The mask's pages stay untouched
    zeros (numpy's calloc), so this reads 2 GiB without holding it."""
    n = 2**31 + 5
    flat = np.zeros(n, dtype=np.bool_)
    true_rows = [3, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 4]
    flat[true_rows] = True
    rows = rowmap.host_rows(torch.from_numpy(flat))
    assert rows.dtype == np.int64 and rows.tolist() == true_rows


def huge_mask(extra: int = 1) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.bool).expand(rowmap.MAX_ROWS + extra)  # no memory behind it


def test_int32_row_maps_refuse_more_than_2_31_rows():
    mask = huge_mask()
    dst = torch.zeros(1, 4).expand(mask.shape[0], 4)
    if INTERPRETED:  # else the Triton path refuses CPU tensors first
        with pytest.raises(ValueError, match=r"int32 row maps: at most 2147483647 mask rows .* got 2147483648"):
            executor.merge_triton(dst, mask, torch.zeros(0, 4), False, config=mm.KernelConfig(1, 4))
    with pytest.raises(ValueError, match="int32 row maps"):
        mm.MergePlan(mask)
    items = items_mod.ItemList.of([torch.zeros(1, 4), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="int32 row maps"):
        items_mod.merge_items(dst, mask, items, 4, False, mm.kernel_config.default_config(4, 3, 1, False))
    assert not mm.dispatch.items_in_place_pays(2, 3, mask.shape[0], dst, torch.float32)
    rowmap.check_fits(rowmap.MAX_ROWS, "at the limit")  # 2**31 - 1 rows still fit


def test_stage_rows_makes_a_host_map_on_the_cpu():
    rows = np.array([4, 0, 9], dtype=np.int64)
    staged = rowmap.stage_rows(rows, torch.device("cpu"))
    assert staged.count is None and staged.rows.dtype == torch.int32 and staged.rows.tolist() == [4, 0, 9]


def test_host_rows_from_threads_while_the_kept_arange_grows():
    """host_rows keeps one arange and swaps in a larger one when a larger mask comes: threads that read it
    meanwhile must each index an arange at least as long as their mask."""
    errors = []
    barrier = threading.Barrier(4)

    def worker(t):
        barrier.wait()
        try:
            for i in range(200):
                n = 1 + (i * 7919 + t * 104729) % (1 << (10 + i % 12))
                mask = torch.zeros(n, dtype=torch.bool)
                mask[n // 2 :: 3] = True
                if not np.array_equal(rowmap.host_rows(mask), np.flatnonzero(mask.numpy())):
                    errors.append((t, i))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    rowmap._arange = np.arange(0, dtype=np.int32)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
