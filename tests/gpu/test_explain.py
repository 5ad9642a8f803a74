"""explain() is what runs on CUDA, for the first call of a signature and memo hits: device masks (the one-launch
kernel below FUSED_BELOW rows, the two-launch one past it), host masks, a plan's row map, a list read in place,
by the shipped H100 table (or the untuned rule on another GPU). The spy and the check are the CPU suite's
(tests/test_explain.py: a spy on core.run, each call made twice around explain())."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton import dispatch, kernel_config  # noqa: E402
from mmmerge_triton.kernel_config import FUSED_BELOW  # noqa: E402

from gpu_helpers import dev, rand, random_mask  # noqa: E402
from tests.test_explain import Spy, check  # noqa: E402

H = 256


@pytest.fixture(autouse=True)
def fresh_decisions():
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def _inputs(n, m, on_device, seed):
    mask = random_mask((n,), m, seed=seed)
    return rand((n, H), torch.bfloat16, seed=seed + 1), rand((m, H), torch.float32, seed + 2), (
        mask.to(dev()) if on_device else mask)


@pytest.mark.parametrize("on_device", [False, True], ids=["cpu_mask", "gpu_mask"])
@pytest.mark.parametrize("n, m", [(1300, 650), (FUSED_BELOW + 1000, 3300), (70000, 20000)])
def test_tensor_source_first_call_and_hits(monkeypatch, on_device, n, m):
    spy = Spy(monkeypatch)
    kinds = set()
    for seed in range(3):  # the first call prepares the signature, the later ones hit it
        dst, src, mask = _inputs(n, m, on_device, seed)
        kinds.add(check(spy, dst, src, mask, f"N={n} M={m} seed={seed}", "hit" if seed else "first").kind)
    assert len(kinds) == 1
    expected = {kernel_config.HOST_ROWS} if not on_device else {kernel_config.DEVICE_FUSED, kernel_config.DEVICE_ROWS}
    assert kinds <= expected
    if on_device and n < FUSED_BELOW:
        assert kinds == {kernel_config.DEVICE_FUSED}


@pytest.mark.parametrize("on_device", [False, True], ids=["cpu_mask", "gpu_mask"])
def test_plan_and_items(monkeypatch, on_device):
    spy = Spy(monkeypatch)
    dst, src, mask = _inputs(3000, 900, on_device, 7)
    plan = mt.MergePlan(mask, device=dev())  # a CPU mask's plan lives on the GPU too
    for _ in range(2):  # neither has a signature: prepared on every call
        assert check(spy, dst, src, None, "plan", "none", plan=plan).kind == kernel_config.PLAN_ROWS
        items = [src[:300], src[300:700], src[700:]]
        assert check(spy, dst, items, mask, "items", "none").kind == kernel_config.ITEMS  # in place: tests/gpu/conftest.py
