"""The real-engine tests: they import vLLM / SGLang themselves and skip where those are absent (CI).

The environment they need is built by bench/engines/make_engine_env.sh; the header of a run names the engine
versions it was run against (the committed logs under bench/results/engines/ start with it).

Two adjustments, made here before any test module imports an engine, and only where the engine's compiled
part cannot load (the CPU engine venv, and the bundle carried to the GPU machine, which has no compiled
extensions); the header says which were made. Neither touches the merge functions under test, which are
plain torch code and run as shipped, on CPU and CUDA tensors alike:

* vLLM: where its CUDA platform module (``vllm.platforms.cuda``, which hard-imports the compiled
  ``vllm._C_stable_libtorch``) does not import, ``VLLM_TARGET_DEVICE=cpu`` is set (unless already set), vLLM's
  own switch for running its CPU platform on an accelerator host: ``vllm.platforms.current_platform`` then
  resolves to ``CpuPlatform``. The platform object is all that changes. Child processes (the plugin-loader
  test) inherit it.
* SGLang: where no ``sgl_kernel`` is installed, ``tests/engines/stubs`` goes at the end of ``sys.path``: an
  import-time stand-in exposing only the names SGLang imports unguarded at module level when it sees CUDA,
  each raising if called (see stubs/sgl_kernel/__init__.py). A real ``sgl_kernel`` is never shadowed.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import pathlib
import platform
import sys

import torch

ENGINES = ("vllm", "sglang")
STUBS = pathlib.Path(__file__).parent / "stubs"
_NOTES: list[str] = []  # what was adjusted, for the header


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _force_vllm_cpu_platform() -> None:
    """VLLM_TARGET_DEVICE=cpu where vLLM's CUDA platform module does not import (see the module docstring)."""
    if not _installed("vllm") or "VLLM_TARGET_DEVICE" in os.environ:
        return
    try:  # what vLLM imports when it picks its CUDA platform; on a working install it would import it anyway
        importlib.import_module("vllm.platforms.cuda")
    except Exception as error:  # noqa: BLE001 - ModuleNotFoundError in the bundle, ImportError in the CPU venv
        os.environ["VLLM_TARGET_DEVICE"] = "cpu"
        _NOTES.append(f"VLLM_TARGET_DEVICE=cpu set (vllm.platforms.cuda: {type(error).__name__}: {error})")


def _stub_sgl_kernel() -> None:
    """tests/engines/stubs at the end of sys.path where SGLang is installed and sgl_kernel is not."""
    if _installed("sglang") and not _installed("sgl_kernel"):
        sys.path.append(str(STUBS))  # last: anything installed comes first
        _NOTES.append(f"sgl_kernel is the import-time stub in {STUBS.relative_to(STUBS.parents[2])}")


_force_vllm_cpu_platform()
_stub_sgl_kernel()


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def pytest_report_header(config) -> list[str]:
    """One line naming what the run was against: engines, torch, triton, transformers, Python, device; then
    the adjustments made above, if any."""
    engines = ", ".join(f"{name} {_version(name)}" for name in ENGINES)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines = [f"engines: {engines}; torch {torch.__version__}, triton {_version('triton')}, transformers "
             f"{_version('transformers')}; Python {platform.python_version()}; device {device}"]
    if _installed("vllm"):  # resolved as the tests will resolve it (they import vLLM's model code next)
        try:
            from vllm.platforms import current_platform
            lines.append(f"vLLM platform: {type(current_platform).__name__}")
        except Exception as error:  # noqa: BLE001 - the test module skips and says why
            lines.append(f"vLLM platform: not resolved ({type(error).__name__}: {error})")
    return lines + [f"engine test environment: {note}" for note in _NOTES]
