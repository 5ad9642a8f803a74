"""SGLang: replace the two functions of SGLang 0.5.23 that write rows of the input embeddings with this package's
row scatters.

    from mmmerge_triton.integrations import sglang as mm_sglang; mm_sglang.enable()

Where SGLang 0.5.23 finds the rows (read in its wheel, the newest on PyPI when read; paths under sglang/srt/):

- The multimodal merge has a mask, never positions. ``_get_multimodal_mask`` (managers/mm_schedule.py:655) marks
  the placeholder tokens of input_ids on their device ([N, 1] bool, a sorted lookup, no sync), and
  ``get_embedding_and_mask`` (mm_schedule.py:719) returns it with the embeddings. The host knows each item's
  token spans (``item.offsets``; ``_count_mm_tokens_in_extend``, mm_schedule.py:669, counts the placeholders
  from them) but never turns them into rows of the batch: ``embed_mm_inputs`` gets the prefix and extend
  lengths of the multimodal requests only, not where the batch's other requests sit. ``_scatter_mm_embedding``
  (managers/mm_utils.py:429, called at mm_utils.py:585 for the merge and 587 for the deepstack buffer) is the
  one place rows are computed, on the device: ranks = cumsum(mask) - 1, a row list of M + 1 slots filled with N
  (the poison value), rows.scatter_(0, ranks, arange(N)) with every false row sent to slot M, then
  ``dest.index_copy_(0, rows[:M], src)``. Its replacement builds no row list: the fast path hands the mask to
  masked_row_scatter_, whose kernel finds the true rows itself. (SGLang 0.4.10, mm_utils.py:600, and 0.5.10,
  mm_utils.py:876, computed ``torch.where(mask)`` inline in embed_mm_inputs, a sync, with no function of its own
  to replace.)
- Embedding overrides have positions. ``ScheduleBatch.prepare_for_extend`` (managers/schedule_batch.py:2942)
  turns each request's ``positional_embed_overrides.positions`` into rows of the batch's extend tokens on the
  host, dropping those outside this chunk, and sends them to the batch's device as int64 (schedule_batch.py:3062);
  ``ModelRunner._extend_forward_kwargs`` (model_executor/model_runner.py:1764) writes
  ``input_embeds[replace_positions] = replace_embeds.to(input_embeds.dtype)``. Its replacement takes those
  positions directly: ``indexed_row_scatter_(input_embeds, replace_positions, replace_embeds)``.

How each is replaced. SGLang looks ``_scatter_mm_embedding`` up as a module global at call time and no other module
binds it, so setting the attribute covers its callers; it calls ``self._extend_forward_kwargs`` (model_runner.py:2047,
model_executor/runner/eager_runner.py:281), so setting the class attribute covers both. Where
``sglang.srt.model_executor.model_runner`` does not import (no ModelRunner can run in this process) or its ModelRunner
has no ``_extend_forward_kwargs`` (another SGLang), enable() replaces ``_scatter_mm_embedding`` alone.

``_scatter_mm_embedding``: same signature (dest, mask, src), in place, returns None; the cast to dest's dtype happens
in the kernel; no sync. On its fast path (``on_fast_path``: eager, plain [N, W] float32/float16/bfloat16 tensors, a
bool mask of N rows on dest's device) the result is SGLang's bit for bit; every other input (float64 and integer
dtypes, a uint8 mask, other shapes) goes to SGLang's own function unchanged, with its results and errors.

A count mismatch (the mask's true rows differ from src's rows): SGLang's recipe device-asserts on the GPU;
on the CPU it raises RuntimeError (two or more placeholders too many), IndexError (more rows, after writing
some), or, with exactly one placeholder too many, leaves that one unwritten without a word (the poison list's
discard slot takes it; its own comment says a mismatch must fail). With a CPU mask the replacement writes nothing and
raises ``ScatterCountError`` in all three cases, both a RuntimeError and an IndexError: SGLang 0.5.23 has no
handler between the merge and the scheduler process's ``except Exception`` (which logs it and shuts the
server down), and its own mismatch test expects ``(RuntimeError, IndexError)``. With a GPU mask nothing is
synced: the first min(K, M) true rows take src's first rows, and no memory out of bounds is touched. Checked
inside SGLang 0.5.23 (tests/engines/test_sglang_engine.py).

``_extend_forward_kwargs``: same signature (self, forward_batch, pp_proxy_tensors) and kwargs dict. SGLang's own method
builds the kwargs (input_embeds as it makes them, pp_proxy_tensors, get_embedding) from a view of forward_batch whose
overrides are empty, so it writes no row; on the fast path (``on_positions_fast_path``) indexed_row_scatter_ then writes
the overrides into input_embeds, bit for bit SGLang's result for positions that do not repeat (repeated ones: which
row lands is undefined in both). Every other input, every one where that first call raises (rows of another width,
say), and every one indexed_row_scatter_ refuses before writing (CPU positions out of range or repeated) goes to
SGLang's own method with forward_batch unchanged, with its results and errors. Device positions are never synced;
one outside [0, N) is skipped where SGLang's index_put device-asserts (or, negative, wraps), which SGLang's own
positions never are (prepare_for_extend keeps 0 <= position < extend tokens).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from . import engines
from ..api import indexed_row_scatter_, masked_row_scatter_
from ..inputs import count_mismatch

TARGET_MODULE = "sglang.srt.managers.mm_utils"
TARGET = "_scatter_mm_embedding"
RUNNER_MODULE = "sglang.srt.model_executor.model_runner"
RUNNER_CLASS = "ModelRunner"
RUNNER_TARGET = "_extend_forward_kwargs"
# The dtypes the Triton path takes; SGLang's index_copy_ takes any other its own way.
FAST_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))
POSITION_DTYPES = frozenset((torch.int32, torch.int64))

_engine: list[Callable] = []  # SGLang's own function: set by enable() (or the first call), kept after disable()
_installed: list[Callable] = []  # the function enable() replaced, while it is replaced
_runner_engine: list[Callable] = []  # SGLang's own ModelRunner method: set by enable(), kept after disable()
_runner_installed: list[tuple[type, Callable]] = []  # (ModelRunner, the method enable() replaced), while replaced


class ScatterCountError(RuntimeError, IndexError):
    """The mask's true rows differ from src's rows: the two types SGLang's own function raises on the CPU."""


def _import_target():
    return engines.import_target(TARGET_MODULE, "sglang", "SGLang")


def _import_runner() -> type | None:
    """SGLang's ModelRunner, where it imports and defines ``_extend_forward_kwargs`` (SGLang 0.5.23); else None."""
    try:
        module = importlib.import_module(RUNNER_MODULE)
    except ImportError:
        return None
    runner = getattr(module, RUNNER_CLASS, None)
    return runner if isinstance(runner, type) and RUNNER_TARGET in vars(runner) else None


def engine_function() -> Callable:
    """SGLang's own ``_scatter_mm_embedding`` (what the replacement hands every other input to)."""
    return engines.engine_function(_engine, TARGET_MODULE, TARGET, _scatter_mm_embedding, "sglang", "SGLang")


def engine_method() -> Callable:
    """SGLang's own ``ModelRunner._extend_forward_kwargs`` (what its replacement hands every other input to).

    Raises:
        RuntimeError: enable() has not replaced it, so SGLang's own is not known.
    """
    if not _runner_engine:
        raise RuntimeError(f"{RUNNER_MODULE}.{RUNNER_CLASS}.{RUNNER_TARGET} was not replaced by enable(), "
                           "and SGLang's own is not known")
    return _runner_engine[0]


def _rows_fit(dest, src) -> bool:
    """The rules both fast paths share: eager plain tensors; dest [N, W] float32/float16/bfloat16 whose rows do not
    overlap; src [M, W] of one of those dtypes, not sharing dest's memory; nothing that needs autograd or writes
    an inference tensor outside inference mode."""
    if type(dest) is not torch.Tensor or type(src) is not torch.Tensor:
        return False
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if dest.dim() != 2 or dest.dtype not in FAST_DTYPES or dest.layout != torch.strided:
        return False
    n, w = dest.shape
    if not ((w <= 1 or dest.stride(1) == 1) and (n <= 1 or dest.stride(0) >= w)):
        return False  # overlapping rows: index_copy_ / index_put write (or refuse) them their own way
    if (src.dim() != 2 or src.shape[1] != w or src.dtype not in FAST_DTYPES or src.layout != torch.strided):
        return False
    if torch.is_grad_enabled() and (dest.requires_grad or src.requires_grad):
        return False
    if dest.is_inference() and not torch.is_inference_mode_enabled():
        return False
    if src.numel() and src.untyped_storage().data_ptr() == dest.untyped_storage().data_ptr():
        return False
    return True


def on_fast_path(dest, mask, src) -> bool:
    """Whether the ``_scatter_mm_embedding`` replacement runs this package's row scatter (else SGLang's own
    function runs).

    True for eager calls on plain tensors: dest [N, W] float32/float16/bfloat16 with rows that do not overlap;
    mask bool [N] or [N, 1] on dest's device (SGLang's ranks and rows must share a device); src [M, W] of one
    of those dtypes, on any device (moved as SGLang moves it) and not sharing dest's memory; no tensor
    requiring grad while grad is on, no in-place write to an inference tensor outside inference mode.
    """
    if type(mask) is not torch.Tensor or not _rows_fit(dest, src):
        return False
    return (mask.dtype == torch.bool and mask.device == dest.device and mask.layout == torch.strided
            and mask.shape in ((dest.shape[0],), (dest.shape[0], 1)))


def _overrides_fit(positions, src) -> bool:
    """The fast path's rules on the overrides alone: positions int32/int64 [M], src [M, ...] (before input_embeds
    exists)."""
    return (type(positions) is torch.Tensor and type(src) is torch.Tensor and positions.dtype in POSITION_DTYPES
            and positions.dim() == 1 and positions.layout == torch.strided and src.dim() >= 1
            and src.shape[0] == positions.shape[0])


def on_positions_fast_path(dest, positions, src) -> bool:
    """Whether the ``_extend_forward_kwargs`` replacement runs indexed_row_scatter_ (else SGLang's own method runs).

    True for eager calls on plain tensors: dest [N, W] as on_fast_path; positions int32/int64 [M] on the CPU or
    dest's device; src [M, W] float32/float16/bfloat16 on dest's device (SGLang casts it, never moves it), not
    sharing dest's memory; the same autograd and inference rules.
    """
    return (_overrides_fit(positions, src) and _rows_fit(dest, src)
            and positions.device in (torch.device("cpu"), dest.device) and src.device == dest.device)


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


class _WithoutOverrides:
    """forward_batch as SGLang's own ``_extend_forward_kwargs`` sees it on the fast path: every attribute is
    forward_batch's but the overrides, which are empty, so SGLang builds input_embeds its own way and writes no row."""

    __slots__ = ("_batch", "replace_embeds", "replace_positions")

    def __init__(self, batch, embeds: torch.Tensor, positions: torch.Tensor):
        self._batch = batch
        self.replace_embeds = embeds[:0]
        self.replace_positions = positions[:0]

    def __getattr__(self, name):
        return getattr(self._batch, name)


def _extend_forward_kwargs(self, forward_batch, pp_proxy_tensors) -> dict:
    """SGLang's method: the extend forward's kwargs, with ``replace_embeds`` [M, W] written into
    ``kwargs["input_embeds"]`` [N, W] at rows ``replace_positions`` [M] (int64, on the batch's device).

    Raises:
        Anything SGLang's own method raises, for inputs off the fast path.
    """
    engine = engine_method()
    kwargs = _with_overrides_written(engine, self, forward_batch, pp_proxy_tensors)
    return kwargs if kwargs is not None else engine(self, forward_batch, pp_proxy_tensors)


def _with_overrides_written(engine: Callable, runner, forward_batch, pp_proxy_tensors) -> dict | None:
    """The fast path of ``_extend_forward_kwargs``: SGLang's kwargs with the overrides written by
    indexed_row_scatter_, or None where SGLang's own method must run on forward_batch as it is."""
    embeds, positions = forward_batch.replace_embeds, forward_batch.replace_positions
    if embeds is None or positions is None or not _overrides_fit(positions, embeds):
        return None
    try:
        kwargs = engine(runner, _WithoutOverrides(forward_batch, embeds, positions), pp_proxy_tensors)
    except Exception:  # noqa: BLE001 - e.g. the empty rows' width: SGLang's method on the real batch raises its own
        return None
    dest = kwargs.get("input_embeds")
    if not on_positions_fast_path(dest, positions, embeds):
        return None
    try:
        indexed_row_scatter_(dest, positions, embeds)
    except (TypeError, ValueError, IndexError):
        return None  # refused before writing (CPU positions out of range or repeated)
    return kwargs


def enable() -> None:
    """Install the replacements (idempotent): ``_scatter_mm_embedding``, and ``ModelRunner._extend_forward_kwargs``
    where SGLang's model runner imports and has it.

    Raises:
        ModuleNotFoundError: SGLang is not importable (one line, with the import's own error).
    """
    module = _import_target()
    runner = _import_runner()
    current = getattr(module, TARGET)
    if current is not _scatter_mm_embedding:
        _engine[:] = [current]
        _installed[:] = [current]
        setattr(module, TARGET, _scatter_mm_embedding)
    if runner is not None:
        method = vars(runner)[RUNNER_TARGET]
        if method is not _extend_forward_kwargs:
            _runner_engine[:] = [method]
            _runner_installed[:] = [(runner, method)]
            setattr(runner, RUNNER_TARGET, _extend_forward_kwargs)


def disable() -> None:
    """Put SGLang's own functions back."""
    if _installed:
        setattr(_import_target(), TARGET, _installed.pop())
    if _runner_installed:
        runner, method = _runner_installed.pop()
        setattr(runner, RUNNER_TARGET, method)
