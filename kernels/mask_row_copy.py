"""Row copies driven by a device bool mask directly, in one launch: each program finds its own offsets."""
import triton
import triton.language as tl

from .row_tiles import count_true_before, move_rows


@triton.jit(do_not_specialize=["n", "n_rows"])
def mask_row_copy_kernel(
    # pointers
    dense_ptr,  # [N, H], unit column stride
    compact_ptr,  # [M, H], unit column stride
    mask_ptr,  # [N] uint8 (a bool mask viewed as bytes)
    # sizes
    n,  # N
    n_rows,  # M
    H,
    # strides, in elements
    stride_dense_row,
    stride_compact_row,
    # meta-parameters
    MODE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PREFIX_CHUNK: tl.constexpr,  # mask bytes per step of the prefix count
    WORDS: tl.constexpr,  # mask_ptr is 4-byte aligned: the prefix is counted in words
):
    """Program p owns dense rows i in [p*ROWS, p*ROWS + ROWS). It counts the true mask bytes before its
    block (so the prefix is re-read by every program: N*N/(2*ROWS) bytes from L2 in all, which is why the
    dispatcher keeps this kernel to small N), takes the in-block exclusive cumsum to get offsets[i], and
    moves dense row i <-> compact row offsets[i] for true rows with offsets[i] < n_rows. Modes as row_copy_kernel."""
    start = tl.program_id(0) * ROWS
    prefix = count_true_before(mask_ptr, start, PREFIX_CHUNK, 1, WORDS)
    i = start + tl.arange(0, ROWS)
    is_true = (tl.load(mask_ptr + i, mask=i < n, other=0) != 0).to(tl.int32)  # any nonzero byte is True
    offsets = prefix + tl.cumsum(is_true, axis=0) - is_true
    row_ok = (is_true != 0) & (offsets < n_rows)
    dense_rows = dense_ptr + i.to(tl.int64)[:, None] * stride_dense_row  # 64-bit: N*H may pass 2**31
    compact_rows = compact_ptr + offsets.to(tl.int64)[:, None] * stride_compact_row
    move_rows(dense_rows, compact_rows, row_ok, H, MODE, BLOCK_H)
