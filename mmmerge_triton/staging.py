"""Pinned host memory that kernels read in place over unified addressing, reused lap after lap.

A CPU mask's row map is computed on the host and must reach the GPU without a sync. Writing it into
pinned memory and passing that address to the kernel costs no copy launch at all (memory from
``cudaHostAlloc`` is mapped into every device's address space under UVA). The hazard is reuse: the
kernel reads the bytes when it runs, so a region must not be rewritten before then. The arena is a ring
cut into quarters; leaving a quarter records an event on each stream that used it, and a quarter is
written again only once those events have completed (the host waits only if the GPU is a whole lap
behind).
"""
from __future__ import annotations

import numpy as np
import torch

_QUARTERS = 4
_ALIGN = 16  # bytes: keeps every staged array 16-byte aligned, as the kernels' loads prefer


def _aligned(nbytes: int) -> int:
    return -(-max(nbytes, 1) // _ALIGN) * _ALIGN


def packed_layout(arrays: list[np.ndarray]) -> tuple[list[int], int]:
    """Byte offsets of ``arrays`` packed one after another at 16-byte boundaries, and the total size."""
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += _aligned(a.nbytes)
    return offsets, total


class RawPointer:
    """An address the GPU can read, with a dtype: what a Triton kernel takes for a pointer argument."""

    __slots__ = ("ptr", "dtype")

    def __init__(self, ptr: int, dtype: torch.dtype):
        self.ptr = ptr
        self.dtype = dtype

    def data_ptr(self) -> int:
        return self.ptr


class PinnedArena:
    """A ring of pinned host memory for one CUDA device, handed out in 16-byte-aligned int32 arrays."""

    def __init__(self, device_index: int, quarter_bytes: int = 1 << 20):
        self.device_index = device_index
        self._retired: list[tuple[torch.Tensor, list[torch.cuda.Event]]] = []
        self._allocate(quarter_bytes)

    def _allocate(self, quarter_bytes: int) -> None:
        self.quarter_bytes = quarter_bytes
        self._buffer = torch.empty(_QUARTERS * quarter_bytes, dtype=torch.uint8, pin_memory=True)
        self._bytes = self._buffer.numpy()
        self._int32 = self._bytes.view(np.int32)  # kept: a view per call costs as much as the copy itself
        self._base = self._buffer.data_ptr()
        self._quarter = 0
        self._offset = 0  # within the current quarter
        self._streams: list[set[int]] = [set() for _ in range(_QUARTERS)]
        self._events: list[list[torch.cuda.Event]] = [[] for _ in range(_QUARTERS)]

    def _reserve(self, nbytes: int, stream: int) -> int:
        """Byte offset of ``nbytes`` free bytes, 16-byte aligned, to be read by work queued on ``stream``."""
        nbytes = _aligned(nbytes)
        if nbytes > self.quarter_bytes:
            self._grow(nbytes)
        if self._offset + nbytes > self.quarter_bytes:
            self._next_quarter()
        start = self._quarter * self.quarter_bytes + self._offset
        self._offset += nbytes
        self._streams[self._quarter].add(stream)
        return start

    def put_int32(self, values: np.ndarray, stream: int) -> RawPointer:
        """Copy ``values`` (any integer dtype) into the arena as int32; the kernel that reads the result
        must be launched on ``stream`` (a raw CUDA stream handle) before the next call."""
        start = self._reserve(4 * values.size, stream)
        np.copyto(self._int32[start >> 2 : (start >> 2) + values.size], values, casting="unsafe")
        return RawPointer(self._base + start, torch.int32)

    def put_packed(self, arrays: list[np.ndarray], stream: int) -> tuple[torch.Tensor, list[int]]:
        """Pack ``arrays`` at 16-byte aligned offsets; returns a pinned uint8 tensor view of the packed bytes
        (for one non_blocking copy to the device on ``stream``) and each array's byte offset in it."""
        offsets, total = packed_layout(arrays)
        start = self._reserve(total, stream)
        for a, offset in zip(arrays, offsets):
            self._bytes[start + offset : start + offset + a.nbytes] = a.view(np.uint8)
        return self._buffer[start : start + total], offsets

    def _fence(self, quarter: int) -> list[torch.cuda.Event]:
        """Record, on every stream that read from ``quarter``, an event that completes once those reads have."""
        events = []
        device = torch.device("cuda", self.device_index)
        for stream in self._streams[quarter]:
            # A null handle is the default stream. (ExternalStream(0) would not be: PyTorch's stream
            # constructor reads a zero pointer as "no pointer" and hands out a pool stream instead.)
            owner = torch.cuda.default_stream(device) if stream == 0 else torch.cuda.ExternalStream(stream, device=device)
            event = torch.cuda.Event()
            event.record(owner)
            events.append(event)
        self._streams[quarter].clear()
        return events

    def _next_quarter(self) -> None:
        self._events[self._quarter] = self._fence(self._quarter)
        self._quarter = (self._quarter + 1) % _QUARTERS
        self._offset = 0
        for event in self._events[self._quarter]:
            event.synchronize()  # returns at once unless the GPU is still reading this quarter from a lap ago
        self._events[self._quarter] = []

    def _grow(self, nbytes: int) -> None:
        # The old buffer may still be read by queued kernels: keep it alive until they have finished.
        events = [e for q in range(_QUARTERS) for e in self._events[q] + self._fence(q)]
        self._retired = [(b, ev) for b, ev in self._retired if not all(e.query() for e in ev)]
        self._retired.append((self._buffer, events))
        self._allocate(max(2 * self.quarter_bytes, 1 << (nbytes - 1).bit_length()))


_ARENAS: dict[int, PinnedArena] = {}


def arena(device_index: int) -> PinnedArena:
    """The staging arena of one CUDA device, made on first use."""
    found = _ARENAS.get(device_index)
    if found is None:
        with torch.cuda.device(device_index):
            found = _ARENAS[device_index] = PinnedArena(device_index)
    return found
