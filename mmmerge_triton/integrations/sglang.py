"""SGLang: replace ``sglang.srt.managers.mm_utils._scatter_mm_embedding`` with this package's row scatter.

    from mmmerge_triton.integrations import sglang as mm_sglang; mm_sglang.enable()

SGLang looks the function up as a module global at call time, so setting the attribute covers its callers
(the main merge and the deepstack buffer). Same signature (dest, mask, src), in place, returns None; the
cast to dest's dtype happens in the kernel; no sync. On a count mismatch that it can see (a CPU mask), it
raises an error that is both a ValueError and an IndexError, where SGLang's recipe raises IndexError or
RuntimeError on the CPU and a device-side assert on the GPU. Written against SGLang 0.5.23; not run inside
the engine here (it pins its own CUDA torch).
"""
from __future__ import annotations

import sys

from ..api import masked_row_scatter_

TARGET_MODULE = "sglang.srt.managers.mm_utils"
TARGET = "_scatter_mm_embedding"
_original: list = []


class ScatterCountError(ValueError, IndexError):
    """The mask's true rows differ from src's rows (caught by SGLang's ``except (RuntimeError, IndexError)``)."""


def _scatter_mm_embedding(dest, mask, src) -> None:
    """dest [N, W] (in place); mask bool [N] or [N, 1]; src [M, W], any float dtype, any device."""
    try:
        masked_row_scatter_(dest, mask.reshape(dest.shape[:-1]), src.to(dest.device))
    except ValueError as error:
        if "multimodal tokens" in str(error):
            raise ScatterCountError(str(error)) from None
        raise


def enable() -> None:
    module = sys.modules.get(TARGET_MODULE) or __import__(TARGET_MODULE, fromlist=[TARGET])
    if getattr(module, TARGET) is not _scatter_mm_embedding:
        _original[:] = [getattr(module, TARGET)]
        setattr(module, TARGET, _scatter_mm_embedding)


def disable() -> None:
    if _original:
        setattr(sys.modules[TARGET_MODULE], TARGET, _original.pop())
