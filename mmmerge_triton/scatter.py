"""Host side of the Triton kernels: the views they take (row views, mask bytes) and their launches."""
from __future__ import annotations

import functools

import torch

from .kernel_config import KernelConfig, cdiv, next_pow2
from .kernels.mask_row_copy import mask_row_copy_kernel
from .kernels.mask_rows import mask_block_counts_kernel, mask_to_rows_kernel
from .kernels.mask_select_copy import mask_select_copy_kernel
from .kernels.row_copy import ADD, COPY, GATHER, row_copy_kernel
from .launch import INTERPRET, Bound, FastKernel
from .rowmap import MAX_ROWS, RowMap
from .workspaces import workspace

_row_copy = FastKernel(row_copy_kernel)
_mask_row_copy = FastKernel(mask_row_copy_kernel)
_mask_to_rows = FastKernel(mask_to_rows_kernel)
_mask_block_counts = FastKernel(mask_block_counts_kernel)
_mask_select_copy = FastKernel(mask_select_copy_kernel)

PREFIX_CHUNK = 4096  # mask bytes per step when a program counts the true rows before its block
SCAN_PREFIX_CHUNK, SCAN_PREFIX_LOADS = 32768, 2
"""The same for mask_to_rows (the row map of a device mask), and its loads in flight per step: its last program
counts N - BLOCK bytes, a latency-bound loop that sets the map's time. The scan alone on an H100 (64 programs,
8 warps), by bytes: 32.6 µs at 4096 bytes per step, 20.9 at 8192, 32.6 at 16384, 15.3 at 32768 at N = 262144
(2026-12-06-s4/device_mask_profile.log); in words (row_tiles.count_true_before), N = 32768 / 131072 / 262144 /
1048576: 3.6 / 6.4 / 10.1 / 34.5 µs at 32 KB x 2 loads, against 3.8 / 8.6 / 15.3 / 53.6 by bytes, 32 KB x 1, and
5.8 / 12.7 / 9.9 / 33.0 at 32 KB x 4 (2026-12-06-s6/prefix_count.log)."""


def words(mask_align: int) -> bool:
    """Whether the kernels count a mask's true rows in 4-byte words, from its address mod 16 (which the launch
    keys hold): where the address is 4-byte aligned."""
    return mask_align % 4 == 0


@functools.cache
def dependent_launch(device_index: int) -> bool:
    """Whether a row copy after a scan on this CUDA device starts while the scan runs (programmatic dependent
    launch: NVIDIA compute capability 9.0 and later; not under the interpreter or on ROCm). On an H100 (H = 4096,
    bf16, scattered rows, CUDA events with the GPU kept busy) the two launches ran 1.236x a copy of the same bytes
    at N = 32768 with 5% of the rows against 1.363x launched one after the other, 1.065x against 1.086x with half,
    1.170x / 1.030x against 1.198x / 1.034x at N = 262144 (bench/results/h100/2026-12-06-s7/device_mask_overlap.log)."""
    return not INTERPRET and torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9


def supports(device: torch.device) -> bool:
    """Whether the Triton path can run on tensors of ``device``."""
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


def mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask of any shape and layout as contiguous bytes [N] uint8, as the kernels read it (a copy only
    for a strided or expanded mask)."""
    flat = mask.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return flat.view(torch.uint8)


def row_copy(dense, compact, rows, count, mode: int, cfg: KernelConfig, bounded: bool = False,
             after_scan: bool = False) -> Bound | None:
    """Move rows between ``dense`` [N, H] and ``compact`` [M, H] (unit column strides) through a row map.

    rows: [>= M] int32 (a tensor, or a RawPointer into pinned memory), 16-byte aligned; with ``bounded``, int32
    or int64 entries of any value, those outside [0, N) skipped (a map the caller wrote: row positions).
    count: [1] int32 on the device, the valid entries of rows (only j < min(count, M) move); None: all M.
    mode: COPY or ADD write dense rows, GATHER writes compact rows.
    after_scan: the launch comes right after mask_to_rows wrote ``rows`` and ``count`` on this stream (COPY or
    ADD): where dependent_launch(), it starts while the scan runs and reads its first source columns then.
    Returns the kernel as bound for this launch (None under the interpreter, or if nothing moved): a later
    launch of the same layout calls it with (grid_x, stream, dense, compact, rows, count or rows, N, M, H,
    dense row stride, compact row stride).
    """
    n_rows, hidden = compact.shape
    if n_rows == 0 or hidden == 0:
        return None
    device = dense.device.index
    sd, sc = dense.stride(0), compact.stride(0)
    has_count = count is not None
    after_scan = after_scan and mode != GATHER and dependent_launch(device)
    # Raw sizes in the key, not their classes: they are stable per model, and this is the hot path.
    key = (device, dense.dtype, compact.dtype, rows.dtype, dense.data_ptr() % 16, compact.data_ptr() % 16, hidden,
           sd, sc, n_rows > 0x7FFFFFFF, dense.shape[0] > 0x7FFFFFFF, mode, has_count, bounded, after_scan, cfg)
    return _row_copy.launch(
        key,
        (cdiv(n_rows, cfg.rows), 1),
        (dense, compact, rows, count if has_count else rows, dense.shape[0], n_rows, hidden, sd, sc),
        (mode, has_count, bounded, cfg.rows, cfg.block_h, after_scan),
        (cfg.num_warps, cfg.num_stages, after_scan),
        device,
    )


def mask_row_copy(dense, compact, mask_bytes, mode: int, cfg: KernelConfig) -> Bound | None:
    """Move rows between ``dense`` [N, H] and ``compact`` [M, H] straight from ``mask_bytes`` [N] uint8 on the
    device, in one launch. True rows past M, and compact rows past the mask's count, are left alone.
    Returns the bound kernel, as row_copy does; its arguments: (grid_x, stream, dense, compact, mask_bytes, N,
    M, H, dense row stride, compact row stride)."""
    n = dense.shape[0]
    n_rows, hidden = compact.shape
    if n > MAX_ROWS - PREFIX_CHUNK:  # its prefix count's byte loop indexes up to N + PREFIX_CHUNK in int32
        raise ValueError(f"the one-launch kernel takes at most {MAX_ROWS - PREFIX_CHUNK} mask rows (got {n}); "
                         "use a two-launch configuration (KernelConfig(..., fused=False))")
    if n == 0 or n_rows == 0 or hidden == 0:
        return None
    device = dense.device.index
    sd, sc = dense.stride(0), compact.stride(0)
    mask_align = mask_bytes.data_ptr() % 16
    key = (device, dense.dtype, compact.dtype, dense.data_ptr() % 16, compact.data_ptr() % 16, mask_align, hidden,
           sd, sc, mode, cfg)
    return _mask_row_copy.launch(
        key,
        (cdiv(n, cfg.rows), 1),
        (dense, compact, mask_bytes, n, n_rows, hidden, sd, sc),
        (mode, cfg.rows, cfg.block_h, PREFIX_CHUNK, words(mask_align)),
        (cfg.num_warps, cfg.num_stages),
        device,
    )


COUNTED_FROM = 65536
"""Masks of this many rows and more are scanned in two levels (mask_block_counts_kernel, then mask_to_rows_kernel
summing the counts before each block); shorter ones in one launch, each program counting the bytes before its
block itself (its last program reads N bytes alone). The scan alone on an H100, busy GPU, one launch against two:
6.0 / 6.7 / 14.7 / 22.9 / 34.5 µs against 6.9 / 6.9 / 6.7 / 7.0 / 11.2 at N = 32768 / 65536 / 131072 / 262144 / 1M;
the merge (H = 4096, bf16, 5% of the rows) 1.281 / 1.185 / 1.358 / 1.311x a copy against 1.309 / 1.192 / 1.137 /
1.094x at N = 32768-262144 (bench/results/h100/2026-12-06-s8/counted_scan_c2c01fa.log). A power of two: every N of
a dispatch bucket falls on one side."""
COUNTED_TILE = 1024  # mask bytes per program of the counted scan, up to COUNTED_PROGRAMS programs
COUNTED_PROGRAMS = 1024  # past it blocks grow (a program sums up to this many counts)
COUNTS_CHUNK = 1024  # block counts a program of the counted scan sums per step
SCAN_TILE = 16384  # the most mask bytes one step of the in-block cumsum holds


def scan_block(n: int) -> int:
    """Mask bytes per program of the row-map scan of N rows: counted (COUNTED_FROM), COUNTED_TILE up to
    COUNTED_PROGRAMS programs, then as many as N needs; else one_launch_block(N)."""
    if counted(n):
        return max(COUNTED_TILE, next_pow2(cdiv(n, COUNTED_PROGRAMS)))
    return one_launch_block(n)


def one_launch_block(n: int) -> int:
    """Mask bytes per program of the one-launch scan: 1024 to 16384, about 64 programs up to N = 1M (each
    program re-reads the mask before its block: few programs, large blocks)."""
    return min(max(1024, next_pow2(cdiv(n, 64))), SCAN_TILE)


def counted(n: int) -> bool:
    """Whether the row map of an N-row mask is scanned in two levels (COUNTED_FROM)."""
    return n >= COUNTED_FROM


def mask_to_rows(mask_bytes, rows, count, capacity: int, n: int | None = None, block: int | None = None,
                 counts=None) -> tuple[Bound | None, Bound | None] | None:
    """Write the row map of ``mask_bytes`` [N] uint8 into ``rows`` [>= capacity] int32 and its true-row count
    into ``count`` [1] int32, on the device; entries past ``capacity`` are dropped. ``mask_bytes``, rows and
    count: tensors, or RawPointers on the device (then pass ``n``). ``block``: mask bytes per program (default
    scan_block(N); any power of two from 1024 gives the same map). ``counts``: [>= cdiv(N, block)] int32 scratch
    for the block counts where ``counted(N)`` (default: allocated here; passed on unread otherwise).
    Returns the kernels as bound, as row_copy does (None under the interpreter): the block counts' (None where
    not counted), arguments (grid_x = cdiv(N, block), stream, mask_bytes, counts, N); the map's, arguments
    (grid_x, stream, mask_bytes, rows, count, counts, N, capacity). None if N = 0."""
    n = mask_bytes.numel() if n is None else n
    if n == 0:
        count.zero_()
        return None
    block = block or scan_block(n)
    device = rows.device.index if isinstance(rows, torch.Tensor) else torch.cuda.current_device()
    mask_align = mask_bytes.data_ptr() % 16  # Triton's alignment and words()
    overlap = dependent_launch(device)  # each launch may start while the one before it runs (else no effect)
    grid = (cdiv(n, block), 1)
    tile = min(block, SCAN_TILE)
    bound_counts = None
    if counted(n):
        if counts is None:
            counts = torch.empty(grid[0], dtype=torch.int32, device=mask_bytes.device)
        key = (device, mask_align, counts.data_ptr() % 16, block, tile, overlap)
        bound_counts = _mask_block_counts.launch(key, grid, (mask_bytes, counts, n), (block, tile, overlap), (4, 1),
                                                 device)
        constexprs = (block, tile, True, overlap, COUNTS_CHUNK, SCAN_PREFIX_CHUNK, SCAN_PREFIX_LOADS, False,
                      overlap)
        options = (4, 1, overlap)
    else:
        counts = rows if counts is None else counts  # not read: COUNTED is off
        constexprs = (block, tile, False, False, COUNTS_CHUNK, SCAN_PREFIX_CHUNK, SCAN_PREFIX_LOADS,
                      words(mask_align), overlap)
        options = (8, 1)
    key = (device, mask_align, rows.data_ptr() % 16, counts.data_ptr() % 16, constexprs)
    bound_rows = _mask_to_rows.launch(key, grid,
                                      (mask_bytes, rows, count, counts, n, capacity), constexprs, options, device)
    return bound_counts, bound_rows


SELECT_BELOW = 524288
"""A device mask of fewer rows merges without a row map (mask_select_copy: the block counts, then the row copy,
each program finding its own dense rows from them); from here on through the map (mask_to_rows, row_copy), where a
program's sum over every block's count would grow with N. On an H100 (H = 4096, bf16, 5% and half the rows, image
blocks and scattered rows, N = 16384-262144; CUDA events, L2 flushed, the GPU kept busy) it took 0.96-0.99x the
map's device time at 19 of 20 points, 1.03x (0.5 µs more) at N = 32768 with 5% scattered, and 0.94-1.03x its idle
time through the executor's bound launches (bench/results/h100/2026-12-06-s12/select_copy_3ea2e0a.log), one launch
fewer from COUNTED_FROM: the copy's first programs wait for the counts' launch alone, not for a map's launch after
it. A power of two: every N of a dispatch bucket falls on one side."""
SELECT_BLOCK = 1024  # mask bytes per block count
SELECT_COUNTS = SELECT_BELOW // SELECT_BLOCK  # the most block counts a program of mask_select_copy sums


def selects(n: int) -> bool:
    """Whether a device mask of N rows merges without a row map (SELECT_BELOW)."""
    return n < SELECT_BELOW


def select_sums(n: int) -> int:
    """The block counts a program of mask_select_copy sums for a mask of N rows: a power of two that holds every
    block count of any N of the same bit length (so of N's dispatch bucket: an executor Launch's bound copy,
    compiled for its first N, serves the bucket), 16 to SELECT_COUNTS. Summing SELECT_COUNTS at every N (512
    counts where N = 16384 has 16) took 1.3-1.4 µs more per merge at N = 16384 with 5% of the rows on an H100, and
    as much as this width within 0.8 µs from N = 32768 (2026-12-06-s12/select_copy_3ea2e0a.log, select_sums512)."""
    return min(SELECT_COUNTS, max(16, 1 << max(n.bit_length() - SELECT_BLOCK.bit_length() + 1, 0)))


SELECT_OWNERS = 128
"""One launch (mask_select_copy without ``counts``): the most programs that count the mask's blocks, each
SELECT_BLOCK bytes at a time. Fewer than the SMs of the GPUs it serves, so that on an idle GPU every counting
program runs while the others wait for its counts (kernels/mask_select_copy.py, published_counts)."""
SELECT_SPINS = 256
"""One launch: reads of the published block counts before a program counts the missing blocks itself (1 under
the interpreter, which runs programs one after another)."""


def mask_select_copy(dense, compact, mask_bytes, counts, mode: int, cfg: KernelConfig,
                     spins: int | None = None) -> tuple[Bound | None, Bound] | None:
    """Move ``compact`` [M, H] into the rows of ``dense`` [N, H] (unit column strides) where ``mask_bytes`` [N] uint8
    is nonzero, in order, on the device, with no row map: compact row j goes to the dense row of the j-th true
    byte, for j < min(M, true bytes). N: at most select_sums(N) block counts (SELECT_COUNTS), the counts a
    program sums. mode: COPY or ADD. ``mask_bytes`` and ``counts``: tensors or RawPointers on the device.
    ``counts`` [>= cdiv(N, SELECT_BLOCK)] int32: mask_block_counts_kernel writes the block counts there, then
    mask_select_copy_kernel (a programmatic dependent where dependent_launch()) moves the rows. ``counts`` None:
    one launch, whose programs count the blocks and publish them in the stream's scan workspace
    (workspaces.workspace); ``spins`` overrides SELECT_SPINS.
    Returns the kernels as bound (each None under the interpreter), as row_copy does: the counts' (None in one
    launch), arguments (grid_x = cdiv(N, SELECT_BLOCK), stream, mask_bytes, counts, N); the copy's, arguments
    (grid_x = select_grid(N, M, cfg.rows, device in one launch), stream, dense, compact, mask_bytes, counts, workspace (or counts),
    N, cdiv(N, SELECT_BLOCK), M, H, dense row stride, compact row stride). None if nothing moves."""
    n = dense.shape[0]
    n_rows, hidden = compact.shape
    programs = cdiv(n, SELECT_BLOCK)
    sums = select_sums(n)
    if mode not in (COPY, ADD) or programs > sums:
        raise ValueError(f"mask_select_copy copies or adds (mode {mode}) up to {SELECT_COUNTS * SELECT_BLOCK} mask "
                         f"rows (got {n})")
    if n == 0 or n_rows == 0 or hidden == 0:
        return None
    device = dense.device.index
    one_launch = counts is None
    mask_align = mask_bytes.data_ptr() % 16
    bound_counts = None
    if one_launch:
        overlap = False
        owned = max(1, sums // SELECT_OWNERS)
        sums = max(sums, 32 * cfg.num_warps)  # a thread per status word at most (published_counts)
        spins = (1 if INTERPRET else SELECT_SPINS) if spins is None else spins
        counts = state = workspace(dense.device, programs)
    else:
        overlap = dependent_launch(device)
        owned = spins = 1
        key = (device, mask_align, counts.data_ptr() % 16, SELECT_BLOCK, SELECT_BLOCK, overlap)  # as mask_to_rows'
        bound_counts = _mask_block_counts.launch(key, (programs, 1), (mask_bytes, counts, n),
                                                 (SELECT_BLOCK, SELECT_BLOCK, overlap), (4, 1), device)
        state = counts  # not read
    sd, sc = dense.stride(0), compact.stride(0)
    key = (device, dense.dtype, compact.dtype, dense.data_ptr() % 16, compact.data_ptr() % 16, mask_align,
           counts.data_ptr() % 16, hidden, sd, sc, n_rows > 0x7FFFFFFF, mode, sums, one_launch, spins, overlap, cfg)
    bound_copy = _mask_select_copy.launch(
        key,
        (select_grid(n, n_rows, cfg.rows, (-1 if INTERPRET else device) if one_launch else None), 1),
        (dense, compact, mask_bytes, counts, state, n, programs, n_rows, hidden, sd, sc),
        (mode, cfg.rows, cfg.block_h, SELECT_BLOCK, sums, overlap, one_launch, owned, spins),
        (cfg.num_warps, cfg.num_stages, overlap),
        device,
    )
    return bound_counts, bound_copy


SELECT_PER_SM = 4
"""One launch: programs per SM of its persistent grid (select_grid), each reading the published block counts once
and then moving every grid-th tile of rows."""


def select_grid(n: int, m: int, rows: int, device: int | None = None) -> int:
    """Programs of mask_select_copy_kernel for N mask rows and M compact rows, ``rows`` per tile: one per tile of
    min(M, N) rows (compact rows past the mask's N never move). ``device``: one launch on that CUDA device (-1:
    the interpreter): a persistent grid of at most SELECT_PER_SM programs per SM, at least one per SELECT_OWNERS
    block counter (extra programs count, then find no row to move)."""
    tiles = cdiv(min(m, n), rows)
    if device is None:
        return tiles
    return max(min(tiles, SELECT_PER_SM * _sm_count(device)), min(cdiv(n, SELECT_BLOCK), SELECT_OWNERS))


@functools.cache
def _sm_count(device: int) -> int:
    """SMs of a CUDA device; 2 under the interpreter (-1), so that its programs loop over several tiles."""
    return 2 if device < 0 else torch.cuda.get_device_properties(device).multi_processor_count


def gather_rows(dense2d, rows, count, n_rows: int, dtype: torch.dtype, cfg: KernelConfig,
                valid: int | None = None) -> torch.Tensor:
    """out[j] = dense2d[rows[j]] cast to ``dtype``: [n_rows, H]. Rows past the map's count, or past ``valid``
    for a count-less map of fewer than n_rows entries, are zero."""
    out = torch.zeros(n_rows, dense2d.shape[1], dtype=dtype, device=dense2d.device)
    row_copy(dense2d, out if valid is None else out[:valid], rows, count, GATHER, cfg)
    return out



def device_rows(mask: torch.Tensor, capacity: int) -> RowMap:
    """The row map of a bool mask on a device (or on the CPU under the interpreter), built there: capacity
    int32 entries (4 bytes per source row) and a count. No sync."""
    rows = torch.empty(max(capacity, 1), dtype=torch.int32, device=mask.device)
    count = torch.empty(1, dtype=torch.int32, device=mask.device)
    mask_to_rows(mask_bytes(mask), rows, count, capacity)
    return RowMap(rows, count)


__all__ = ["COPY", "ADD", "GATHER"]
