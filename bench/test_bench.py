"""pytest-benchmark comparisons: every path and the copy floor, grouped per case so they read side by side.

    pytest bench/ --benchmark-only                       # the quick grid
    MMMERGE_BENCH_GRID=full pytest bench/ --benchmark-only

On a GPU each timed call ends in torch.cuda.synchronize(), so every figure is device truth. On the CPU the
Triton path is skipped. The calls and cases are the package's own (mmmerge_triton.tools.bench, .cases).
"""
import os

import pytest
import torch

from mmmerge_triton.tools.bench import path_calls
from mmmerge_triton.tools.cases import grid, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = grid(os.environ.get("MMMERGE_BENCH_GRID", "quick"), DEVICE)
PATHS = ("copy", "triton", "auto", "index_put", "masked_scatter", "index_copy")


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.label().replace(" ", "_"))
def case_inputs(request):
    case = request.param
    yield case, make_inputs(case, DEVICE)
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.parametrize("path", PATHS)
def test_merge(benchmark, case_inputs, path):
    case, (dst, mask, src) = case_inputs
    calls = path_calls(case, dst, mask, src)
    if path not in calls:
        pytest.skip("the Triton path runs on CUDA only (the interpreter is not a speed path)")
    call = calls[path]

    def synchronized():
        call()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = case.label()
    benchmark.extra_info.update(case.as_dict(), moved_bytes=case.moved_bytes)
    benchmark.pedantic(synchronized, warmup_rounds=3, rounds=20 if case.moved_bytes > 64e6 else 50, iterations=1)
