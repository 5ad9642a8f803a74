"""Public API: the vLLM-compatible merge, and the general masked row scatter, in place and out of place."""
from __future__ import annotations

import numpy as np
import torch

from . import inputs
from . import dispatch
from . import lean
from .autograd import TritonScatter
from .dispatch import Decision, decide
from .inputs import NestedTensors
from .items import ItemList, common_row_stride
from .paths import PATHS, RUNNERS, merge_triton
from .plan import MergePlan
from .rowmap import CountMismatch


_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack


def _eager(*tensors) -> bool:
    """Whether the call can skip the torch.library dispatcher: plain tensors, no tracing, no dispatch mode.
    (The dispatcher costs 40-55 µs per eager call, MEASUREMENTS.md; torch.compile and tensor subclasses
    need the registered op.) A non-tensor argument stays here too: the checks raise its TypeError."""
    if _is_compiling() or _dispatch_modes():
        return False
    for t in tensors:
        if type(t) is not torch.Tensor and isinstance(t, torch.Tensor):
            return False
    return True


def _mask_of(mask, plan, mask_name: str) -> torch.Tensor:
    if plan is None:
        if mask is None:
            raise TypeError(f"{mask_name} is required (or pass plan=)")
        return mask
    if mask is not None:
        raise ValueError(f"pass {mask_name} or plan=, not both")
    if not isinstance(plan, MergePlan):
        raise TypeError(f"plan must be a MergePlan, got {type(plan).__name__}")
    return plan.mask


def _scatter_args(mask, plan, src) -> torch.Tensor:
    """The mask (given, or the plan's) of masked_row_scatter(_), after checking that src is a tensor."""
    mask = _mask_of(mask, plan, "mask")
    if src is None:
        raise TypeError("src is required")
    inputs.check_tensor(src, "src")  # a list is for merge_multimodal_embeddings
    return mask


def _placeholders(mask, plan, check_count: bool) -> int | None:
    """The mask's true rows, where knowing them costs no sync (a CPU mask), or where the caller asked for
    the sync (check_count=True); else None."""
    if mask.is_cpu:
        return plan.host_count if plan is not None else int(np.count_nonzero(mask.numpy()))
    if check_count:
        return int(plan.count.item() if plan is not None else mask.sum().item())
    return None


def _merge_(dst, mask, src, *, accumulate, path, plan, check_count, names, expression=None) -> None:
    """Check everything, then write dst[mask] = src (or +=) in place. Raises before any write.

    src: [M, H], or an ItemList of [m_i, H] items (already checked) that the Triton path reads in place.
    expression: the embeddings as the caller passed them, spelled vLLM's way in a count error.
    Gradients: an in-place call that needs them arrives here on a fresh clone (see wants_grad), so the
    Triton path may mark it dirty.
    """
    dst_name, mask_name, src_name = names
    inputs.check_flag(accumulate, "accumulate")
    inputs.check_flag(check_count, "check_count")
    inputs.check_path(path, PATHS)
    inputs.check_dst(dst, dst_name)
    inputs.check_mask(mask, dst, mask_name, dst_name)
    if isinstance(src, ItemList):
        n_rows, src_dtype = sum(src.rows), src.tensors[0].dtype
    else:
        inputs.check_src(src, dst, src_name, dst_name)
        n_rows, src_dtype = src.shape[0], src.dtype
    if plan is not None:
        if plan.device != dst.device:
            raise ValueError(f"plan was built for {plan.device}; {dst_name} is on {dst.device}")
        plan.check_current(mask_name)
    inputs.check_writable(dst, dst_name)
    if dst.dim() == 1:  # one row and a 0-dim mask: every path takes them as [1, H] and [1] (index_put_ would not)
        dst, mask = dst.unsqueeze(0), mask.reshape(1)
    _execute(dst, mask, src, n_rows, src_dtype, accumulate=accumulate, path=path, plan=plan, check_count=check_count,
             names=names, expression=expression)


_Tensor = torch.Tensor


def _execute(dst, mask, src, n_rows: int, src_dtype, *, accumulate, path, plan, check_count, names,
             expression=None) -> None:
    """Decide, count, resolve shared memory, then write: the rest of _merge_ once the inputs are known good
    (by _merge_'s checks)."""
    dst_name, mask_name, src_name = names
    path, config, _ = decide(dst, mask, src_dtype, n_rows, path, None if isinstance(src, ItemList) else src)
    empty = n_rows == 0 or dst.shape[-1] == 0
    # The Triton path counts a CPU mask itself, from the row map it stages (CountMismatch, before any write).
    if path != "triton" or plan is not None or empty or not mask.is_cpu:
        placeholders = _placeholders(mask, plan, check_count)
        if placeholders is not None and placeholders != n_rows:
            raise inputs.count_mismatch(n_rows, placeholders, _spelled(expression))
    if empty:
        return
    # Memory shared with dst: read it before writing, or refuse where PyTorch refuses (a same-dtype src).
    if mask.device == dst.device and inputs.overlaps(mask, dst):
        mask = mask.clone()
    if isinstance(src, ItemList):
        aliased = inputs.any_overlaps(src.tensors, dst)
    elif inputs.overlaps(src, dst):
        if src.dtype == dst.dtype:
            raise ValueError(f"{src_name} shares memory with {dst_name}, which the merge writes (PyTorch refuses "
                             f"the same: some elements refer to a single memory location). Clone {src_name} first")
        src = src.to(dst.dtype)  # the copy that dst[mask] = src.to(dst.dtype) makes: PyTorch's result
    needs_grad = torch.is_grad_enabled() and (dst.requires_grad or _requires_grad(src))
    try:
        if isinstance(src, ItemList):
            in_place = path == "triton" and not needs_grad and not aliased and dispatch.items_in_place_pays(
                len(src.rows), n_rows, mask.numel(), dst, src_dtype)
            stride = common_row_stride(src.tensors) if in_place else None
            if stride is not None:
                merge_triton(dst, mask, src, accumulate, plan.rowmap if plan is not None else None, config, stride)
                _bump_version(dst)
                return
            src = torch.cat(src.tensors)
        if path != "triton":
            RUNNERS[path](dst, mask, src, accumulate)
        elif needs_grad:
            TritonScatter.apply(dst, src, mask, plan, accumulate, config)
        else:
            merge_triton(dst, mask, src, accumulate, plan.rowmap if plan is not None else None, config)
            _bump_version(dst)
    except CountMismatch as error:
        raise inputs.count_mismatch(error.num_rows, error.num_placeholders, _spelled(expression)) from None


def _spelled(expression) -> str | None:
    """The count expression of an error message; the embeddings themselves until an error needs it (spelling
    it out on every call would cost more than the rest of the checks)."""
    return None if expression is None else inputs.count_expression(expression)


def _requires_grad(src) -> bool:
    """src: a tensor, a list of tensors, or an ItemList (a generator, not map(attrgetter): Dynamo traces it)."""
    if isinstance(src, ItemList):
        src = src.tensors
    if isinstance(src, (list, tuple)):
        return any(t.requires_grad for t in src)
    return src.requires_grad


def wants_grad(dst, src) -> bool:
    """Whether an in-place merge must record gradients. Such a call merges out of place (differentiable)
    and copies the result into dst with ``copy_``: PyTorch's own in-place rules (a leaf that requires grad,
    a view of one, a view from unbind/split, an inference tensor) then raise before anything is written,
    on every route (eager, compiled, subclass), and the gradients are PyTorch's."""
    return torch.is_grad_enabled() and (getattr(dst, "requires_grad", False) or _requires_grad(src))


def _bump_version(dst: torch.Tensor) -> None:
    """The kernels write behind autograd's back: bump dst's version counter as any in-place op does."""
    if not dst.is_inference():
        torch.autograd.graph.increment_version(dst)


_SCATTER_NAMES = ("dst", "mask", "src")


def scatter(dst, mask, src, *, in_place: bool, accumulate, path, plan, check_count, names) -> torch.Tensor:
    """masked_row_scatter_ (``in_place``) or masked_row_scatter, once mask (or plan's) and src are known;
    ``names`` name dst, mask and src in errors (deepstack_add has its own)."""
    if in_place and plan is None:
        try:
            if lean.merge(dst, mask, src, accumulate, check_count, path):
                return dst
        except CountMismatch as error:
            raise inputs.count_mismatch(error.num_rows, error.num_placeholders) from None
    if in_place and wants_grad(dst, src):
        merged = scatter(dst, mask, src, in_place=False, accumulate=accumulate, path=path, plan=plan,
                         check_count=check_count, names=names)
        return dst.copy_(merged)
    if not _eager(dst, mask, src):
        if plan is not None:
            plan.check_current()
        if not in_place:
            return torch.ops.mmmerge_triton.masked_row_scatter(dst, mask, src, accumulate, path, check_count)
        torch.ops.mmmerge_triton.masked_row_scatter_(dst, mask, src, accumulate, path, check_count)
        return dst
    inputs.check_dst(dst, names[0])
    out = dst if in_place else dst.clone(memory_format=torch.contiguous_format)
    _merge_(out, mask, src, accumulate=accumulate, path=path, plan=plan, check_count=check_count, names=names)
    return out


def masked_row_scatter_(
    dst: torch.Tensor,
    mask: torch.Tensor | None = None,
    src: torch.Tensor | None = None,
    *,
    accumulate: bool = False,
    path: str = "auto",
    plan: MergePlan | None = None,
    check_count: bool = False,
) -> torch.Tensor:
    """In place: ``dst[mask] = src`` row by row, src cast to dst's dtype (``+=`` with ``accumulate``).

    Args:
        dst: [..., H] float32/float16/bfloat16, CUDA (or CPU).
        mask: bool of shape dst.shape[:-1], on the CPU or on dst's device. Its true rows, in order, take
            src's rows. Or pass ``plan=`` (a MergePlan of the mask) instead.
        src: [M, H] float32/float16/bfloat16 on dst's device; M must equal the mask's true rows.
        accumulate: add src's rows (rounded to dst's dtype, added in fp32) instead of overwriting.
        path: "auto" (the dispatcher), or one of mmmerge_triton.PATHS.
        check_count: with a mask on the GPU, count its true rows on the host (one sync) and raise on a
            mismatch. Without it a device mask is never synced: on a mismatch the first min(K, M) true
            rows take src's first rows, later true rows keep their values, later src rows are unused, and
            no memory out of bounds is touched. A CPU mask is always checked, at no cost.

    Returns:
        dst. Differentiable, with PyTorch's in-place rules: where a gradient is needed the merge runs out of
        place and ``dst.copy_`` writes the result, so a leaf that requires grad (or a view of one, or an
        output of unbind) raises PyTorch's error before anything is written.

    Raises:
        ValueError: count mismatch ("Attempted to assign M multimodal tokens to K placeholders"), wrong
            shapes or devices. TypeError: wrong dtypes or types. Nothing is written when it raises.
    """
    mask = _scatter_args(mask, plan, src)
    return scatter(dst, mask, src, in_place=True, accumulate=accumulate, path=path, plan=plan,
                   check_count=check_count, names=_SCATTER_NAMES)


def masked_row_scatter(
    dst: torch.Tensor,
    mask: torch.Tensor | None = None,
    src: torch.Tensor | None = None,
    *,
    accumulate: bool = False,
    path: str = "auto",
    plan: MergePlan | None = None,
    check_count: bool = False,
) -> torch.Tensor:
    """Out of place and differentiable in dst and src: a copy of dst with ``[mask] = src`` (or ``+=``).

    Replaces ``dst.masked_scatter(mask[..., None].expand_as(dst), src)``, e.g. [B, S, H] embeddings with a
    [B, S] mask. Arguments as masked_row_scatter_. Returns a new [..., H] tensor of dst's dtype.
    """
    mask = _scatter_args(mask, plan, src)
    return scatter(dst, mask, src, in_place=False, accumulate=accumulate, path=path, plan=plan,
                   check_count=check_count, names=_SCATTER_NAMES)


def merge_multimodal_embeddings(
    inputs_embeds: torch.Tensor,
    multimodal_embeddings: NestedTensors,
    is_multimodal: torch.Tensor | None = None,
    *,
    path: str = "auto",
    plan: MergePlan | None = None,
    check_count: bool = False,
) -> torch.Tensor:
    """vLLM's merge, in place: the rows of ``inputs_embeds`` where ``is_multimodal`` is true take the rows of
    ``multimodal_embeddings``, in order, cast to inputs_embeds' dtype.

    Args:
        inputs_embeds: [N, H] (or [..., H]) float32/float16/bfloat16.
        multimodal_embeddings: [M, H] tensor, or a (nested) list/tuple of tensors [..., H] taken in order
            with their leading dims flattened. An empty list leaves inputs_embeds as it is (as vLLM does).
        is_multimodal: bool of shape inputs_embeds.shape[:-1], on the CPU (checked and staged without a
            sync) or on inputs_embeds' device (no sync; see ``check_count``). Or ``plan=``.
        path, plan, check_count: as masked_row_scatter_.

    Returns:
        inputs_embeds.

    Raises:
        ValueError: "Attempted to assign {expr} = {M} multimodal tokens to {K} placeholders" (vLLM's text),
            or a shape/device error naming the argument. TypeError: bad dtypes. Nothing is written then.
    """
    names = ("inputs_embeds", "is_multimodal", "multimodal_embeddings")
    if plan is None and type(multimodal_embeddings) is _Tensor:
        try:
            if lean.merge(inputs_embeds, is_multimodal, multimodal_embeddings, False, check_count, path):
                return inputs_embeds
        except CountMismatch as error:
            raise inputs.count_mismatch(error.num_rows, error.num_placeholders, _spelled(multimodal_embeddings)) from None
    if isinstance(multimodal_embeddings, (list, tuple)) and len(multimodal_embeddings) == 0:
        return inputs_embeds
    is_multimodal = _mask_of(is_multimodal, plan, "is_multimodal")
    items = inputs.flatten_items(multimodal_embeddings, "multimodal_embeddings")
    if not items:  # nested empty lists, e.g. [[]]: as empty as [], and vLLM returns early for that
        return inputs_embeds
    inputs.check_dst(inputs_embeds, "inputs_embeds")
    rows = inputs.check_items(items, inputs_embeds, "multimodal_embeddings", "inputs_embeds")
    grad = wants_grad(inputs_embeds, items)
    if _eager(inputs_embeds, is_multimodal) and inputs.plain_tensors(items):
        # Several items: read in place where the Triton path runs.
        src = items[0] if len(items) == 1 else ItemList(items, rows)
        target = inputs_embeds.clone(memory_format=torch.contiguous_format) if grad else inputs_embeds
        _merge_(target, is_multimodal, src, accumulate=False, path=path, plan=plan, check_count=check_count,
                names=names, expression=multimodal_embeddings)
        return inputs_embeds.copy_(target) if grad else inputs_embeds
    src = items[0] if len(items) == 1 else torch.cat(items)
    if plan is not None:
        plan.check_current()
    if grad:
        merged = torch.ops.mmmerge_triton.masked_row_scatter(inputs_embeds, is_multimodal, src, False, path, check_count)
        return inputs_embeds.copy_(merged)
    torch.ops.mmmerge_triton.masked_row_scatter_(inputs_embeds, is_multimodal, src, False, path, check_count)
    return inputs_embeds


def explain(
    inputs_embeds: torch.Tensor, multimodal_embeddings: NestedTensors, is_multimodal: torch.Tensor
) -> Decision:
    """What path="auto" would do for these inputs: ``Decision(path, config, reason)``, the reason naming the
    tuned table entry and its measured loop times, or the heuristic rule. Nothing is written."""
    items = inputs.flatten_items(multimodal_embeddings, "multimodal_embeddings")
    inputs.check_dst(inputs_embeds, "inputs_embeds")
    inputs.check_mask(is_multimodal, inputs_embeds, "is_multimodal", "inputs_embeds")
    rows = inputs.check_items(items, inputs_embeds, "multimodal_embeddings", "inputs_embeds")
    src_dtype = items[0].dtype if items else inputs_embeds.dtype
    return decide(inputs_embeds, is_multimodal, src_dtype, sum(rows), src=items[0] if len(items) == 1 else None)
