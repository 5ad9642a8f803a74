"""What the vLLM and SGLang hooks share: importing the engine's module, and remembering the engine's own function."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable


def import_target(module: str, hook: str, engine: str) -> ModuleType:
    """The engine's module, or a one-line ModuleNotFoundError saying which engine the hook needs."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ModuleNotFoundError(
            f"mmmerge_triton.integrations.{hook} needs {engine}: importing {module} failed ({error})"
        ) from None


def engine_function(cache: list[Callable], module: str, target: str, replacement: Callable, hook: str,
                    engine: str) -> Callable:
    """The engine's own ``module.target`` (what the replacement hands every other input to), kept in ``cache``
    (filled by enable(), or here on first use)."""
    if not cache:
        original = getattr(import_target(module, hook, engine), target)
        if original is replacement:  # only enable() installs it, and it fills the cache
            raise RuntimeError(f"{module}.{target} is the replacement, and {engine}'s own is not known")
        cache.append(original)
    return cache[0]
