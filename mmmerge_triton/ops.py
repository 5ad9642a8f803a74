"""The merge as registered torch ops, for torch.compile, export and tensor subclasses.

Eager calls from the public API skip these (a custom_op costs 40-55 µs per eager call on the H100 host,
MEASUREMENTS.md); they are what the API calls while tracing, and what ``torch.ops.mmmerge_triton.*``
names. Their fake implementations only check shapes, so a compiled graph holds them without a break.
"""
from __future__ import annotations

import torch

from . import api
from .autograd import gather_masked_rows
from .scatter import supports

_NAMES = ("dst", "mask", "src")


@torch.library.custom_op("mmmerge_triton::masked_row_scatter_", mutates_args=("dst",))
def masked_row_scatter_op_(
    dst: torch.Tensor, mask: torch.Tensor, src: torch.Tensor, accumulate: bool, path: str, check_count: bool
) -> None:
    """In place: dst[mask] = src (or +=). See mmmerge_triton.masked_row_scatter_."""
    api._merge_(dst, mask, src, accumulate=accumulate, path=path, plan=None, check_count=check_count, names=_NAMES)


@masked_row_scatter_op_.register_fake
def _(dst, mask, src, accumulate, path, check_count):
    return None


@torch.library.custom_op("mmmerge_triton::masked_row_scatter", mutates_args=())
def masked_row_scatter_op(
    dst: torch.Tensor, mask: torch.Tensor, src: torch.Tensor, accumulate: bool, path: str, check_count: bool
) -> torch.Tensor:
    """Out of place: a copy of dst with [mask] = src (or +=). See mmmerge_triton.masked_row_scatter."""
    out = dst.clone()
    api._merge_(out, mask, src, accumulate=accumulate, path=path, plan=None, check_count=check_count, names=_NAMES)
    return out


@masked_row_scatter_op.register_fake
def _(dst, mask, src, accumulate, path, check_count):
    return torch.empty_like(dst)


@torch.library.custom_op("mmmerge_triton::masked_row_gather", mutates_args=())
def masked_row_gather_op(dense: torch.Tensor, mask: torch.Tensor, num_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """[num_rows, H]: row j is dense's j-th masked row cast to ``dtype`` (zero past the mask's true rows)."""
    if supports(dense.device):
        return gather_masked_rows(dense, mask, num_rows, dtype)
    picked = dense[mask.to(dense.device)][:num_rows].to(dtype)
    out = picked.new_zeros(num_rows, dense.shape[-1])
    out[: picked.shape[0]] = picked
    return out


@masked_row_gather_op.register_fake
def _(dense, mask, num_rows, dtype):
    return dense.new_empty(num_rows, dense.shape[-1], dtype=dtype)


def _setup_context(ctx, inputs, output):
    dst, mask, src, accumulate, path, _ = inputs
    ctx.save_for_backward(mask)
    ctx.accumulate, ctx.path, ctx.src_dtype, ctx.n_rows = accumulate, path, src.dtype, src.shape[0]


def _backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    grad_src = torch.ops.mmmerge_triton.masked_row_gather(grad, mask, ctx.n_rows, ctx.src_dtype)
    grad_dst = grad
    if not ctx.accumulate:  # the rows that were overwritten get no gradient
        zeros = grad.new_zeros(ctx.n_rows, grad.shape[-1])
        grad_dst = torch.ops.mmmerge_triton.masked_row_scatter(grad, mask, zeros, False, ctx.path, False)
    return grad_dst, None, grad_src, None, None, None


masked_row_scatter_op.register_autograd(_backward, setup_context=_setup_context)
