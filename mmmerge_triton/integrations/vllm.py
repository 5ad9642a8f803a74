"""vLLM: replace ``vllm.model_executor.models.utils._merge_multimodal_embeddings`` with this package's merge.

    from mmmerge_triton.integrations import vllm as mm_vllm; mm_vllm.enable()

or, in every engine process, with the package installed: ``MMMERGE_TRITON_VLLM=1 vllm serve ...`` (the
``vllm.general_plugins`` entry point ``mmmerge_triton`` calls ``register``). The replacement keeps vLLM's
signature, argument order, in-place semantics and error text. Many model files bind the function at import
time (some under another name), so ``enable`` also rebinds every module global that is the original.
Written against vLLM 0.33's function; not run inside the engine here (it pins its own CUDA torch).
"""
from __future__ import annotations

import os
import sys

from ..api import merge_multimodal_embeddings

TARGET_MODULE = "vllm.model_executor.models.utils"
TARGET = "_merge_multimodal_embeddings"
ENV_SWITCH = "MMMERGE_TRITON_VLLM"
_original: list = []


def _merge_multimodal_embeddings(inputs_embeds, multimodal_embeddings, is_multimodal):
    """vLLM's signature: in place, returns inputs_embeds; ValueError "Attempted to assign ..." on a mismatch.
    Unlike vLLM's index_put, one source row is not broadcast to every placeholder: that raises too."""
    return merge_multimodal_embeddings(inputs_embeds, multimodal_embeddings, is_multimodal)


def _rebind(old, new) -> int:
    """Set every global of a loaded vllm module that is ``old`` to ``new``; returns how many."""
    replaced = 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("vllm"):
            continue
        for attr, value in list(vars(module).items()):
            if value is old:
                setattr(module, attr, new)
                replaced += 1
    return replaced


def enable() -> int:
    """Install the replacement; returns how many bindings were replaced. vLLM must be importable."""
    utils = sys.modules.get(TARGET_MODULE) or __import__(TARGET_MODULE, fromlist=[TARGET])
    original = getattr(utils, TARGET)
    if original is _merge_multimodal_embeddings:
        return 0
    _original[:] = [original]
    return _rebind(original, _merge_multimodal_embeddings)


def disable() -> None:
    """Put vLLM's own function back wherever enable() replaced it."""
    if _original:
        _rebind(_merge_multimodal_embeddings, _original.pop())


def register() -> None:
    """The ``vllm.general_plugins`` entry point: vLLM calls it in every process; it enables the replacement when
    the environment variable MMMERGE_TRITON_VLLM is 1."""
    if os.environ.get(ENV_SWITCH) == "1":
        enable()
