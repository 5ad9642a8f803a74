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
    n_blocks,  # cdiv(N, BLOCK)
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
    COUNTS: tl.constexpr,  # a power of two: the block counts a program sums at once (it loops over more)
    AFTER_COUNTS: tl.constexpr,  # a programmatic dependent launch after mask_block_counts_kernel
):
    """Program p moves compact rows j in [p*ROWS, p*ROWS + ROWS) into the dense row of the mask's j-th true byte
    (any nonzero byte is True), for j < min(n_rows, K) where K is the mask's true bytes: as row_copy_kernel
    through the mask's row map, without one. It reads the compact rows' first BLOCK_H columns, waits for the
    counts (AFTER_COUNTS: Hopper and later, scatter.mask_select_copy), sums them COUNTS at a time in registers to
    find the block that holds the j-th true byte, and finds the byte in that block's cumsum: two dependent loads
    (the counts, one mask block) where a map costs a second launch that the copy waits for whole."""
    j = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    compact_rows = compact_ptr + j[:, None] * stride_compact_row
    cols = tl.arange(0, BLOCK_H)
    first = tl.load(compact_rows + cols[None, :], mask=(j < n_rows)[:, None] & (cols < H)[None, :])
    if AFTER_COUNTS:
        tl.extra.cuda.gdc_wait()  # the counts are written and visible
    # Blocks wholly before the j-th true byte (those whose inclusive count is at most j), and their true bytes,
    # in 32 bits: N < 2**31 (scatter.mask_select_copy), so every count and every j that can move fits.
    j32 = j.to(tl.int32)
    block = tl.zeros([ROWS], dtype=tl.int32)
    before = tl.zeros([ROWS], dtype=tl.int32)
    total = tl.full([], 0, tl.int32)  # the mask's true bytes in the blocks summed so far
    for start in range(0, n_blocks, COUNTS):
        b = start + tl.arange(0, COUNTS)
        count = tl.load(counts_ptr + b, mask=b < n_blocks, other=0)
        inclusive = tl.cumsum(count, axis=0) + total
        done = inclusive[None, :] <= j32[:, None]
        block += tl.sum(done.to(tl.int32), axis=1)
        before += tl.sum(tl.where(done, count[None, :], 0), axis=1)
        total += tl.sum(count, axis=0)
    row_ok = (j < n_rows) & (j < total)  # 64-bit: j past 2**31 wraps in j32
    rank = j32 - before
    i = block.to(tl.int64)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # 64-bit: N*H may pass 2**31
    is_true = (tl.load(mask_ptr + i, mask=row_ok[:, None] & (i < n), other=0) != 0).to(tl.int32)
    below = tl.cumsum(is_true, axis=1) - is_true
    dense_row = tl.sum(tl.where((is_true != 0) & (below == rank[:, None]), i, 0), axis=1)
    dense_rows = dense_ptr + dense_row[:, None] * stride_dense_row
    put_tile(dense_rows + cols[None, :], first, row_ok[:, None] & (cols < H)[None, :], MODE)
    move_rows(dense_rows + BLOCK_H, compact_rows + BLOCK_H, row_ok, H - BLOCK_H, MODE, BLOCK_H)
