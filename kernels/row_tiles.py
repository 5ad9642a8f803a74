"""@triton.jit helpers shared by the kernels: moving rows (or writing a tile of them already loaded), counting
true mask bytes, addressing the rows of a list of items."""
import triton
import triton.language as tl


@triton.jit
def move_rows(
    dense_rows,  # [ROWS, 1] pointers: the start of each lane's dense row
    compact_rows,  # [ROWS, 1] pointers: the start of each lane's compact row
    row_ok,  # [ROWS] bool: which lane rows move
    H,
    MODE: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Move the ROWS rows of this program, all H columns, BLOCK_H at a time. A program's row indices are
    loaded once, before this loop: a row map read over PCIe costs one read per program, not one per tile.

    MODE 0 COPY: dense = cast(compact). 1 ADD: dense = dense + cast(compact), as torch's
    ``index_put_(..., src.to(dst.dtype), accumulate=True)``: src rounded to dst's dtype, added in fp32.
    2 GATHER: compact = cast(dense).
    """
    for c0 in range(0, H, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        ok = row_ok[:, None] & (cols < H)[None, :]
        dense_ptrs = dense_rows + cols[None, :]
        compact_ptrs = compact_rows + cols[None, :]
        if MODE == 2:
            tl.store(compact_ptrs, tl.load(dense_ptrs, mask=ok).to(compact_rows.dtype.element_ty), mask=ok)
        else:
            put_tile(dense_ptrs, tl.load(compact_ptrs, mask=ok), ok, MODE)


@triton.jit
def put_tile(dense_ptrs, tile, ok, MODE: tl.constexpr):
    """Write a tile of compact rows, already loaded, into dense rows: MODE 0 COPY or 1 ADD (as move_rows)."""
    dense_ty = dense_ptrs.dtype.element_ty
    if MODE == 0:
        tl.store(dense_ptrs, tile.to(dense_ty), mask=ok)
    else:
        acc = tl.load(dense_ptrs, mask=ok).to(tl.float32)
        tl.store(dense_ptrs, (acc + tile.to(dense_ty).to(tl.float32)).to(dense_ty), mask=ok)


@triton.jit
def count_true_before(mask_ptr, end, CHUNK: tl.constexpr, LOADS: tl.constexpr, WORDS: tl.constexpr):
    """Number of nonzero bytes in mask_ptr[0:end], LOADS loads of CHUNK bytes per step, all issued before any is
    summed: the loop is latency-bound, so the bytes in flight set its time. Any nonzero byte counts once: a
    bool's byte may hold any nonzero value (``uint8_tensor.view(torch.bool)``), and PyTorch reads it as True.

    WORDS (mask_ptr 4-byte aligned): the bytes read as 4-byte words, each word's nonzero bytes counted with
    shifts (a quarter of the lanes and registers for the same bytes), the last end % 4 bytes one by one. On an
    H100 the row-map scan's last program counted 262144 bytes in 10.1 µs this way (words, 32 KB x 2 loads)
    against 15.3 µs by bytes, 32 KB x 1 (bench/results/h100/2026-12-06-s6/prefix_count.log)."""
    if WORDS:
        words_ptr = mask_ptr.to(tl.pointer_type(tl.uint32))
        n_words = end // 4
        lane = tl.arange(0, CHUNK // 4)
        acc = tl.zeros([CHUNK // 4], dtype=tl.int32)
        for s in range(0, n_words, (CHUNK // 4) * LOADS):
            for u in tl.static_range(LOADS):
                idx = s + u * (CHUNK // 4) + lane
                x = tl.load(words_ptr + idx, mask=idx < n_words, other=0)
                x = x | (x >> 4)
                x = x | (x >> 2)
                x = x | (x >> 1)  # bit 0 of each byte: the OR of that byte's 8 bits (logical shifts of a uint32)
                acc += (((x & 0x01010101) * 0x01010101) >> 24).to(tl.int32)  # the four bit-0s summed
        tail = n_words * 4 + tl.arange(0, 4)
        total = tl.sum(acc, axis=0) + tl.sum((tl.load(mask_ptr + tail, mask=tail < end, other=0) != 0).to(tl.int32),
                                             axis=0)
    else:
        lane = tl.arange(0, CHUNK)
        acc = tl.zeros([CHUNK], dtype=tl.int32)
        for s in range(0, end, CHUNK * LOADS):
            for u in tl.static_range(LOADS):
                idx = s + u * CHUNK + lane
                acc += (tl.load(mask_ptr + idx, mask=idx < end, other=0) != 0).to(tl.int32)
        total = tl.sum(acc, axis=0)
    return total


@triton.jit
def item_rows(
    base_ptr,  # the first item's data: every item is addressed relative to it
    item_offsets_ptr,  # [T] int64: element offset of item t's first row from base_ptr
    item_starts_ptr,  # [T + 1] int32: compact index of item t's first row
    j,  # [ROWS] compact row indices
    row_ok,  # [ROWS] bool: which lanes to look up
    n_items,
    stride_item_row,
    SEARCH_STEPS: tl.constexpr,  # ceil(log2(T))
    ITEM_ALIGN: tl.constexpr,  # every item offset and row start is a multiple of this many elements
):
    """[ROWS, 1] pointers to compact rows j of a list of items: row j belongs to the item t with
    item_starts[t] <= j < item_starts[t+1], found by binary search in the small table, and lives at
    base_ptr + item_offsets[t] + (j - item_starts[t]) * stride_item_row."""
    lo = tl.zeros(j.shape, dtype=tl.int32)
    hi = tl.zeros(j.shape, dtype=tl.int32) + (n_items - 1)
    for _ in tl.static_range(SEARCH_STEPS):  # largest t with item_starts[t] <= j
        mid = (lo + hi + 1) // 2
        below = tl.load(item_starts_ptr + mid, mask=row_ok, other=0) <= j
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    item_offset = tl.multiple_of(tl.load(item_offsets_ptr + lo, mask=row_ok, other=0), ITEM_ALIGN)
    local_row = (j - tl.load(item_starts_ptr + lo, mask=row_ok, other=0)).to(tl.int64)
    return base_ptr + (item_offset + local_row * stride_item_row)[:, None]
