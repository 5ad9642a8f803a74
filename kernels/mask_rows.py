"""Build the row map of a device-resident bool mask, with no host sync.

Program p owns mask[p*BLOCK : (p+1)*BLOCK] and needs the number of true bytes before its block. Counted (the
two-level scan): mask_block_counts_kernel first writes every block's count, and mask_to_rows_kernel sums the
counts before its block (N / BLOCK numbers). Else mask_to_rows_kernel counts the mask bytes before its block
itself (count_true_before): one launch, but its last program reads N bytes alone.
"""
import triton
import triton.language as tl

from .row_tiles import count_true_before


@triton.jit(do_not_specialize=["n"])
def mask_block_counts_kernel(
    mask_ptr,  # [N] uint8 (a bool mask viewed as bytes)
    counts_ptr,  # [cdiv(N, BLOCK)] int32, out: counts_ptr[p] = true bytes of mask[p*BLOCK : (p+1)*BLOCK]
    n,  # N
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,  # mask bytes per load: BLOCK is a multiple of it
    TRIGGER: tl.constexpr,  # let mask_to_rows_kernel, a programmatic dependent launch, start at once
):
    """The first level of the counted scan: one count per block."""
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    start = tl.program_id(0).to(tl.int64) * BLOCK  # 64-bit: the last block may reach past 2**31
    acc = tl.zeros([TILE], dtype=tl.int32)
    for t in range(0, BLOCK, TILE):
        i = start + t + tl.arange(0, TILE)
        acc += (tl.load(mask_ptr + i, mask=i < n, other=0) != 0).to(tl.int32)  # any nonzero byte is True
    tl.store(counts_ptr + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["n", "n_rows"])
def mask_to_rows_kernel(
    # pointers
    mask_ptr,  # [N] uint8 (a bool mask viewed as bytes)
    rows_ptr,  # [n_rows] int32, out: rows_ptr[offsets[i]] = i for true mask[i] with offsets[i] < n_rows
    count_ptr,  # [1] int32, out: number of true rows in the mask
    counts_ptr,  # [cdiv(N, BLOCK)] int32: the blocks' counts (read only if COUNTED)
    # sizes
    n,  # N
    n_rows,  # capacity of rows_ptr
    # meta-parameters
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,  # mask bytes per step of the in-block cumsum: BLOCK is a multiple of it
    COUNTED: tl.constexpr,  # the prefix summed from counts_ptr (mask_block_counts_kernel ran first)
    AFTER_COUNTS: tl.constexpr,  # a programmatic dependent launch after mask_block_counts_kernel
    COUNTS_CHUNK: tl.constexpr,  # COUNTED: block counts summed per step
    PREFIX_CHUNK: tl.constexpr,  # not COUNTED: mask bytes per load of the prefix count
    PREFIX_LOADS: tl.constexpr,  # not COUNTED: loads in flight per step of it
    WORDS: tl.constexpr,  # not COUNTED: mask_ptr is 4-byte aligned, the prefix is counted in words
    TRIGGER: tl.constexpr,  # let a programmatic dependent launch (row_copy_kernel's AFTER_SCAN) start at once
):
    """Program p finds the true bytes before its block, takes the exclusive cumsum of its block TILE bytes at a
    time, and writes the row index of each true row at its offset. The last program writes the total count."""
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK  # 64-bit: the last block may reach past 2**31
    if COUNTED:
        if AFTER_COUNTS:
            tl.extra.cuda.gdc_wait()  # the counts are written and visible
        lane = tl.arange(0, COUNTS_CHUNK)
        acc = tl.zeros([COUNTS_CHUNK], dtype=tl.int32)
        for s in range(0, pid, COUNTS_CHUNK):
            acc += tl.load(counts_ptr + s + lane, mask=s + lane < pid, other=0)
        prefix = tl.sum(acc, axis=0)
    else:
        prefix = count_true_before(mask_ptr, start, PREFIX_CHUNK, PREFIX_LOADS, WORDS)
    for t in range(0, BLOCK, TILE):
        i = start + t + tl.arange(0, TILE)
        is_true = (tl.load(mask_ptr + i, mask=i < n, other=0) != 0).to(tl.int32)  # any nonzero byte is True
        offsets = prefix + tl.cumsum(is_true, axis=0) - is_true
        tl.store(rows_ptr + offsets, i.to(tl.int32), mask=(is_true != 0) & (offsets < n_rows))
        prefix += tl.sum(is_true, axis=0)
    if pid == tl.num_programs(0) - 1:
        tl.store(count_ptr, prefix)
