"""Row maps: for the j-th true row of a mask, its row index (``rows[offsets[i]] = i``, offsets the
exclusive prefix sum of the mask). row_copy_kernel moves rows through them.

A CPU mask's map is computed on the host (``np.flatnonzero``) and staged in pinned memory that the kernel
reads in place (staging.py): no copy launch, no sync, and the count is known on the host. A device mask's
map is built on the device by mask_to_rows_kernel, its count left there: no sync either.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .inputs import CountMismatch

MAX_ROWS = 2**31 - 1
"""The most mask rows an int32 row map can address (the staged map, MergePlan, the item tables)."""


class RowMap(NamedTuple):
    """rows: [>= M] int32 on (or readable from) the device. count: [1] int32 on the device, the mask's
    true rows; None when all M entries of rows are valid (a CPU mask, checked on the host)."""

    rows: "torch.Tensor | staging.RawPointer"
    count: torch.Tensor | None


def check_fits(n: int, what: str) -> None:
    """Raise a ValueError naming ``what`` unless an int32 row map can address ``n`` mask rows."""
    if n > MAX_ROWS:
        raise ValueError(f"{what} uses int32 row maps: at most {MAX_ROWS} mask rows (2**31 - 1), got {n}; "
                         "merge such a mask with path='index_put' (or 'index_copy')")


_arange = np.arange(0, dtype=np.int32)


def host_rows(mask: torch.Tensor) -> np.ndarray:
    """Flat indices of the true entries of a CPU bool mask: [K] int32, or int64 past MAX_ROWS entries.

    Any nonzero byte is true, as in PyTorch (a bool tensor viewed from uint8 may hold 2 or 255): numpy's
    boolean indexing and count test ``!= 0``. (Indexing a kept int32 arange is the fastest form numpy has:
    0.38 µs against 1.0 for np.flatnonzero at N=512, 3.5 against 5.1 at N=16384.)
    """
    global _arange
    flat = mask.numpy().reshape(-1)
    if flat.size > MAX_ROWS:  # int32 would wrap (and a kept arange of that size would take 8 GiB)
        return np.flatnonzero(flat)
    arange = _arange  # one read: another thread may swap in a larger arange meanwhile
    if arange.size < flat.size:
        arange = _arange = np.arange(min(max(flat.size, 2 * arange.size), MAX_ROWS), dtype=np.int32)
    return arange[: flat.size][flat]


_CPU_MASK = ("a CPU mask cannot be captured in a CUDA graph: its row map is staged per call. Capture with a mask on "
             "the GPU, or with a MergePlan built before capture.")


def refuse_capture(device: torch.device, why: str = _CPU_MASK) -> None:
    """The one capture refusal: raise RuntimeError(why) if a CUDA graph is being captured on ``device``'s current
    stream, where something is staged from the host per call (a replay would read a ring slot reused since)."""
    if device.type == "cuda" and torch._C._cuda_isCurrentStreamCapturing():
        raise RuntimeError(why)


def require_count(m: int, placeholders: int) -> None:
    """The one count rule: the mask's true rows (``placeholders``) must equal the source rows ``m``."""
    if placeholders != m:
        raise CountMismatch(m, placeholders)


def check_count(mask: torch.Tensor, m: int, plan=None, sync: bool = False) -> None:
    """require_count where the mask's true rows are known without a sync (a CPU mask, or a MergePlan of one)
    or where the caller asked for the sync (``sync``: check_count=True with a device mask); else nothing (a
    device mask's kernels move min(K, M) rows)."""
    if plan is not None:
        if plan.host_count is not None:
            require_count(m, plan.host_count)
        elif sync:
            require_count(m, int(plan.count.item()))
    elif mask.is_cpu:
        require_count(m, int(np.count_nonzero(mask.numpy())))
    elif sync:
        require_count(m, int(mask.count_nonzero().item()))


def check_positions(positions: np.ndarray, n: int, name: str = "positions") -> None:
    """Row positions checked on the host: each in [0, n) (IndexError) and none repeated (ValueError). O(M) for
    increasing positions (what engines build); else a bitmap of the n rows, O(n + M), or a sort where n is far
    larger than M. (With the sort alone, 32768 shuffled positions of 65536 rows cost about 360 µs more loop time
    than sorted ones on the H100 host, bench/results/h100/2026-12-06-s3/positions.log; the bitmap takes 1/19 of
    the sort's time on the development host.) Repeats are refused, not left to the kernel: concurrent programs would write
    one row in an undefined order (PyTorch's index_copy_ leaves the order of duplicate writes undefined too), and
    accumulate would lose updates."""
    m = positions.size
    if m == 0:
        return
    increasing = m < 2 or bool(np.all(positions[1:] > positions[:-1]))
    lo, hi = (positions[0], positions[-1]) if increasing else (positions.min(), positions.max())
    if lo < 0 or hi >= n:
        j = int(np.flatnonzero((positions < 0) | (positions >= n))[0])
        raise IndexError(f"{name}[{j}] = {int(positions[j])} is out of range for {n} rows (positions index "
                         f"dst's rows: 0 <= p < {n})")
    if increasing:
        return
    if n <= 64 * m:
        seen = np.zeros(n, dtype=np.bool_)
        seen[positions] = True
        if np.count_nonzero(seen) == m:
            return
    ordered = np.sort(positions)
    repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
    if repeated.size:
        raise ValueError(f"{name} repeats row {int(ordered[repeated[0]])}: each row may be written once "
                         "(duplicate writes would land in an undefined order)")


def host_positions(positions: torch.Tensor, n: int, name: str = "positions") -> np.ndarray:
    """Row positions as a checked host array (check_positions): a CPU tensor's own memory, a device tensor's
    copy (one sync: check=True)."""
    host = positions.numpy() if positions.is_cpu else positions.cpu().numpy()
    check_positions(host, n, name)
    return host


def cpu_rows(mask: torch.Tensor, m: int, device: torch.device) -> np.ndarray:
    """The row map of a CPU mask for a launch on ``device`` that stages it per call: raises CountMismatch
    unless the mask has exactly ``m`` true rows (a staged map is count-less, read up to m), and refuses
    CUDA-graph capture."""
    rows = host_rows(mask)
    require_count(m, rows.size)
    refuse_capture(device)
    return rows


def stage_rows(rows: np.ndarray, device: torch.device) -> RowMap:
    """Host row indices [K], made readable by a kernel on ``device`` without a sync (a count-less map of K).

    On CUDA this is a device copy made through PyTorch's pinned caching allocator, which keeps its host
    buffer until the copy has run, from any thread on any stream: no session with the ring is needed, at
    the cost of a copy launch (for backward passes; the forward merges read the ring in place).
    """
    if rows.size and rows.dtype != np.int32:
        check_fits(int(rows.max()) + 1, "the staged row map")
    host = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int32))
    if device.type != "cuda":  # the interpreter reads host memory directly
        return RowMap(host, None)
    refuse_capture(device)
    return RowMap(host.pin_memory().to(device, non_blocking=True), None)
