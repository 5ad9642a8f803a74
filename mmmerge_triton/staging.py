"""Pinned host memory that kernels read in place over unified addressing, reused lap after lap.

A CPU mask's row map is computed on the host and must reach the GPU without a sync. Writing it into
pinned memory and passing that address to the kernel costs no copy launch at all (memory from
``cudaHostAlloc`` is mapped into every device's address space under UVA). The hazard is reuse: the
kernel reads the bytes when it runs, so a region must not be rewritten before then. The arena is a ring
cut into quarters, and a quarter is written again only once a fence of every stream that read it has
completed (the host waits only if the GPU is a whole lap behind). Tables that a kernel reads many times (the
item tables) are copied to a device mirror of the ring, at the same offsets, under the same fences.

Threads. A reservation and the launches that read it form one *session*, ``with arena(i) as ring:``, held
under the arena's lock: no other thread can move the ring (and fence the quarter) between a caller's
reservation and its launch, nor touch the ring's bookkeeping meanwhile. An uncontended session costs 0.30 µs
of host time (lock, stream lookup and exit, against 0.18 µs for a bare ``with lock:``), where the lookup of
a per-thread ring (``threading.local``) would cost 0.08 µs (CPU dev host, Python 3.11, medians of 7 x 2e5
calls): per-thread rings would save about 0.2 µs of a ~40 µs merge, and cost a pinned ring per thread, to be
fenced and retired as threads come and go.

Fences. A stream that PyTorch owns (the default stream, or one of its pools) is never destroyed, so its
fence is recorded once per quarter, when the ring leaves that quarter: no event per call. Any other
stream (``torch.cuda.ExternalStream``, e.g. another library's) may be destroyed as soon as the call
returns, so its fence is recorded at launch time, at the end of the session, while the stream is
certainly alive; a handle is never used after its session.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from .kernels.copy_words import copy_words_kernel
from .launch import FastKernel

_QUARTERS = 4
_ALIGN = 16  # bytes: keeps every staged array 16-byte aligned, as the kernels' loads prefer

Stream = tuple  # (stream id, device index, device type): what torch._C._cuda_getCurrentStream returns
_copy_words = FastKernel(copy_words_kernel)
_COPY_BLOCK = 1024


def _aligned(nbytes: int) -> int:
    return -(-max(nbytes, 1) // _ALIGN) * _ALIGN


def packed_layout(arrays: list[np.ndarray]) -> tuple[list[int], int]:
    """Byte offsets of ``arrays`` packed one after another at 16-byte boundaries, and the total size."""
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += _aligned(a.nbytes)
    return offsets, total


def is_external(stream_id: int) -> bool:
    """Whether a stream id (``torch.cuda.Stream.stream_id``) is a stream PyTorch does not own: an external
    one's id is its cudaStream_t pointer (even), a native one's has its low bit set, and 0 is the default
    stream (c10/cuda/CUDAStream.cpp, "StreamId assignment"). Native streams are never destroyed."""
    return stream_id != 0 and not stream_id & 1


class RawPointer:
    """An address the GPU can read, with a dtype: what a Triton kernel takes for a pointer argument."""

    __slots__ = ("ptr", "dtype")

    def __init__(self, ptr: int, dtype: torch.dtype):
        self.ptr = ptr
        self.dtype = dtype

    def data_ptr(self) -> int:
        return self.ptr


class CudaSide:
    """What the ring asks of one CUDA device. (tests/test_staging.py puts a fake GPU in its place.)"""

    def __init__(self, device_index: int):
        self.device_index = device_index

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def device_bytes(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", self.device_index))

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy pinned bytes ``src`` into device bytes ``dst`` (both uint8, a multiple of 4 bytes), queued on the
        current stream, by a kernel: a Tensor.copy_ would make PyTorch's pinned allocator record an event on
        this stream when the ring's buffer is freed one day, and an external stream may be dead by then."""
        words = src.numel() // 4
        _copy_words.launch((dst.device.index,), (-(-words // _COPY_BLOCK), 1),
                           (RawPointer(src.data_ptr(), torch.int32), RawPointer(dst.data_ptr(), torch.int32), words),
                           (_COPY_BLOCK,), (4, 1), dst.device.index)

    def current_stream(self) -> Stream:
        return torch._C._cuda_getCurrentStream(self.device_index)

    def fence(self, stream: Stream) -> torch.cuda.Event:
        """An event recorded now on ``stream``: it completes once the work queued there so far has."""
        event = torch.cuda.Event()
        event.record(torch.cuda.Stream(stream_id=stream[0], device_index=stream[1], device_type=stream[2]))
        return event


class PinnedArena:
    """A ring of pinned host memory for one CUDA device, handed out in 16-byte-aligned arrays.

    Use it as a session that spans the reservation and every launch that reads it, on the stream that is
    current on the device::

        with arena(device.index) as ring:
            rows = ring.put_int32(values)
            launch(..., rows, ...)

    One reservation per session (``put_int32``, ``put_device`` or ``put_into``). Threads take turns.
    """

    def __init__(self, device_index: int, quarter_bytes: int = 1 << 20, gpu: CudaSide | None = None):
        self.device_index = device_index
        self._gpu = gpu if gpu is not None else CudaSide(device_index)
        self._lock = threading.Lock()
        self._retired: list[tuple[tuple, list]] = []  # replaced buffers, kept until their fences complete
        self._stream: Stream | None = None  # the current session's stream; None outside a session
        self._reserved = -1  # the quarter of the current session's reservation (-1: none yet)
        self.switches = 0  # quarter switches so far (tests and the stress script read them)
        self.growths = 0
        self._allocate(quarter_bytes)

    def _allocate(self, quarter_bytes: int) -> None:
        self.quarter_bytes = quarter_bytes
        self._buffer = self._gpu.pinned(_QUARTERS * quarter_bytes)
        self._bytes = self._buffer.numpy()
        self._int32 = self._bytes.view(np.int32)  # kept: a view per call costs as much as the copy itself
        self._base = self._buffer.data_ptr()
        self._mirror: torch.Tensor | None = None  # device copy of the ring for put_device, made on first use
        self._quarter = 0
        self._offset = 0  # within the current quarter
        # Native streams that read a quarter this lap (fenced when the ring leaves it), by stream id.
        self._readers: list[dict[int, Stream]] = [{} for _ in range(_QUARTERS)]
        # Fences to wait on before a quarter is rewritten: the latest per stream id, and older ones still
        # pending when a newer one replaced them (a destroyed external stream's handle may come back).
        self._fences: list[dict[int, object]] = [{} for _ in range(_QUARTERS)]
        self._pending: list[list] = [[] for _ in range(_QUARTERS)]

    # ---- sessions ---------------------------------------------------------------------------------------
    def __enter__(self) -> "PinnedArena":
        self._lock.acquire()
        try:
            self._stream = self._gpu.current_stream()
        except BaseException:
            self._lock.release()
            raise
        self._reserved = -1
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            stream = self._stream
            if self._reserved >= 0 and is_external(stream[0]):  # fence now: the handle may die after we return
                fences = self._fences[self._reserved]
                previous = fences.get(stream[0])
                if previous is not None and not previous.query():
                    self._pending[self._reserved].append(previous)
                fences[stream[0]] = self._gpu.fence(stream)
        finally:
            self._stream = None
            self._reserved = -1
            self._lock.release()

    # ---- reservations -----------------------------------------------------------------------------------
    def _reserve(self, nbytes: int) -> int:
        """Byte offset of ``nbytes`` free bytes, 16-byte aligned, to be read by this session's launches."""
        stream = self._stream
        if stream is None or self._reserved >= 0:
            raise RuntimeError("PinnedArena: reserve once per session, inside `with arena(index) as ring:`")
        nbytes = _aligned(nbytes)
        if nbytes > self.quarter_bytes:
            self._grow(nbytes)
        if self._offset + nbytes > self.quarter_bytes:
            self._next_quarter()
        start = self._quarter * self.quarter_bytes + self._offset
        self._offset += nbytes
        self._reserved = self._quarter
        if not is_external(stream[0]):
            self._readers[self._quarter][stream[0]] = stream
        return start

    def put_int32(self, values: np.ndarray) -> RawPointer:
        """Copy ``values`` (any integer dtype, each within int32) into the ring as int32, for a kernel that
        this session launches."""
        start = self._reserve(4 * values.size)
        np.copyto(self._int32[start >> 2 : (start >> 2) + values.size], values, casting="unsafe")
        return RawPointer(self._base + start, torch.int32)

    def put_device(self, arrays: list[np.ndarray]) -> tuple[int, list[int]]:
        """Pack ``arrays`` at 16-byte aligned offsets and copy them to the same offsets of a device mirror of the
        ring, on the session's stream: returns the device address of the packed bytes and each array's byte
        offset. For tables a kernel reads many times (pinned memory is read over PCIe). The mirror region is
        reused under the same fences as the pinned one, which cover both the copy and the kernel."""
        start, offsets, total = self._stage(arrays)
        if self._mirror is None:
            self._mirror = self._gpu.device_bytes(self._buffer.numel())
        self._gpu.copy(self._mirror[start : start + total], self._buffer[start : start + total])
        return self._mirror.data_ptr() + start, offsets

    def put_into(self, arrays: list[np.ndarray], dst: torch.Tensor) -> list[int]:
        """Pack ``arrays`` as put_device does and copy the packed bytes into ``dst`` (device uint8, at most as
        many bytes), on the session's stream; returns each array's byte offset."""
        start, offsets, total = self._stage(arrays)
        nbytes = min(total, dst.numel())
        self._gpu.copy(dst[:nbytes], self._buffer[start : start + nbytes])
        return offsets

    def _stage(self, arrays: list[np.ndarray]) -> tuple[int, list[int], int]:
        """Reserve and write ``arrays`` packed: (start in the ring, each array's offset, total bytes)."""
        offsets, total = packed_layout(arrays)
        start = self._reserve(total)
        self._write(start, arrays, offsets)
        return start, offsets, total

    def _write(self, start: int, arrays: list[np.ndarray], offsets: list[int]) -> None:
        for a, offset in zip(arrays, offsets):
            self._bytes[start + offset : start + offset + a.nbytes] = a.view(np.uint8)

    # ---- the ring ---------------------------------------------------------------------------------------
    def _fence_readers(self, quarter: int) -> None:
        """Fence, now, every native stream that read ``quarter``: their launches are all queued (sessions)."""
        readers = self._readers[quarter]
        if readers:
            fences = self._fences[quarter]
            for stream_id, stream in readers.items():
                fences[stream_id] = self._gpu.fence(stream)
            readers.clear()

    def _next_quarter(self) -> None:
        self._fence_readers(self._quarter)
        self._quarter = (self._quarter + 1) % _QUARTERS
        self._offset = 0
        self.switches += 1
        # Returns at once unless the GPU is still reading this quarter from a lap ago. (The wait releases the
        # GIL; other threads wait on the lock meanwhile, as they would need the ring anyway.)
        for event in (*self._fences[self._quarter].values(), *self._pending[self._quarter]):
            event.synchronize()
        self._fences[self._quarter].clear()
        self._pending[self._quarter].clear()

    def _grow(self, nbytes: int) -> None:
        # The old buffers may still be read by queued work: keep them alive until every fence has completed.
        events = []
        for q in range(_QUARTERS):
            self._fence_readers(q)
            events += [*self._fences[q].values(), *self._pending[q]]
        self._retired = [(old, ev) for old, ev in self._retired if not all(e.query() for e in ev)]
        self._retired.append(((self._buffer, self._mirror), events))
        self.growths += 1
        self._allocate(max(2 * self.quarter_bytes, 1 << (nbytes - 1).bit_length()))


_ARENAS: dict[int, PinnedArena] = {}
_ARENAS_LOCK = threading.Lock()


def _make_arena(device_index: int) -> PinnedArena:
    with torch.cuda.device(device_index):
        return PinnedArena(device_index)


def arena(device_index: int) -> PinnedArena:
    """The staging arena of one CUDA device, made on first use (once, whichever threads ask)."""
    found = _ARENAS.get(device_index)
    if found is None:
        with _ARENAS_LOCK:
            found = _ARENAS.get(device_index)
            if found is None:
                found = _ARENAS[device_index] = _make_arena(device_index)
    return found
