"""The one executor: every merge, once decided (dispatch.decide) and prepared (``prepare``), runs through ``run``;
the backward gather through ``gather``; merge_requests' device kernels through ``run_requests``. Here and nowhere
else: the count check of a mask against the source rows (rowmap.check_count, or the row map a launch stages),
the version bump after a kernel writes behind autograd's back, and the launches of every kind.

Kinds of the Triton path (kernel_config.Decision.kind), by where the row map comes from:
- HOST_ROWS: a CPU mask. Its row map is built on the host (np boolean indexing), staged in the pinned ring and
  read in place by one row_copy launch. (Staging a large mask's bytes instead and building its map on the
  device saved host time past N = 32768 but cost more device time, up to 41%, three launches where this is one:
  bench/results/h100/RUNS.md, "staged CPU masks".)
- DEVICE_FUSED: a device mask with a one-launch configuration: mask_row_copy finds its offsets in-kernel.
- DEVICE_ROWS: a device mask otherwise. Under scatter.SELECT_BELOW mask rows, mask_select_copy in one launch: its
  first programs count the mask's blocks and publish the counts in the stream's scan workspace (workspaces.py),
  and each program finds its own dense rows from them (no row map). From there, mask_to_rows into a fresh buffer
  (4 bytes per source row; from scatter.COUNTED_FROM mask rows in two launches, the blocks' counts first), then
  row_copy. On Hopper and later each of these launches starts while the one before it runs
  (scatter.dependent_launch).
- PLAN_ROWS: a MergePlan's row map, already on the device: one row_copy.
- ITEMS: a list of items read in place (items.merge_items): its item table and row map staged, one launch.
- POSITIONS: row positions given by the caller (indexed_row_scatter_): CPU ones checked on the host and staged
  as a CPU mask's map is; device ones read in place by one bounded row_copy (a position out of range skipped).
(Under TRITON_INTERPRET=1 masks are CPU tensors: HOST_ROWS, the map read from host memory.)
A CPU mask's count is checked on the host before anything is queued (CountMismatch), and a CUDA graph being
captured is refused where anything is staged per call (rowmap.refuse_capture). Extra device memory per call:
none for a CPU mask, nor for DEVICE_ROWS under scatter.SELECT_BELOW mask rows (a scan workspace of 8 KB per
stream, and one per captured launch, kept); past it 4 bytes per source row (the row map) and 4 per 1024 mask rows
(the block counts).

A ``Prepared`` merge holds the decision and, for the kinds that launch one kernel layout per call, a ``Launch``
whose kernels are bound on its first run (launch.bind): core.py memoizes ``prepare`` per input signature, so
that later calls launch through the bound C entry with addresses as ints.
"""
from __future__ import annotations

import numpy as np
import torch

from .inputs import as_rows
from .items import ItemList, common_row_stride, merge_items
from .kernel_config import (DEVICE_FUSED, DEVICE_ROWS, HOST_ROWS, ITEMS, PLAN_ROWS, POSITIONS, Decision,
                            KernelConfig, cdiv, launch_kind, row_map_config)
from .kernels.request_rows import request_row_copy_kernel, request_rows_kernel
from .launch import FastKernel
from .paths import POSITION_RUNNERS, RUNNERS, rows_view
from .rowmap import RowMap, check_count, check_fits, cpu_rows, host_positions, host_rows, refuse_capture, stage_rows
from .scatter import (ADD, COPY, GATHER, PREFIX_CHUNK, SELECT_BLOCK, device_rows, mask_bytes, mask_row_copy,
                      mask_select_copy, mask_to_rows, row_copy, scan_block, select_grid, selects, supports)
from .staging import RawPointer, arena
from .workspaces import workspace

_LAUNCHED = (HOST_ROWS, DEVICE_FUSED, DEVICE_ROWS, POSITIONS)  # the kinds a Launch binds
_COUNTED_BY_MAP = (HOST_ROWS, ITEMS)  # with a CPU mask and no plan, these count from the row map they stage

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # absent from CPU-only builds
_current_device = getattr(torch._C, "_cuda_getDevice", None)
_bump = torch._C._increment_version  # of a tuple of tensors (autograd.graph.increment_version's call); an
# inference tensor, which has no version counter, is skipped


class Launch:
    """How one layout of merge launches: ``kind``, ``config``, the CUDA ``device`` index (-1: the interpreter's
    CPU tensors), for DEVICE_ROWS whether the copy selects its own rows from the mask's block counts in one
    launch (``select``, scatter.selects) and otherwise the mask bytes per program of its row-map scan
    (``block``), and the kernels bound on the first run: the copy (``bound``) and, for a row map, the launches
    before it (``bound_rows``: the block counts', None where the scan is not counted, and the map's)."""

    __slots__ = ("kind", "config", "device", "select", "block", "bound", "bound_rows")

    def __init__(self, kind: str, config: KernelConfig, n: int, device: torch.device):
        """n: N, or any N of its dispatch bucket (the thresholds start buckets)."""
        self.kind, self.config = kind, config
        self.select = kind == DEVICE_ROWS and selects(n)
        self.block = None if self.select else scan_block(max(n, 1))
        self.device = device.index if device.type == "cuda" else -1
        self.bound = self.bound_rows = None


class Prepared:
    """A decided merge, ready to run: the ``decision`` (what explain() returns), for HOST_ROWS, DEVICE_FUSED,
    DEVICE_ROWS and POSITIONS its ``launch``, whether it merges at row ``positions`` rather than at a mask, and
    where the launch reads dst, src and the mask as they are (the layout facts of prepare's inputs, which the
    signature of a memoized entry fixes): ``fixed`` = (H, dst row stride, src row stride), what the bound
    kernels take, and ``spans`` = (dst's, src's element size, the mask's where it is on dst's device, else 0),
    what ``may_share`` reads; else both None."""

    __slots__ = ("decision", "launch", "positions", "fixed", "spans")

    def __init__(self, decision: Decision, launch: Launch | None, positions: bool = False,
                 fixed: tuple | None = None, spans: tuple | None = None):
        self.decision, self.launch, self.positions, self.fixed, self.spans = decision, launch, positions, fixed, spans

    def may_share(self, at: tuple) -> tuple[bool, bool]:
        """Whether the mask (or positions), and src, of a call with addresses and sizes ``at`` (core._signature)
        may share dst's bytes: whether the address spans they can touch meet (unit column strides, strides >= 0:
        no span, no share). A mask is N bytes, positions M entries."""
        mask_ptr, dst_ptr, src_ptr, n, m = at
        h, dst_row, src_row = self.fixed
        dst_size, src_size, mask_size = self.spans
        dst_end = dst_ptr + ((n - 1) * dst_row + h) * dst_size
        mask_end = mask_ptr + (m if self.positions else n) * mask_size
        return (mask_size != 0 and mask_ptr < dst_end and dst_ptr < mask_end,
                src_ptr < dst_end and dst_ptr < src_ptr + ((m - 1) * src_row + h) * src_size)


def prepare(decision: Decision, n: int, dst: torch.Tensor, mask: torch.Tensor, src, positions: bool = False) -> Prepared:
    """What runs ``decision`` for N = n rows of ``dst``, ``mask`` and ``src`` (core.py memoizes it per input
    signature: only the facts of the signature are read here)."""
    launch = fixed = spans = None
    if decision.kind in _LAUNCHED:
        launch = Launch(decision.kind, decision.config, n, dst.device)
        mask_near = mask.device == dst.device
        if (type(src) is torch.Tensor and dst.dim() == 2 and dst.stride(1) == 1 and not src.is_neg()
                and (src.stride(1) == 1 or src.shape[1] == 1) and mask.dim() == 1
                and (not mask_near or mask.is_contiguous())):
            fixed = (dst.shape[1], dst.stride(0), src.stride(0))
            spans = (dst.element_size(), src.element_size(), mask.element_size() if mask_near else 0)
    return Prepared(decision, launch, positions, fixed, spans)


def run(prepared: Prepared, dst: torch.Tensor, mask: torch.Tensor, src, accumulate: bool, sync_count: bool = False,
        plan=None, stride: int | None = None, *, rowmap: RowMap | None = None, at: tuple | None = None) -> None:
    """dst[mask] = src (or +=) in place, as ``prepared`` says. Inputs checked and free of shared memory (core.py).

    dst: [..., H]; mask: bool of shape dst.shape[:-1]; src: [M, H], or for kind ITEMS an ItemList sharing the row
    ``stride``. plan: the MergePlan of the mask (PLAN_ROWS reads its row map). rowmap: a row map in hand instead
    (merge_triton), whose device count bounds the rows that move. Raises CountMismatch before anything is written
    where the count is known without a sync (a CPU mask, a plan of one) or asked for (``sync_count``)."""
    if prepared.positions:
        _run_at(prepared, dst, mask, src, accumulate, sync_count)
        return
    fixed = prepared.fixed
    if fixed is not None and plan is None and rowmap is None:  # the common call: straight to the launch
        if at is None:
            at = (mask.data_ptr(), dst.data_ptr(), src.data_ptr(), dst.shape[0], src.shape[0])
        m = at[4]
        if sync_count or m == 0 or fixed[0] == 0:
            check_count(mask, m, None, sync_count)
            if m == 0 or fixed[0] == 0:
                return
        launch = prepared.launch
        if launch.device >= 0 and launch.device != _current_device():
            with torch.cuda.device(launch.device):
                _launch(launch, dst, mask, src, accumulate, at, fixed)
        else:
            _launch(launch, dst, mask, src, accumulate, at, fixed)
        _bump((dst,))
        return
    decision = prepared.decision
    kind = decision.kind
    listed = type(src) is ItemList
    m = sum(src.rows) if listed else src.shape[0]
    empty = m == 0 or dst.shape[-1] == 0
    cpu_mask = mask.is_cpu
    # The count: known without a sync (a CPU mask, a plan of one) or asked for; a CPU mask's staged map counts
    # itself (cpu_rows). A device mask otherwise moves min(K, M) rows.
    if rowmap is None and (cpu_mask or plan is not None or sync_count) and (
            empty or plan is not None or kind not in _COUNTED_BY_MAP or not cpu_mask):
        check_count(mask, m, plan, sync_count)
    if empty:
        return
    if kind is None:  # a PyTorch path
        RUNNERS[decision.path](dst, mask, torch.cat(src.tensors) if listed else src, accumulate)
        return
    dst2d = dst if dst.dim() == 2 and dst.stride(1) == 1 else rows_view(dst, "triton")
    config = decision.config
    if plan is not None:
        rowmap = plan.rowmap
    if kind == ITEMS:
        if rowmap is None and mask.is_cuda:
            rowmap = device_rows(mask, m)
        merge_items(dst2d, mask, src, stride, accumulate, config, rowmap)
    else:
        if listed:  # decided concatenated
            src = torch.cat(src.tensors)
        src = _readable(src)
        if kind == PLAN_ROWS:
            row_copy(dst2d, src, rowmap.rows, rowmap.count, ADD if accumulate else COPY, config)
        else:
            launch = prepared.launch
            # A device mask's bytes as the kernels read them (a copy only if strided), alive until queued.
            flat = mask if cpu_mask or (mask.dim() == 1 and mask.is_contiguous()) else mask_bytes(mask)
            at = (flat.data_ptr(), dst2d.data_ptr(), src.data_ptr(), dst2d.shape[0], m)
            layout = (dst2d.shape[1], dst2d.stride(0), src.stride(0))
            if launch.device >= 0 and launch.device != _current_device():
                with torch.cuda.device(launch.device):
                    _launch(launch, dst2d, flat, src, accumulate, at, layout)
            else:
                _launch(launch, dst2d, flat, src, accumulate, at, layout)
    _bump((dst,))  # the kernels write behind autograd's back, as any in-place op bumps it


def _readable(src: torch.Tensor) -> torch.Tensor:
    """src as the kernels read it: raw memory (a negative bit resolved; a negated destination is refused by
    dispatch), unit column stride."""
    if src.is_neg():
        src = src.resolve_neg()
    if src.stride(1) != 1 and src.shape[1] != 1:
        src = src.contiguous()
    return src


def _run_at(prepared: Prepared, dst: torch.Tensor, positions: torch.Tensor, src: torch.Tensor, accumulate: bool,
            check: bool) -> None:
    """dst[positions] = src (or +=): dst [N, H], positions [M] (checked against src's M by core.check_call).
    CPU positions (and device ones with ``check``: one sync) are checked on the host before anything is written
    (rowmap.check_positions) and staged; device ones are read in place by the kernel, which skips those out of
    range. Where the signature fixes the layout (``prepared.fixed``) a later call launches the kernel bound on the
    first, with addresses as ints."""
    decision = prepared.decision
    n, h = dst.shape
    host = host_positions(positions, n) if positions.is_cpu or check else None
    m = src.shape[0]
    if m == 0 or h == 0:
        return
    if decision.kind is None:
        POSITION_RUNNERS[decision.path](dst, positions, src, accumulate)
        return
    launch, fixed, config = prepared.launch, prepared.fixed, decision.config
    if fixed is None:
        src = _readable(src)
    mode = ADD if accumulate else COPY
    if not positions.is_cpu and not positions.is_contiguous():
        positions = positions.contiguous()
    if launch.device >= 0 and launch.device != _current_device():
        with torch.cuda.device(launch.device):
            _launch_at(launch, fixed, dst, positions, host, src, mode, config)
    else:
        _launch_at(launch, fixed, dst, positions, host, src, mode, config)
    _bump((dst,))


_CPU_POSITIONS = ("CPU positions cannot be captured in a CUDA graph: they are checked and staged per call. Capture "
                  "with positions on the GPU.")


def _launch_at(launch: Launch, fixed, dst, positions, host, src, mode: int, config: KernelConfig) -> None:
    """The POSITIONS launch: device positions read in place (bounded), or the checked host ones staged."""
    if host is not None and launch.device < 0:  # the interpreter reads host memory
        row_copy(dst, src, torch.from_numpy(host.astype(np.int32)), None, mode, config)
        return
    if positions.is_cpu:
        refuse_capture(dst.device, _CPU_POSITIONS)
        with arena(launch.device) as ring:  # the reservation and the launch that reads it: one session
            rows = ring.put_int32(host)
            _bound_row_copy(launch, fixed, dst, rows, rows.ptr, src, mode, config, False)
    else:
        _bound_row_copy(launch, fixed, dst, positions, positions.data_ptr(), src, mode, config, True)


def _bound_row_copy(launch: Launch, fixed, dst, rows, rows_ptr: int, src, mode: int, config: KernelConfig,
                    bounded: bool) -> None:
    """row_copy through ``rows``: the kernel bound on the entry's first call where the layout is fixed."""
    if launch.bound is None or fixed is None:
        bound = row_copy(dst, src, rows, None, mode, config, bounded)
        if fixed is not None:
            launch.bound = bound
        return
    m = src.shape[0]
    launch.bound(cdiv(m, config.rows), _raw_stream(launch.device), dst.data_ptr(), src.data_ptr(), rows_ptr,
                 rows_ptr, dst.shape[0], m, *fixed)


def run_modalities(config: KernelConfig, dst2d: torch.Tensor, rows, srcs: list[torch.Tensor],
                   accumulate: bool) -> None:
    """dst2d [N, H] rows ``rows[j]`` = the j-th row of the concatenated ``srcs`` (or +=), in one launch
    (modalities.py). rows: a checked host map [M] int32 (staged), or a device map [M] int32 whose entries outside
    [0, N) are skipped. The sources are read in place as a list's items where they share a row layout, else
    concatenated first."""
    m = sum(src.shape[0] for src in srcs)
    if m == 0 or dst2d.shape[1] == 0:
        return
    host = rows if isinstance(rows, np.ndarray) else None
    stride = common_row_stride(srcs)
    mode = ADD if accumulate else COPY
    if stride is not None and not any(map(torch.Tensor.is_neg, srcs)):
        merge_items(dst2d, None, ItemList.of(srcs), stride, accumulate, config,
                    rowmap=None if host is not None else RowMap(rows, None), host=host, bounded=host is None)
    else:
        src = _readable(torch.cat(srcs) if len(srcs) > 1 else srcs[0])
        if host is None:
            row_copy(dst2d, src, rows, None, mode, config, bounded=True)
        elif dst2d.device.type != "cuda":
            row_copy(dst2d, src, torch.from_numpy(host), None, mode, config)
        else:
            refuse_capture(dst2d.device)
            with arena(dst2d.device.index) as ring:
                row_copy(dst2d, src, ring.put_int32(host), None, mode, config)
    _bump((dst2d,))


def merge_triton(dst: torch.Tensor, mask: torch.Tensor, src: torch.Tensor, accumulate: bool,
                 rowmap: RowMap | None = None, config: KernelConfig | None = None) -> None:
    """The Triton path with an explicit ``config`` (the tuner's sweeps, the kernel tests): run as decided with it,
    through ``rowmap`` where one is given (then its count bounds the rows that move: no count check)."""
    if config is None:
        raise TypeError("merge_triton needs a KernelConfig")
    if not supports(dst.device):
        raise RuntimeError("path='triton' runs on CUDA tensors; to run it on the CPU, set TRITON_INTERPRET=1 "
                           "before importing mmmerge_triton")
    check_fits(mask.numel(), "path='triton'")
    kind = launch_kind(config, mask, rowmap is not None, False)
    decision = Decision("triton", kind, config, False, "an explicit configuration")
    run(prepare(decision, mask.numel(), dst, mask, src), dst, mask, src, accumulate, rowmap=rowmap)


def _launch(launch: Launch, dst, mask, src, accumulate, at, layout) -> None:
    """HOST_ROWS, DEVICE_FUSED, DEVICE_ROWS. ``at``: (mask address, dst address, src address, N, M); ``layout``:
    (H, dst row stride, src row stride); as the bound kernels take them."""
    kind, device, bound, config = launch.kind, launch.device, launch.bound, launch.config
    mask_ptr, dst_ptr, src_ptr, n, m = at
    h, dst_stride, src_stride = layout
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
                bound(cdiv(m, config.rows), _raw_stream(device), dst_ptr, src_ptr, rows_ptr, rows_ptr, n, m, h,
                      dst_stride, src_stride)
    elif kind == DEVICE_FUSED:
        if bound is None:
            launch.bound = mask_row_copy(dst, src, RawPointer(mask_ptr, torch.uint8), mode, config)
        else:
            bound(cdiv(n, config.rows), _raw_stream(device), dst_ptr, src_ptr, mask_ptr, n, m, h, dst_stride,
                  src_stride)
    elif launch.select:  # DEVICE_ROWS with no row map: one launch, its programs counting the mask's blocks
        if bound is None:
            launch.bound = (mask_select_copy(dst, src, RawPointer(mask_ptr, torch.uint8), None, mode, config)
                            or (None, None))[1]
            return
        programs = cdiv(n, SELECT_BLOCK)
        state = workspace(dst.device, programs).data_ptr()
        bound(select_grid(n, m, config.rows, device), _raw_stream(device), dst_ptr, src_ptr, mask_ptr, state, state,
              n, programs, m, h, dst_stride, src_stride)
    else:  # DEVICE_ROWS: in one fresh device buffer the map (M entries), the count at 16 bytes, the block counts
        capacity = -(-m // 4) * 4
        programs = cdiv(n, launch.block)
        buffer = torch.empty(capacity + 4 + programs, dtype=torch.int32, device=dst.device)  # alive until queued
        rows = buffer.data_ptr()
        count = rows + 4 * capacity
        counts = count + 16
        if launch.bound_rows is None or bound is None:
            launch.bound_rows = mask_to_rows(RawPointer(mask_ptr, torch.uint8), RawPointer(rows, torch.int32),
                                             RawPointer(count, torch.int32), m, n, launch.block,
                                             RawPointer(counts, torch.int32))
            launch.bound = row_copy(dst, src, RawPointer(rows, torch.int32), RawPointer(count, torch.int32), mode,
                                    config, after_scan=True)
            return
        stream = _raw_stream(device)
        count_blocks, build_rows = launch.bound_rows
        if count_blocks is not None:
            count_blocks(programs, stream, mask_ptr, counts, n)
        build_rows(programs, stream, mask_ptr, rows, count, counts, n, m)
        bound(cdiv(m, config.rows), stream, dst_ptr, src_ptr, rows, count, n, m, h, dst_stride, src_stride)


def gather(dense: torch.Tensor, mask: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
    """The backward gather: [m, H], row j the j-th masked row of ``dense`` [..., H] cast to ``dtype`` (zero past
    the mask's true rows). A CPU mask's first min(K, m) rows staged (stage_rows), a device mask's map built there."""
    dense2d = as_rows(dense.contiguous())
    out = torch.zeros(m, dense2d.shape[1], dtype=dtype, device=dense.device)
    if mask.device.type == "cpu":
        rows = host_rows(mask)[:m]
        (rows, count), out_rows = stage_rows(rows, dense.device), out[: rows.size]
    else:
        (rows, count), out_rows = device_rows(mask, m), out
    row_copy(dense2d, out_rows, rows, count, GATHER, row_map_config(dense2d.shape[1]))
    return out


_request_rows = FastKernel(request_rows_kernel)
_request_row_copy = FastKernel(request_row_copy_kernel)


def run_requests(dst: torch.Tensor, mask: torch.Tensor, tables: tuple, n_requests: int, m: int, first, n_items: int,
                 stride: int, align: int, block: int) -> torch.Tensor:
    """merge_requests' device route: request_rows_kernel (grid R: each request's count, status and part of the
    row map), then request_row_copy_kernel over the M embedding rows. ``tables``: pointers (or interpreter
    tensors) to the request offsets, their first embedding rows, the item starts and item offsets (requests.py
    stages them). first: the first item, which the item offsets address from. Returns the status [R] bool."""
    device, hidden = dst.device, dst.shape[1]
    offsets, src_starts, item_starts, item_offsets = tables
    status = torch.empty(n_requests, dtype=torch.bool, device=device)
    rows = torch.empty(max(m, 1), dtype=torch.int32, device=device)
    mask8 = mask_bytes(mask)
    index = device.index
    _request_rows.launch((index, mask8.data_ptr() % 16, block), (n_requests, 1),
                         (mask8, offsets, src_starts, rows, status.view(torch.uint8)), (block, PREFIX_CHUNK), (8, 1),
                         index)
    if m == 0 or hidden == 0:
        return status
    if align > 1 and (stride * first.element_size()) % 16:
        align = 1
    cfg = row_map_config(hidden)
    steps = max(1, (n_items - 1).bit_length())
    key = (index, dst.dtype, first.dtype, dst.data_ptr() % 16, first.data_ptr() % 16, hidden, dst.stride(0),
           stride, m > 0x7FFFFFFF, steps, align, cfg)
    _request_row_copy.launch(key, (cdiv(m, cfg.rows), 1),
                             (dst, first, item_offsets, item_starts, rows, m, n_items, hidden, dst.stride(0), stride),
                             (cfg.rows, cfg.block_h, steps, align), (cfg.num_warps, cfg.num_stages), index)
    _bump((dst,))
    return status

