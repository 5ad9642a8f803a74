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
_forward_ad = torch.autograd.forward_ad  # its _current_level is -1 outside a dual level
_functorch_stack = torch._C._functorch.peek_interpreter_stack  # None outside torch.func's transforms
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


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


def _transformed() -> bool:
    """Whether a function transform is on: torch.func's vmap, grad or jvp (whose tensors are wrappers without
    storage, and under which a host read such as ``.numpy()`` fails), or forward-mode AD (a dual level: tangents
    the kernels cannot see). A merge then runs PyTorch's index_put, which every transform knows, before anything
    reads an address (_merge_by_torch); the registered ops have no batching rule or jvp, so it skips them too.
    Two reads where none is on; never while tracing (torch.compile sees the registered ops)."""
    return not _is_compiling() and (_forward_ad._current_level >= 0 or _functorch_stack() is not None)


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
    dst_name, mask_name, _ = names
    n_rows, src_dtype = _checked(dst, mask, src, accumulate, path, check_count, names)
    if plan is not None:
        if plan.device != dst.device:
            raise ValueError(f"plan was built for {plan.device}; {dst_name} is on {dst.device}")
        plan.check_current(mask_name)
    inputs.check_writable(dst, dst_name)
    if dst.dim() == 1:  # one row and a 0-dim mask: every path takes them as [1, H] and [1] (index_put_ would not)
        dst, mask = dst.unsqueeze(0), mask.reshape(1)
    if _transformed():
        _merge_by_torch(dst, mask, src, n_rows, accumulate=accumulate, path=path, expression=expression)
        return
    _execute(dst, mask, src, n_rows, src_dtype, accumulate=accumulate, path=path, plan=plan, check_count=check_count,
             names=names, expression=expression)


def _checked(dst, mask, src, accumulate, path, check_count, names) -> tuple[int, torch.dtype]:
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


def _unshared(src: torch.Tensor, dst: torch.Tensor, src_name: str, dst_name: str) -> torch.Tensor:
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
    else:
        src = _unshared(src, dst, src_name, dst_name)
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


_TRANSFORM_REFUSAL = ("path='triton' cannot merge under a function transform (torch.func's vmap, grad or jvp, or "
                      "forward-mode AD): the kernels see neither batch dims nor tangents. path='auto' takes index_put "
                      "there")


def _merge_by_torch(dst, mask, src, n_rows: int, *, accumulate, path, expression=None) -> None:
    """The rest of _merge_ under a function transform (see _transformed): the count, then PyTorch's index_put_,
    whose batching rule and forward and backward formulas are PyTorch's, as are its rules for shared memory.
    Every path but "triton" (refused) runs it. Reads no address and nothing through numpy; a mask that the
    transform wraps (vmapped) is left to index_put_, which refuses what it cannot take."""
    if path == "triton":
        raise ValueError(_TRANSFORM_REFUSAL)
    if not _functorch_wrapped(mask):
        placeholders = int(mask.count_nonzero())
        if placeholders != n_rows:
            raise inputs.count_mismatch(n_rows, placeholders, _spelled(expression))
    RUNNERS["index_put"](dst, mask, torch.cat(src.tensors) if isinstance(src, ItemList) else src, accumulate)


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
    transformed = _transformed()  # then _merge_ runs PyTorch's op, which records gradients itself
    grad = in_place and not transformed and wants_grad(dst, src)
    through_ops = not transformed and not _eager(dst, mask, src)
    if grad or through_ops:  # a clone of dst or the registered ops merge: checked first, in the caller's names
        _checked(dst, mask, src, accumulate, path, check_count, names)
    if grad:
        if _eager(dst, src):  # against dst itself, which the clone that merges hides
            _unshared(src, dst, names[2], names[0])
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
            raise inputs.count_mismatch(error.num_rows, error.num_placeholders, _spelled(multimodal_embeddings)) from None
    is_multimodal = _mask_of(is_multimodal, plan, "is_multimodal")
    items = inputs.flatten_items(multimodal_embeddings, "multimodal_embeddings")
    inputs.check_dst(inputs_embeds, "inputs_embeds")
    # The mask before the items, in masked_row_scatter_'s order: a mask that does not fit a 1-D inputs_embeds
    # explains that mistake, where the items' hidden size would blame them.
    inputs.check_mask(is_multimodal, inputs_embeds, "is_multimodal", "inputs_embeds")
    rows, dtype = inputs.check_items_dtype(items, inputs_embeds, "multimodal_embeddings", "inputs_embeds")
    transformed = _transformed()  # then _merge_ runs PyTorch's op, which records gradients itself
    grad = not transformed and wants_grad(inputs_embeds, items)
    eager = _eager(inputs_embeds, is_multimodal) and (not items or inputs.plain_tensors(items))
    src = _source(multimodal_embeddings, items, rows, dtype, inputs_embeds, eager and not transformed)
    if transformed or eager:
        if grad and isinstance(src, _Tensor):  # against inputs_embeds itself, which the clone that merges hides
            _unshared(src, inputs_embeds, names[2], names[0])
        target = inputs_embeds.clone(memory_format=torch.contiguous_format) if grad else inputs_embeds
        _merge_(target, is_multimodal, src, accumulate=False, path=path, plan=plan, check_count=check_count,
                names=names, expression=multimodal_embeddings)
        return inputs_embeds.copy_(target) if grad else inputs_embeds
    _checked(inputs_embeds, is_multimodal, src, False, path, check_count, names)  # the ops check in their names
    if plan is not None:
        plan.check_current()
    try:
        if grad:
            merged = torch.ops.mmmerge_triton.masked_row_scatter(inputs_embeds, is_multimodal, src, False, path,
                                                                 check_count)
            return inputs_embeds.copy_(merged)
        torch.ops.mmmerge_triton.masked_row_scatter_(inputs_embeds, is_multimodal, src, False, path, check_count)
    except CountMismatch as error:  # the ops' count error, spelled as vLLM spells these embeddings
        raise inputs.count_mismatch(error.num_rows, error.num_placeholders, _spelled(multimodal_embeddings)) from None
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
    inputs_embeds: torch.Tensor, multimodal_embeddings: NestedTensors, is_multimodal: torch.Tensor
) -> Decision:
    """What path="auto" would do for these inputs: ``Decision(path, config, reason)``, the reason naming the
    tuned table entry and its measured loop times, or the heuristic rule. Nothing is written."""
    items = inputs.flatten_items(multimodal_embeddings, "multimodal_embeddings")
    inputs.check_dst(inputs_embeds, "inputs_embeds")
    inputs.check_mask(is_multimodal, inputs_embeds, "is_multimodal", "inputs_embeds")
    rows, src_dtype = inputs.check_items_dtype(items, inputs_embeds, "multimodal_embeddings", "inputs_embeds")
    return decide(inputs_embeds, is_multimodal, src_dtype or inputs_embeds.dtype, sum(rows),
                  src=items[0] if len(items) == 1 else None)
