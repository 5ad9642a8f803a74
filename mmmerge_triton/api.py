"""Public API: the vLLM-compatible merge, and the general masked row scatter, in place and out of place.

These functions name the arguments, turn a list of items into one source, and pick the route: a plain call that
needs no gradient (core.plain_call, core.needs_grad) runs core.merge_ (prepare, check, execute); a traced call,
a tensor subclass, a dispatch mode or a call that needs gradients runs the registered ops (ops.py), whose
implementations run core.merge_ too (a function transform runs core.merge_, which takes PyTorch's op there)."""
from __future__ import annotations

from typing import Sequence

import torch

from . import core, inputs, modalities
from .dispatch import bucket, decide_positions
from .executor import run_modalities
from .ops import indexed_row_scatter_op, indexed_row_scatter_op_, masked_row_scatter_op, masked_row_scatter_op_
from .kernel_config import Decision
from .inputs import NestedTensors
from .items import ItemList
from .plan import MergePlan
from .inputs import CountMismatch

_Tensor = torch.Tensor


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




_SCATTER_NAMES = ("dst", "mask", "src")
_OPS = {False: (masked_row_scatter_op, masked_row_scatter_op_), True: (indexed_row_scatter_op, indexed_row_scatter_op_)}
"""The registered (out-of-place, in-place) ops of a merge at a mask (False) or at row positions (True)."""


def scatter(dst, mask, src, *, in_place: bool, accumulate, path, plan, check_count, names,
            at_positions: bool = False) -> torch.Tensor:
    """masked_row_scatter_ (``in_place``) or masked_row_scatter, once mask (or plan's) and src are known, or with
    ``at_positions`` indexed_row_scatter(_) (``mask`` the positions, ``check_count`` their check); ``names`` name
    dst, mask and src in errors (deepstack_add has its own)."""
    eager = core.eager(dst, mask, src)
    plain = eager or core.plain_call(dst, mask, src)
    grad = not eager and core.needs_grad(dst, src)
    if (plain and not grad) or core.transformed():
        if not in_place:
            inputs.check_dst(dst, names[0])
            dst = dst.clone(memory_format=torch.contiguous_format)
        core.merge_(dst, mask, src, accumulate=accumulate, path=path, plan=plan, check_count=check_count,
                    names=names, at_positions=at_positions)
        return dst
    # The registered ops, checked first in the caller's names (theirs are dst, mask, src).
    core.check_args(dst, mask, src, accumulate, path, check_count, names, at_positions)
    if plan is not None:
        plan.check_current()
    if in_place and grad and plain:  # against dst itself, which the out-of-place op's copy hides
        core.unshared(src, dst, names[2], names[0])
    op, op_ = _OPS[at_positions]
    if not in_place or grad:
        merged = op(dst, mask, src, accumulate, path, check_count)
        return dst.copy_(merged) if in_place else merged
    op_(dst, mask, src, accumulate, path, check_count)
    return dst


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


_AT_NAMES = ("dst", "positions", "src")


def _scatter_at(dst, positions, src, *, in_place: bool, accumulate, path, check) -> torch.Tensor:
    """indexed_row_scatter_ (``in_place``) or indexed_row_scatter: ``scatter`` at positions."""
    if src is None or positions is None:
        raise TypeError("positions and src are required")
    inputs.check_tensor(src, "src")
    return scatter(dst, positions, src, in_place=in_place, accumulate=accumulate, path=path, plan=None,
                   check_count=check, names=_AT_NAMES, at_positions=True)


def indexed_row_scatter_(
    dst: torch.Tensor,
    positions: torch.Tensor,
    src: torch.Tensor,
    *,
    accumulate: bool = False,
    path: str = "auto",
    check: bool = False,
) -> torch.Tensor:
    """In place: rows ``positions`` of dst take src's rows, cast to dst's dtype:
    ``dst.index_copy_(0, positions, src.to(dst.dtype))`` (``index_add_`` with ``accumulate``).

    Args:
        dst: [N, H] float32/float16/bfloat16 (float64 on the PyTorch paths), CUDA (or CPU).
        positions: [M] int32 or int64, any order. On the CPU: checked on the host before anything is written
            (a position outside [0, N): IndexError; a repeated one: ValueError, since the order of duplicate
            writes is undefined), then staged without a sync. On dst's device: never synced; the Triton path
            skips a position outside [0, N) (no out-of-bounds access, no device assert), and which of repeated
            positions' rows lands is undefined, as with index_copy_.
        src: [M, H] float32/float16/bfloat16 on dst's device.
        accumulate: add src's rows (rounded to dst's dtype, added in fp32) instead of overwriting.
        path: "auto" (the dispatcher; device positions always take the Triton path where it runs), "triton",
            "index_copy" or "index_put".
        check: with positions on the device, copy them to the host (one sync) and check them as CPU ones.

    Returns:
        dst. Differentiable with PyTorch's in-place rules, as masked_row_scatter_.
    """
    return _scatter_at(dst, positions, src, in_place=True, accumulate=accumulate, path=path, check=check)


def indexed_row_scatter(
    dst: torch.Tensor,
    positions: torch.Tensor,
    src: torch.Tensor,
    *,
    accumulate: bool = False,
    path: str = "auto",
    check: bool = False,
) -> torch.Tensor:
    """Out of place and differentiable in dst and src: a contiguous copy of dst [N, H] whose rows ``positions``
    take src's rows (``+=`` with accumulate). Arguments as indexed_row_scatter_; src's gradient at a skipped
    device position is zero."""
    return _scatter_at(dst, positions, src, in_place=False, accumulate=accumulate, path=path, check=check)


def merge_modalities_(dst: torch.Tensor, pairs: Sequence[modalities.Pair], *, accumulate: bool = False, path: str = "auto",
                      check_count: bool = False) -> torch.Tensor:
    """In place: for each ``(index, src)`` of ``pairs``, in order, the rows of dst that ``index`` names take
    src's rows cast to dst's dtype (``+=`` with accumulate), in one launch.

    Args:
        dst: [..., H] float32/float16/bfloat16 (float64 on the PyTorch paths); [N, H] where an index is positions.
        pairs: (index, src) per modality. index: a bool mask of dst.shape[:-1], or row positions [M_k] int32/int64;
            every index on the CPU, or every one on dst's device. src: [M_k, H] on dst's device.
        accumulate, path: as masked_row_scatter_ ("masked_scatter" takes masks only).
        check_count: with indexes on the device, check them on the host (one sync): each mask's count, each
            position's range, and rows named twice, as for CPU indexes.

    Returns:
        dst.

    Raises:
        ValueError: a CPU mask whose true rows differ from its src's rows ("pairs[k]: ..."), rows named by two
            pairs (CPU indexes), bad shapes or devices. IndexError: a CPU position out of range. TypeError:
            bad dtypes. Nothing is written when it raises.
    """
    inputs.check_flag(accumulate, "accumulate")
    inputs.check_flag(check_count, "check_count")
    indexes, srcs = modalities.checked(dst, pairs, path)
    # PyTorch's rule for a source sharing dst's bytes, for every pair before any is written.
    srcs = [core.unshared(src, dst, f"pairs[{k}] src", "dst") for k, src in enumerate(srcs)]
    on_cpu = all(index.is_cpu for index in indexes)
    if on_cpu or check_count:
        host = modalities.host_map(dst, indexes, srcs)
    dst2d = inputs.as_rows(dst)
    # One launch, except: gradients, tracing, subclasses, transforms (the registered ops and PyTorch's formulas
    # serve them pair by pair); a dst without a row view; accumulate with device indexes, whose overlaps the
    # host cannot see (each pair's adds must all land, where a copy's last pair wins); and device indexes under
    # path="auto": their map, built by a few PyTorch ops per pair, made one launch 1.54-2.06x a copy where a
    # masked_row_scatter_ per pair took 1.24-1.35x (H100, bench/results/h100/2026-12-06-s3/positions.log).
    one_launch = (len(srcs) > 0 and dst2d is not None and (path == "triton" or path == "auto" and on_cpu)
                  and not (accumulate and not on_cpu) and not core.transformed()
                  and core.plain_call(dst, *indexes, *srcs) and not any(core.needs_grad(dst, src) for src in srcs))
    if one_launch:
        # A row copy through a map in hand, as at positions: decided so (only the index's device and size read).
        decision = decide_positions(dst2d, indexes[0], srcs[0].dtype, bucket(sum(src.shape[0] for src in srcs)),
                                    path)
        one_launch = decision.path == "triton"
    if not one_launch:
        for index, src in zip(indexes, srcs):
            if index.dtype == torch.bool:
                masked_row_scatter_(dst, index, src, accumulate=accumulate, path=path, check_count=check_count)
            else:
                indexed_row_scatter_(dst, index, src, accumulate=accumulate, path=path, check=check_count)
        return dst
    inputs.check_writable(dst, "dst")
    rows = host if on_cpu else modalities.device_map(dst2d.shape[0], indexes, srcs)
    run_modalities(decision.config, dst2d, rows, srcs, accumulate)
    return dst


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
    if (plan is None and core.eager(inputs_embeds, is_multimodal, multimodal_embeddings)
            and multimodal_embeddings.dim() == 2):
        # The serving call (a tensor of embeddings), with nothing to normalize first.
        core.merge_(inputs_embeds, is_multimodal, multimodal_embeddings, accumulate=False, path=path, plan=None,
                    check_count=check_count, names=_MERGE_NAMES, expression=multimodal_embeddings)
        return inputs_embeds
    is_multimodal = _mask_of(is_multimodal, plan, "is_multimodal")
    src = _checked_source(inputs_embeds, multimodal_embeddings, is_multimodal)
    plain = core.plain_call(inputs_embeds, is_multimodal) and (type(src) is ItemList or core.plain_call(src))
    grad = core.needs_grad(inputs_embeds, src)
    if (plain and not grad) or core.transformed():
        core.merge_(inputs_embeds, is_multimodal, src, accumulate=False, path=path, plan=plan,
                    check_count=check_count, names=_MERGE_NAMES, expression=multimodal_embeddings)
        return inputs_embeds
    if type(src) is ItemList:
        src = torch.cat(src.tensors)
    core.check_args(inputs_embeds, is_multimodal, src, False, path, check_count, _MERGE_NAMES)  # in the caller's names
    if plan is not None:
        plan.check_current()
    if grad and plain:  # against inputs_embeds itself, which the out-of-place op's copy hides
        core.unshared(src, inputs_embeds, _MERGE_NAMES[2], _MERGE_NAMES[0])
    try:
        if grad:
            merged = masked_row_scatter_op(inputs_embeds, is_multimodal, src, False, path,
                                                                 check_count)
            return inputs_embeds.copy_(merged)
        masked_row_scatter_op_(inputs_embeds, is_multimodal, src, False, path, check_count)
    except CountMismatch as error:  # the ops' count error, spelled as vLLM spells these embeddings
        raise inputs.count_mismatch(error.num_rows, error.num_placeholders,
                                    core.spelled(multimodal_embeddings)) from None
    return inputs_embeds


_MERGE_NAMES = ("inputs_embeds", "is_multimodal", "multimodal_embeddings")


def _checked_source(dst: torch.Tensor, embeddings: NestedTensors, mask: torch.Tensor) -> torch.Tensor | ItemList:
    """What merge_multimodal_embeddings merges, its items checked (in the mask's order of checks: a mask that does
    not fit a 1-D inputs_embeds explains that mistake, where the items' hidden size would blame them): the tensor it
    was given; for a list, vLLM's torch.cat of the items (a copy, so an item may share dst's memory; its dtype the
    items' promotion), spared where it can be: several items as an ItemList (the decision reads them in place or
    concatenates them), one item as it is unless it shares dst's memory. No items ([] or [[]]): [0, H] rows, which
    the count check still compares with the mask."""
    items = inputs.flatten_items(embeddings, _MERGE_NAMES[2])
    inputs.check_dst(dst, _MERGE_NAMES[0])
    inputs.check_mask(mask, dst, _MERGE_NAMES[1], _MERGE_NAMES[0])
    rows, dtype = inputs.check_items_dtype(items, dst, _MERGE_NAMES[2], _MERGE_NAMES[0])
    if isinstance(embeddings, torch.Tensor):
        return items[0]
    if not items:
        return dst.new_empty(0, dst.shape[-1])
    if core.transformed() or not (core.plain_call(dst, mask) and inputs.plain_tensors(items)):
        return torch.cat(items)
    if len(items) > 1:
        return ItemList(items, rows, dtype)
    return items[0].clone(memory_format=torch.contiguous_format) if inputs.overlaps(items[0], dst) else items[0]


def explain(
    inputs_embeds: torch.Tensor, multimodal_embeddings: NestedTensors, is_multimodal: torch.Tensor | None = None,
    *, path: str = "auto", plan: MergePlan | None = None, positions: torch.Tensor | None = None,
) -> Decision:
    """What ``merge_multimodal_embeddings`` with these arguments runs (or, given ``positions`` instead of a mask,
    ``indexed_row_scatter_(inputs_embeds, positions, multimodal_embeddings)``): ``Decision(path, kind, config,
    concatenate, reason)`` (kernel_config.Decision), the reason naming the tuned table entry and its measured loop
    times, or the rule: the decision of the entry that call runs (core.decision_of; tests/test_explain.py checks
    it against what ran, on first calls and memo hits). Nothing is written."""
    if positions is not None:
        if is_multimodal is not None or plan is not None:
            raise ValueError("pass positions= or a mask (is_multimodal / plan=), not both")
        inputs.check_tensor(multimodal_embeddings, "src")
        return core.decision_of(inputs_embeds, positions, multimodal_embeddings, path, None, _AT_NAMES,
                                at_positions=True)
    is_multimodal = _mask_of(is_multimodal, plan, "is_multimodal")
    src = _checked_source(inputs_embeds, multimodal_embeddings, is_multimodal)
    return core.decision_of(inputs_embeds, is_multimodal, src, path, plan, _MERGE_NAMES)
