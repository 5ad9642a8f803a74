"""The merge as registered torch ops, for torch.compile, export and tensor subclasses.

Plain eager calls from the public API skip these (a custom_op costs 40-55 µs per eager call, measured on the H100
host); they are what the API calls while tracing, for tensor subclasses and dispatch modes, and where a gradient
is needed, and what ``torch.ops.mmmerge_triton.*`` names. Their implementations run core.merge_. Each checks
its inputs as the Python API does (they are public). Their fake implementations only check shapes, so a
compiled graph holds them without a break. The out-of-place scatter and the gather have
autograd formulas written with these same ops, so gradients of any order are PyTorch's; the in-place
scatter has none (PyTorch registers none for a mutating custom op) and refuses inputs that need one.
"""
from __future__ import annotations

import numpy as np
import torch

from . import core, inputs
from .executor import gather
from .scatter import supports

_NAMES = ("dst", "mask", "src")


@torch.library.custom_op("mmmerge_triton::masked_row_scatter_", mutates_args=("dst",))
def masked_row_scatter_op_(
    dst: torch.Tensor, mask: torch.Tensor, src: torch.Tensor, accumulate: bool, path: str, check_count: bool
) -> None:
    """In place: dst[mask] = src (or +=). See mmmerge_triton.masked_row_scatter_."""
    core.merge_(dst, mask, src, accumulate=accumulate, path=path, plan=None, check_count=check_count, names=_NAMES)


@masked_row_scatter_op_.register_fake
def _(dst, mask, src, accumulate, path, check_count):
    return None


_lib = torch.library.Library("mmmerge_triton", "IMPL")


def _refusing_autograd(name: str):
    """The autograd kernel of the in-place op ``name``: no formula, so a call that needs gradients is refused
    before it writes (without this, PyTorch would run it and drop src's gradient silently)."""
    op = getattr(torch.ops.mmmerge_triton, name)

    def autograd_kernel(dst, index, src, accumulate, path, check):
        if torch.is_grad_enabled() and (dst.requires_grad or src.requires_grad):
            raise RuntimeError(
                f"torch.ops.mmmerge_triton.{name} has no autograd formula (it mutates dst): with inputs that require "
                f"grad, call mmmerge_triton.{name} (it routes gradients through the out-of-place op) or "
                f"torch.ops.mmmerge_triton.{name[:-1]}"
            )
        with torch._C._AutoDispatchBelowAutograd():
            return op(dst, index, src, accumulate, path, check)

    # custom_op registered an autograd kernel of its own, which runs the op and drops src's gradient: override it.
    _lib.impl(name, autograd_kernel, "Autograd", allow_override=True)


_refusing_autograd("masked_row_scatter_")


@torch.library.custom_op("mmmerge_triton::masked_row_scatter", mutates_args=())
def masked_row_scatter_op(
    dst: torch.Tensor, mask: torch.Tensor, src: torch.Tensor, accumulate: bool, path: str, check_count: bool
) -> torch.Tensor:
    """Out of place: a contiguous copy of dst with [mask] = src (or +=). See mmmerge_triton.masked_row_scatter."""
    inputs.check_dst(dst, "dst")
    out = dst.clone(memory_format=torch.contiguous_format)
    core.merge_(out, mask, src, accumulate=accumulate, path=path, plan=None, check_count=check_count, names=_NAMES)
    return out


@masked_row_scatter_op.register_fake
def _(dst, mask, src, accumulate, path, check_count):
    return torch.empty_like(dst, memory_format=torch.contiguous_format)


def scatter_backward(grad: torch.Tensor, mask: torch.Tensor, m: int, src_dtype: torch.dtype, accumulate: bool,
                     path: str, needs_dst: bool, needs_src: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_dst, grad_src) of out = dst with out[mask] = src (or +=) by ``path``: src's m rows gathered from grad
    (by PyTorch's indexing for a PyTorch path, as its own backward gathers; else the Triton gather), and grad with
    the overwritten rows zeroed by the same path (grad itself with ``accumulate``). Written with these ops and
    PyTorch's, which have formulas of their own: differentiable again (double backward, Hessian-vector products).
    Neither part needs dst's old values. No rows (m = 0): src gets no gradient, as with index_put_."""
    grad_src = grad_dst = None
    if needs_src and m:
        grad_src = (masked_row_gather_op(grad, mask, m, src_dtype) if path in ("auto", "triton")
                    else _gathered_by_torch(grad, mask, m, src_dtype))
    if needs_dst:
        grad_dst = grad
        if not accumulate:  # the overwritten rows get no gradient
            grad_dst = masked_row_scatter_op(grad, mask, grad.new_zeros(m, grad.shape[-1]), False, path, False)
    return grad_dst, grad_src


def _setup_scatter(ctx, inputs, output):
    dst, mask, src, accumulate, path, _ = inputs
    ctx.save_for_backward(mask)
    ctx.accumulate, ctx.src_dtype, ctx.m, ctx.path = accumulate, src.dtype, src.shape[0], path


def _scatter_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    grad_dst, grad_src = scatter_backward(grad, mask, ctx.m, ctx.src_dtype, ctx.accumulate, ctx.path,
                                          ctx.needs_input_grad[0], ctx.needs_input_grad[2])
    return grad_dst, None, grad_src, None, None, None


masked_row_scatter_op.register_autograd(_scatter_backward, setup_context=_setup_scatter)


def _check_gather(dense, mask, num_rows, dtype) -> None:
    inputs.check_dst(dense, "dense")
    inputs.check_mask(mask, dense, "mask", "dense")
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    if dtype not in inputs.MERGE_DTYPES:
        raise TypeError(f"dtype must be float64, float32, float16 or bfloat16, got {dtype}")


@torch.library.custom_op("mmmerge_triton::masked_row_gather", mutates_args=())
def masked_row_gather_op(dense: torch.Tensor, mask: torch.Tensor, num_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """[num_rows, H]: row j is dense's j-th masked row cast to ``dtype`` (zero past the mask's true rows).
    dense: [..., H]; mask: bool of shape dense.shape[:-1], on the CPU or on dense's device."""
    _check_gather(dense, mask, num_rows, dtype)
    if supports(dense.device) and dense.dtype in inputs.TRITON_DTYPES and dtype in inputs.TRITON_DTYPES:
        return gather(dense, mask, num_rows, dtype)
    return _gathered_by_torch(dense, mask, num_rows, dtype)


def _gathered_by_torch(dense: torch.Tensor, mask: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
    """masked_row_gather by PyTorch's indexing (a device mask syncs): [m, H], zero past the mask's true rows."""
    picked = dense[mask.to(dense.device)][:m].to(dtype)
    out = picked.new_zeros(m, dense.shape[-1])
    out[: picked.shape[0]] = picked
    return out


@masked_row_gather_op.register_fake
def _(dense, mask, num_rows, dtype):
    _check_gather(dense, mask, num_rows, dtype)
    return dense.new_empty(num_rows, dense.shape[-1], dtype=dtype)


def _setup_gather(ctx, inputs, output):
    dense, mask, num_rows, _ = inputs
    ctx.save_for_backward(mask)
    ctx.dense_shape, ctx.dense_dtype = dense.shape, dense.dtype


def _gather_backward(ctx, grad):
    """grad_dense: zeros with the gathered rows' gradients scattered back (the first min(K, num_rows) rows)."""
    (mask,) = ctx.saved_tensors
    if mask.is_cpu:  # counted on the host: the scatter back takes exactly K rows (a device mask moves min(K, M))
        k = int(np.count_nonzero(mask.numpy()))
        grad = grad[:k] if k <= grad.shape[0] else torch.cat([grad, grad.new_zeros(k - grad.shape[0], grad.shape[1])])
    zeros = grad.new_zeros(ctx.dense_shape, dtype=ctx.dense_dtype)
    grad_dense = masked_row_scatter_op(zeros, mask, grad, False, "auto", False)
    return grad_dense, None, None, None


masked_row_gather_op.register_autograd(_gather_backward, setup_context=_setup_gather)


# Row positions: the same ops with ``positions`` [M] int32/int64 in the mask's place (indexed_row_scatter).
_AT_NAMES = ("dst", "positions", "src")


@torch.library.custom_op("mmmerge_triton::indexed_row_scatter_", mutates_args=("dst",))
def indexed_row_scatter_op_(
    dst: torch.Tensor, positions: torch.Tensor, src: torch.Tensor, accumulate: bool, path: str, check: bool
) -> None:
    """In place: dst.index_copy_(0, positions, src) (index_add_ to accumulate). See
    mmmerge_triton.indexed_row_scatter_."""
    core.merge_(dst, positions, src, accumulate=accumulate, path=path, plan=None, check_count=check,
                names=_AT_NAMES, at_positions=True)


@indexed_row_scatter_op_.register_fake
def _(dst, positions, src, accumulate, path, check):
    return None


_refusing_autograd("indexed_row_scatter_")


@torch.library.custom_op("mmmerge_triton::indexed_row_scatter", mutates_args=())
def indexed_row_scatter_op(
    dst: torch.Tensor, positions: torch.Tensor, src: torch.Tensor, accumulate: bool, path: str, check: bool
) -> torch.Tensor:
    """Out of place: a contiguous copy of dst with rows ``positions`` = src (or +=). See
    mmmerge_triton.indexed_row_scatter."""
    inputs.check_dst(dst, "dst")
    out = dst.clone(memory_format=torch.contiguous_format)
    core.merge_(out, positions, src, accumulate=accumulate, path=path, plan=None, check_count=check,
                names=_AT_NAMES, at_positions=True)
    return out


@indexed_row_scatter_op.register_fake
def _(dst, positions, src, accumulate, path, check):
    return torch.empty_like(dst, memory_format=torch.contiguous_format)


def _setup_at(ctx, inputs, output):
    dst, positions, src, accumulate, path, _ = inputs
    ctx.save_for_backward(positions)
    ctx.accumulate, ctx.src_dtype, ctx.path = accumulate, src.dtype, path


def _at_backward(ctx, grad):
    """grad_src[j] = grad[positions[j]] (zero where a device position was out of range, and so skipped);
    grad_dst = grad with the written rows zeroed (grad itself with accumulate). PyTorch's ops and this one:
    differentiable again, no sync, no device assert."""
    (positions,) = ctx.saved_tensors
    grad_dst = grad_src = None
    if ctx.needs_input_grad[2]:
        index = positions.to(grad.device, torch.long, non_blocking=True)
        n = grad.shape[0]
        inside = (index >= 0) & (index < n)
        picked = (grad.index_select(0, torch.where(inside, index, 0)) if n
                  else grad.new_zeros(index.shape[0], grad.shape[-1]))
        grad_src = torch.where(inside[:, None], picked, 0).to(ctx.src_dtype)
    if ctx.needs_input_grad[0]:
        grad_dst = grad
        if not ctx.accumulate:
            zeros = grad.new_zeros(positions.shape[0], grad.shape[-1])
            grad_dst = indexed_row_scatter_op(grad, positions, zeros, False, ctx.path, False)
    return grad_dst, None, grad_src, None, None, None


indexed_row_scatter_op.register_autograd(_at_backward, setup_context=_setup_at)
