"""The one orchestrator of a merge: check the arguments, decide (dispatch.decide), count, resolve memory shared
with dst, then write through the decided path (paths.py: the Triton executor or a PyTorch runner).

``merge_`` is what every route runs once its inputs are plain tensors in hand: the public API's general path
(api.py; the prepared call of lean.py serves the common call before it) and the registered ops (ops.py, for
torch.compile, subclasses and dispatch modes). It raises before anything is written.
"""
from __future__ import annotations

import numpy as np
import torch

from . import inputs
from .autograd import TritonScatter
from .dispatch import Decision, decide
from .executor import ITEMS
from .items import ItemList, common_row_stride
from .paths import PATHS, RUNNERS, merge_triton
from .rowmap import CountMismatch

_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_forward_ad = torch.autograd.forward_ad  # its _current_level is -1 outside a dual level
_functorch_stack = torch._C._functorch.peek_interpreter_stack  # None outside torch.func's transforms
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def transformed() -> bool:
    """Whether a function transform is on: torch.func's vmap, grad or jvp (whose tensors are wrappers without
    storage, and under which a host read such as ``.numpy()`` fails), or forward-mode AD (a dual level: tangents
    the kernels cannot see). A merge then runs PyTorch's index_put, which every transform knows, before anything
    reads an address (_merge_by_torch); the registered ops have no batching rule or jvp, so it skips them too.
    Two reads where none is on; never while tracing (torch.compile sees the registered ops)."""
    return not _is_compiling() and (_forward_ad._current_level >= 0 or _functorch_stack() is not None)



def _placeholders(mask, plan, check_count: bool) -> int | None:
    """The mask's true rows, where knowing them costs no sync (a CPU mask), or where the caller asked for
    the sync (check_count=True); else None."""
    if mask.is_cpu:
        return plan.host_count if plan is not None else int(np.count_nonzero(mask.numpy()))
    if check_count:
        return int(plan.count.item() if plan is not None else mask.sum().item())
    return None



def merge_(dst, mask, src, *, accumulate, path, plan, check_count, names, expression=None) -> None:
    """Check everything, then write dst[mask] = src (or +=) in place. Raises before any write.

    src: [M, H], or an ItemList of [m_i, H] items (already checked) that the Triton path reads in place.
    expression: the embeddings as the caller passed them, spelled vLLM's way in a count error.
    Gradients: an in-place call that needs them arrives here on a fresh clone (see wants_grad), so the
    Triton path may mark it dirty.
    """
    dst_name, mask_name, _ = names
    n_rows, src_dtype = check_args(dst, mask, src, accumulate, path, check_count, names)
    if plan is not None:
        if plan.device != dst.device:
            raise ValueError(f"plan was built for {plan.device}; {dst_name} is on {dst.device}")
        plan.check_current(mask_name)
    inputs.check_writable(dst, dst_name)
    if dst.dim() == 1:  # one row and a 0-dim mask: every path takes them as [1, H] and [1] (index_put_ would not)
        dst, mask = dst.unsqueeze(0), mask.reshape(1)
    if transformed():
        _merge_by_torch(dst, mask, src, n_rows, accumulate=accumulate, path=path, expression=expression)
        return
    _execute(dst, mask, src, n_rows, src_dtype, accumulate=accumulate, path=path, plan=plan, check_count=check_count,
             names=names, expression=expression)



def check_args(dst, mask, src, accumulate, path, check_count, names) -> tuple[int, torch.dtype]:
    """The argument checks of every route, in one order (flags, path, dst, mask, src) and in the caller's
    ``names``: src's rows and dtype. src: a tensor, or an ItemList of checked items (its dtype torch.cat's)."""
    dst_name, mask_name, src_name = names
    inputs.check_flag(accumulate, "accumulate")
    inputs.check_flag(check_count, "check_count")
    inputs.check_path(path, PATHS)
    inputs.check_dst(dst, dst_name)
    inputs.check_mask(mask, dst, mask_name, dst_name)
    if isinstance(src, ItemList):
        return sum(src.rows), src.dtype
    inputs.check_src(src, dst, src_name, dst_name)
    return src.shape[0], src.dtype



def unshared(src: torch.Tensor, dst: torch.Tensor, src_name: str, dst_name: str) -> torch.Tensor:
    """src, or where it shares dst's bytes in another dtype its copy in dst's dtype (the copy that
    ``dst[mask] = src.to(dst.dtype)`` makes: PyTorch's result). Sharing them in dst's dtype raises, as PyTorch
    refuses such a write."""
    if not inputs.overlaps(src, dst):
        return src
    if src.dtype == dst.dtype:
        raise ValueError(f"{src_name} shares memory with {dst_name}, which the merge writes (PyTorch refuses "
                         f"such a write where it can tell: some elements refer to a single memory location). "
                         f"Clone {src_name} first")
    return src.to(dst.dtype)



def _execute(dst, mask, src, n_rows: int, src_dtype, *, accumulate, path, plan, check_count, names,
             expression=None) -> None:
    """Decide, count, resolve shared memory, then write: the rest of merge_ once the inputs are known good
    (by merge_'s checks)."""
    dst_name, mask_name, src_name = names
    decision, stride = decision_for(dst, mask, src, n_rows, src_dtype, path, plan)
    path = decision.path
    empty = n_rows == 0 or dst.shape[-1] == 0
    # The Triton path counts a CPU mask itself, from the row map it stages (CountMismatch, before any write).
    if path != "triton" or plan is not None or empty or not mask.is_cpu:
        placeholders = _placeholders(mask, plan, check_count)
        if placeholders is not None and placeholders != n_rows:
            raise inputs.count_mismatch(n_rows, placeholders, spelled(expression))
    if empty:
        return
    # Memory shared with dst: read it before writing, or refuse where PyTorch refuses (a same-dtype src). A list
    # sharing it is concatenated (the decision reads it so).
    if mask.device == dst.device and inputs.overlaps(mask, dst):
        mask = mask.clone()
    if not isinstance(src, ItemList):
        src = unshared(src, dst, src_name, dst_name)
    rowmap = plan.rowmap if plan is not None else None
    try:
        if isinstance(src, ItemList):
            if decision.kind == ITEMS:
                merge_triton(dst, mask, src, accumulate, rowmap, decision.config, stride)
                _bump_version(dst)
                return
            src = torch.cat(src.tensors)
        if path != "triton":
            RUNNERS[path](dst, mask, src, accumulate)
        elif _needs_grad(dst, src):
            TritonScatter.apply(dst, src, mask, plan, accumulate, decision.config)
        else:
            merge_triton(dst, mask, src, accumulate, rowmap, decision.config)
            _bump_version(dst)
    except CountMismatch as error:
        raise inputs.count_mismatch(error.num_rows, error.num_placeholders, spelled(expression)) from None



def decision_for(dst, mask, src, n_rows: int, src_dtype, path, plan) -> tuple[Decision, int | None]:
    """dispatch.decide's whole decision for checked inputs (what _execute runs and explain() returns), and a
    list's common row stride: the facts of the call that decide reads for a list (one row stride, memory
    shared with dst, gradients, the negative bit) are gathered here, for both."""
    if not isinstance(src, ItemList):
        return decide(dst, mask, src_dtype, n_rows, path, src, plan=plan is not None), None
    stride = common_row_stride(src.tensors)
    readable = (stride is not None and not _needs_grad(dst, src) and not any(map(_Tensor.is_neg, src.tensors))
                and not inputs.any_overlaps(src.tensors, dst))
    decision = decide(dst, mask, src_dtype, n_rows, path, plan=plan is not None, items=len(src.rows),
                      items_readable=readable)
    return decision, stride



def _needs_grad(dst, src) -> bool:
    return torch.is_grad_enabled() and (dst.requires_grad or requires_grad(src))



_TRANSFORM_REFUSAL = ("path='triton' cannot merge under a function transform (torch.func's vmap, grad or jvp, or "
                      "forward-mode AD): the kernels see neither batch dims nor tangents. path='auto' takes index_put "
                      "there")



def _merge_by_torch(dst, mask, src, n_rows: int, *, accumulate, path, expression=None) -> None:
    """The rest of merge_ under a function transform (see transformed): the count, then PyTorch's index_put_,
    whose batching rule and forward and backward formulas are PyTorch's, as are its rules for shared memory.
    Every path but "triton" (refused) runs it. Reads no address and nothing through numpy; a mask that the
    transform wraps (vmapped) is left to index_put_, which refuses what it cannot take."""
    if path == "triton":
        raise ValueError(_TRANSFORM_REFUSAL)
    if not _functorch_wrapped(mask):
        placeholders = int(mask.count_nonzero())
        if placeholders != n_rows:
            raise inputs.count_mismatch(n_rows, placeholders, spelled(expression))
    RUNNERS["index_put"](dst, mask, torch.cat(src.tensors) if isinstance(src, ItemList) else src, accumulate)



def spelled(expression) -> str | None:
    """The count expression of an error message; the embeddings themselves until an error needs it (spelling
    it out on every call would cost more than the rest of the checks)."""
    return None if expression is None else inputs.count_expression(expression)



def requires_grad(src) -> bool:
    """src: a tensor, a list of tensors, or an ItemList (a generator, not map(attrgetter): Dynamo traces it)."""
    if isinstance(src, ItemList):
        src = src.tensors
    if isinstance(src, (list, tuple)):
        return any(t.requires_grad for t in src)
    return src.requires_grad



def _bump_version(dst: torch.Tensor) -> None:
    """The kernels write behind autograd's back: bump dst's version counter as any in-place op does."""
    if not dst.is_inference():
        torch.autograd.graph.increment_version(dst)
