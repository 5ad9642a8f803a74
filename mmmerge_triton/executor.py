"""The Triton path's one executor for a tensor source: rows of src [M, H] into dst [N, H] at a mask, once the
kind of launch and its configuration are known.

Kinds, by where the mask is:
- HOST_ROWS: a CPU mask. Its row map is built on the host (np boolean indexing), staged in the pinned ring and
  read in place by one row_copy launch. (Staging a large mask's bytes instead and building its map on the
  device saved host time past N = 32768 but cost more device time, up to 41%, three launches where this is one:
  bench/results/h100/RUNS.md, "staged CPU masks".)
- DEVICE_FUSED: a device mask with a one-launch configuration: mask_row_copy finds its offsets in-kernel.
- DEVICE_ROWS: a device mask otherwise: mask_to_rows into a fresh buffer (4 bytes per source row), row_copy.
(Under TRITON_INTERPRET=1 masks are CPU tensors: HOST_ROWS, the map read from host memory.)
A CPU mask's count is checked on the host before anything is queued (CountMismatch), and a CUDA graph being
captured is refused (the staging is per call). Extra device memory: none for a CPU mask, 4 bytes per source row
for DEVICE_ROWS.

A ``Launch`` holds the kind, configuration and device, and the kernels bound on its first run (launch.bind):
lean.py keeps one per input signature, so that later calls launch through the bound C entry with addresses as
ints; paths.merge_triton makes a fresh one per call (its launches go through the kernels' FastKernel caches).
"""
from __future__ import annotations

import torch

from .kernel_config import KernelConfig
from .rowmap import cpu_rows
from .scatter import ADD, COPY, cdiv, mask_row_copy, mask_to_rows, row_copy, scan_block
from .staging import RawPointer, arena

# The kinds of launch of the Triton path (dispatch.Decision.kind). The first three run here, for a tensor
# source; PLAN_ROWS (a MergePlan's row map, one row_copy) and ITEMS (a list read in place, items.merge_items)
# run in paths.merge_triton.
HOST_ROWS, DEVICE_FUSED, DEVICE_ROWS, PLAN_ROWS, ITEMS = "host_rows", "device_fused", "device_rows", "plan_rows", "items"
KINDS = (HOST_ROWS, DEVICE_FUSED, DEVICE_ROWS, PLAN_ROWS, ITEMS)


def launch_kind(config: KernelConfig, mask: torch.Tensor, plan: bool, items_in_place: bool) -> str:
    """The kind of launch that merges with ``config`` at ``mask``: a list read in place, a MergePlan's row map,
    else by where the mask is (under the interpreter every mask is a CPU one). dispatch.decide reports it;
    paths.merge_triton runs it."""
    if items_in_place:
        return ITEMS
    if plan:
        return PLAN_ROWS
    if mask.is_cuda:
        return DEVICE_FUSED if config.fused else DEVICE_ROWS
    return HOST_ROWS

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # absent from CPU-only builds
_current_device = getattr(torch._C, "_cuda_getDevice", None)


class Launch:
    """How one merge runs on the Triton path: ``kind``, ``config``, the CUDA ``device`` index (-1: the
    interpreter's CPU tensors), the mask bytes per program of a device row map (``block``), and the kernels
    bound on the first run: the copy (``bound``) and the row-map scan (``bound_rows``)."""

    __slots__ = ("kind", "config", "device", "block", "bound", "bound_rows")

    def __init__(self, kind: str, config: KernelConfig, n: int, device: torch.device):
        """kind: HOST_ROWS, DEVICE_FUSED or DEVICE_ROWS (dispatch.decide's). n: N, or any N of its dispatch
        bucket (the thresholds start buckets)."""
        self.kind, self.config, self.block = kind, config, scan_block(max(n, 1))
        self.device = device.index if device.type == "cuda" else -1
        self.bound = self.bound_rows = None


def execute(launch: Launch, dst: torch.Tensor, mask: torch.Tensor, src: torch.Tensor, accumulate: bool,
            at: tuple) -> None:
    """dst[mask] = src (or +=), through ``launch``. dst [N, H] and src [M, H], both with unit column stride;
    mask: for a CPU mask the bool tensor (any shape of N entries), for a device mask its N bytes, contiguous.
    ``at``: what the launches read of them, as the caller has it (a lean call reads each once): (mask address,
    dst address, src address, N, M, H, dst row stride, src row stride); see ``addressing``. Raises CountMismatch
    (a CPU mask) before anything is queued."""
    device = launch.device
    if device >= 0 and device != _current_device():
        with torch.cuda.device(device):
            _execute(launch, dst, mask, src, accumulate, at)
    else:
        _execute(launch, dst, mask, src, accumulate, at)


def addressing(dst: torch.Tensor, mask: torch.Tensor, src: torch.Tensor) -> tuple:
    """``at`` of execute, read off the tensors."""
    n, h = dst.shape
    return mask.data_ptr(), dst.data_ptr(), src.data_ptr(), n, src.shape[0], h, dst.stride(0), src.stride(0)


def _execute(launch: Launch, dst, mask, src, accumulate, at) -> None:
    kind, device, bound, config = launch.kind, launch.device, launch.bound, launch.config
    mask_ptr, dst_ptr, src_ptr, n, m, h, dst_stride, src_stride = at
    mode = ADD if accumulate else COPY
    if kind == HOST_ROWS:
        rows = cpu_rows(mask, m, dst.device)  # the count check and capture refusal of a staged map
        if device < 0:  # the interpreter reads host memory
            row_copy(dst, src, torch.from_numpy(rows), None, mode, config)
            return
        with arena(device) as ring:  # the reservation and the launch that reads it: one session
            staged = ring.put_int32(rows)
            if bound is None:
                launch.bound = row_copy(dst, src, staged, None, mode, config)
            else:
                rows_ptr = staged.ptr
                bound(cdiv(m, config.rows), _raw_stream(device), dst_ptr, src_ptr, rows_ptr, rows_ptr, m, h,
                      dst_stride, src_stride)
    elif kind == DEVICE_FUSED:
        if bound is None:
            launch.bound = mask_row_copy(dst, src, RawPointer(mask_ptr, torch.uint8), mode, config)
        else:
            bound(cdiv(n, config.rows), _raw_stream(device), dst_ptr, src_ptr, mask_ptr, n, m, h, dst_stride,
                  src_stride)
    elif kind == DEVICE_ROWS:  # the map in a fresh device buffer: M entries, then the count at 16 bytes
        capacity = -(-m // 4) * 4
        buffer = torch.empty(capacity + 4, dtype=torch.int32, device=dst.device)  # alive until both launches
        rows = buffer.data_ptr()
        _rows_then_copy(launch, dst, src, mask_ptr, rows, rows + 4 * capacity, mode, at)


def _rows_then_copy(launch: Launch, dst, src, mask: int, rows: int, count: int, mode: int, at: tuple) -> None:
    """The row map of the N mask bytes at device address ``mask``, built on the device into ``rows`` (M int32,
    16-byte aligned) and ``count`` (one int32), then the row copy through it: two launches."""
    _, dst_ptr, src_ptr, n, m, h, dst_stride, src_stride = at
    if n == 0 or m == 0 or h == 0:
        return
    if launch.bound_rows is None or launch.bound is None:
        launch.bound_rows = mask_to_rows(RawPointer(mask, torch.uint8), RawPointer(rows, torch.int32),
                                         RawPointer(count, torch.int32), m, n, launch.block)
        launch.bound = row_copy(dst, src, RawPointer(rows, torch.int32), RawPointer(count, torch.int32), mode,
                                launch.config)
        return
    stream = _raw_stream(launch.device)
    launch.bound_rows(cdiv(n, launch.block), stream, mask, rows, count, n, m)
    launch.bound(cdiv(m, launch.config.rows), stream, dst_ptr, src_ptr, rows, count, m, h, dst_stride, src_stride)
