"""The repository's layout never shadows an installed package.

The top-level ``kernels/`` folder installs as ``mmmerge_triton.kernels``; Hugging Face's ``kernels``
package (which transformers >= 5.25 imports) owns the top-level name. Run from the repository root, as the
README's commands, CI and a notebook in a checkout do, the root is first on ``sys.path``: a regular package
there would win over the installed one and break every transformers model import.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter whose sys.path starts at ``cwd`` (as from a checkout)."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_kernels_folder_is_a_namespace_portion():
    # A folder without __init__.py is a namespace portion: any regular package of that name beats it.
    assert (ROOT / "kernels" / "row_copy.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow an installed `kernels`"


def test_import_kernels_from_the_root_does_not_resolve_into_the_repository():
    # What `import kernels` finds (without running it: an installed package may fail to import for reasons of
    # its own, e.g. at the transformers floor, where CI downgrades huggingface_hub under it).
    code = (
        "import importlib.util\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec and spec.origin else 'namespace' if spec else 'none')\n"
        "print(*(spec.submodule_search_locations or []) if spec else [], sep='\\n')\n"
    )
    result = run_python(code, ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    origin, *locations = result.stdout.splitlines()
    # (The folder itself: CI's virtual environment lives inside the checkout.)
    assert not origin.startswith(str(ROOT / "kernels")), f"`import kernels` resolves into the repository: {origin}"
    if installed("kernels"):  # the installed regular package wins, not a namespace package with the repo's folder
        assert origin not in ("namespace", "none"), result.stdout
        assert str(ROOT / "kernels") not in locations, result.stdout


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_imports_from_the_root():
    result = run_python(
        "import transformers.activations, transformers.models.qwen2_vl.modeling_qwen2_vl; print('ok')", ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_package_kernels_import_from_a_checkout_and_from_elsewhere(where, tmp_path):
    code = (
        "import mmmerge_triton, mmmerge_triton.kernels as k\n"
        "from mmmerge_triton.kernels.row_copy import row_copy_kernel\n"
        "print(row_copy_kernel.fn.__module__)\n"
    )
    result = run_python(code, ROOT if where == "root" else tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "mmmerge_triton.kernels.row_copy"
