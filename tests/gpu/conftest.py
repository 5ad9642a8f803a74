"""tests/gpu: puts this folder on sys.path so the test modules (and sanitize.py) can import gpu_helpers.py,
whatever pytest import mode runs them. Every test module skips itself when CUDA is unavailable."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
