"""tests/gpu: puts this folder on sys.path so the test modules (and sanitize.py) can import gpu_helpers.py,
whatever pytest import mode runs them. Every test module skips itself when CUDA is unavailable."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _items_in_place(monkeypatch):
    """Lists of items go through the in-place multi-item kernel here, whatever their size: these tests check
    that kernel (at these sizes the loop-time rule, dispatch.items_in_place_pays, would concatenate them)."""
    import mmmerge_triton.dispatch as dispatch

    monkeypatch.setattr(dispatch, "items_in_place_pays", lambda *args: True)
