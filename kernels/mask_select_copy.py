"""Row copies driven by a device bool mask's block counts, no row map: each program finds its own dense rows."""
import triton
import triton.language as tl

from .row_tiles import move_rows, put_tile
from .scan_state import GEN, STATUS, release_state, tag_of


@triton.jit(do_not_specialize=["n", "n_blocks", "n_rows"])
def mask_select_copy_kernel(
    # pointers
    dense_ptr,  # [N, H], unit column stride
    compact_ptr,  # [M, H], unit column stride
    mask_ptr,  # [N] uint8 (a bool mask viewed as bytes)
    counts_ptr,  # [n_blocks] int32: true bytes of each BLOCK mask bytes (mask_block_counts_kernel); not ONE_LAUNCH
    state_ptr,  # ONE_LAUNCH: the int64 scan workspace (scan_state.py), STATUS + n_blocks words at least
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
    COUNTS: tl.constexpr,  # a power of two >= n_blocks: the counts a program sums in registers; ONE_LAUNCH: and
    #                        >= the program's threads (32 * num_warps), see published_counts
    AFTER_COUNTS: tl.constexpr,  # a programmatic dependent launch after mask_block_counts_kernel
    ONE_LAUNCH: tl.constexpr,  # the block counts counted and published by this launch's first programs
    OWNED: tl.constexpr,  # ONE_LAUNCH: blocks a counting program counts (a power of two)
    SPINS: tl.constexpr,  # ONE_LAUNCH: reads of the counts before a program counts the missing ones itself
):
    """Program p moves compact rows j in [p*ROWS, p*ROWS + ROWS) into the dense row of the mask's j-th true byte
    (any nonzero byte is True), for j < min(n_rows, K) where K is the mask's true bytes: as row_copy_kernel
    through the mask's row map, without one. It reads the compact rows' first BLOCK_H columns, gets the block
    counts, sums them in registers to find the block that holds the j-th true byte, and finds the byte in that
    block's cumsum: two dependent loads (the counts, one mask block) where a map costs a second launch that the
    copy waits for whole.

    The counts: written by mask_block_counts_kernel before this launch (AFTER_COUNTS: Hopper and later waits for
    it only here, scatter.mask_select_copy), or ONE_LAUNCH (grid >= cdiv(n_blocks, OWNED)): published by this
    launch's programs, see published_counts."""
    pid = tl.program_id(0)
    b = tl.arange(0, COUNTS)
    if ONE_LAUNCH:  # a persistent grid: each program gets the counts once, then moves tiles pid, pid + grid, ...
        gen = tl.load(state_ptr + GEN, volatile=True)
        count = published_counts(mask_ptr, state_ptr + STATUS, pid, tag_of(gen), n, n_blocks, BLOCK, COUNTS,
                                 OWNED, SPINS)
        inclusive = tl.cumsum(count, axis=0)
        found = tl.sum(count, axis=0)
        tiles = (tl.minimum(n_rows, found) + ROWS - 1) // ROWS
        for tile in range(pid, tiles, tl.num_programs(0)):
            j = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
            move_selected(dense_ptr, compact_ptr, mask_ptr, j, count, inclusive, n, n_rows, found, H,
                          stride_dense_row, stride_compact_row, MODE, BLOCK_H, BLOCK, COUNTS)
        release_state(state_ptr, gen, n_blocks)
    else:
        j = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        compact_rows = compact_ptr + j[:, None] * stride_compact_row
        cols = tl.arange(0, BLOCK_H)
        first = tl.load(compact_rows + cols[None, :], mask=(j < n_rows)[:, None] & (cols < H)[None, :])
        if AFTER_COUNTS:
            tl.extra.cuda.gdc_wait()  # the counts are written and visible
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


@triton.jit
def move_selected(dense_ptr, compact_ptr, mask_ptr, j, count, inclusive, n, n_rows, found, H, stride_dense_row,
                  stride_compact_row, MODE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK: tl.constexpr,
                  COUNTS: tl.constexpr):
    """Compact rows ``j`` [ROWS] into the dense rows of the mask's j-th true bytes, for j < min(n_rows, found),
    from the block counts ``count`` [COUNTS] and their cumsum ``inclusive``."""
    b = tl.arange(0, COUNTS)
    row_ok = (j < n_rows) & (j < found)
    block = tl.sum((inclusive[None, :] <= j[:, None]).to(tl.int32), axis=1)  # blocks wholly before the j-th
    rank = j - tl.sum(tl.where(b[None, :] == block[:, None], (inclusive - count)[None, :], 0), axis=1)
    i = block.to(tl.int64)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # 64-bit: N*H may pass 2**31
    is_true = (tl.load(mask_ptr + i, mask=row_ok[:, None] & (i < n), other=0) != 0).to(tl.int32)
    below = tl.cumsum(is_true, axis=1) - is_true
    dense_row = tl.sum(tl.where((is_true != 0) & (below == rank[:, None]), i, 0), axis=1)
    move_rows(dense_ptr + dense_row[:, None] * stride_dense_row, compact_ptr + j[:, None] * stride_compact_row,
              row_ok, H, MODE, BLOCK_H)


@triton.jit
def published_counts(mask_ptr, status_ptr, pid, tag, n, n_blocks, BLOCK: tl.constexpr, COUNTS: tl.constexpr,
                     OWNED: tl.constexpr, SPINS: tl.constexpr):
    """The [COUNTS] int32 block counts (0 past n_blocks), counted within the launch. Program p < cdiv(n_blocks,
    OWNED) counts blocks p, p + owners, ... (OWNED of them, owners = cdiv(n_blocks, OWNED)) and publishes each as
    a status word ``tag | count``; then every program reads the n_blocks words until all carry this launch's tag.

    No program waits on another for good: after SPINS reads with some count still missing (its owner not yet
    running, e.g. every slot of the GPU taken by waiting programs, or programs run one after another as under
    the interpreter), a program counts the missing blocks itself, in registers (the owners publish them).

    COUNTS is at least the program's threads, so that one thread alone reads each word. In a smaller tensor
    whole warps are copies of it, each reading the words itself, one maybe just before an owner publishes a
    count and one just after; and a reduction over it is done in each warp on its own copy, so the warps could
    differ on the counts and on whether to wait or count (on an H100: wrong rows, and illegal addresses where
    warps took different branches past a barrier; bench/results/h100/2026-12-07-s15/)."""
    owners = (n_blocks + OWNED - 1) // OWNED
    if pid < owners:
        own = pid + owners * tl.arange(0, OWNED)
        own_bytes = own[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # 32-bit: N is under COUNTS * BLOCK
        ok = (own < n_blocks)[:, None] & (own_bytes < n)
        mine = tl.sum((tl.load(mask_ptr + own_bytes, mask=ok, other=0) != 0).to(tl.int64), axis=1)  # nonzero: True
        tl.atomic_xchg(status_ptr + own, tag | mine, mask=own < n_blocks, sem="relaxed", scope="gpu")
    b = tl.arange(0, COUNTS)
    listed = b < n_blocks
    word = tl.load(status_ptr + b, mask=listed, other=0, volatile=True)
    missing = listed & ((word >> 32) != (tag >> 32))
    spins = 0
    while (tl.max(missing.to(tl.int32), axis=0) > 0) & (spins < SPINS):
        word = tl.load(status_ptr + b, mask=listed, other=0, volatile=True)
        missing = listed & ((word >> 32) != (tag >> 32))
        spins += 1
    count = tl.where(listed, word - tag, 0).to(tl.int32)  # a word of this launch: tag | count
    if tl.max(missing.to(tl.int32), axis=0) > 0:
        for k in range(0, n_blocks):  # loads only a missing block's bytes
            missing_k = missing & (b == k)
            end = tl.where(tl.max(missing_k.to(tl.int32), axis=0) > 0, n, 0)  # 0: block k published
            k_bytes = k * BLOCK + tl.arange(0, BLOCK)
            found = tl.sum((tl.load(mask_ptr + k_bytes, mask=k_bytes < end, other=0) != 0).to(tl.int32), axis=0)
            count = tl.where(missing_k, found, count)
    return count
