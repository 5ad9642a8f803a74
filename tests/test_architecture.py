"""The shape of the runtime (CONTRIBUTING.md, "Architecture"): how tall its import graph is, and the walk of one
merge followed as data. Both are measured here from the code itself, so the figures CONTRIBUTING.md gives are
this test's, and a change that makes the graph taller or the walk longer fails here first.

- Floors: the longest chain of imports among the runtime modules (mmmerge_triton/*.py and kernels/*.py; the
  package's __init__, which only re-exports, and tools/ and integrations/, which sit above the runtime, left out).
- The walk: every call into the package's code that receives ``is_multimodal`` itself as an argument during one
  ``merge_multimodal_embeddings(inputs_embeds [N, H], mm_embeds [M, H], is_multimodal [N] on the CPU)``, the
  serving call (path="triton": the Triton path under the interpreter), on the first call of its signature and
  on a memo hit: its stops, the files they are in, and its climbs (a call into a module on a higher floor than
  the caller's: a step back up the graph).
"""
from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

import torch

import mmmerge_triton as mm
from mmmerge_triton import dispatch

ROOT = Path(__file__).resolve().parents[1]
MAX_FLOORS = 8
MAX_STOPS, MAX_FILES, MAX_CLIMBS = 25, 8, 6


def _modules() -> dict[str, Path]:
    found = {f"mmmerge_triton.{f.stem}": f for f in (ROOT / "mmmerge_triton").glob("*.py") if f.stem != "__init__"}
    found |= {f"mmmerge_triton.kernels.{f.stem}": f for f in (ROOT / "kernels").glob("*.py")}
    return found


def _imports(name: str, path: Path, known) -> set[str]:
    """The runtime modules that ``name`` imports (relative imports: the package's own)."""
    package = name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            names = [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]
            out |= {n for n in names if n in known}
    return out


MODULES = _modules()
GRAPH = {name: _imports(name, path, MODULES) for name, path in MODULES.items()}


@functools.lru_cache(maxsize=None)
def floor(name: str) -> int:
    return 1 + max((floor(d) for d in GRAPH[name]), default=0)


def test_import_graph_has_at_most_eight_floors():
    floors = {name: floor(name) for name in MODULES}
    tallest = max(floors.values())
    chain = sorted(floors, key=floors.get)[-3:]
    assert tallest <= MAX_FLOORS, f"{tallest} floors (top: {chain})"


def test_no_import_loop():
    for name in MODULES:
        floor(name)  # a loop would recurse without end (RecursionError)


def _walk(call) -> list[tuple[str, str, str]]:
    """(module, function, caller module) of every package call that receives the mask during ``call()``."""
    files = {str(path): name for name, path in MODULES.items()}
    stops = []
    mask = call.mask

    def profile(frame, event, arg):
        if event != "call":
            return
        module = files.get(frame.f_code.co_filename)
        if module is None or not any(v is mask for v in frame.f_locals.values()):
            return
        caller = frame.f_back
        stops.append((module, frame.f_code.co_name, files.get(caller.f_code.co_filename if caller else "", "")))

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return stops


class _ServingCall:
    def __init__(self):
        n, h, m = 64, 32, 20
        self.mask = torch.zeros(n, dtype=torch.bool)
        self.mask[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:m]] = True
        self.dst, self.src = torch.randn(n, h), torch.randn(m, h)

    def __call__(self):
        mm.merge_multimodal_embeddings(self.dst, self.src, self.mask, path="triton")


def walk_summary(stops) -> tuple[int, int, int]:
    climbs = sum(1 for module, _, caller in stops if caller in MODULES and floor(module) > floor(caller))
    return len(stops), len({module for module, _, _ in stops}), climbs


def test_the_serving_call_walks_down_in_few_stops():
    dispatch.clear_cache()
    call = _ServingCall()
    first, hit = _walk(call), _walk(call)
    for name, stops in (("first call", first), ("memo hit", hit)):
        n_stops, n_files, n_climbs = walk_summary(stops)
        where = " -> ".join(f"{module.rsplit('.', 1)[1]}.{fn}" for module, fn, _ in stops)
        assert n_stops <= MAX_STOPS and n_files <= MAX_FILES and n_climbs <= MAX_CLIMBS, (
            f"{name}: {n_stops} stops in {n_files} files, {n_climbs} climbs: {where}")
    assert len(hit) < len(first), "a memo hit skips the prepare step"


if __name__ == "__main__":  # the figures CONTRIBUTING.md quotes
    print("floors:", max(floor(n) for n in MODULES))
    dispatch.clear_cache()
    c = _ServingCall()
    for label, stops in (("first call", _walk(c)), ("memo hit", _walk(c))):
        print(label, walk_summary(stops), " -> ".join(f"{m.rsplit('.', 1)[1]}.{f}" for m, f, _ in stops))
