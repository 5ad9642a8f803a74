"""Copy staged host words into device memory, as a kernel (not a copy engine transfer)."""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_words"])
def copy_words_kernel(
    src_ptr,  # [n_words] int32, pinned host memory read over unified addressing
    dst_ptr,  # [n_words] int32, device memory
    n_words,
    BLOCK: tl.constexpr,
):
    """dst[i] = src[i] for i < n_words. The staging ring's tables reach the device through this launch rather
    than a Tensor.copy_: PyTorch's pinned allocator records, on freeing a block, an event on every stream a
    copy_ used it on, and a stream that another library destroyed since would crash that record."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_words
    tl.store(dst_ptr + i, tl.load(src_ptr + i, mask=ok), mask=ok)
