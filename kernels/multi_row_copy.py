"""Row copies whose compact side is a list of tensors, read in place: no concatenation."""
import triton
import triton.language as tl

from .row_tiles import item_rows, move_rows


@triton.jit(do_not_specialize=["n_dense", "n_rows", "n_items"])
def multi_row_copy_kernel(
    # pointers
    dense_ptr,  # [N, H], unit column stride
    base_ptr,  # the first item's data: every item is addressed relative to it
    item_offsets_ptr,  # [T] int64: element offset of item t's first row from base_ptr
    item_starts_ptr,  # [T + 1] int32: compact index of item t's first row (item_starts[T] = M)
    rows_ptr,  # [>= M] int32 row map: dense row of compact row j
    count_ptr,  # [1] int32: valid entries of rows_ptr (read only if HAS_COUNT)
    # sizes
    n_dense,  # N (read only if BOUNDED)
    n_rows,  # M, the rows of all items together
    n_items,  # T
    H,
    # strides, in elements
    stride_dense_row,
    stride_item_row,  # shared by every item
    # meta-parameters
    MODE: tl.constexpr,  # 0 COPY or 1 ADD (see row_tiles.move_rows)
    HAS_COUNT: tl.constexpr,
    BOUNDED: tl.constexpr,  # skip map entries outside [0, n_dense) (per-modality maps with unused entries)
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,  # ceil(log2(T)): binary-search steps to find a row's item
    ITEM_ALIGN: tl.constexpr,  # every item offset and row start is a multiple of this many elements
):
    """Program p moves compact rows j in [p*ROWS, p*ROWS + ROWS) (j < min(n_rows, count)). Row j belongs to
    the item t with item_starts[t] <= j < item_starts[t+1], found by binary search in the small table, and
    lives at base_ptr + item_offsets[t] + (j - item_starts[t]) * stride_item_row."""
    limit = n_rows
    if HAS_COUNT:
        limit = tl.minimum(tl.load(count_ptr), n_rows)
    j = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = j < limit
    dense_row = tl.load(rows_ptr + j, mask=row_ok, other=0).to(tl.int64)
    if BOUNDED:
        row_ok = row_ok & (dense_row >= 0) & (dense_row < n_dense)
    dense_rows = dense_ptr + dense_row[:, None] * stride_dense_row
    compact_rows = item_rows(base_ptr, item_offsets_ptr, item_starts_ptr, j, row_ok, n_items, stride_item_row,
                             SEARCH_STEPS, ITEM_ALIGN)
    move_rows(dense_rows, compact_rows, row_ok, H, MODE, BLOCK_H)
