"""Triton kernels of mmmerge_triton (installed as ``mmmerge_triton.kernels``). Pure Triton: no torch here.

- row_copy_kernel: rows move through a row map (rows[offsets[i]] = i), one program per ROWS moved rows.
- mask_row_copy_kernel: rows move straight from a device mask, offsets found in-kernel (one launch).
- mask_to_rows_kernel: a device mask's row map and count, for row_copy_kernel.
- multi_row_copy_kernel: as row_copy_kernel, the compact rows read in place from a list of tensors.
- request_rows_kernel, request_row_copy_kernel: per-request counts, status and row map of a batch; its copy.
- copy_words_kernel: staged host words into device memory.
"""
from .copy_words import copy_words_kernel
from .mask_row_copy import mask_row_copy_kernel
from .mask_rows import mask_to_rows_kernel
from .multi_row_copy import multi_row_copy_kernel
from .request_rows import request_row_copy_kernel, request_rows_kernel
from .row_copy import ADD, COPY, GATHER, ZERO, row_copy_kernel

__all__ = ["row_copy_kernel", "mask_row_copy_kernel", "mask_to_rows_kernel", "multi_row_copy_kernel",
           "request_rows_kernel", "request_row_copy_kernel", "copy_words_kernel", "COPY", "ADD", "GATHER", "ZERO"]
