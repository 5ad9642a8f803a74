"""Row copies driven by a device bool mask in one launch and O(N) mask reads: the offsets come from a
single-pass prefix scan with decoupled look-back (Merrill & Garland 2016, CUB's single-pass scan).

The kernel keeps its scan state in a persistent int64 workspace and leaves it ready for the next launch
itself (no memset launch, no host state per call, so a CUDA graph replays it as is). Layout, in words:

    [TICKET] next tile index to hand out   [DONE] programs finished          [GEN] launches run so far
    [HIGH] most tiles any launch used      [STATUS + t] tile t's status word, for t < HIGH (or this grid)

A zeroed workspace is ready. The host (mmmerge_triton/scan_copy.py) gives a workspace to one stream (or to
one captured launch), so launches on it never overlap: each starts after the previous one has finished.
"""
import triton
import triton.language as tl

from .row_tiles import move_rows

# Workspace words (constexpr globals: a @jit function reads no other module globals).
TICKET = tl.constexpr(0)
DONE = tl.constexpr(1)
GEN = tl.constexpr(2)
HIGH = tl.constexpr(3)
STATUS = tl.constexpr(16)  # status words start 128 bytes in, apart from the counters every program hits

# A status word: tag << 32 | value << 1 | kind. tag = GEN % TAG_PERIOD + 1 (never 0: a zeroed word matches no
# launch); value < 2**31 (N < 2**31); kind 0: value is the tile's own count (aggregate), 1: the count of tiles
# 0..t (inclusive prefix). Every field is non-negative, so ``word >> 32`` is the tag.
TAG_PERIOD = tl.constexpr(2**31 - 1)
VALUE_BITS = tl.constexpr(2**31 - 1)
CLEAR_BLOCK = tl.constexpr(1024)  # status words zeroed per step when the tags wrap


@triton.jit(do_not_specialize=["n", "n_rows"])
def mask_scan_copy_kernel(
    # pointers
    dense_ptr,  # [N, H], unit column stride
    compact_ptr,  # [M, H], unit column stride
    mask_ptr,  # [N] uint8 (a bool mask viewed as bytes)
    state_ptr,  # [STATUS + max(HIGH, cdiv(N, ROWS))] int64 workspace (module doc)
    # sizes
    n,  # N, < 2**31
    n_rows,  # M
    H,
    # strides, in elements
    stride_dense_row,
    stride_compact_row,
    # meta-parameters
    MODE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    LOOKBACK: tl.constexpr,  # predecessors' status words read per step (a power of two)
):
    """Launch with a grid of cdiv(N, ROWS) programs. Each takes a tile t (ROWS mask rows), counts its true
    bytes, publishes that aggregate, sums predecessors' status words back to the nearest inclusive prefix
    (exclusive prefix = offsets of its first row), publishes its own inclusive prefix, then moves dense row i
    <-> compact row offsets[i] for its true rows with offsets[i] < n_rows, as mask_row_copy_kernel (modes of
    row_copy_kernel; any nonzero byte is True). Mask bytes read once: O(N) where mask_row_copy is O(N^2).

    Forward progress: t is a ticket (an atomic counter), not the program id. Tickets go out in the order
    programs start, so a program waits only on tiles whose programs have already run their first
    instruction and are resident; they never wait on a later tile (they publish their aggregate before
    looking back), so the wait ends whatever order the hardware schedules programs in.

    Generations: status words carry the launch's tag, so words left by earlier launches never match. When
    GEN reaches the last tag of a period, the last program zeroes the status words up to HIGH before the
    tags repeat (every word ever written lies below HIGH).

    Memory order (scope gpu): a status word is self-contained (tag, kind and value in one 64-bit atomic
    exchange, read by volatile loads that bypass L1), so a reader needs no other write of its writer: the
    status traffic may be relaxed; the exchanges are release anyway. Every program reads GEN, takes its
    ticket and finishes its look-back before its acq_rel increment of DONE (the program's last act, after
    its rows); the program that moves DONE to the grid size acquires them all (the increments form one
    release sequence), so its reset (TICKET and DONE to 0, HIGH, the wrap's zeroing, GEN + 1) happens after
    every other program's reads of the old state. The next launch on this workspace starts after this one
    has finished (same stream, or a graph's next replay), and sees the reset state.
    """
    lane_row = tl.arange(0, ROWS)
    lane = tl.arange(0, LOOKBACK)
    status_ptr = state_ptr + STATUS

    gen = tl.load(state_ptr + GEN, volatile=True)  # issued before the ticket: their latencies overlap
    tile = tl.atomic_add(state_ptr + TICKET, 1, sem="relaxed", scope="gpu")  # int64
    tag = (gen % TAG_PERIOD + 1) << 32

    i = tile * ROWS + lane_row  # 64-bit: tile * ROWS may pass 2**31 near N = 2**31
    is_true = (tl.load(mask_ptr + i, mask=i < n, other=0) != 0).to(tl.int32)  # any nonzero byte is True
    count = tl.sum(is_true, axis=0).to(tl.int64)

    # Look back from tile - 1 towards tile 0 until an inclusive prefix: windows of LOOKBACK words,
    # [end - LOOKBACK, end), each retried until every word above its nearest inclusive prefix is this
    # launch's. Words before tile 0 count as an inclusive prefix of 0.
    if tile > 0:
        tl.atomic_xchg(status_ptr + tile, tag | (count << 1), sem="release", scope="gpu")
    prefix = tile * 0
    end = tile
    looking = tile > 0
    while looking:
        idx = end - LOOKBACK + lane
        word = tl.load(status_ptr + idx, mask=idx >= 0, other=0, volatile=True)
        word = tl.where(idx >= 0, word, tag | 1)
        current = (word >> 32) == (tag >> 32)
        inclusive = current & ((word & 1) != 0)
        nearest = tl.max(tl.where(inclusive, lane, -1), axis=0)  # -1: none in this window
        ready = tl.sum((~current & (lane > nearest)).to(tl.int32), axis=0) == 0
        window = tl.sum(tl.where(lane >= nearest, (word >> 1) & VALUE_BITS, 0), axis=0)
        prefix += tl.where(ready, window, 0)
        end -= tl.where(ready, LOOKBACK, 0)
        looking = ~ready | (nearest < 0)
    tl.atomic_xchg(status_ptr + tile, tag | ((prefix + count) << 1) | 1, sem="release", scope="gpu")

    offsets = prefix + tl.cumsum(is_true, axis=0) - is_true  # int64
    row_ok = (is_true != 0) & (offsets < n_rows)
    dense_rows = dense_ptr + i[:, None] * stride_dense_row  # 64-bit: N*H may pass 2**31
    compact_rows = compact_ptr + offsets[:, None] * stride_compact_row
    move_rows(dense_rows, compact_rows, row_ok, H, MODE, BLOCK_H)

    # After the copy, which needs none of it: the wait for DONE's old value delays no row.
    done = tl.atomic_add(state_ptr + DONE, 1, sem="acq_rel", scope="gpu")
    n_tiles = tl.num_programs(0)
    if done == n_tiles - 1:  # the last program: every other one is done with the workspace
        high = tl.maximum(tl.load(state_ptr + HIGH, volatile=True), n_tiles)
        tl.store(state_ptr + HIGH, high)
        if gen % TAG_PERIOD == TAG_PERIOD - 1:  # the next launch's tag was used before: zero the words
            for s in range(0, high, CLEAR_BLOCK):
                clear = s + tl.arange(0, CLEAR_BLOCK)
                tl.store(status_ptr + clear, tl.zeros([CLEAR_BLOCK], tl.int64), mask=clear < high)
        tl.store(state_ptr + GEN, gen + 1)
        tl.store(state_ptr + TICKET, 0)
        tl.store(state_ptr + DONE, 0)

