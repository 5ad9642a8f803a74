"""The merge paths by name (``path=``): "triton" (executor.py runs it) and the PyTorch runners, one signature
each: ``run(dst, mask, src, accumulate)``.

Every runner writes ``dst[mask] = src`` (or ``+=``) in place, with src cast to dst's dtype. Inputs arrive
checked (see inputs.py): dst [..., H] float64/32/16/bfloat16; mask bool of shape dst.shape[:-1], on the CPU or
on dst's device; src [M, H] of those dtypes on dst's device.
"""
from __future__ import annotations

import numpy as np
import torch

from .inputs import as_rows
from .kernel_config import PATHS
from .rowmap import host_rows


def rows_view(dst: torch.Tensor, path: str) -> torch.Tensor:
    view = as_rows(dst)
    if view is None:
        raise ValueError(
            f"path={path!r} needs the destination's leading dims to flatten to rows without a copy "
            f"(shape {tuple(dst.shape)}, strides {dst.stride()}); use path='index_put' or 'auto'"
        )
    return view


def merge_index_put(dst, mask, src, accumulate):
    """``dst[mask] = src.to(dst.dtype)``: what vLLM runs. Since PyTorch 2.9 a CPU mask costs no sync (a
    host nonzero, then an async copy of K int64 indices); a GPU mask syncs."""
    dst.index_put_((mask,), src.to(dst.dtype), accumulate=accumulate)


def merge_masked_scatter(dst, mask, src, accumulate):
    """Legacy ``dst.masked_scatter_(mask[..., None], src)``: no sync, but it takes a prefix sum over the
    N*H broadcast mask (about 9 bytes per element of dst). ``accumulate`` adds a dense scattered copy, as
    engines add deepstack features today, then keeps the untouched rows as they were."""
    # != 0: a bool's byte may be 2 or 255 (a uint8 view); PyTorch's CUDA prefix sums would add it as such.
    expanded = (mask.to(dst.device, non_blocking=True).view(torch.uint8) != 0).unsqueeze(-1)
    values = src.to(dst.dtype)
    # The aten op by name: integrations.transformers may have rerouted the Tensor method.
    if accumulate:  # a dense scattered copy added where the mask is set (untouched rows keep their bits, -0.0 too)
        scattered = torch.ops.aten.masked_scatter_(torch.zeros_like(dst), expanded, values)
        dst.copy_(torch.where(expanded, dst + scattered, dst))
    else:
        torch.ops.aten.masked_scatter_(dst, expanded, values)


def merge_index_copy(dst, mask, src, accumulate):
    """Row indices then ``index_copy_`` (``index_add_`` to accumulate). A GPU mask takes SGLang's recipe
    (cumsum ranks scattered into a row list: no sync, O(N) int64; a count mismatch there ends in a
    device-side assert); a CPU mask, ``np.flatnonzero`` and a pinned copy."""
    dst2d = rows_view(dst, "index_copy")
    n, m = dst2d.shape[0], src.shape[0]
    if mask.device.type == "cpu":
        index = torch.from_numpy(host_rows(mask).astype(np.int64, copy=False))  # int64 past 2**31 rows
        if dst.is_cuda:
            index = index.pin_memory().to(dst.device, non_blocking=True)
    else:
        flat = mask.reshape(-1).view(torch.uint8) != 0  # 0/1 bytes: a bool may hold 2 or 255 (a uint8 view)
        ranks = torch.cumsum(flat, 0) - 1
        ranks.masked_fill_(~flat, m)
        rows = torch.full((m + 1,), n, dtype=torch.long, device=dst.device)
        rows.scatter_(0, ranks, torch.arange(n, device=dst.device))
        index = rows[:m]
    values = src.to(dst.dtype)
    if accumulate:
        dst2d.index_add_(0, index, values)
    else:
        dst2d.index_copy_(0, index, values)


def at_index_put(dst, positions, src, accumulate):
    """``dst.index_put_((positions,), src.to(dst.dtype))``: row positions (on dst's device) by index_put."""
    dst.index_put_((positions.to(dst.device, torch.long, non_blocking=True),), src.to(dst.dtype),
                   accumulate=accumulate)


def at_index_copy(dst, positions, src, accumulate):
    """``dst.index_copy_(0, positions, src.to(dst.dtype))`` (``index_add_`` to accumulate)."""
    index = positions.to(dst.device, torch.long, non_blocking=True)  # index_copy_ takes int64 alone
    if accumulate:
        dst.index_add_(0, index, src.to(dst.dtype))
    else:
        dst.index_copy_(0, index, src.to(dst.dtype))


POSITION_RUNNERS = {"index_put": at_index_put, "index_copy": at_index_copy}
"""The PyTorch runners of a merge at row positions: ``run(dst [N, H], positions [M], src, accumulate)``."""

RUNNERS = {
    "index_put": merge_index_put,
    "masked_scatter": merge_masked_scatter,
    "index_copy": merge_index_copy,
}

assert PATHS == ("triton", *RUNNERS), "kernel_config.PATHS names the runners of this module, in order"
