"""HF transformers, one line: ``mmmerge_triton.integrations.transformers.enable()`` (or ``with enabled():``).

Transformers VLMs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA and others) merge image features with an inline
``inputs_embeds.masked_scatter(mask, features)``, the mask [B, S, 1] (or expanded to [B, S, H]). While
enabled, ``torch.Tensor.masked_scatter`` / ``masked_scatter_`` calls whose mask is constant along the last dim
run as a row scatter (``masked_row_scatter``: no N*H prefix sum, differentiable as before, the result laid out
as PyTorch's); every other call goes to PyTorch unchanged (the same result or error, bit for bit): other
masks and dtypes, in-place calls PyTorch refuses or runs on aliased memory, and every traced call
(torch.compile, torch.export, fake, meta and subclass tensors), where counting the mask would force a value.
Qwen3-VL's deepstack add (``_deepstack_process``) becomes one accumulate launch over the visual rows with a row
map built once per forward, instead of a clone plus two bool-mask index ops (two host syncs) per layer; traced,
HF's own runs. It stays out of place, as HF's own is: callers may hold the layer's output. The switch is
thread-safe, and a method looked up while enabled keeps working after ``disable()``.

Several modalities: Qwen2.5-Omni and Qwen3-Omni merge audio, image and video, Qwen2-VL, Qwen2.5-VL and Qwen3-VL
image and video, each by an out-of-place ``inputs_embeds = inputs_embeds.masked_scatter(mask, features)``, the
result of one the input of the next: K modalities, K copies of the N x H embeddings. Their forwards run inside
``chained_merges()`` while enabled: the first merge copies, the later ones write into that copy in place, one
copy in all (each merge still runs at once, so whatever HF reads between them, such as a placeholder mask
computed from the embeddings, is what it reads without the switch). This is what ``merge_modalities_`` runs for
masks on the GPU, where one launch for all modalities measured slower than one per modality (bench/results).
The block spans the whole forward: an out-of-place masked_scatter of the last merge's result made there by a
caller's hook would be written in place too (the audited HF code makes no other).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import threading
from typing import Callable

import torch

from ..api import masked_row_scatter, masked_row_scatter_
from ..inputs import TRITON_DTYPES
from ..plan import MergePlan

_DEEPSTACK_CLASSES = (
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLTextModel"),
    ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeTextModel"),
)
# PyTorch's methods, taken once at import: the patched functions call these, never a table that disable()
# clears, so a reference kept from while enabled, or a call racing a toggle in another thread, still works.
# (A reload while enabled would find the patched function here: take the stock one it carries.)
_STOCK_MASKED_SCATTER = getattr(torch.Tensor.masked_scatter, "_mmmerge_stock", torch.Tensor.masked_scatter)
_STOCK_MASKED_SCATTER_ = getattr(torch.Tensor.masked_scatter_, "_mmmerge_stock", torch.Tensor.masked_scatter_)
_STOCK_DEEPSTACK: dict[type, Callable] = {}  # HF's _deepstack_process per class: filled by enable(), never emptied
_DEEPSTACK_IN_PLACE: dict[type, bool] = {}  # whether it adds into hidden_states in place (transformers 4.x) or a copy


def _writes_in_place(stock: Callable) -> bool:
    """Whether HF's ``_deepstack_process`` adds into the hidden states it is given (transformers 4.57 indexes
    them in place and returns them) or into a copy (5.x): asked of the method itself, on a 2 x 1 tensor."""
    hidden = torch.zeros(2, 1)
    out = stock(None, hidden, torch.tensor([True, False]), torch.ones(1, 1))
    return out is hidden or bool(hidden[0, 0] != 0)


# The forwards that merge one modality after another, each result rebinding inputs_embeds and read by nothing
# else (audited in transformers 4.57.1, 5.17 and 5.25): run inside chained_merges() while enabled. The omni thinkers
# merge in their ForConditionalGeneration forward up to 5.17, in their inner model's after it (whose caller's
# block then holds nothing but that call and the head).
_CHAINED_FORWARDS = (
    ("transformers.models.qwen2_5_omni.modeling_qwen2_5_omni", "Qwen2_5OmniThinkerForConditionalGeneration"),
    ("transformers.models.qwen2_5_omni.modeling_qwen2_5_omni", "Qwen2_5OmniThinkerModel"),
    ("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe", "Qwen3OmniMoeThinkerForConditionalGeneration"),
    ("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe", "Qwen3OmniMoeThinkerModel"),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLModel"),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLModel"),
    ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeModel"),
)

_INFRA_MODES = tuple(torch._C._TorchDispatchModeKey.__members__.values())  # fake, proxy, functional: tracers
_toggle = threading.Lock()
_replaced: dict = {}  # what enable() replaced, for disable(); empty while off


def _traced(*tensors: torch.Tensor) -> bool:
    """Whether the call is traced or runs on tensors without values: torch.compile / export, torch.jit.trace,
    a torch.func transform (vmap, grad), a fake, proxy or functional mode, a tensor subclass (FakeTensor,
    DTensor, ...), a meta tensor. Such calls go to PyTorch: the row scatter counts the mask's values, which a
    tracer can only bake in or refuse. Other dispatch modes (observers on real tensors) keep the row scatter,
    through the registered ops."""
    if torch.compiler.is_compiling():
        return True
    if torch._C._get_tracing_state() is not None or torch._C._functorch.maybe_current_level() is not None:
        return True
    for key in _INFRA_MODES:
        if torch._C._get_dispatch_mode(key) is not None:
            return True
    return any(type(t) is not torch.Tensor or t.is_meta for t in tensors)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same storage (any overlap, or none, within it): cheap, and enough to hand the call to PyTorch."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _refused_in_place(self: torch.Tensor, mask: torch.Tensor, source: torch.Tensor) -> bool:
    """In-place calls that PyTorch refuses (its error is the one to raise) or runs on aliased memory (its
    element order is the result to give): left to PyTorch."""
    if torch._debug_has_internal_overlap(self) != 0:  # expanded self: PyTorch's "single memory location"
        return True
    if self.requires_grad and (self.is_leaf or self._is_view()):
        return True  # a leaf (or a view of one) that requires grad: PyTorch's autograd error, or its no_grad write
    if self.is_inference() and not torch.is_inference_mode_enabled():
        return True
    return _shares_memory(self, source) or _shares_memory(self, mask)


def _row_merge(self: torch.Tensor, mask, source, in_place: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row mask [...], source rows [K, H]) of a masked_scatter call that broadcasts one flag per row over the
    last dim and that a row scatter reproduces bit for bit; None for any other call, left to PyTorch.

    Like PyTorch, the K true rows take the first K*H source elements. A source with fewer is PyTorch's to
    refuse: on the CPU its op runs (its error, and the rows it writes before raising); on CUDA, where its op
    has no host check (a device-side assert, which ends the process's CUDA context), the same error is raised
    here, before any write. Counting K syncs for a GPU mask, as HF's own count check before the merge does.
    """
    if not (isinstance(mask, torch.Tensor) and isinstance(source, torch.Tensor) and mask.dtype == torch.bool):
        return None
    if _traced(self, mask, source):
        return None
    if self.dim() < 2 or mask.dim() != self.dim() or mask.shape[:-1] != self.shape[:-1]:
        return None
    if not (mask.shape[-1] == 1 or (mask.shape[-1] == self.shape[-1] and mask.stride(-1) == 0)):
        return None
    hidden = self.shape[-1]
    if (self.dtype not in TRITON_DTYPES or source.dtype != self.dtype or source.device != self.device
            or mask.device != self.device or hidden == 0):
        return None
    if in_place and _refused_in_place(self, mask, source):
        return None
    rows = mask[..., 0]
    placeholders = int(rows.sum())
    if source.numel() < placeholders * hidden:
        if not self.is_cuda:
            return None
        raise _short_source_error()
    return rows, source.reshape(-1)[:placeholders * hidden].view(-1, hidden)


def _short_source_error() -> Exception:
    """PyTorch's error for a source shorter than the mask's true elements, type and text, as its CPU op raises
    it (asked of the op itself, so the text follows the installed PyTorch)."""
    try:
        _STOCK_MASKED_SCATTER(torch.zeros(1), torch.ones(1, dtype=torch.bool), torch.zeros(0))
    except RuntimeError as error:
        return type(error)(*error.args)
    raise AssertionError("PyTorch's masked_scatter took a source shorter than its mask")


class _Chain(threading.local):
    """A thread's chained_merges() block: whether one is open, and the tensor its last out-of-place row merge
    returned (``head``) with the version it had then (None: an inference tensor, which has none)."""

    open = False
    head: torch.Tensor | None = None
    version: int | None = None


_chain = _Chain()


def _version(tensor: torch.Tensor) -> int | None:
    return None if tensor.is_inference() else tensor._version


@contextlib.contextmanager
def chained_merges():
    """``with chained_merges(): ...``: while the switch is enabled, an out-of-place ``masked_scatter`` call in
    the block whose tensor is what the block's previous row merge returned, unchanged since (its version), writes
    into it in place and returns it: K merges that each take the last one's result make one copy of the
    embeddings, not K. The caller promises that no one else holds those intermediate results (HF's forwards
    rebind ``inputs_embeds``; enable() runs the audited ones in a block). A call that records a gradient, or that
    PyTorch would refuse in place, merges out of place as without the block. Per thread; blocks nest."""
    saved = (_chain.open, _chain.head, _chain.version)
    _chain.open, _chain.head, _chain.version = True, None, None
    try:
        yield
    finally:
        _chain.open, _chain.head, _chain.version = saved


def _stock(method: Callable, op, self: torch.Tensor, mask, source) -> torch.Tensor:
    """PyTorch's masked_scatter(_): its Tensor method, or under torch.compile its aten op. (Dynamo lists the
    Tensor methods it knows once per process, from the class: when that first happens while the switch is on,
    the stock method is not on its list and a fullgraph compile refuses it as a skipped function.)"""
    if torch.compiler.is_compiling():
        return op(self, mask, source)
    return method(self, mask, source)


def _masked_scatter(self: torch.Tensor, mask, source) -> torch.Tensor:
    """``torch.Tensor.masked_scatter`` while enabled: a row scatter where it equals PyTorch's, else PyTorch's;
    in a chained_merges() block, into the block's last result where it is this call's tensor."""
    merge = _row_merge(self, mask, source, in_place=False)
    if merge is None:
        return _stock(_STOCK_MASKED_SCATTER, torch.ops.aten.masked_scatter, self, mask, source)
    if not _chain.open:
        return masked_row_scatter(self, merge[0], merge[1])  # contiguous, whatever self's layout, as PyTorch's
    if (self is _chain.head and _version(self) == _chain.version
            and not (torch.is_grad_enabled() and (self.requires_grad or source.requires_grad))
            and not _refused_in_place(self, mask, source)):
        merged = masked_row_scatter_(self, merge[0], merge[1])
    else:
        merged = masked_row_scatter(self, merge[0], merge[1])
    _chain.head, _chain.version = merged, _version(merged)
    return merged


def _chained_forward(stock: Callable) -> Callable:
    """HF's ``forward`` run inside chained_merges() (traced: HF's own, which a compiled graph sees whole)."""

    @functools.wraps(stock)
    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # the merges take PyTorch's op there: no chain, no thread state traced
            return stock(self, *args, **kwargs)
        with chained_merges():
            return stock(self, *args, **kwargs)

    forward._mmmerge_stock = stock
    return forward


def _masked_scatter_(self: torch.Tensor, mask, source) -> torch.Tensor:
    """``torch.Tensor.masked_scatter_`` while enabled: a row scatter where it equals PyTorch's, else PyTorch's."""
    merge = _row_merge(self, mask, source, in_place=True)
    if merge is None:
        return _stock(_STOCK_MASKED_SCATTER_, torch.ops.aten.masked_scatter_, self, mask, source)
    return masked_row_scatter_(self, merge[0], merge[1])


_masked_scatter._mmmerge_stock = _STOCK_MASKED_SCATTER
_masked_scatter_._mmmerge_stock = _STOCK_MASKED_SCATTER_


def _deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
    """Qwen3-VL's deepstack add after a decoder layer, as one accumulate launch over the visual rows."""
    if _traced(hidden_states, visual_pos_masks, visual_embeds):  # the row map reads the mask's values
        stock = next(_STOCK_DEEPSTACK[cls] for cls in type(self).__mro__ if cls in _STOCK_DEEPSTACK)
        return stock(self, hidden_states, visual_pos_masks, visual_embeds)
    visual_pos_masks = visual_pos_masks.to(hidden_states.device)
    visual_embeds = visual_embeds.to(hidden_states.device, hidden_states.dtype)
    if visual_pos_masks.is_inference():
        # No version counter (inference mode, HF's serving case): a change in place would go unseen, so no
        # plan is reused; one per layer is still no sync, against HF's two.
        plan = MergePlan(visual_pos_masks)
    else:
        cached = getattr(self, "_mmmerge_deepstack_plan", None)
        if cached is None or cached[0] is not visual_pos_masks or cached[1] != visual_pos_masks._version:
            cached = (visual_pos_masks, visual_pos_masks._version, MergePlan(visual_pos_masks))
            self._mmmerge_deepstack_plan = cached  # the same mask serves every layer of one forward
        plan = cached[2]
    cls = next(cls for cls in type(self).__mro__ if cls in _STOCK_DEEPSTACK)
    in_place = _DEEPSTACK_IN_PLACE.get(cls)
    if in_place is None:  # asked once, eagerly (never under a trace or a fake mode: see _traced above)
        in_place = _DEEPSTACK_IN_PLACE[cls] = _writes_in_place(_STOCK_DEEPSTACK[cls])
    if in_place:  # as HF's method of this version: the same tensor, written in place
        return masked_row_scatter_(hidden_states, src=visual_embeds, plan=plan, accumulate=True)
    return masked_row_scatter(hidden_states, src=visual_embeds, plan=plan, accumulate=True)


def enable() -> None:
    """Route row-broadcast masked_scatter calls, and Qwen3-VL's deepstack add, through mmmerge_triton; run the
    forwards of _CHAINED_FORWARDS in chained_merges()."""
    with _toggle:
        if _replaced:
            return
        _replaced["masked_scatter"] = torch.Tensor.masked_scatter
        _replaced["masked_scatter_"] = torch.Tensor.masked_scatter_
        torch.Tensor.masked_scatter = _masked_scatter
        torch.Tensor.masked_scatter_ = _masked_scatter_
        for cls in _classes(_DEEPSTACK_CLASSES):
            _replaced[cls, "_deepstack_process"] = cls._deepstack_process
            _STOCK_DEEPSTACK.setdefault(cls, cls._deepstack_process)
            cls._deepstack_process = _deepstack_process
        for cls in _classes(_CHAINED_FORWARDS):
            stock = cls.__dict__.get("forward")
            if stock is None:  # inherited: not the audited code
                continue
            _replaced[cls, "forward"] = stock
            cls.forward = _chained_forward(getattr(stock, "_mmmerge_stock", stock))


def _classes(names) -> list[type]:
    """The classes of (module, class) names that the installed transformers has."""
    found = []
    for module_name, class_name in names:
        try:
            found.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):  # an older transformers without this model
            continue
    return found


def disable() -> None:
    """Restore what enable() replaced. A reference to a patched method taken while enabled keeps working."""
    with _toggle:
        if not _replaced:
            return
        torch.Tensor.masked_scatter = _replaced.pop("masked_scatter")
        torch.Tensor.masked_scatter_ = _replaced.pop("masked_scatter_")
        for (cls, name), method in _replaced.items():
            setattr(cls, name, method)
        _replaced.clear()


@contextlib.contextmanager
def enabled():
    """``with enabled(): model(**inputs)``: the integration on for the block, then restored."""
    was_on = bool(_replaced)
    enable()
    try:
        yield
    finally:
        if not was_on:
            disable()
