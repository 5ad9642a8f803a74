"""HF transformers, one line: ``mmmerge_triton.integrations.transformers.enable()`` (or ``with enabled():``).

Transformers VLMs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA and others) merge image features with an inline
``inputs_embeds.masked_scatter(mask, features)``, the mask [B, S, 1] (or expanded to [B, S, H]). While
enabled, ``torch.Tensor.masked_scatter`` / ``masked_scatter_`` calls whose mask is constant along the last dim
run as a row scatter (``masked_row_scatter``: no N*H prefix sum, differentiable as before); every other call
goes to PyTorch unchanged (the same result or error, bit for bit). Qwen3-VL's deepstack add (``_deepstack_process``) becomes one accumulate launch over
the visual rows with a row map built once per forward, instead of a clone plus two bool-mask index ops (two
host syncs) per layer. It stays out of place, as HF's own is: callers may hold the layer's output.
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from ..api import masked_row_scatter, masked_row_scatter_
from ..inputs import FLOAT_DTYPES
from ..plan import MergePlan

_DEEPSTACK_CLASSES = (
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLTextModel"),
    ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeTextModel"),
)
_stock: dict = {}  # what enable() replaced, for disable()


class MaskedScatterCountError(ValueError, RuntimeError):
    """Fewer source rows than true mask rows: a count mismatch (ValueError) where PyTorch raises RuntimeError."""


def _row_merge(self: torch.Tensor, mask, source) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row mask [...], source rows [K, H]) of a masked_scatter call that broadcasts one flag per row over the
    last dim and that a row scatter reproduces bit for bit; None for any other call, left to PyTorch.

    Like PyTorch, the K true rows take the first K*H source elements. A source with fewer raises, before any
    write, an error that is both the ValueError of a count mismatch and PyTorch's RuntimeError. Counting K
    syncs for a GPU mask, as HF's own count check before the merge already does.
    """
    if not (isinstance(mask, torch.Tensor) and isinstance(source, torch.Tensor) and mask.dtype == torch.bool):
        return None
    if self.dim() < 2 or mask.dim() != self.dim() or mask.shape[:-1] != self.shape[:-1]:
        return None
    if not (mask.shape[-1] == 1 or (mask.shape[-1] == self.shape[-1] and mask.stride(-1) == 0)):
        return None
    hidden = self.shape[-1]
    if (self.dtype not in FLOAT_DTYPES or source.dtype != self.dtype or source.device != self.device
            or mask.device != self.device or hidden == 0):
        return None
    rows = mask[..., 0]
    placeholders = int(rows.sum())
    if source.numel() < placeholders * hidden:
        raise MaskedScatterCountError(
            f"Attempted to assign {source.numel() // hidden} multimodal tokens to {placeholders} placeholders "
            f"(masked_scatter: number of elements of source < number of ones in mask)")
    return rows, source.reshape(-1)[:placeholders * hidden].view(-1, hidden)


def _masked_scatter(self, mask, source):
    merge = _row_merge(self, mask, source)
    if merge is None:
        return _stock["masked_scatter"](self, mask, source)
    return masked_row_scatter(self, merge[0], merge[1])


def _masked_scatter_(self, mask, source):
    merge = _row_merge(self, mask, source)
    if merge is None:
        return _stock["masked_scatter_"](self, mask, source)
    return masked_row_scatter_(self, merge[0], merge[1])


def _deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
    """Qwen3-VL's deepstack add after a decoder layer, as one accumulate launch over the visual rows."""
    visual_pos_masks = visual_pos_masks.to(hidden_states.device)
    visual_embeds = visual_embeds.to(hidden_states.device, hidden_states.dtype)
    cached = getattr(self, "_mmmerge_deepstack_plan", None)
    if cached is None or cached[0] is not visual_pos_masks or cached[1] != visual_pos_masks._version:
        cached = (visual_pos_masks, visual_pos_masks._version, MergePlan(visual_pos_masks))
        self._mmmerge_deepstack_plan = cached  # the same mask serves every layer of one forward
    return masked_row_scatter(hidden_states, src=visual_embeds, plan=cached[2], accumulate=True)


def enable() -> None:
    """Route row-broadcast masked_scatter calls, and Qwen3-VL's deepstack add, through mmmerge_triton."""
    if _stock:
        return
    _stock["masked_scatter"] = torch.Tensor.masked_scatter
    _stock["masked_scatter_"] = torch.Tensor.masked_scatter_
    torch.Tensor.masked_scatter = _masked_scatter
    torch.Tensor.masked_scatter_ = _masked_scatter_
    for module_name, class_name in _DEEPSTACK_CLASSES:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):  # an older transformers without this model
            continue
        _stock[cls] = cls._deepstack_process
        cls._deepstack_process = _deepstack_process


def disable() -> None:
    """Restore what enable() replaced."""
    if not _stock:
        return
    torch.Tensor.masked_scatter = _stock.pop("masked_scatter")
    torch.Tensor.masked_scatter_ = _stock.pop("masked_scatter_")
    for cls, method in list(_stock.items()):
        cls._deepstack_process = method
    _stock.clear()


@contextlib.contextmanager
def enabled():
    """``with enabled(): model(**inputs)``: the integration on for the block, then restored."""
    was_on = bool(_stock)
    enable()
    try:
        yield
    finally:
        if not was_on:
            disable()
