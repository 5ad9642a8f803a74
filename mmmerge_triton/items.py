"""Merging a list of per-item tensors (one per image or clip) in one launch, read where they lie.

Engines ``torch.cat`` their items before the scatter: an allocation of M x H and a full extra read and write
of every multimodal row. Here each item is addressed relative to the first one's storage through a small
table (element offset and first compact row of each item), staged with the row map in the pinned ring and
sent in one host-to-device copy to the ring's device mirror (staging.PinnedArena.put_device), under the
same fences as the ring: one session per merge spans the staging, the copy and the launch, so threads and
streams never share a table in flight.

Host time is what limits this path (a few hundred items are common), so everything per item is done in one
pass per property (``map`` over the list, numpy over the results), never in a Python call per item.
"""
from __future__ import annotations

from operator import attrgetter
from typing import NamedTuple

import numpy as np
import torch

from .inputs import items_dtype
from .kernel_config import KernelConfig, cdiv
from .kernels.multi_row_copy import multi_row_copy_kernel
from .launch import FastKernel
from .rowmap import RowMap, check_fits, cpu_rows, refuse_capture
from .staging import RawPointer, arena

_multi_row_copy = FastKernel(multi_row_copy_kernel)
_dtype_of = attrgetter("dtype")


class ItemList(NamedTuple):
    """Checked items of one merge: ``tensors`` [m_i, H] on the destination's device, ``rows`` [m_i], and
    ``dtype``, torch.cat's (the promotion of the items' dtypes: a float64 item makes the list float64)."""

    tensors: list[torch.Tensor]
    rows: list[int]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensors: list[torch.Tensor]) -> "ItemList":
        return cls(tensors, [t.shape[0] for t in tensors], items_dtype(tensors))


def common_row_stride(items: list[torch.Tensor]) -> int | None:
    """The row stride shared by the items (2-D, on one device, unit column stride, one dtype), or None when
    they have none and must be concatenated instead. Rows of items with fewer than two rows have any stride."""
    if len(set(map(_dtype_of, items))) != 1:
        return None
    strides = set(map(torch.Tensor.stride, items))
    hidden = items[0].shape[1]
    if len(strides) == 1:  # the common case: one pass
        row_stride, column_stride = next(iter(strides))
        return row_stride if column_stride == 1 or hidden <= 1 else None
    stride = None
    for item in items:
        if item.stride(1) != 1 and hidden > 1:
            return None
        if item.shape[0] > 1:
            if stride is None:
                stride = item.stride(0)
            elif item.stride(0) != stride:
                return None
    return hidden if stride is None else stride


def item_tables(items: ItemList) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(item element offsets from the first item [T] int64, item first rows [T + 1] int32, alignment in
    elements that every offset shares), or None when an item's address is not a multiple of its element size
    (``torch.frombuffer(..., offset=1)``, DLPack): element offsets cannot address it."""
    tensors = items.tensors
    size = tensors[0].element_size()
    ptrs = np.fromiter(map(torch.Tensor.data_ptr, tensors), dtype=np.int64, count=len(tensors))
    if size > 1 and np.any(ptrs % size):
        return None
    offsets = (ptrs - ptrs[0]) // size
    starts = np.zeros(len(tensors) + 1, dtype=np.int32)
    np.cumsum(items.rows, out=starts[1:])
    align = 16 // size if not np.any(ptrs % 16) else 1
    return offsets, starts, align


def _host_tensors(parts: list[np.ndarray]) -> list[torch.Tensor]:
    """The interpreter reads host memory: the staged arrays as plain tensors."""
    return [torch.from_numpy(np.ascontiguousarray(part)) for part in parts]


def merge_items(dst2d: torch.Tensor, mask: torch.Tensor | None, items: ItemList, stride: int, accumulate: bool,
                cfg: KernelConfig, rowmap: RowMap | None = None, host: np.ndarray | None = None,
                bounded: bool = False) -> None:
    """dst2d[mask] = cat(items) (or +=), without the cat. items: 2-D, one dtype, unit column stride, sharing
    row ``stride`` (common_row_stride). Raises CountMismatch for a CPU mask whose count differs, and a
    ValueError past MAX_ROWS mask rows. Items at addresses that are not a multiple of their element size are
    concatenated first (the one case that pays for the cat). The row map: the CPU mask's, or given: ``rowmap``
    on the device, or ``host`` [M] (checked by the caller) to stage; ``bounded``: entries outside [0, N)
    are skipped (modalities.py's device maps)."""
    if 0 in items.rows:  # an empty item has no rows to address (nor, maybe, storage)
        kept = [(t, r) for t, r in zip(items.tensors, items.rows) if r]
        if not kept:
            return
        items = ItemList([t for t, _ in kept], [r for _, r in kept], items.dtype)
    check_fits(max(dst2d.shape[0], sum(items.rows)), "reading items in place")
    tables = item_tables(items)
    if tables is None:
        whole = torch.cat(items.tensors)
        items, stride = ItemList([whole], [whole.shape[0]], whole.dtype), whole.stride(0)
        tables = item_tables(items)
    offsets, starts, align = tables
    first = items.tensors[0]
    n_rows = int(starts[-1])
    if align > 1 and (stride * first.element_size()) % 16:
        align = 1
    device = dst2d.device
    refuse_capture(device, "a list of items cannot be merged inside a CUDA graph capture: its item table is staged "
                           "per call. Concatenate the items first, or merge outside the graph.")
    if host is None and rowmap is None:  # a CPU mask's map (a device mask's is the caller's: rowmap)
        host = cpu_rows(mask, n_rows, device)
    parts = [starts, offsets] + ([host] if host is not None else [])
    common = (dst2d, first, stride, n_rows, len(offsets), accumulate, cfg, align)
    if device.type != "cuda":
        starts_host, offsets_host, *rest = _host_tensors(parts)
        rows, count = (rest[0], None) if host is not None else rowmap
        _launch(*common, offsets_host, starts_host, rows, count, bounded)
        return
    with arena(device.index) as ring:  # staging, the table's copy and the launch that reads both: one session
        base, at = ring.put_device(parts)
        rows, count = (RawPointer(base + at[2], torch.int32), None) if host is not None else rowmap
        _launch(*common, RawPointer(base + at[1], torch.int64), RawPointer(base + at[0], torch.int32), rows, count,
                bounded)


def _launch(dst2d, first, stride, n_rows, n_items, accumulate, cfg, align, offsets, starts, rows, count,
            bounded=False) -> None:
    """multi_row_copy_kernel over the staged tables (tensors or RawPointers readable by the kernel)."""
    hidden = dst2d.shape[1]
    has_count = count is not None
    steps = max(1, (n_items - 1).bit_length())
    key = (dst2d.device.index, dst2d.dtype, first.dtype, dst2d.data_ptr() % 16, first.data_ptr() % 16, hidden,
           dst2d.stride(0), stride, accumulate, has_count, bounded, steps, align, cfg)
    _multi_row_copy.launch(
        key,
        (cdiv(n_rows, cfg.rows), 1),
        (dst2d, first, offsets, starts, rows, count if has_count else rows, dst2d.shape[0], n_rows, n_items, hidden,
         dst2d.stride(0), stride),
        (1 if accumulate else 0, has_count, bounded, cfg.rows, cfg.block_h, steps, align),
        (cfg.num_warps, cfg.num_stages),
        dst2d.device.index,
    )
