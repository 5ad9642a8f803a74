"""Merging a list of per-item tensors (one per image or clip) in one launch, read where they lie.

Engines ``torch.cat`` their items before the scatter: an allocation of M x H and a full extra read and write
of every multimodal row. Here each item is addressed relative to the first one's storage through a small
table (element offset and first compact row of each item), sent with the row map in one host-to-device copy.
"""
from __future__ import annotations

import numpy as np
import torch

from .kernels import multi_row_copy_kernel
from .launch import FastKernel
from .rowmap import CountMismatch, RowMap, device_rows, host_rows
from .scatter import KernelConfig, cdiv
from .staging import arena, packed_layout

_multi_row_copy = FastKernel(multi_row_copy_kernel)


# Host cost of building and sending the item table, and the copy rate, on the H100 host of
# bench/results/h100/suite_items_*.json: about 200 µs plus 7 µs per item, against 2.9 TB/s.
_TABLE_HOST_US, _PER_ITEM_HOST_US, _COPY_BYTES_PER_US = 200.0, 7.0, 2.9e6


def items_in_place_pays(items: list[torch.Tensor], dst: torch.Tensor) -> bool:
    """Whether reading the items in place beats concatenating them first, in loop time. In place halves the
    device work (no cat: one read and one write of the rows instead of two) but costs host time per item; it
    pays when that host time stays under the device time that ``torch.cat`` + scatter would take. This rule
    picks the faster of the two at all 12 points of the H100 items suite (from which its constants come)."""
    n_rows = sum(t.shape[0] for t in items)
    moved = n_rows * dst.shape[-1] * (items[0].element_size() + dst.element_size())
    return _TABLE_HOST_US + _PER_ITEM_HOST_US * len(items) < 2 * moved / _COPY_BYTES_PER_US


def common_row_stride(items: list[torch.Tensor]) -> int | None:
    """The row stride shared by the items (2-D, unit column stride, one dtype and device), or None when they
    have none and must be concatenated instead."""
    first = items[0]
    stride = None
    for item in items:
        if item.dtype != first.dtype or item.device != first.device or (item.stride(1) != 1 and item.shape[1] > 1):
            return None
        if item.shape[0] > 1:
            if stride is None:
                stride = item.stride(0)
            elif item.stride(0) != stride:
                return None
    return first.shape[1] if stride is None else stride


def _tables(items: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, int]:
    """(item element offsets from the first item [T] int64, item first rows [T + 1] int32, alignment in
    elements that every offset shares)."""
    size = items[0].element_size()
    ptrs = np.array([t.data_ptr() for t in items], dtype=np.int64)
    offsets = (ptrs - ptrs[0]) // size
    starts = np.zeros(len(items) + 1, dtype=np.int32)
    np.cumsum([t.shape[0] for t in items], out=starts[1:])
    align = 16 // size if not np.any(ptrs % 16) else 1
    return offsets, starts, align


def _typed(packed: torch.Tensor, offset: int, dtype: torch.dtype, n: int) -> torch.Tensor:
    return packed[offset:offset + n * dtype.itemsize].view(dtype)


def merge_items(dst2d: torch.Tensor, mask: torch.Tensor, items: list[torch.Tensor], stride: int, accumulate: bool,
                cfg: KernelConfig, rowmap: RowMap | None = None) -> None:
    """dst2d[mask] = cat(items) (or +=), without the cat. items: 2-D, one dtype, unit column stride, sharing
    row ``stride`` (common_row_stride). Raises CountMismatch for a CPU mask whose count differs."""
    items = [t for t in items if t.shape[0]]  # an empty item has no rows to address (nor, maybe, storage)
    offsets, starts, align = _tables(items)
    n_rows = int(starts[-1])
    if align > 1 and (stride * items[0].element_size()) % 16:
        align = 1
    device = dst2d.device
    if device.type == "cuda" and torch._C._cuda_isCurrentStreamCapturing():
        raise RuntimeError("a list of items cannot be merged inside a CUDA graph capture: its item table is staged "
                           "per call. Concatenate the items first, or merge outside the graph.")
    on_device = dst2d.is_cuda and mask.device.type != "cpu"
    host = None if (rowmap is not None or on_device) else host_rows(mask)
    if host is not None and host.size != n_rows:
        raise CountMismatch(n_rows, host.size)
    if rowmap is None and on_device:
        rowmap = device_rows(mask, n_rows)
    parts = [starts, offsets] + ([host.astype(np.int32)] if host is not None else [])
    if device.type == "cuda":
        pinned, at = arena(device.index).put_packed(parts, torch._C._cuda_getCurrentRawStream(device.index))
        packed = torch.empty(pinned.numel(), dtype=torch.uint8, device=device)
        packed.copy_(pinned, non_blocking=True)
    else:  # the interpreter reads host memory: the same layout in a plain array
        at, total = packed_layout(parts)
        packed = torch.zeros(total, dtype=torch.uint8)
        for part, offset in zip(parts, at):
            packed[offset:offset + part.nbytes] = torch.from_numpy(part.view(np.uint8))
    starts_dev = _typed(packed, at[0], torch.int32, len(starts))
    offsets_dev = _typed(packed, at[1], torch.int64, len(offsets))
    rows, count = (_typed(packed, at[2], torch.int32, n_rows), None) if host is not None else rowmap
    hidden = dst2d.shape[1]
    has_count = count is not None
    steps = max(1, (len(items) - 1).bit_length())
    key = (device.index, dst2d.dtype, items[0].dtype, dst2d.data_ptr() % 16, items[0].data_ptr() % 16, hidden,
           dst2d.stride(0), stride, accumulate, has_count, steps, align, cfg)
    _multi_row_copy.launch(
        key,
        (cdiv(n_rows, cfg.rows), 1),
        (dst2d, items[0], offsets_dev, starts_dev, rows, count if has_count else rows, n_rows, len(items), hidden,
         dst2d.stride(0), stride),
        (1 if accumulate else 0, has_count, cfg.rows, cfg.block_h, steps, align),
        (cfg.num_warps, cfg.num_stages),
        device.index,
    )
