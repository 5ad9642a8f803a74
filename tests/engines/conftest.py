"""The real-engine tests: they import vLLM / SGLang themselves and skip where those are absent (CI).

The environment they need is built by bench/engines/make_engine_env.sh; the header of a run names the engine
versions it was run against (the committed logs under bench/results/engines/ start with it).
"""
from __future__ import annotations

import importlib.metadata
import platform

import torch

ENGINES = ("vllm", "sglang")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def pytest_report_header(config) -> list[str]:
    """One line naming what the run was against: engines, torch, triton, transformers, Python, device."""
    engines = ", ".join(f"{name} {_version(name)}" for name in ENGINES)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return [f"engines: {engines}; torch {torch.__version__}, triton {_version('triton')}, transformers "
            f"{_version('transformers')}; Python {platform.python_version()}; device {device}"]
