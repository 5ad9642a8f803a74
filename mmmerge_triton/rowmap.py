"""Row maps: for the j-th true row of a mask, its row index (``rows[offsets[i]] = i``, offsets the
exclusive prefix sum of the mask). row_copy_kernel moves rows through them.

A CPU mask's map is computed on the host (``np.flatnonzero``) and staged in pinned memory that the kernel
reads in place: no copy launch, no sync, and the count is known on the host. A device mask's map is built
on the device by mask_to_rows_kernel, its count left there: no sync either.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .scatter import mask_bytes, mask_to_rows
from .staging import RawPointer, arena


class RowMap(NamedTuple):
    """rows: [>= M] int32 on (or readable from) the device. count: [1] int32 on the device, the mask's
    true rows; None when all M entries of rows are valid (a CPU mask, checked on the host)."""

    rows: torch.Tensor | RawPointer
    count: torch.Tensor | None


class CountMismatch(ValueError):
    """The mask's true rows differ from the source rows. The API re-raises it in vLLM's words."""

    def __init__(self, num_rows: int, num_placeholders: int):
        super().__init__(f"Attempted to assign {num_rows} multimodal tokens to {num_placeholders} placeholders")
        self.num_rows, self.num_placeholders = num_rows, num_placeholders


_arange = np.arange(0, dtype=np.int32)


def host_rows(mask: torch.Tensor) -> np.ndarray:
    """Flat indices of the true entries of a CPU bool mask: [K] int32. (Indexing a kept int32 arange is the
    fastest form numpy has: 0.38 µs against 1.0 for np.flatnonzero at N=512, 3.5 against 5.1 at N=16384.)"""
    global _arange
    flat = mask.numpy().reshape(-1)
    if _arange.size < flat.size:
        _arange = np.arange(max(flat.size, 2 * _arange.size), dtype=np.int32)
    return _arange[: flat.size][flat]


def staged_rows(mask: torch.Tensor, n_rows: int, device: torch.device) -> RowMap:
    """The row map of a CPU mask, readable by a kernel on ``device`` without a sync.

    Raises CountMismatch (before anything is staged) unless the mask has exactly ``n_rows`` true rows: a
    count-less map is read up to n_rows.
    """
    rows = host_rows(mask)
    if rows.size != n_rows:
        raise CountMismatch(n_rows, rows.size)
    return stage_rows(rows, device)


def stage_rows(rows: np.ndarray, device: torch.device) -> RowMap:
    """Host row indices [K], made readable by a kernel on ``device`` without a sync (a count-less map of K)."""
    if device.type != "cuda":  # the interpreter reads host memory directly
        return RowMap(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int32)), None)
    if torch._C._cuda_isCurrentStreamCapturing():
        raise RuntimeError(
            "a CPU mask cannot be captured in a CUDA graph: its row map is staged per call. "
            "Capture with a mask on the GPU, or with a MergePlan built before capture."
        )
    index = device.index
    return RowMap(arena(index).put_int32(rows, torch._C._cuda_getCurrentRawStream(index)), None)


def device_rows(mask: torch.Tensor, capacity: int) -> RowMap:
    """The row map of a bool mask on a device (or on the CPU under the interpreter), built there: capacity
    int32 entries (4 bytes per source row) and a count. No sync."""
    rows = torch.empty(max(capacity, 1), dtype=torch.int32, device=mask.device)
    count = torch.empty(1, dtype=torch.int32, device=mask.device)
    mask_to_rows(mask_bytes(mask), rows, count, capacity)
    return RowMap(rows, count)
