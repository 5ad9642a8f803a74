"""merge_requests: one merge for a batch of requests, where a request whose placeholders and embedding rows
disagree is left out alone (its rows untouched) and reported, instead of failing the whole batch.

Launches. A CPU mask is counted per request on the host (its row map and ``np.searchsorted`` at the row
offsets); the matching requests are then merged by merge_multimodal_embeddings with the other requests' rows
cleared from a copy of the mask: the launches of one merge (one row copy for a tensor; a list of items read
in place adds one copy of its item table). A device mask takes two launches after one copy of the request
tables (none when this layout was merged just before on this stream): request_rows_kernel, one program per
request (its count, its status, its part of the row map), then request_row_copy_kernel over the embedding
rows. The count cannot be folded into the copy: no row of a request may be written before all of its rows
are counted, and a copy program that counted its whole request itself would re-read it once per program
(quadratic in a request's length; mask_row_copy_kernel's prefix re-reads are kept below 16384 rows for that).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from . import inputs
from .api import merge_multimodal_embeddings
from .core import needs_grad, transformed
from .dispatch import triton_refusal
from .executor import run_requests
from .inputs import NestedTensors
from .items import ItemList, common_row_stride, item_tables
from .kernel_config import PATHS, next_pow2
from .rowmap import host_rows
from .staging import RawPointer, arena, packed_layout

# Mask bytes per step of request_rows_kernel's row-map pass: a request's longest range rounded up to a power
# of two, within these bounds (mask_to_rows_kernel's scan blocks span 1024-16384; 8192 keeps the cumsum at
# 32 int32 per thread with 8 warps).
_SCAN_MIN, _SCAN_MAX = 1024, 8192


def merge_requests(
    inputs_embeds: torch.Tensor,
    mm_embeds_per_request: Sequence[NestedTensors],
    is_multimodal: torch.Tensor,
    row_offsets: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    path: str = "auto",
) -> torch.Tensor:
    """Merge a batch of requests in place, each only where its placeholders match its embeddings: a bad
    request fails alone, its rows untouched, and the others are merged as merge_multimodal_embeddings would.

    Args:
        inputs_embeds: [N, H] float32/float16/bfloat16 (float64 through PyTorch ops), CUDA (or CPU).
        mm_embeds_per_request: R entries, one per request: a tensor [m_r, H] or a (nested) list/tuple of the
            request's items [..., H] (leading dims flattened, taken in order; ``[]`` for none), on
            inputs_embeds' device, any of those dtypes (cast to inputs_embeds' dtype as ``.to()`` rounds).
            They may share memory with inputs_embeds (read before anything is written, as vLLM's
            concatenation of the batch reads them) and lie at any address (an item at an address that is
            not a multiple of its element size is merged from an aligned copy).
        is_multimodal: [N] bool, on the CPU (counted on the host: vLLM's mask) or on inputs_embeds' device
            (counted on the device, no sync: SGLang's mask).
        row_offsets: R + 1 host ints (a list, tuple, numpy array or CPU tensor), non-decreasing, within
            [0, N]: request r owns the rows [row_offsets[r], row_offsets[r + 1]). They need not start at 0
            nor end at N (padding rows before or after are allowed).
        path: "auto", or one of mmmerge_triton.PATHS. With a CPU mask it is merge_multimodal_embeddings'
            path. With a device mask, "triton" and "auto" run the two kernels and any other path the
            PyTorch form (cumsum, searchsorted, where: no sync either, and differentiable); "auto" takes the
            PyTorch form where the kernels cannot run (where "triton" raises), and both take it where
            gradients are needed.

    Returns:
        status: [R] bool, True where request r was merged (its true rows in its range equal its embedding
        rows, which includes a request with neither). A CPU tensor for a CPU mask, known at return; a
        tensor on the device for a device mask, written in stream order (read it at the next sync, e.g.
        with the sampled tokens). A request with status False keeps its rows bit for bit.

    Rows outside every request (before row_offsets[0] or from row_offsets[-1]): a true row there raises
    ValueError for a CPU mask (counting it costs nothing there); with a device mask (where raising would
    need a sync) those rows are never written, nor counted in any request.

    Extra device memory (device mask): 4 bytes per embedding row (the row map), R bytes (the status) and
    the request tables (8 bytes per request and 12 per item; 16 per request for the PyTorch form).

    CUDA graphs (device mask): capturable, for the request layout (row_offsets, embedding rows per item,
    and the items' addresses) of a call made before capture on the device (a warm-up does it); a layout
    first seen during capture raises RuntimeError, as its tables would have to be staged from the host.
    Replays then merge new mask and embedding values in that layout, and rewrite the status tensor.

    Raises:
        ValueError: shapes, devices, row_offsets (length, order, range), a true CPU-mask row outside every
            request, or path="triton" where it cannot run. TypeError: dtypes and types. Nothing is written
            when it raises.
    """
    inputs.check_path(path, PATHS)
    inputs.check_dst(inputs_embeds, "inputs_embeds")
    if inputs_embeds.dim() != 2:
        raise ValueError(f"inputs_embeds must have shape [N, H], got {tuple(inputs_embeds.shape)}")
    inputs.check_mask(is_multimodal, inputs_embeds, "is_multimodal", "inputs_embeds")
    if not isinstance(mm_embeds_per_request, (list, tuple)):
        raise TypeError("mm_embeds_per_request must be a list or tuple with one entry per request, got "
                        f"{type(mm_embeds_per_request).__name__}")
    n_requests = len(mm_embeds_per_request)
    offsets = _host_offsets(row_offsets, n_requests, inputs_embeds.shape[0])
    items, request_rows = _request_items(mm_embeds_per_request, inputs_embeds)
    inputs.check_writable(inputs_embeds, "inputs_embeds")
    if is_multimodal.device.type == "cpu":
        return _merge_host_mask(inputs_embeds, items, is_multimodal, offsets, request_rows, path)
    flat = [t for request in items for t in request]
    src_dtype = inputs.items_dtype(flat) if flat else inputs_embeds.dtype  # torch.cat's, as the API's lists
    refusal = triton_refusal(inputs_embeds, is_multimodal, src_dtype)
    if path == "triton" and refusal:
        raise ValueError(f"path='triton' cannot merge these inputs: {refusal}. path='auto' takes the PyTorch form there")
    grad = needs_grad(inputs_embeds, flat)
    # Under forward AD or a torch.func transform the kernels see neither tangents nor batch dims: the PyTorch form.
    use_triton = path in ("auto", "triton") and refusal is None and not grad and not transformed()
    return _merge_device_mask(inputs_embeds, is_multimodal, flat, offsets, request_rows, use_triton)


def _host_offsets(row_offsets, n_requests: int, n: int) -> np.ndarray:
    """row_offsets as int64 [R + 1], checked: host ints, R + 1 of them, non-decreasing, within [0, N]."""
    if not isinstance(row_offsets, (list, tuple, np.ndarray, torch.Tensor)):
        raise TypeError("row_offsets must be R + 1 host ints (a list, tuple, numpy array or CPU tensor), got "
                        f"{type(row_offsets).__name__}")
    if isinstance(row_offsets, torch.Tensor):
        if row_offsets.device.type != "cpu":
            raise ValueError(f"row_offsets must be host ints (a list, tuple, numpy array or CPU tensor); a tensor "
                             f"on {row_offsets.device} would have to be synced to be read")
        row_offsets = row_offsets.detach().numpy()
    values = np.asarray(row_offsets)
    if values.ndim != 1 or values.size != n_requests + 1:
        raise ValueError(f"row_offsets must hold R + 1 = {n_requests + 1} ints (one more than the {n_requests} "
                         f"entries of mm_embeds_per_request), got shape {values.shape}")
    if values.dtype.kind not in "iu":
        raise TypeError(f"row_offsets must be ints, got {values.dtype}")
    values = values.astype(np.int64)
    if values[0] < 0 or values[-1] > n:
        raise ValueError(f"row_offsets must lie within [0, N] = [0, {n}] (N: inputs_embeds' rows), got "
                         f"row_offsets[0] = {values[0]} and row_offsets[-1] = {values[-1]}")
    steps = np.diff(values)
    if np.any(steps < 0):
        r = int(np.argmax(steps < 0))
        raise ValueError(f"row_offsets must be non-decreasing, got row_offsets[{r + 1}] = {values[r + 1]} < "
                         f"row_offsets[{r}] = {values[r]}")
    return values


def _request_items(per_request, dst: torch.Tensor) -> tuple[list[list[torch.Tensor]], np.ndarray]:
    """Each request's items flattened to [rows, H] and checked, and each request's embedding rows [R] int64.
    An item at an address that is not a multiple of its element size is replaced by an aligned copy."""
    items, rows = [], np.zeros(len(per_request), dtype=np.int64)
    for r, entry in enumerate(per_request):
        name = f"mm_embeds_per_request[{r}]"
        flat = inputs.flatten_items(entry, name)
        rows[r] = sum(inputs.check_items(flat, dst, name, "inputs_embeds"))
        if any(t.data_ptr() % t.element_size() for t in flat if t.numel()):
            flat = [_Realigned.apply(t) if t.numel() and t.data_ptr() % t.element_size() else t for t in flat]
        items.append(flat)
    return items, rows


class _Realigned(torch.autograd.Function):
    """A contiguous copy of an item [m, H] whose address is not a multiple of its element size (DLPack, a
    storage sliced at an odd byte), made through its bytes. Element offsets cannot address such an item (the
    kernels' item tables), and on CUDA any kernel that loads it as its dtype, PyTorch's cat and index ops
    included, faults with a misaligned address (sticky: the process's CUDA context is lost). The identity for
    gradients."""

    @staticmethod
    def forward(ctx, item: torch.Tensor) -> torch.Tensor:
        raw = item.unsqueeze(-1).view(torch.uint8)  # [m, H, element size] bytes: any address will do
        return raw.clone(memory_format=torch.contiguous_format).view(item.dtype).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _merge_host_mask(dst, items, mask, offsets, request_rows, path) -> torch.Tensor:
    """A CPU mask: everything is known on the host. Count each request's true rows, then merge the matching
    requests with the others' rows cleared from the mask (one merge, the existing path machinery)."""
    rows = host_rows(mask)
    before = np.searchsorted(rows, offsets)  # true rows before each offset
    outside = int(before[0]) + int(rows.size - before[-1])
    if outside:
        first = int(rows[0] if before[0] else rows[before[-1]])
        raise ValueError(f"is_multimodal has {outside} true rows outside every request (rows [{offsets[0]}, "
                         f"{offsets[-1]}) of row_offsets), the first at row {first}: each placeholder must "
                         "belong to a request")
    status = np.diff(before) == request_rows
    bad = np.flatnonzero(~status)
    good_mask = mask
    if bad.size:
        cleared = mask.numpy().copy()
        for r in bad:
            cleared[offsets[r]:offsets[r + 1]] = False
        good_mask = torch.from_numpy(cleared)
    good_items = [t for r in np.flatnonzero(status) for t in items[r]]
    if good_items:
        merge_multimodal_embeddings(dst, good_items, good_mask, path=path)
    return torch.from_numpy(status)


def _merge_device_mask(dst, mask, items, offsets, request_rows, use_triton: bool) -> torch.Tensor:
    """A device mask: counts, status and the copy on the device, no sync. items: every request's items in
    order, [m_i, H] each. Callable on CPU tensors too (the tests' device-mask semantics)."""
    src_starts = np.zeros(offsets.size, dtype=np.int64)
    np.cumsum(request_rows, out=src_starts[1:])
    if offsets.size == 1:
        return torch.zeros(0, dtype=torch.bool, device=dst.device)
    kept = [t for t in items if t.shape[0]]  # an empty item has no rows to address (nor, maybe, storage)
    if use_triton:
        return _triton_merge(dst, mask, kept, offsets, src_starts)
    return _torch_merge(dst, mask, kept, offsets, src_starts)


def _triton_merge(dst, mask, items, offsets, src_starts) -> torch.Tensor:
    """The two kernels (executor.run_requests), items read in place where they share a row stride (else
    concatenated first, as when they share memory with dst)."""
    hidden = dst.shape[1]
    n_requests, m = offsets.size - 1, int(src_starts[-1])
    stride = common_row_stride(items) if items else None
    # A copy (torch.cat resolves a negative bit; dst's bytes are read before any write) where the item table
    # cannot address the items as they lie.
    if items and (stride is None or any(t.is_neg() for t in items) or inputs.any_overlaps(items, dst)):
        whole = torch.cat(items) if len(items) > 1 else items[0].clone(memory_format=torch.contiguous_format)
        items, stride = [whole], hidden
    parts = [offsets.astype(np.int32), src_starts.astype(np.int32)]
    first, n_items, align = (items[0], 0, 1) if items else (dst, 0, 1)
    if items:
        item_offsets, item_starts, align = item_tables(ItemList.of(items))
        parts += [item_starts, item_offsets]
        n_items = len(item_offsets)
    buffer, at = _tables_on(dst.device, parts)
    tables = (_pointer(buffer, at[0], torch.int32, n_requests + 1), _pointer(buffer, at[1], torch.int32, n_requests + 1))
    tables += ((_pointer(buffer, at[2], torch.int32, n_items + 1), _pointer(buffer, at[3], torch.int64, n_items))
               if items else (None, None))
    block = min(max(_SCAN_MIN, next_pow2(int(np.max(np.diff(offsets))))), _SCAN_MAX)
    return run_requests(dst, mask, tables, n_requests, m, first, n_items, stride or hidden, align, block)


def _torch_merge(dst, mask, items, offsets, src_starts) -> torch.Tensor:
    """The same semantics with PyTorch ops and no sync (no nonzero, no .item()): an inclusive cumsum of the
    mask gives each request's count and each true row's rank in its request; the rows of matching requests
    take their embedding rows through torch.where over the requests' span (dense: a fallback)."""
    device, n_requests, n_rows = dst.device, offsets.size - 1, int(src_starts[-1])
    buffer, at = _tables_on(device, [offsets, src_starts])  # int64: searchsorted and indexing take them as they are
    starts_of = _view(buffer, at[0], torch.int64, n_requests + 1)
    first_rows = _view(buffer, at[1], torch.int64, n_requests + 1)
    flat = mask.reshape(-1)
    ranks = torch.zeros(flat.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(flat, 0, out=ranks[1:])  # ranks[i]: true rows before row i
    before = ranks[starts_of]
    status = before.diff() == first_rows.diff()
    lo, hi = int(offsets[0]), int(offsets[-1])
    if n_rows == 0 or dst.shape[1] == 0 or hi == lo:
        return status
    request = torch.searchsorted(starts_of, torch.arange(lo, hi, device=device), right=True) - 1
    take = flat[lo:hi] & status[request]
    src_row = (first_rows[request] + ranks[lo:hi] - before[request]).clamp_(0, n_rows - 1)
    src = items[0] if len(items) == 1 else torch.cat(items)
    span = dst[lo:hi]
    span.copy_(torch.where(take[:, None], src[src_row].to(dst.dtype), span))
    return status


def _view(buffer: torch.Tensor, at: int, dtype: torch.dtype, count: int) -> torch.Tensor:
    return buffer[at : at + count * dtype.itemsize].view(dtype)


def _pointer(buffer: torch.Tensor, at: int, dtype: torch.dtype, count: int):
    """A table as a kernel takes it: an address on CUDA (a view would cost a µs each), a tensor for the
    interpreter (which reads tensors only)."""
    return RawPointer(buffer.data_ptr() + at, dtype) if buffer.is_cuda else _view(buffer, at, dtype, count)


# Device tables by content: the recent ones per stream (a layout merged again on the stream that copied it
# needs no new copy; a reuse on another stream could race with that copy), and those read by a captured
# graph, kept for the process (a graph reads them at every replay; they are a few bytes per request).
_RECENT_TABLES = 64
_recent: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()
_captured: dict[tuple, torch.Tensor] = {}
_tables_lock = threading.Lock()


def _tables_on(device: torch.device, parts: list[np.ndarray]) -> tuple[torch.Tensor, list[int]]:
    """``parts`` packed at 16-byte offsets into a uint8 tensor on ``device``, and each part's byte offset.

    On CUDA: staged in the pinned ring and copied in one non-blocking copy (no sync), or taken from a recent
    call on this stream. During capture nothing can be staged (a replay would re-read a ring slot reused
    since): the tables must come from a call made before capture, else RuntimeError.
    """
    at, total = packed_layout(parts)
    if device.type != "cuda":
        packed = np.zeros(total, dtype=np.uint8)
        for part, offset in zip(parts, at):
            packed[offset : offset + part.nbytes] = part.view(np.uint8)
        return torch.from_numpy(packed), at
    index = device.index
    key = (index, tuple(part.size for part in parts), b"".join(part.tobytes() for part in parts))
    stream = torch._C._cuda_getCurrentRawStream(index)
    with _tables_lock:
        if torch._C._cuda_isCurrentStreamCapturing():
            buffer = _captured.get(key)
            if buffer is None:
                entry = _recent.pop(key, None)
                if entry is None:
                    raise RuntimeError(
                        "merge_requests with a mask on the GPU cannot be captured in a CUDA graph for a request "
                        "layout it has not merged before: its tables (row_offsets, embedding rows, item "
                        "addresses) are host ints staged per call. Make the same call once before capture "
                        "(a warm-up does), then capture it.")
                buffer = _captured[key] = entry[0]
            return buffer, at
        entry = _recent.get(key)
        if entry is not None and entry[1] == stream:
            _recent.move_to_end(key)
            return entry[0], at
    buffer = torch.empty(total, dtype=torch.uint8, device=device)
    with arena(index) as ring:  # the copy that reads the staged bytes is issued inside the session
        ring.put_into(parts, buffer)
    with _tables_lock:
        _recent[key] = (buffer, stream)
        _recent.move_to_end(key)
        while len(_recent) > _RECENT_TABLES:
            _recent.popitem(last=False)
    return buffer, at
