"""Per-request merges driven by a device mask: each request's placeholder count is checked on the device, and
only the rows of requests whose count matches their embedding rows move. Two launches, no host sync:
request_rows_kernel (one program per request: its count, its status, its part of the row map), then
request_row_copy_kernel (the rows, as multi_row_copy_kernel, skipping the slots of mismatching requests).
"""
import triton
import triton.language as tl

from .row_tiles import count_true_before, item_rows, move_rows


@triton.jit
def request_rows_kernel(
    # pointers
    mask_ptr,  # [N] uint8 (a bool mask viewed as bytes)
    row_offsets_ptr,  # [R + 1] int32: request r owns dense rows [row_offsets[r], row_offsets[r + 1])
    src_starts_ptr,  # [R + 1] int32: request r owns compact rows [src_starts[r], src_starts[r + 1])
    rows_ptr,  # [M] int32, out: dense row of each compact row of a matching request, -1 for the others
    status_ptr,  # [R] uint8, out: 1 where request r's true rows equal its compact rows, else 0
    # meta-parameters
    BLOCK: tl.constexpr,  # mask bytes per step of the row-map pass
    PREFIX_CHUNK: tl.constexpr,  # mask bytes per step of the counting pass
):
    """Program r counts the true rows of its range first, and writes its rows only once the count is known
    to match: a matching request's j-th true row i gives rows[src_starts[r] + j] = i (every slot written,
    since the count equals the slots); a mismatching one fills its slots with -1, which the copy skips. So no
    slot is written out of its request's bounds whatever the mask holds, and no slot is left unwritten.
    Rows outside every range are never read. A program reads its range twice (the second pass from L2)."""
    r = tl.program_id(0)
    # 64-bit indices: a range ending near 2**31 rows (or slots) would wrap its last step's int32 lanes (s + lane).
    start = tl.load(row_offsets_ptr + r).to(tl.int64)
    end = tl.load(row_offsets_ptr + r + 1).to(tl.int64)
    first = tl.load(src_starts_ptr + r).to(tl.int64)
    expected = tl.load(src_starts_ptr + r + 1).to(tl.int64) - first
    count = count_true_before(mask_ptr + start, end - start, PREFIX_CHUNK, 1, False)  # at any byte: no words
    matches = count == expected
    tl.store(status_ptr + r, matches.to(tl.uint8))
    lane = tl.arange(0, BLOCK)
    if matches:
        seen = start - start  # an int64 scalar carried through the loop
        for s in range(start, end, BLOCK):
            i = s + lane
            is_true = (tl.load(mask_ptr + i, mask=i < end, other=0) != 0).to(tl.int32)  # any nonzero byte is True
            local = seen + tl.cumsum(is_true, axis=0) - is_true  # the request's true rows before row i
            tl.store(rows_ptr + first + local, i.to(tl.int32), mask=is_true != 0)
            seen += tl.sum(is_true, axis=0)
    else:
        for s in range(0, expected, BLOCK):
            j = s + lane
            tl.store(rows_ptr + first + j, tl.full([BLOCK], -1, tl.int32), mask=j < expected)


@triton.jit(do_not_specialize=["n_rows", "n_items"])
def request_row_copy_kernel(
    # pointers
    dense_ptr,  # [N, H], unit column stride
    base_ptr,  # the first item's data: every item is addressed relative to it
    item_offsets_ptr,  # [T] int64: element offset of item t's first row from base_ptr
    item_starts_ptr,  # [T + 1] int32: compact index of item t's first row (item_starts[T] = M)
    rows_ptr,  # [>= M] int32 row map: dense row of compact row j, or < 0 to leave it out
    # sizes
    n_rows,  # M, the rows of all items together
    n_items,  # T
    H,
    # strides, in elements
    stride_dense_row,
    stride_item_row,  # shared by every item
    # meta-parameters
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,  # ceil(log2(T)): binary-search steps to find a row's item
    ITEM_ALIGN: tl.constexpr,  # every item offset and row start is a multiple of this many elements
):
    """Program p copies compact rows j in [p*ROWS, p*ROWS + ROWS) with rows[j] >= 0 into dense row rows[j],
    cast to the dense dtype. Items are found as in multi_row_copy_kernel (binary search in item_starts)."""
    j = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_range = j < n_rows
    dense_row = tl.load(rows_ptr + j, mask=in_range, other=-1)
    row_ok = dense_row >= 0
    dense_rows = dense_ptr + tl.where(row_ok, dense_row, 0).to(tl.int64)[:, None] * stride_dense_row
    compact_rows = item_rows(base_ptr, item_offsets_ptr, item_starts_ptr, j, row_ok, n_items, stride_item_row,
                             SEARCH_STEPS, ITEM_ALIGN)
    move_rows(dense_rows, compact_rows, row_ok, H, 0, BLOCK_H)  # MODE 0: COPY
