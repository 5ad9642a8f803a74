"""Build the row map of a device-resident bool mask, with no host sync."""
import triton
import triton.language as tl

from .row_tiles import count_true_before


@triton.jit(do_not_specialize=["n", "n_rows"])
def mask_to_rows_kernel(
    # pointers
    mask_ptr,  # [N] uint8 (a bool mask viewed as bytes)
    rows_ptr,  # [n_rows] int32, out: rows_ptr[offsets[i]] = i for true mask[i] with offsets[i] < n_rows
    count_ptr,  # [1] int32, out: number of true rows in the mask
    # sizes
    n,  # N
    n_rows,  # capacity of rows_ptr
    # meta-parameters
    BLOCK: tl.constexpr,
    PREFIX_CHUNK: tl.constexpr,  # mask bytes per load of the prefix count
    PREFIX_LOADS: tl.constexpr,  # loads in flight per step of it
    WORDS: tl.constexpr,  # mask_ptr is 4-byte aligned: the prefix is counted in words
    TRIGGER: tl.constexpr,  # let a programmatic dependent launch (row_copy_kernel's AFTER_SCAN) start at once
):
    """Program p owns mask[p*BLOCK : (p+1)*BLOCK]: it counts the true bytes before its block itself (BLOCK
    is large, so this re-read is small), takes the in-block exclusive cumsum, and writes the row index of
    each true row at its offset. The last program writes the total count."""
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    start = pid * BLOCK
    prefix = count_true_before(mask_ptr, start, PREFIX_CHUNK, PREFIX_LOADS, WORDS)
    i = start + tl.arange(0, BLOCK)
    is_true = (tl.load(mask_ptr + i, mask=i < n, other=0) != 0).to(tl.int32)  # any nonzero byte is True
    offsets = prefix + tl.cumsum(is_true, axis=0) - is_true
    tl.store(rows_ptr + offsets, i, mask=(is_true != 0) & (offsets < n_rows))
    if pid == tl.num_programs(0) - 1:
        tl.store(count_ptr, prefix + tl.sum(is_true, axis=0))
