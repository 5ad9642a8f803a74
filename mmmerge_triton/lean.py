"""The common call, prepared once per input signature, then checked and launched lean.

Step after step an engine merges the same kinds of tensors: plain strided tensors, dst [N, H] and src [M, H]
of the same dtypes, strides and H on one device, a bool mask [N] on the CPU or there; only N, M and the
addresses change. The first call of a *signature* (everything the checks and the decision read but N, M and
the addresses, plus the quarter-octave buckets of N and M that the decision reads) runs every check of
inputs.py and asks dispatch.decide; what they found is kept under the signature. A later call of it reads the
signature (about 20 attribute reads), checks what the signature does not fix (N against the mask, the
addresses for shared memory, a CPU mask's count, gradients, inference tensors) and launches the bound kernel
through its C entry with addresses as ints: no check, decision, key or wrapper is rebuilt.

A call is lean only where nothing needs the general path's care: no tracing, dispatch mode or gradient, no
inference tensor, no bytes shared between dst and src (or a device mask), nothing empty, a device mask without
check_count. ``merge`` returns False for anything else, having written nothing, and api.py runs the general
path, which owns the errors (a CPU mask's count mismatch is raised here, as CountMismatch, by rowmap.cpu_rows).
"""
from __future__ import annotations

import numpy as np
import torch

from . import inputs
from .dispatch import bucket, decide, on_clear
from .kernel_config import HOST_ROWS_BELOW, KernelConfig, default_config
from .paths import RUNNERS, merge_triton
from .rowmap import MAX_ROWS, CountMismatch, cpu_mask_bytes, cpu_rows
from .scatter import ADD, COPY, cdiv, mask_row_copy, mask_to_rows, row_copy, scan_block
from .staging import RawPointer, arena

# How an entry merges: the Triton row copy through a host row map staged in the ring (CPU masks under
# HOST_ROWS_BELOW rows); through a row map built on the device from the mask's bytes staged there (larger CPU
# masks); the one-launch kernel on a device mask; a device row map then the row copy; or a PyTorch path.
HOST_ROWS, STAGED_ROWS, DEVICE_FUSED, DEVICE_ROWS, TORCH = range(5)
_MAX_ENTRIES = 4096  # signatures kept; a serving engine meets a few dozen (N and M buckets of one model)

_Tensor, _bool, _strided = torch.Tensor, torch.bool, torch.strided
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_grad_enabled = torch.is_grad_enabled
_bump = torch.autograd.graph.increment_version
_inference_mode = torch.is_inference_mode_enabled
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # absent from CPU-only builds
_current_device = getattr(torch._C, "_cuda_getDevice", None)


class Entry:
    """What a signature merges with: ``path`` (of dispatch.decide) and its Triton ``config``, the ``kind`` of
    merge, the CUDA ``device`` index (-1: none; the interpreter's CPU tensors take paths.merge_triton), whether
    the mask shares dst's device (and so maybe its bytes), the element sizes, the mask bytes per program of a
    device row map (``block``, from N's bucket), and the kernels, bound on the first call: the copy, the scan."""

    __slots__ = ("path", "config", "kind", "device", "mask_on_dst_device", "src_size", "dst_size", "block",
                 "bound", "bound_rows")

    def __init__(self, path: str, config: KernelConfig | None, kind: int, device: int, mask_on_dst_device: bool,
                 src_size: int, dst_size: int, block: int):
        self.path, self.config, self.kind, self.device = path, config, kind, device
        self.mask_on_dst_device, self.src_size, self.dst_size, self.block = mask_on_dst_device, src_size, dst_size, block
        self.bound = self.bound_rows = None


_entries: dict = {}
on_clear(_entries.clear)  # the entries hold decisions: a new table (dispatch.clear_cache) drops them


def merge(dst, mask, src, accumulate, check_count, path) -> bool:
    """``dst[mask] = src`` (or ``+=``) in place, if this is a lean call (see the module's docstring): returns
    whether it ran. dst [N, H], mask [N] bool, src [M, H]; accumulate, check_count bool; path a str."""
    if (_is_compiling() or _dispatch_modes() or type(dst) is not _Tensor or type(mask) is not _Tensor
            or type(src) is not _Tensor or type(path) is not str
            or (accumulate is not True and accumulate is not False)
            or (check_count is not True and check_count is not False)):
        return False
    try:
        n, h = dst.shape
        m, h_src = src.shape
        (n_mask,) = mask.shape
        dst_ptr, src_ptr, mask_ptr = dst.data_ptr(), src.data_ptr(), mask.data_ptr()
        dst_strides, src_strides = dst.stride(), src.stride()
        key = (dst.dtype, src.dtype, mask.dtype, mask.layout, dst.device, src.device, mask.device, dst_strides,
               src_strides, mask.is_contiguous(), h, h_src, dst_ptr & 15, src_ptr & 15, mask_ptr & 15, accumulate,
               check_count, path, bucket(n), bucket(m))
    except (ValueError, RuntimeError):  # not [N, H] / [M, H] / [N]; a layout without strides or storage
        return False
    entry = _entries.get(key, False)
    if entry is False:
        entry = _prepare(key, dst, mask, src, accumulate, check_count, path)
    if entry is None or n_mask != n or m == 0 or h == 0 or n > MAX_ROWS:
        return False
    inference = dst.is_inference()  # written in place only under inference mode (PyTorch's rule)
    if (inference and not _inference_mode()) or (_grad_enabled() and (dst.requires_grad or src.requires_grad)):
        return False
    # Shared bytes: the general path reads a mask first, copies or refuses a src (PyTorch's rules).
    dst_end = dst_ptr + ((n - 1) * dst_strides[0] + (h - 1) * dst_strides[1] + 1) * entry.dst_size
    if src_ptr < dst_end and dst_ptr < src_ptr + ((m - 1) * src_strides[0] + (h - 1) * src_strides[1] + 1) * entry.src_size:
        return False
    if entry.mask_on_dst_device and mask_ptr < dst_end and dst_ptr < mask_ptr + n:
        return False
    _run(entry, dst, mask, src, accumulate, n, m, h, dst_ptr, src_ptr, mask_ptr, dst_strides[0], src_strides[0])
    if entry.kind != TORCH and not inference:
        _bump(dst)  # the kernels write behind autograd's back
    return True


def _prepare(key, dst, mask, src, accumulate, check_count, path) -> Entry | None:
    """The entry of a new signature: None where every call of it takes the general path (a check fails, the
    mask is on the device and check_count asks for a sync, or a strided device mask)."""
    if len(_entries) >= _MAX_ENTRIES:
        _entries.clear()
    try:
        inputs.check_path(path, tuple(RUNNERS))
        inputs.check_dst(dst, "dst")
        inputs.check_mask(mask, dst, "mask", "dst")
        inputs.check_src(src, dst, "src", "dst")
        decision = decide(dst, mask, src.dtype, bucket(src.shape[0]), path, src)
    except (TypeError, ValueError):
        _entries[key] = None
        return None
    on_device = not mask.is_cpu
    if (on_device and (check_count or not mask.is_contiguous())) or (src.stride(1) != 1 and src.shape[1] != 1):
        _entries[key] = None  # a sync asked for; a strided device mask or src, which the general path copies
        return None
    config, n = decision.config, bucket(dst.shape[0])
    if decision.path != "triton":
        kind = TORCH
    elif on_device:
        config = config or default_config(dst.shape[1], bucket(src.shape[0]), n, on_device)
        kind = DEVICE_FUSED if config.fused else DEVICE_ROWS
    else:
        config = config or default_config(dst.shape[1], bucket(src.shape[0]), n, on_device)
        kind = HOST_ROWS if n < HOST_ROWS_BELOW else STAGED_ROWS
    device = dst.device.index if dst.is_cuda else -1
    entry = _entries[key] = Entry(decision.path, config, kind, device, mask.device == dst.device,
                                  src.element_size(), dst.element_size(), scan_block(max(n, 1)))
    return entry


def _run(entry: Entry, dst, mask, src, accumulate, n, m, h, dst_ptr, src_ptr, mask_ptr, dst_stride, src_stride):
    kind, device, bound = entry.kind, entry.device, entry.bound
    if kind == TORCH:
        if mask.is_cpu:
            count = int(np.count_nonzero(mask.numpy()))
            if count != m:
                raise CountMismatch(m, count)
        RUNNERS[entry.path](dst, mask, src, accumulate)
        return
    if device < 0 or device != _current_device():  # the interpreter's CPU tensors, or another current device
        merge_triton(dst, mask, src, accumulate, None, entry.config)
    elif kind == HOST_ROWS:
        rows = cpu_rows(mask, m, dst.device)  # the one count check and capture refusal of a staged map
        with arena(device) as ring:  # the reservation and the launch that reads it: one session
            staged = ring.put_int32(rows)
            if bound is None:
                entry.bound = row_copy(dst, src, staged, None, ADD if accumulate else COPY, entry.config)
            else:
                rows_ptr = staged.ptr
                bound(cdiv(m, entry.config.rows), _raw_stream(device), dst_ptr, src_ptr, rows_ptr, rows_ptr, m, h,
                      dst_stride, src_stride)
    elif kind == DEVICE_FUSED:
        if bound is None:
            entry.bound = mask_row_copy(dst, src, mask.view(torch.uint8), ADD if accumulate else COPY, entry.config)
        else:
            bound(cdiv(n, entry.config.rows), _raw_stream(device), dst_ptr, src_ptr, mask_ptr, n, m, h, dst_stride,
                  src_stride)
    elif kind == DEVICE_ROWS:  # the map in a fresh device buffer: M entries, then the count at 16 bytes
        capacity = -(-m // 4) * 4
        buffer = torch.empty(capacity + 4, dtype=torch.int32, device=dst.device)  # alive until both launches
        rows = buffer.data_ptr()
        _rows_then_copy(entry, dst, src, mask_ptr, rows, rows + 4 * capacity, n, m, h, accumulate)
    else:  # STAGED_ROWS: the mask's bytes copied to the ring's device mirror, the map after them there
        staged = cpu_mask_bytes(mask, m, dst.device)  # the count check and capture refusal of a staged mask
        capacity = -(-m // 4) * 4
        with arena(device) as ring:  # the copy, the scan and the row copy that read the mirror: one session
            base, (_, rows_offset) = ring.put_device([staged], scratch_bytes=4 * (capacity + 4))
            rows = base + rows_offset
            _rows_then_copy(entry, dst, src, base, rows, rows + 4 * capacity, n, m, h, accumulate)


def _rows_then_copy(entry: Entry, dst, src, mask, rows, count, n, m, h, accumulate) -> None:
    """The row map of the N mask bytes at device address ``mask``, built on the device into ``rows`` (M int32,
    16-byte aligned) and ``count`` (one int32), then the row copy through it: two launches."""
    if entry.bound_rows is None or entry.bound is None:
        entry.bound_rows = mask_to_rows(RawPointer(mask, torch.uint8), RawPointer(rows, torch.int32),
                                        RawPointer(count, torch.int32), m, n, entry.block)
        entry.bound = row_copy(dst, src, RawPointer(rows, torch.int32), RawPointer(count, torch.int32),
                               ADD if accumulate else COPY, entry.config)
        return
    stream = _raw_stream(entry.device)
    entry.bound_rows(cdiv(n, entry.block), stream, mask, rows, count, n, m)
    entry.bound(cdiv(m, entry.config.rows), stream, dst.data_ptr(), src.data_ptr(), rows, count, m, h,
                dst.stride(0), src.stride(0))
