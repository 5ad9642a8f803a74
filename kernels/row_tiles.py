"""@triton.jit helpers shared by the kernels: moving a tile of rows, counting true mask bytes."""
import triton
import triton.language as tl


@triton.jit
def move_rows(
    dense_ptr,  # [N, H]
    compact_ptr,  # [M, H]
    dense_row,  # [ROWS] int64: row of dense for each lane row
    compact_row,  # [ROWS] int64: row of compact for each lane row
    row_ok,  # [ROWS] bool: which lane rows move
    H,
    stride_dense_row,
    stride_compact_row,
    MODE: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Move the ROWS rows of this program, all H columns, BLOCK_H at a time (rows are loaded once and
    reused across the loop: a row map read over PCIe costs one read per program, not one per tile).

    MODE 0 COPY: dense = cast(compact). 1 ADD: dense = dense + cast(compact), as torch's
    ``index_put_(..., src.to(dst.dtype), accumulate=True)``: src rounded to dst's dtype, added in fp32.
    2 GATHER: compact = cast(dense). 3 ZERO: dense = 0.
    """
    dense_base = dense_ptr + dense_row[:, None] * stride_dense_row  # 64-bit: N*H may pass 2**31
    compact_base = compact_ptr + compact_row[:, None] * stride_compact_row
    dense_ty = dense_ptr.dtype.element_ty
    for c0 in range(0, H, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        ok = row_ok[:, None] & (cols < H)[None, :]
        dense_ptrs = dense_base + cols[None, :]
        compact_ptrs = compact_base + cols[None, :]
        if MODE == 0:
            tl.store(dense_ptrs, tl.load(compact_ptrs, mask=ok).to(dense_ty), mask=ok)
        elif MODE == 1:
            add = tl.load(compact_ptrs, mask=ok).to(dense_ty).to(tl.float32)
            acc = tl.load(dense_ptrs, mask=ok).to(tl.float32)
            tl.store(dense_ptrs, (acc + add).to(dense_ty), mask=ok)
        elif MODE == 2:
            tl.store(compact_ptrs, tl.load(dense_ptrs, mask=ok).to(compact_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(dense_ptrs, tl.zeros(ok.shape, dtype=dense_ty), mask=ok)


@triton.jit
def count_true_before(mask_ptr, end, CHUNK: tl.constexpr):
    """Number of nonzero bytes in mask_ptr[0:end], read CHUNK bytes per step (wide steps: the loop is
    latency-bound, so few iterations matter more than lanes)."""
    lane = tl.arange(0, CHUNK)
    acc = tl.zeros([CHUNK], dtype=tl.int32)
    for s in range(0, end, CHUNK):
        idx = s + lane
        acc += tl.load(mask_ptr + idx, mask=idx < end, other=0).to(tl.int32)
    return tl.sum(acc, axis=0)
