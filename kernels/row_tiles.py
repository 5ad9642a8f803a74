"""@triton.jit helpers shared by the kernels: moving a tile of rows, counting true mask bytes."""
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
    2 GATHER: compact = cast(dense). 3 ZERO: dense = 0.
    """
    dense_ty = dense_rows.dtype.element_ty
    for c0 in range(0, H, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        ok = row_ok[:, None] & (cols < H)[None, :]
        dense_ptrs = dense_rows + cols[None, :]
        compact_ptrs = compact_rows + cols[None, :]
        if MODE == 0:
            tl.store(dense_ptrs, tl.load(compact_ptrs, mask=ok).to(dense_ty), mask=ok)
        elif MODE == 1:
            add = tl.load(compact_ptrs, mask=ok).to(dense_ty).to(tl.float32)
            acc = tl.load(dense_ptrs, mask=ok).to(tl.float32)
            tl.store(dense_ptrs, (acc + add).to(dense_ty), mask=ok)
        elif MODE == 2:
            tl.store(compact_ptrs, tl.load(dense_ptrs, mask=ok).to(compact_rows.dtype.element_ty), mask=ok)
        else:
            tl.store(dense_ptrs, tl.zeros(ok.shape, dtype=dense_ty), mask=ok)


@triton.jit
def count_true_before(mask_ptr, end, CHUNK: tl.constexpr):
    """Number of nonzero bytes in mask_ptr[0:end], read CHUNK bytes per step (wide steps: the loop is
    latency-bound, so few iterations matter more than lanes). Any nonzero byte counts once: a bool's byte
    may hold any nonzero value (``uint8_tensor.view(torch.bool)``), and PyTorch reads it as True."""
    lane = tl.arange(0, CHUNK)
    acc = tl.zeros([CHUNK], dtype=tl.int32)
    for s in range(0, end, CHUNK):
        idx = s + lane
        acc += (tl.load(mask_ptr + idx, mask=idx < end, other=0) != 0).to(tl.int32)
    return tl.sum(acc, axis=0)
