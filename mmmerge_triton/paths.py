"""The merge paths, one signature each: ``run(dst, mask, src, accumulate, rowmap=None, config=None)``.

Every path writes ``dst[mask] = src`` (or ``+=``) in place, with src cast to dst's dtype. Inputs arrive
checked (see inputs.py): dst [..., H] fp32/fp16/bf16; mask bool of shape dst.shape[:-1], on the CPU or on
dst's device; src [M, H] fp32/fp16/bf16 on dst's device. ``rowmap`` (from a MergePlan) and ``config``
matter to the Triton path only.
"""
from __future__ import annotations

import numpy as np
import torch

from .executor import ITEMS, PLAN_ROWS, Launch, addressing, execute, launch_kind
from .items import ItemList, merge_items
from .kernel_config import KernelConfig
from .rowmap import RowMap, check_fits, host_rows
from .scatter import ADD, COPY, as_rows, mask_bytes, row_copy, supports


def rows_view(dst: torch.Tensor, path: str) -> torch.Tensor:
    view = as_rows(dst)
    if view is None:
        raise ValueError(
            f"path={path!r} needs the destination's leading dims to flatten to rows without a copy "
            f"(shape {tuple(dst.shape)}, strides {dst.stride()}); use path='index_put' or 'auto'"
        )
    return view


def merge_triton(dst, mask, src, accumulate, rowmap: RowMap | None = None, config: KernelConfig | None = None,
                 item_stride: int | None = None):
    """The Triton row copy with ``config`` (dispatch.decide's), for a tensor or a list of items: dst's row view,
    then the kind of launch that executor.launch_kind names for these inputs (the one dispatch reported).

    src: [M, H]; or an ItemList of items sharing the row stride ``item_stride``, read in place by one launch
    (items.merge_items). A tensor src goes to executor.execute (how a CPU or device mask runs, and what it
    costs, is described there), or, with a plan's ``rowmap``, one row_copy through it. The kernels read memory
    raw, so a source with the negative bit (z.conj().imag) is resolved first, as a strided one is copied (a
    destination with it is refused by dispatch.triton_refusal; a list with it is concatenated by api.py).
    Raises CountMismatch (a CPU mask whose true rows are not src's rows) before anything is written."""
    if config is None:
        raise TypeError("merge_triton needs the KernelConfig that dispatch.decide picks")
    if not supports(dst.device):
        raise RuntimeError(
            "path='triton' runs on CUDA tensors; to run it on the CPU, set TRITON_INTERPRET=1 "
            "before importing mmmerge_triton"
        )
    dst2d = dst if dst.dim() == 2 and dst.stride(1) == 1 else rows_view(dst, "triton")
    check_fits(dst2d.shape[0], "path='triton'")
    kind = launch_kind(config, mask, rowmap is not None, isinstance(src, ItemList))
    if kind == ITEMS:
        merge_items(dst2d, mask, src, item_stride, accumulate, config, rowmap)
        return
    if src.is_neg():
        src = src.resolve_neg()
    src2d = src if src.stride(1) == 1 or src.shape[1] == 1 else src.contiguous()  # src is [M, H]
    if kind == PLAN_ROWS:
        row_copy(dst2d, src2d, rowmap.rows, rowmap.count, ADD if accumulate else COPY, config)
        return
    flat = mask_bytes(mask) if mask.is_cuda else mask  # alive until the launches are queued
    execute(Launch(kind, config, dst2d.shape[0], dst.device), dst2d, flat, src2d, accumulate,
            addressing(dst2d, flat, src2d))


def merge_index_put(dst, mask, src, accumulate, rowmap=None, config=None):
    """``dst[mask] = src.to(dst.dtype)``: what vLLM runs. Since PyTorch 2.9 a CPU mask costs no sync (a
    host nonzero, then an async copy of K int64 indices); a GPU mask syncs."""
    dst.index_put_((mask,), src.to(dst.dtype), accumulate=accumulate)


def merge_masked_scatter(dst, mask, src, accumulate, rowmap=None, config=None):
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


def merge_index_copy(dst, mask, src, accumulate, rowmap=None, config=None):
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


RUNNERS = {
    "triton": merge_triton,
    "index_put": merge_index_put,
    "masked_scatter": merge_masked_scatter,
    "index_copy": merge_index_copy,
}

PATHS: tuple[str, ...] = tuple(RUNNERS)
"""Names accepted by ``path=`` (besides "auto")."""
