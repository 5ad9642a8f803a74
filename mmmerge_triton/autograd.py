"""Autograd for the Triton path: an in-place function that marks dst dirty, so no clone is needed.

Forward: dst[rows[j]] = src[j] (or +=). Backward, for the rows that moved (j < min(count, M)):
grad_src[j] = grad[rows[j]] cast to src's dtype; grad_dst = grad with those rows zeroed (as it is, with
``accumulate``). Neither needs dst's old values, which is what lets the in-place form be differentiable.
"""
from __future__ import annotations

import torch

from .paths import merge_triton
from .rowmap import RowMap, device_rows, staged_rows
from .scatter import as_rows, default_config, gather_rows, zero_rows


def rowmap_for(mask: torch.Tensor, plan, device: torch.device, n_rows: int) -> RowMap:
    """The row map of ``mask`` for kernels on ``device``: the plan's if given, else staged or built anew."""
    if plan is not None:
        return plan.rowmap
    if mask.device.type == "cpu":
        return staged_rows(mask, n_rows, device)
    return device_rows(mask, n_rows)


def gather_masked_rows(dense: torch.Tensor, mask: torch.Tensor, n_rows: int, dtype: torch.dtype, plan=None):
    """[n_rows, H]: row j is the j-th masked row of ``dense`` [..., H], cast to ``dtype`` (zero past the
    mask's true rows)."""
    dense2d = as_rows(dense.contiguous())
    rows, count = rowmap_for(mask, plan, dense.device, n_rows)
    cfg = default_config(dense2d.shape[1], n_rows, dense2d.shape[0], False)
    return gather_rows(dense2d, rows, count, n_rows, dtype, cfg)


class TritonScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dst, src, mask, plan, accumulate, config):
        merge_triton(dst, mask, src, accumulate, plan.rowmap if plan is not None else None, config)
        ctx.mark_dirty(dst)
        ctx.save_for_backward(mask)
        ctx.plan, ctx.accumulate, ctx.src_dtype, ctx.n_rows = plan, accumulate, src.dtype, src.shape[0]
        return dst

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        grad_src = grad_dst = None
        if ctx.needs_input_grad[1]:
            grad_src = gather_masked_rows(grad, mask, ctx.n_rows, ctx.src_dtype, ctx.plan)
        if ctx.needs_input_grad[0]:
            grad_dst = grad
            if not ctx.accumulate:  # the overwritten rows get no gradient
                grad_dst = grad.contiguous().clone()
                rows, count = rowmap_for(mask, ctx.plan, grad.device, ctx.n_rows)
                grad2d = as_rows(grad_dst)
                zero_rows(grad2d, rows, count, ctx.n_rows, default_config(grad2d.shape[1], ctx.n_rows, 0, False))
        return grad_dst, grad_src, None, None, None, None
