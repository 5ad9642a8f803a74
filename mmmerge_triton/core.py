"""The one route of a merge, for every entry point: **prepare** (check the arguments, decide, say what runs),
**check the call**, **execute**. ``merge_`` is what the public API runs on plain tensors (api.py) and what the
registered ops run inside (ops.py), so eager calls, compiled graphs and tensor subclasses take the same steps.

    merge_ ─ signature ─┬─ memo hit ───────────────────────────┬─ check_call ─ executor.run ─ kernel
                        └─ prepare: check_args, decide, ───────┘   (per call)
                           executor.prepare (memoized by signature)

**The memo.** Step after step an engine merges the same kinds of tensors: plain dst [N, H] and src [M, H], a bool
mask [N], the same dtypes, strides, H and devices; only N, M, the addresses and the contents change. Such a call
has a *signature* (``_signature``): every fact that ``prepare`` reads, with N and M as their quarter-octave
buckets (the values dispatch's rules read). ``prepare`` is then a function of the signature alone, so its result
is kept under it and a later call of the signature skips it: no argument check, decision or Launch is rebuilt,
and the Launch's kernels, bound on its first run, launch through their C entry. Each field of the key stands for
the checks that read it (see ``_signature``); whatever no field fixes is checked on every call, first or not, by
``check_call`` (and by the executor: the count). A contiguous [B, S, H] dst with its [B, S] mask is signed as its
[N, H] rows (``_flat``). A call without a signature (a list of items, a plan, a 1-D dst, a strided N-D one, a
subclass) is prepared on every call, by the same function. tests/test_twice.py runs every adversarial
input twice, the second time as a memo hit, and requires identical outcomes.

Gradients: api.py sends a call that needs them to the registered out-of-place op (ops.py: its autograd formula
gathers with the same executor), and ``copy_``s the result where the caller merges in place (PyTorch's in-place
rules then raise before anything is written). Under a function transform (torch.func, forward-mode AD)
PyTorch's index_put_ merges instead (``transformed``).
"""
from __future__ import annotations

import torch

from . import inputs
from .dispatch import POSITION_PATHS, bucket, decide, decide_positions, on_clear
from .executor import Prepared, prepare, run
from .inputs import CountMismatch
from .items import ItemList, common_row_stride
from .kernel_config import PATHS, Decision
from .paths import POSITION_RUNNERS, RUNNERS
from .rowmap import host_positions, require_count

_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_forward_ad = torch.autograd.forward_ad  # its _current_level is -1 outside a dual level
_functorch_stack = torch._C._functorch.peek_interpreter_stack  # None outside torch.func's transforms
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_grad_enabled = torch.is_grad_enabled

_MAX_ENTRIES = 4096  # signatures kept; a serving engine meets a few dozen (N and M buckets of one model)
_prepared: dict = {}
on_clear(_prepared.clear)  # the entries hold decisions: a new table (dispatch.clear_cache) drops them


def plain_call(*tensors) -> bool:
    """Whether a call can skip the torch.library dispatcher: no tracing, no dispatch mode, and plain tensors (no
    subclass; a non-tensor argument counts as plain: the checks raise its TypeError). The dispatcher costs 40-55 µs
    per eager call (measured on the H100 host); torch.compile and tensor subclasses need the registered ops.
    api.py and the integrations ask this one gate."""
    if _is_compiling() or _dispatch_modes():
        return False
    for t in tensors:
        if type(t) is not _Tensor and isinstance(t, _Tensor):
            return False
    return True


def eager(dst, mask, src) -> bool:
    """The serving call's gate: three tensors of exactly torch.Tensor, no tracing, no dispatch mode, no gradient
    to record; what ``plain_call(dst, mask, src) and not needs_grad(dst, src)`` says of them, in one read each
    (a call it turns down is asked those two)."""
    return (type(dst) is _Tensor and type(mask) is _Tensor and type(src) is _Tensor and not _is_compiling()
            and not _dispatch_modes() and not (_grad_enabled() and (dst.requires_grad or src.requires_grad)))


def transformed() -> bool:
    """Whether a function transform is on: torch.func's vmap, grad or jvp (whose tensors are wrappers without
    storage, and under which a host read such as ``.numpy()`` fails), or forward-mode AD (a dual level: tangents
    the kernels cannot see). A merge then runs PyTorch's index_put, which every transform knows, before anything
    reads an address (_merge_by_torch); the registered ops have no batching rule or jvp, so it skips them too.
    Two reads where none is on; never while tracing (torch.compile sees the registered ops)."""
    return not _is_compiling() and _transform_on()


def _transform_on() -> bool:
    """transformed() without its tracing test, for merge_: no caller enters merge_ while Dynamo traces (api.py
    takes the registered ops then, and their implementations run after tracing), so that test reads False on
    every call there."""
    return _forward_ad._current_level >= 0 or _functorch_stack() is not None


def needs_grad(dst, src) -> bool:
    """Whether a merge must record gradients. src: a tensor, a list of tensors or an ItemList (a generator, not
    map(attrgetter): Dynamo traces it)."""
    if not _grad_enabled():
        return False
    if isinstance(src, ItemList):
        src = src.tensors
    if isinstance(src, (list, tuple)):
        return getattr(dst, "requires_grad", False) or any(t.requires_grad for t in src)
    return getattr(dst, "requires_grad", False) or src.requires_grad


def merge_(dst, mask, src, *, accumulate, path, plan, check_count, names, expression=None,
           at_positions=False) -> None:
    """dst[mask] = src (or +=) in place, through every check, or raise before anything is written. No gradient
    is recorded (a call that needs one takes the registered out-of-place op, whose formula is ops.py's).

    dst: [..., H]; mask: bool of shape dst.shape[:-1] (a plan's mask with ``plan``); src: [M, H], or an ItemList
    of checked items. names: how the caller names dst, mask and src in errors; expression: the embeddings as
    passed, spelled vLLM's way in a count error. ``at_positions``: ``mask`` is row positions [M] int32/int64 of
    dst [N, H] instead (dst.index_copy_(0, positions, src)); check_count then asks device positions to be
    checked on the host (one sync).
    """
    try:
        if _transform_on():
            _merge_by_torch(dst, mask, src, accumulate=accumulate, path=path, plan=plan, check_count=check_count,
                            names=names, at_positions=at_positions)
            return
        signed = _signature(dst, mask, src, accumulate, check_count, path, at_positions) if plan is None else None
        if signed is None and plan is None and not at_positions:
            flat = _flat(dst, mask)
            if flat is not None and (signed := _signature(*flat, src, accumulate, check_count, path)) is not None:
                dst, mask = flat
        if signed is not None:
            key, at = signed
            prepared, stride = _prepared.get(key), None
            if prepared is None:
                prepared, stride = _prepare(key, dst, mask, src, accumulate, path, plan, check_count, names,
                                            at_positions)
        else:
            at = None
            prepared, stride = _prepare(None, dst, mask, src, accumulate, path, plan, check_count, names,
                                        at_positions)
            if dst.dim() == 1:  # one row, a 0-dim mask: every path takes them as [1, H] and [1] (not index_put_)
                dst, mask = dst.unsqueeze(0), mask.reshape(1)
        checked_mask, checked_src = check_call(prepared, dst, mask, src, plan, names, at)
        if checked_mask is not mask or checked_src is not src:  # a copy: other addresses
            mask, src, at = checked_mask, checked_src, None
        run(prepared, dst, mask, src, accumulate, check_count, plan, stride, at=at)
    except CountMismatch as error:  # in vLLM's words, with the caller's spelling of the embeddings
        raise inputs.count_mismatch(error.num_rows, error.num_placeholders, spelled(expression)) from None


def _signature(dst, mask, src, accumulate, check_count, path, at_positions=False) -> tuple[tuple, tuple] | None:
    """(key, at) of a call, or None: it has no signature and is prepared every time. ``at``: (mask address, dst
    address, src address, N, M), what check_call and the launch read per call, read once here.

    The key is the memo's. What each field stands for, in prepare: the types, dtypes and layouts ->
    inputs.check_dst/check_mask/check_src and the Triton path's dtypes (dispatch.triton_refusal); the devices ->
    the device checks, the kind of launch and whether the mask's bytes may be dst's; the strides -> the row views
    (dst), the column-stride rule (src), a strided device mask (its bytes copied), the strides the bound kernels
    are specialized on and the spans of check_call's shared-memory test (a stride read also refuses a layout
    without strides); h, h_src -> the hidden-size check; the mask's length against N (positions': against M)
    -> inputs.check_mask (check_args), so a call of the wrong length has a key no entry is kept under; the
    addresses mod 16 -> the odd-address refusal and the kernels' alignment specialization; dst's negative bit ->
    the refusal of a negated dst, src's -> whether the launch reads src as it is (executor.prepare's ``fixed``);
    the flags and path -> check_flag/check_path and the decision; the buckets of N and M -> what dispatch.decide
    reads of them (its 2**31-row limit starts a bucket); at_positions -> which checks and which decision (a
    mask's or positions'). What no field fixes is check_call's (memory shared with dst, inference tensors, a
    plan, a negated positions view) and the executor's (the count, the positions' values, empty sizes)."""
    if (type(dst) is not _Tensor or type(mask) is not _Tensor or type(src) is not _Tensor or type(path) is not str
            or type(accumulate) is not bool or type(check_count) is not bool):
        return None
    try:
        n, h = dst.shape
        m, h_src = src.shape
        (length,) = mask.shape
        at = (mask.data_ptr(), dst.data_ptr(), src.data_ptr(), n, m)
        # bucket(n) and bucket(m), inline (this is the hot path of every call): their top three bits
        n_shift, m_shift = n.bit_length() - 3, m.bit_length() - 3
        key = (dst.dtype, src.dtype, mask.dtype, dst.device, src.device, mask.device, dst.stride(), src.stride(),
               mask.stride(), h, h_src, length == (m if at_positions else n), at[1] & 15, at[2] & 15, at[0] & 15,
               dst.is_neg(), src.is_neg(), accumulate, check_count, path,
               n >> n_shift << n_shift if n_shift > 0 else n, m >> m_shift << m_shift if m_shift > 0 else m,
               at_positions)
        return key, at
    except (ValueError, RuntimeError):  # not [N, H] / [M, H] / [N]; a layout without strides or storage
        return None


def _flat(dst, mask) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A contiguous dst [..., H] of three or more dims and its mask [...] as the [N, H] and [N] views of the same
    rows in the same order (a batched [B, S, H] merge, HF's layout): then the call has a signature. None for any
    other call (a mask of another shape keeps its own, for the error that names it)."""
    if (type(dst) is _Tensor and type(mask) is _Tensor and dst.dim() > 2 and mask.shape == dst.shape[:-1]
            and dst.is_contiguous()):
        return dst.view(-1, dst.shape[-1]), mask.reshape(-1)
    return None


def _prepare(key, dst, mask, src, accumulate, path, plan, check_count, names,
             at_positions=False) -> tuple[Prepared, int | None]:
    """Check every argument (raising in the caller's ``names``), decide, and prepare what runs; memoized under
    ``key`` (see _signature). Also a list's common row stride (a list has no signature)."""
    m, src_dtype = check_args(dst, mask, src, accumulate, path, check_count, names, at_positions)
    if at_positions:
        if torch._debug_has_internal_overlap(dst) == 1:  # rows sharing memory (expand): index_copy_'s refusal
            raise RuntimeError(f"{names[0]}: unsupported operation: more than one element of the written-to tensor "
                               "refers to a single memory location. Please clone() the tensor before performing "
                               "the operation.")
        decision = decide_positions(dst, mask, src_dtype, m if key is None else bucket(m), path, src)
        prepared = prepare(decision, dst.shape[0], dst, mask, src, positions=True)
        _memoize(key, prepared)
        return prepared, None
    if plan is not None:
        if plan.device != dst.device:
            raise ValueError(f"plan was built for {plan.device}; {names[0]} is on {dst.device}")
    if dst.dim() == 1:
        dst, mask = dst.unsqueeze(0), mask.reshape(1)
    decision, stride = decision_for(dst, mask, src, m if key is None else bucket(m), src_dtype, path, plan)
    prepared = prepare(decision, bucket(mask.numel()), dst, mask, src)
    _memoize(key, prepared)
    return prepared, stride


def _memoize(key, prepared: Prepared) -> None:
    if key is not None:
        if len(_prepared) >= _MAX_ENTRIES:
            _prepared.clear()
        _prepared[key] = prepared


def check_call(prepared: Prepared, dst, mask, src, plan, names, at: tuple | None = None) -> tuple:
    """The checks no signature fixes, on every call (a memo hit or not): the plan's currency, PyTorch's rule for
    inference tensors, memory shared with dst (a mask or positions sharing it are read first; a src sharing it is
    copied in dst's dtype or refused, PyTorch's rules), and a lazily negated positions view (its values, not its
    raw bytes, are the positions). ``at``: the call's addresses and sizes (``_signature``) where the entry fixes
    the layout, for an exact-where-disjoint span test that leaves only a possible share to inputs.overlaps.
    Returns the mask (or positions) and src to merge."""
    if plan is not None:
        plan.check_current(names[1])
    if dst.is_inference():
        inputs.check_writable(dst, names[0])
    if at is not None and prepared.spans is not None:
        mask_may_share, src_may_share = prepared.may_share(at)
    else:
        mask_may_share, src_may_share = mask.is_cpu == dst.is_cpu, type(src) is not ItemList
    if mask_may_share and inputs.overlaps(mask, dst):  # (then on one device: checked)
        mask = mask.clone()
    if src_may_share:  # a list sharing dst's memory is concatenated (decision_for)
        src = unshared(src, dst, names[2], names[0])
    if prepared.positions and mask.is_neg():
        mask = mask.resolve_neg()
    return mask, src


def check_args(dst, mask, src, accumulate, path, check_count, names,
               at_positions=False) -> tuple[int, torch.dtype]:
    """The argument checks of every route, in one order (flags, path, dst, mask or positions, src) and in the
    caller's ``names``: src's rows and dtype. src: a tensor, or an ItemList of checked items (its dtype
    torch.cat's)."""
    dst_name, mask_name, src_name = names
    inputs.check_flag(accumulate, "accumulate")
    inputs.check_flag(check_count, "check" if at_positions else "check_count")
    inputs.check_path(path, POSITION_PATHS if at_positions else PATHS)
    inputs.check_dst(dst, dst_name)
    if at_positions:
        inputs.check_positions(mask, dst, mask_name, dst_name)
    else:
        inputs.check_mask(mask, dst, mask_name, dst_name)
    if isinstance(src, ItemList):
        return sum(src.rows), src.dtype
    inputs.check_src(src, dst, src_name, dst_name)
    if at_positions and mask.shape[0] != src.shape[0]:
        raise ValueError(f"{mask_name} has {mask.shape[0]} entries; {src_name} has {src.shape[0]} rows (one "
                         "position per row)")
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


def decision_for(dst, mask, src, m: int, src_dtype, path, plan) -> tuple[Decision, int | None]:
    """dispatch.decide's whole decision for checked inputs (what runs and what explain() returns), and a list's
    common row stride: the facts of the call that decide reads for a list (one row stride, memory shared with
    dst, gradients, the negative bit) are gathered here."""
    if not isinstance(src, ItemList):
        return decide(dst, mask, src_dtype, m, path, src, plan=plan is not None), None
    stride = common_row_stride(src.tensors)
    readable = (stride is not None and not needs_grad(dst, src) and not any(map(_Tensor.is_neg, src.tensors))
                and not inputs.any_overlaps(src.tensors, dst))
    decision = decide(dst, mask, src_dtype, m, path, plan=plan is not None, items=len(src.rows),
                      items_readable=readable)
    return decision, stride


def decision_of(dst, mask, src, path, plan, names, at_positions=False) -> Decision:
    """What merge_ would run for these arguments (explain()): the memoized entry's decision where the call has a
    signature and it was prepared, else prepare's (memoized as merge_ would). Writes nothing."""
    signed = _signature(dst, mask, src, False, False, path, at_positions) if plan is None else None
    if signed is None and plan is None and not at_positions:
        flat = _flat(dst, mask)
        if flat is not None and (signed := _signature(*flat, src, False, False, path)) is not None:
            dst, mask = flat
    key = signed[0] if signed is not None else None
    prepared = _prepared.get(key) if key is not None else None
    if prepared is None:
        prepared, _ = _prepare(key, dst, mask, src, False, path, plan, False, names, at_positions)
    return prepared.decision


_TRANSFORM_REFUSAL = ("path='triton' cannot merge under a function transform (torch.func's vmap, grad or jvp, or "
                      "forward-mode AD): the kernels see neither batch dims nor tangents. path='auto' takes index_put "
                      "there")


def _merge_by_torch(dst, mask, src, *, accumulate, path, plan, check_count, names, at_positions=False) -> None:
    """merge_ under a function transform (see transformed): the checks, the count, then PyTorch's index_put_, whose
    batching rule and forward and backward formulas are PyTorch's, as are its rules for shared memory. Every path
    but "triton" (refused) runs it. Reads no address and nothing through numpy; a mask that the transform wraps
    (vmapped) is left to index_put_, which refuses what it cannot take."""
    m, _ = check_args(dst, mask, src, accumulate, path, check_count, names, at_positions)
    if plan is not None:
        plan.check_current(names[1])
    inputs.check_writable(dst, names[0])
    if path == "triton":
        raise ValueError(_TRANSFORM_REFUSAL)
    if at_positions:
        if not _functorch_wrapped(mask):
            mask = mask.resolve_neg()
            if mask.is_cpu or check_count:
                host_positions(mask, dst.shape[0], names[1])
        POSITION_RUNNERS["index_put"](dst, mask, src, accumulate)
        return
    if dst.dim() == 1:
        dst, mask = dst.unsqueeze(0), mask.reshape(1)
    if not _functorch_wrapped(mask):
        require_count(m, int(mask.count_nonzero()))  # merge_ words it (count_mismatch)
    RUNNERS["index_put"](dst, mask, torch.cat(src.tensors) if isinstance(src, ItemList) else src, accumulate)


def spelled(expression) -> str | None:
    """The count expression of an error message; the embeddings themselves until an error needs it (spelling
    it out on every call would cost more than the rest of the checks)."""
    return None if expression is None else inputs.count_expression(expression)
