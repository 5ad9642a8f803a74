"""Autograd for the Triton path: an in-place function that marks dst dirty, so no clone is needed.

Forward: dst[rows[j]] = src[j] (or +=). Backward, for the rows that moved (j < min(count, M)):
grad_src[j] = grad[rows[j]] cast to src's dtype; grad_dst = grad with those rows zeroed (as it is, with
``accumulate``). Neither needs dst's old values, which is what lets the in-place form be differentiable.
The backward is written with the registered ops (ops.py), which have autograd formulas of their own: so it is
differentiable again (double backward, Hessian-vector products), and eager and compiled calls share it.
"""
from __future__ import annotations

import torch

from .dispatch import row_map_config
from .paths import merge_triton
from .rowmap import RowMap, device_rows, host_rows, stage_rows
from .scatter import as_rows, gather_rows


def rowmap_for(mask: torch.Tensor, device: torch.device, n_rows: int) -> tuple[RowMap, int]:
    """The row map of ``mask`` for kernels on ``device``, and how many of its rows to use: a CPU mask's first
    min(K, n_rows) rows (staged), or a device mask's map with its count on the device (n_rows)."""
    if mask.device.type == "cpu":
        rows = host_rows(mask)[:n_rows]
        return stage_rows(rows, device), rows.size
    return device_rows(mask, n_rows), n_rows


def gather_masked_rows(dense: torch.Tensor, mask: torch.Tensor, n_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """[n_rows, H]: row j is the j-th masked row of ``dense`` [..., H], cast to ``dtype`` (zero past the
    mask's true rows)."""
    dense2d = as_rows(dense.contiguous())
    (rows, count), used = rowmap_for(mask, dense.device, n_rows)
    cfg = row_map_config(dense2d.shape[1])
    return gather_rows(dense2d, rows, count, n_rows, dtype, cfg, valid=used)


def scatter_backward(grad: torch.Tensor, mask: torch.Tensor, n_rows: int, src_dtype: torch.dtype, accumulate: bool,
                     needs_dst: bool, needs_src: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_dst, grad_src) of out = dst with out[mask] = src (or +=): src's rows gathered from grad, and grad
    with the overwritten rows zeroed (grad itself with ``accumulate``)."""
    grad_src = grad_dst = None
    if needs_src:
        grad_src = torch.ops.mmmerge_triton.masked_row_gather(grad, mask, n_rows, src_dtype)
    if needs_dst:
        grad_dst = grad
        if not accumulate:  # the overwritten rows get no gradient
            zeros = grad.new_zeros(n_rows, grad.shape[-1])
            grad_dst = torch.ops.mmmerge_triton.masked_row_scatter(grad, mask, zeros, False, "auto", False)
    return grad_dst, grad_src


class TritonScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dst, src, mask, plan, accumulate, config):
        merge_triton(dst, mask, src, accumulate, plan.rowmap if plan is not None else None, config)
        ctx.mark_dirty(dst)
        ctx.save_for_backward(mask)  # backward rebuilds its row map from the mask saved here, not from a
        ctx.accumulate, ctx.src_dtype, ctx.n_rows = accumulate, src.dtype, src.shape[0]  # plan updated since
        return dst

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        grad_dst, grad_src = scatter_backward(grad, mask, ctx.n_rows, ctx.src_dtype, ctx.accumulate,
                                              ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_dst, grad_src, None, None, None, None
