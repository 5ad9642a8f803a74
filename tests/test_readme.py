"""The README's quickstart (its first python block) runs as is, as a new user would run it: in a fresh
interpreter, without the Triton interpreter switched on."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def first_python_block(text: str) -> str:
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, "README.md has no python block"
    return match.group(1)


def test_quickstart_runs_as_is():
    code = first_python_block(README.read_text(encoding="utf-8"))
    assert "import mmmerge_triton" in code and "merge_multimodal_embeddings" in code
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the quickstart prints what ran"
