"""Row copies driven by a device bool mask's block counts, no row map: each program finds its own dense rows."""
import triton
import triton.language as tl

from .row_tiles import move_rows, put_tile


@triton.jit(do_not_specialize=["n", "n_blocks", "n_rows"])
def mask_select_copy_kernel(
    # pointers
    dense_ptr,  # [N, H], unit column stride
    compact_ptr,  # [M, H], unit column stride
    mask_ptr,  # [N] uint8 (a bool mask viewed as bytes)
    counts_ptr,  # [n_blocks] int32: true bytes of each BLOCK mask bytes (mask_block_counts_kernel)
    # sizes
    n,  # N
    n_blocks,  # cdiv(N, BLOCK), at most COUNTS
    n_rows,  # M
    H,
    # strides, in elements
    stride_dense_row,
    stride_compact_row,
    # meta-parameters
    MODE: tl.constexpr,  # COPY or ADD (row_copy.py)
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK: tl.constexpr,  # mask bytes per count
    COUNTS: tl.constexpr,  # a power of two >= n_blocks: the counts a program sums in registers
    AFTER_COUNTS: tl.constexpr,  # a programmatic dependent launch after mask_block_counts_kernel
):
    """Program p moves compact rows j in [p*ROWS, p*ROWS + ROWS) into the dense row of the mask's j-th true byte
    (any nonzero byte is True), for j < min(n_rows, K) where K is the mask's true bytes: as row_copy_kernel
    through the mask's row map, without one. It reads the compact rows' first BLOCK_H columns, waits for the
    counts (AFTER_COUNTS: Hopper and later, scatter.mask_select_copy), sums them in registers to find the block
    that holds the j-th true byte, and finds the byte in that block's cumsum: two dependent loads (the counts,
    one mask block) where a map costs a second launch that the copy waits for whole."""
    j = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    compact_rows = compact_ptr + j[:, None] * stride_compact_row
    cols = tl.arange(0, BLOCK_H)
    first = tl.load(compact_rows + cols[None, :], mask=(j < n_rows)[:, None] & (cols < H)[None, :])
    if AFTER_COUNTS:
        tl.extra.cuda.gdc_wait()  # the counts are written and visible
    b = tl.arange(0, COUNTS)
    count = tl.load(counts_ptr + b, mask=b < n_blocks, other=0)
    inclusive = tl.cumsum(count, axis=0)
    row_ok = (j < n_rows) & (j < tl.sum(count, axis=0))
    block = tl.sum((inclusive[None, :] <= j[:, None]).to(tl.int32), axis=1)  # blocks wholly before the j-th
    rank = j - tl.sum(tl.where(b[None, :] == block[:, None], (inclusive - count)[None, :], 0), axis=1)
    i = block.to(tl.int64)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # 64-bit: N*H may pass 2**31
    is_true = (tl.load(mask_ptr + i, mask=row_ok[:, None] & (i < n), other=0) != 0).to(tl.int32)
    below = tl.cumsum(is_true, axis=1) - is_true
    dense_row = tl.sum(tl.where((is_true != 0) & (below == rank[:, None]), i, 0), axis=1)
    dense_rows = dense_ptr + dense_row[:, None] * stride_dense_row
    put_tile(dense_rows + cols[None, :], first, row_ok[:, None] & (cols < H)[None, :], MODE)
    move_rows(dense_rows + BLOCK_H, compact_rows + BLOCK_H, row_ok, H - BLOCK_H, MODE, BLOCK_H)
