"""Row copies between a dense tensor and its masked rows, driven by a row map.

The row map is the inverse of the mask's exclusive prefix sum: with ``offsets = cumsum(mask) - mask``,
``rows[offsets[i]] = i`` for every true ``mask[i]``. Iterating over ``rows`` sizes the grid by the M rows
that move, so no program idles on an unmasked row. A map the caller wrote (row positions on the device, or
per-modality maps with unused entries) is read BOUNDED: an entry outside [0, N) is skipped.
"""
import triton
import triton.language as tl

from .row_tiles import move_rows, put_tile

# MODE values (the kernels compare literals: a jit function reads no plain module globals).
COPY = 0  # dense[rows[j]] = cast(compact[j])
ADD = 1  # dense[rows[j]] += cast(compact[j])
GATHER = 2  # compact[j] = cast(dense[rows[j]])


@triton.jit(do_not_specialize=["n_dense", "n_rows"])
def row_copy_kernel(
    # pointers
    dense_ptr,  # [N, H], unit column stride
    compact_ptr,  # [M, H], unit column stride
    rows_ptr,  # [>= M] int32 (int64 if BOUNDED): rows_ptr[j] = dense row of compact row j
    count_ptr,  # [1] int32: how many entries of rows_ptr are valid (read only if HAS_COUNT)
    # sizes
    n_dense,  # N (read only if BOUNDED)
    n_rows,  # M
    H,
    # strides, in elements
    stride_dense_row,
    stride_compact_row,
    # meta-parameters
    MODE: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    BOUNDED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    AFTER_SCAN: tl.constexpr,  # a programmatic dependent launch after the scan that writes rows_ptr and count_ptr
):
    """Program p moves compact rows j in [p*ROWS, p*ROWS + ROWS). Only rows j < min(n_rows, count) move,
    so a row map with fewer (or more) valid rows than n_rows never reads or writes out of bounds; BOUNDED,
    only those whose entry lies in [0, n_dense). COPY and ADD read the compact rows' first BLOCK_H columns before
    the map; AFTER_SCAN (Hopper and later, scatter.row_copy) they wait for the scan only after that read."""
    j = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    compact_rows = compact_ptr + j.to(tl.int64)[:, None] * stride_compact_row
    cols = tl.arange(0, BLOCK_H)
    if MODE != 2:
        # The compact rows' first BLOCK_H columns are read before the map: their loads do not wait on the map's
        # (a chain of two latencies, three with a count), and after a scan they overlap it (AFTER_SCAN).
        first = tl.load(compact_rows + cols[None, :], mask=(j < n_rows)[:, None] & (cols < H)[None, :])
        if AFTER_SCAN:
            tl.extra.cuda.gdc_wait()  # the scan has finished and its map and count are visible
    limit = n_rows
    if HAS_COUNT:
        limit = tl.minimum(tl.load(count_ptr), n_rows)
    row_ok = j < limit
    dense_row = tl.load(rows_ptr + j, mask=row_ok, other=0).to(tl.int64)  # 64-bit: N*H may pass 2**31
    if BOUNDED:
        row_ok = row_ok & (dense_row >= 0) & (dense_row < n_dense)
    dense_rows = dense_ptr + dense_row[:, None] * stride_dense_row
    if MODE != 2:
        put_tile(dense_rows + cols[None, :], first, row_ok[:, None] & (cols < H)[None, :], MODE)
        move_rows(dense_rows + BLOCK_H, compact_rows + BLOCK_H, row_ok, H - BLOCK_H, MODE, BLOCK_H)
    else:
        move_rows(dense_rows, compact_rows, row_ok, H, MODE, BLOCK_H)
