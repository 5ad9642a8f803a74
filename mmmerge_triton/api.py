"""Public API: the vLLM-compatible merge, and the general masked row scatter, in place and out of place.

A call takes the prepared route of lean.py where it can (the common call), else core.merge_ (every check, the
decision, the write), or, while tracing or for tensor subclasses, the registered ops (ops.py), which run
core.merge_ too."""
from __future__ import annotations

import torch

from . import core, inputs, lean
from .dispatch import Decision
from .inputs import NestedTensors
from .items import ItemList
from .paths import PATHS
from .plan import MergePlan
from .rowmap import CountMismatch

_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack


def _eager(*tensors) -> bool:
    """Whether the call can skip the torch.library dispatcher: plain tensors, no tracing, no dispatch mode.
    (The dispatcher costs 40-55 µs per eager call, measured on the H100 host; torch.compile and tensor subclasses
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




def wants_grad(dst, src) -> bool:
    """Whether an in-place merge must record gradients. Such a call merges out of place (differentiable)
    and copies the result into dst with ``copy_``: PyTorch's own in-place rules (a leaf that requires grad,
    a view of one, a view from unbind/split, an inference tensor) then raise before anything is written,
    on every route (eager, compiled, subclass), and the gradients are PyTorch's."""
    return torch.is_grad_enabled() and (getattr(dst, "requires_grad", False) or core.requires_grad(src))


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
    transformed = core.transformed()  # then core.merge_ runs PyTorch's op, which records gradients itself
    grad = in_place and not transformed and wants_grad(dst, src)
    through_ops = not transformed and not _eager(dst, mask, src)
    if grad or through_ops:  # a clone of dst or the registered ops merge: checked first, in the caller's names
        core.check_args(dst, mask, src, accumulate, path, check_count, names)
    if grad:
        if _eager(dst, src):  # against dst itself, which the clone that merges hides
            core.unshared(src, dst, names[2], names[0])
        merged = scatter(dst, mask, src, in_place=False, accumulate=accumulate, path=path, plan=plan,
                         check_count=check_count, names=names)
        return dst.copy_(merged)
    if through_ops:
        if plan is not None:
            plan.check_current()
        if not in_place:
            return torch.ops.mmmerge_triton.masked_row_scatter(dst, mask, src, accumulate, path, check_count)
        torch.ops.mmmerge_triton.masked_row_scatter_(dst, mask, src, accumulate, path, check_count)
        return dst
    inputs.check_dst(dst, names[0])
    out = dst if in_place else dst.clone(memory_format=torch.contiguous_format)
    core.merge_(out, mask, src, accumulate=accumulate, path=path, plan=plan, check_count=check_count, names=names)
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
            with their leading dims flattened. An empty list ([] or [[]]) has 0 rows: a mask with true
            rows raises the count error (vLLM returns early for [] whatever the mask holds).
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
            raise inputs.count_mismatch(error.num_rows, error.num_placeholders, core.spelled(multimodal_embeddings)) from None
    is_multimodal = _mask_of(is_multimodal, plan, "is_multimodal")
    items = inputs.flatten_items(multimodal_embeddings, "multimodal_embeddings")
    inputs.check_dst(inputs_embeds, "inputs_embeds")
    # The mask before the items, in masked_row_scatter_'s order: a mask that does not fit a 1-D inputs_embeds
    # explains that mistake, where the items' hidden size would blame them.
    inputs.check_mask(is_multimodal, inputs_embeds, "is_multimodal", "inputs_embeds")
    rows, dtype = inputs.check_items_dtype(items, inputs_embeds, "multimodal_embeddings", "inputs_embeds")
    transformed = core.transformed()  # then core.merge_ runs PyTorch's op, which records gradients itself
    grad = not transformed and wants_grad(inputs_embeds, items)
    eager = _eager(inputs_embeds, is_multimodal) and (not items or inputs.plain_tensors(items))
    src = _source(multimodal_embeddings, items, rows, dtype, inputs_embeds, eager and not transformed)
    if transformed or eager:
        if grad and isinstance(src, _Tensor):  # against inputs_embeds itself, which the clone that merges hides
            core.unshared(src, inputs_embeds, names[2], names[0])
        target = inputs_embeds.clone(memory_format=torch.contiguous_format) if grad else inputs_embeds
        core.merge_(target, is_multimodal, src, accumulate=False, path=path, plan=plan, check_count=check_count,
                names=names, expression=multimodal_embeddings)
        return inputs_embeds.copy_(target) if grad else inputs_embeds
    core.check_args(inputs_embeds, is_multimodal, src, False, path, check_count, names)  # the ops check in their names
    if plan is not None:
        plan.check_current()
    try:
        if grad:
            merged = torch.ops.mmmerge_triton.masked_row_scatter(inputs_embeds, is_multimodal, src, False, path,
                                                                 check_count)
            return inputs_embeds.copy_(merged)
        torch.ops.mmmerge_triton.masked_row_scatter_(inputs_embeds, is_multimodal, src, False, path, check_count)
    except CountMismatch as error:  # the ops' count error, spelled as vLLM spells these embeddings
        raise inputs.count_mismatch(error.num_rows, error.num_placeholders, core.spelled(multimodal_embeddings)) from None
    return inputs_embeds


def _source(embeddings: NestedTensors, items: list[torch.Tensor], rows: list[int], dtype: torch.dtype | None,
            dst: torch.Tensor, eager: bool) -> torch.Tensor | ItemList:
    """What merge_multimodal_embeddings merges: the tensor it was given, or for a list vLLM's torch.cat of the
    items (a copy, so an item may share dst's memory; its dtype is the items' promotion), which the eager
    route spares where it can: several items as an ItemList (_execute reads them in place or concatenates
    them), one item as it is unless it shares dst's memory. No items ([] or [[]]): [0, H] rows, which the
    count check still compares with the mask."""
    if isinstance(embeddings, torch.Tensor):
        return items[0]
    if not items:
        return dst.new_empty(0, dst.shape[-1])
    if not eager:
        return torch.cat(items)
    if len(items) > 1:
        return ItemList(items, rows, dtype)
    return items[0].clone(memory_format=torch.contiguous_format) if inputs.overlaps(items[0], dst) else items[0]


def explain(
    inputs_embeds: torch.Tensor, multimodal_embeddings: NestedTensors, is_multimodal: torch.Tensor,
    *, path: str = "auto", plan: MergePlan | None = None,
) -> Decision:
    """What ``merge_multimodal_embeddings`` with these arguments runs: ``Decision(path, kind, config,
    concatenate, reason)`` (dispatch.Decision), the reason naming the tuned table entry and its measured loop
    times, or the rule. The same function decides for the call (tests/test_dispatch.py checks it against what
    ran). Nothing is written."""
    is_multimodal = _mask_of(is_multimodal, plan, "is_multimodal")
    items = inputs.flatten_items(multimodal_embeddings, "multimodal_embeddings")
    inputs.check_dst(inputs_embeds, "inputs_embeds")
    inputs.check_mask(is_multimodal, inputs_embeds, "is_multimodal", "inputs_embeds")
    rows, src_dtype = inputs.check_items_dtype(items, inputs_embeds, "multimodal_embeddings", "inputs_embeds")
    inputs.check_path(path, PATHS)
    src = _source(multimodal_embeddings, items, rows, src_dtype, inputs_embeds, True)
    dst, mask = inputs_embeds, is_multimodal
    if dst.dim() == 1:  # as core.merge_ takes them
        dst, mask = dst.unsqueeze(0), mask.reshape(1)
    return core.decision_for(dst, mask, src, sum(rows), src_dtype or inputs_embeds.dtype, path, plan)[0]
