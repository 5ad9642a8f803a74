"""vLLM: replace ``vllm.model_executor.models.utils._merge_multimodal_embeddings`` with this package's merge.

    from mmmerge_triton.integrations import vllm as mm_vllm; mm_vllm.enable()

or, in every engine process, with the package installed: ``MMMERGE_TRITON_VLLM=1 vllm serve ...`` (the
``vllm.general_plugins`` entry point ``mmmerge_triton`` calls ``register``). Many model files bind the function
at import time (some under another name), so ``enable`` also rebinds every module global that is the original.

The replacement never turns an input that vLLM accepts into an error, and fails as vLLM fails: it runs this
package's merge only on its fast path (``on_fast_path``: eager, plain [N, H] float32/float16/bfloat16 tensors,
a bool [N] mask on the CPU or the embeddings' device, no autograd, no aliasing), where the result is vLLM's
bit for bit; everything else, and every input that the merge's checks refuse (a count mismatch among them, which
they find before writing), goes to vLLM's own function unchanged, so its results, exception types, texts and
chaining are vLLM's. A mask on the GPU is counted on the host (one sync, as vLLM's index_put syncs on it), so
a mismatch never writes part of the rows. Checked inside vLLM 0.33.0 and 0.34.0 (tests/engines/test_vllm_engine.py).
"""
from __future__ import annotations

import os
import sys
from operator import attrgetter
from typing import Callable

import torch

from . import engines
from ..api import merge_multimodal_embeddings

TARGET_MODULE = "vllm.model_executor.models.utils"
TARGET = "_merge_multimodal_embeddings"
ENV_SWITCH = "MMMERGE_TRITON_VLLM"
# The dtypes the Triton path takes; vLLM's index_put takes any other (float64, integers) its own way.
FAST_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))

# vLLM's own function: set by enable() (or the first call) and kept after disable(), so a reference to the
# replacement taken while enabled still reaches vLLM's function.
_engine: list[Callable] = []
_installed: list[Callable] = []  # the function enable() replaced, while it is replaced


def _import_target():
    return engines.import_target(TARGET_MODULE, "vllm", "vLLM")


def engine_function() -> Callable:
    """vLLM's own ``_merge_multimodal_embeddings`` (what the replacement hands every other input to)."""
    return engines.engine_function(_engine, TARGET_MODULE, TARGET, _merge_multimodal_embeddings, "vllm", "vLLM")


def _rows_distinct(t: torch.Tensor) -> bool:
    """A 2-D tensor whose rows are contiguous and do not overlap (index_put writes an overlapping one its own
    way: an expanded dst, with a deprecation warning)."""
    n, h = t.shape
    return (h <= 1 or t.stride(1) == 1) and (n <= 1 or t.stride(0) >= h)


_dtype_of, _layout_of, _requires_grad_of = attrgetter("dtype"), attrgetter("layout"), attrgetter("requires_grad")


def _fast_items(embeddings, dst: torch.Tensor) -> bool:
    """Whether the tensors of (nested) lists are ones the merge takes as vLLM would: one dtype of the fast set,
    strided, no grad while grad is on, no memory shared with dst (vLLM's index_put refuses one tensor aliasing
    dst; torch.cat copies a list first). False for a nested empty list (torch.cat's error) or a non-tensor.
    Shapes and devices are left to the merge's checks, which refuse a 1-D item, another hidden size or device
    before writing (then vLLM's function runs). A flat list (what vLLM's model runner passes) is checked one
    property at a time over all items, C-level maps as in inputs.check_items: about 0.25 µs per item."""
    if type(embeddings) is torch.Tensor:
        items = (embeddings,)
    elif isinstance(embeddings, (list, tuple)):
        items = embeddings
        if not (items and set(map(type, items)) == {torch.Tensor}):
            items = _flatten(embeddings)
            if items is None:
                return False
    else:
        return False
    dtypes = set(map(_dtype_of, items))
    if len(dtypes) != 1 or not dtypes <= FAST_DTYPES or set(map(_layout_of, items)) != {torch.strided}:
        return False
    if torch.is_grad_enabled() and any(map(_requires_grad_of, items)):
        return False
    # Memory shared with dst (an empty dst or item may report a null address: then vLLM decides, harmlessly).
    storages = set(map(torch.UntypedStorage.data_ptr, map(torch.Tensor.untyped_storage, items)))
    return dst.untyped_storage().data_ptr() not in storages


def _flatten(embeddings) -> list | None:
    """The tensors of nested lists/tuples in order, or None where one holds anything else or is empty."""
    out, pending = [], [embeddings]
    while pending:
        item = pending.pop()
        if type(item) is torch.Tensor:
            out.append(item)
        elif isinstance(item, (list, tuple)) and len(item):
            pending.extend(reversed(item))
        else:
            return None
    return out


def on_fast_path(inputs_embeds, multimodal_embeddings, is_multimodal) -> bool:
    """Whether the replacement runs this package's merge for these arguments (else vLLM's own function runs).

    True for eager calls on plain tensors: inputs_embeds [N, H] float32/float16/bfloat16 whose rows do not
    overlap, not requiring grad while grad is on, and not an inference tensor outside inference mode (PyTorch
    refuses those writes, and vLLM wraps the refusal); is_multimodal bool [N] on the CPU or on inputs_embeds'
    device; multimodal_embeddings a tensor with rows, or a non-empty (nested) list/tuple of tensors, all of
    one of those dtypes, strided, not requiring grad while grad is on, not sharing inputs_embeds' memory. A
    [0, H] tensor is not on it: vLLM returns at once, whatever the mask holds. The embeddings' shapes and
    devices are left to the merge's own checks (a refusal there hands the call to vLLM's function).
    """
    dst, mask = inputs_embeds, is_multimodal
    if type(dst) is not torch.Tensor or type(mask) is not torch.Tensor:
        return False  # tensor subclasses, and non-tensors: vLLM's function and its errors
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False  # traced or under a dispatch mode: vLLM's function traces as it always has
    if (dst.dim() != 2 or dst.dtype not in FAST_DTYPES or dst.layout != torch.strided
            or not _rows_distinct(dst)):
        return False
    if (mask.dtype != torch.bool or mask.shape != dst.shape[:1] or mask.layout != torch.strided
            or not (mask.is_cpu or mask.device == dst.device)):
        return False
    if torch.is_grad_enabled() and dst.requires_grad:
        return False
    if dst.is_inference() and not torch.is_inference_mode_enabled():
        return False
    if type(multimodal_embeddings) is torch.Tensor and (multimodal_embeddings.dim() == 0
                                                        or multimodal_embeddings.shape[0] == 0):
        return False  # vLLM's len() check: returns at once, or raises for a 0-d tensor
    return _fast_items(multimodal_embeddings, dst)


def _merge_multimodal_embeddings(inputs_embeds, multimodal_embeddings, is_multimodal):
    """vLLM's signature and contract: in place, returns inputs_embeds. On the fast path (``on_fast_path``) this
    package's merge; anything else, and any input its checks refuse (they raise before writing: a count
    mismatch, which vLLM may still take, e.g. one row broadcast to every placeholder), vLLM's own function."""
    if on_fast_path(inputs_embeds, multimodal_embeddings, is_multimodal):
        try:
            # A GPU mask is counted on the host (one sync, as vLLM's index_put's nonzero), so a mismatch is
            # refused before writing instead of writing the first rows.
            return merge_multimodal_embeddings(inputs_embeds, multimodal_embeddings, is_multimodal,
                                               check_count=not is_multimodal.is_cpu)
        except (TypeError, ValueError):
            pass  # vLLM decides below, outside this handler: its exception carries no context from ours
    return engine_function()(inputs_embeds, multimodal_embeddings, is_multimodal)


def _rebind(old, new) -> int:
    """Set every global of a loaded vllm module that is ``old`` to ``new``; returns how many."""
    replaced = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "vllm" or name.startswith("vllm.")):
            continue
        for attr, value in list(vars(module).items()):
            if value is old:
                setattr(module, attr, new)
                replaced += 1
    return replaced


def enable() -> int:
    """Install the replacement in every loaded vLLM module that binds vLLM's function; returns how many
    bindings were replaced (0 when already enabled). Modules imported later take it from utils.

    Raises:
        ModuleNotFoundError: vLLM is not importable (one line, with the import's own error).
    """
    current = getattr(_import_target(), TARGET)
    if current is _merge_multimodal_embeddings:
        return 0
    _engine[:] = [current]
    _installed[:] = [current]
    return _rebind(current, _merge_multimodal_embeddings)


def disable() -> None:
    """Put vLLM's own function back wherever enable() replaced it."""
    if _installed:
        _rebind(_merge_multimodal_embeddings, _installed.pop())


def register() -> None:
    """The ``vllm.general_plugins`` entry point: vLLM calls it in every process; it enables the replacement when
    the environment variable MMMERGE_TRITON_VLLM is 1."""
    if os.environ.get(ENV_SWITCH) == "1":
        enable()
