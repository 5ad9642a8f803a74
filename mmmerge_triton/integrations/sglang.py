"""SGLang: replace ``sglang.srt.managers.mm_utils._scatter_mm_embedding`` with this package's row scatter.

    from mmmerge_triton.integrations import sglang as mm_sglang; mm_sglang.enable()

SGLang looks the function up as a module global at call time, and no other module binds it (SGLang 0.5.23),
so setting the attribute covers its callers (the main merge and the deepstack buffer in ``embed_mm_inputs``).
Same signature (dest, mask, src), in place, returns None; the cast to dest's dtype happens in the kernel; no
sync. On its fast path (``on_fast_path``: eager, plain [N, W] float32/float16/bfloat16 tensors, a bool mask of
N rows on dest's device) the result is SGLang's bit for bit; every other input (float64 and integer dtypes, a
uint8 mask, other shapes) goes to SGLang's own function unchanged, with its results and errors.

A count mismatch (the mask's true rows differ from src's rows): SGLang's recipe device-asserts on the GPU;
on the CPU it raises RuntimeError (two or more placeholders too many), IndexError (more rows, after writing
some), or, with exactly one placeholder too many, leaves that one unwritten without a word (its discard slot
takes it; its own comment says a mismatch must fail). With a CPU mask the replacement writes nothing and
raises ``ScatterCountError`` in all three cases, both a RuntimeError and an IndexError: SGLang 0.5.23 has no
handler between the merge and the scheduler process's ``except Exception`` (which logs it and shuts the
server down), and its own mismatch test expects ``(RuntimeError, IndexError)``. With a GPU mask nothing is
synced: the first min(K, M) true rows take src's first rows, and no memory out of bounds is touched. Checked
inside SGLang 0.5.23 (tests/engines/test_sglang_engine.py).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import engines
from ..api import masked_row_scatter_
from ..inputs import count_mismatch

TARGET_MODULE = "sglang.srt.managers.mm_utils"
TARGET = "_scatter_mm_embedding"
# The dtypes the Triton path takes; SGLang's index_copy_ takes any other its own way.
FAST_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))

_engine: list[Callable] = []  # SGLang's own function: set by enable() (or the first call), kept after disable()
_installed: list[Callable] = []  # the function enable() replaced, while it is replaced


class ScatterCountError(RuntimeError, IndexError):
    """The mask's true rows differ from src's rows: the two types SGLang's own function raises on the CPU."""


def _import_target():
    return engines.import_target(TARGET_MODULE, "sglang", "SGLang")


def engine_function() -> Callable:
    """SGLang's own ``_scatter_mm_embedding`` (what the replacement hands every other input to)."""
    return engines.engine_function(_engine, TARGET_MODULE, TARGET, _scatter_mm_embedding, "sglang", "SGLang")


def on_fast_path(dest, mask, src) -> bool:
    """Whether the replacement runs this package's row scatter (else SGLang's own function runs).

    True for eager calls on plain tensors: dest [N, W] float32/float16/bfloat16 with rows that do not overlap;
    mask bool [N] or [N, 1] on dest's device (SGLang's ranks and rows must share a device); src [M, W] of one
    of those dtypes, on any device (moved as SGLang moves it) and not sharing dest's memory; no tensor
    requiring grad while grad is on, no in-place write to an inference tensor outside inference mode.
    """
    if type(dest) is not torch.Tensor or type(mask) is not torch.Tensor or type(src) is not torch.Tensor:
        return False
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if dest.dim() != 2 or dest.dtype not in FAST_DTYPES or dest.layout != torch.strided:
        return False
    n, w = dest.shape
    if not ((w <= 1 or dest.stride(1) == 1) and (n <= 1 or dest.stride(0) >= w)):
        return False  # overlapping rows: index_copy_ writes (or refuses) them its own way
    if (mask.dtype != torch.bool or mask.device != dest.device or mask.layout != torch.strided
            or mask.shape not in ((n,), (n, 1))):
        return False
    if (src.dim() != 2 or src.shape[1] != w or src.dtype not in FAST_DTYPES or src.layout != torch.strided):
        return False
    if torch.is_grad_enabled() and (dest.requires_grad or src.requires_grad):
        return False
    if dest.is_inference() and not torch.is_inference_mode_enabled():
        return False
    if src.numel() and src.untyped_storage().data_ptr() == dest.untyped_storage().data_ptr():
        return False
    return True


def _scatter_mm_embedding(dest, mask, src) -> None:
    """SGLang's signature: dest [N, W] in place, mask bool [N, 1] (or [N]), src [M, W]; returns None.

    Raises:
        ScatterCountError: a CPU mask whose true rows differ from src's rows (nothing written).
        Anything SGLang's own function raises, for inputs off the fast path.
    """
    if on_fast_path(dest, mask, src):
        if mask.is_cpu:  # then dest is on the CPU too: counting costs no sync
            placeholders = int(mask.sum())
            if placeholders != src.shape[0]:
                raise ScatterCountError(str(count_mismatch(src.shape[0], placeholders)))
        try:
            masked_row_scatter_(dest, mask.view(dest.shape[0]), src.to(dest.device))
            return None
        except (TypeError, ValueError):
            pass  # an input the checks refuse (before writing): SGLang's function decides, outside this handler
    return engine_function()(dest, mask, src)


def enable() -> None:
    """Install the replacement (idempotent).

    Raises:
        ModuleNotFoundError: SGLang is not importable (one line, with the import's own error).
    """
    module = _import_target()
    current = getattr(module, TARGET)
    if current is not _scatter_mm_embedding:
        _engine[:] = [current]
        _installed[:] = [current]
        setattr(module, TARGET, _scatter_mm_embedding)


def disable() -> None:
    """Put SGLang's own function back."""
    if _installed:
        setattr(_import_target(), TARGET, _installed.pop())
