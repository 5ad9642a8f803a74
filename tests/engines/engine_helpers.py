"""Helpers of the real-engine tests: run a call, record what it did, compare two records."""
from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


class Outcome(NamedTuple):
    """What one call did: the destination afterwards (on the CPU), whether it returned that tensor, and the
    exception it raised (type, text, and the types of its cause and context), if any."""

    dst: torch.Tensor
    returned_dst: bool | None
    error: tuple | None


def outcome(fn: Callable, dst: torch.Tensor, *args) -> Outcome:
    """Call ``fn(dst, *args)`` (no exception being handled, so its context is its own) and record it."""
    try:
        result = fn(dst, *args)
    except Exception as error:  # noqa: BLE001 - recorded and compared, type included
        cause, context = error.__cause__, error.__context__
        recorded = (type(error), str(error), type(cause) if cause is not None else None,
                    type(context) if context is not None else None)
        return Outcome(dst.detach().cpu().clone(), None, recorded)
    return Outcome(dst.detach().cpu().clone(), result is dst if result is not None else None, None)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same dtype, shape and bit patterns (NaN and -0.0 included)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.numel():
        int_dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[actual.element_size()]
        assert torch.equal(actual.contiguous().view(int_dtype), expected.contiguous().view(int_dtype)), what


def assert_same_outcome(ours: Outcome, engine: Outcome) -> None:
    """The replacement did what the engine's function did: same error (type, text, cause and context types)
    or none, the same return, and the destination bit for bit."""
    assert ours.error == engine.error
    assert ours.returned_dst == engine.returned_dst
    assert_bits_equal(ours.dst, engine.dst, "destination after the call")


class Spy:
    """Wraps a function of the package (what the hook calls on its fast path) and counts its returns and
    raises, so that a test proves which route a call took."""

    def __init__(self, fn: Callable):
        self.fn, self.returned, self.raised = fn, 0, 0

    def __call__(self, *args, **kwargs):
        try:
            result = self.fn(*args, **kwargs)
        except Exception:
            self.raised += 1
            raise
        self.returned += 1
        return result


def route_spies(monkeypatch, hook, ours_name: str, engine: Callable):
    """Spies on the two routes of an engine hook module: the package function it calls on its fast path
    (``hook.<ours_name>``) and the engine's own function (kept in ``hook._engine``). The hook is disabled, and the
    engine's function checked back in place, by the test module's fixture afterwards."""
    ours, engine_spy = Spy(getattr(hook, ours_name)), Spy(engine)
    monkeypatch.setattr(hook, ours_name, ours)
    monkeypatch.setattr(hook, "_engine", [engine_spy])
    return ours, engine_spy
