"""Extra device memory of one merge, measured by the caching allocator's peak after a warm-up call:
none for a CPU mask (its row map is read from pinned host memory), none for the fused kernel or a plan; for
the two-launch kind 4 bytes per 1024 mask rows (the block counts, rounded to the allocator's 512-byte blocks)
where it has no row map (N under scatter.SELECT_BELOW, as here), and through a row map (SELECT_BELOW lowered)
at most 4 bytes per source row and 4 per 1024 mask rows (+ 1 MiB of slack for allocator rounding)."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton import executor, scatter  # noqa: E402
from mmmerge_triton.kernel_config import KernelConfig  # noqa: E402

from gpu_helpers import assert_same, dev, rand, random_mask, reference  # noqa: E402

DEV = dev()
N, H, M = 65536, 1024, 20000
MIB = 1 << 20
TWO_PASS_LIMIT = 4 * M + 4 * -(-N // 1024) + MIB
SELECT_LIMIT = -(-4 * -(-N // 1024) // 512) * 512  # 4 * M bytes (a row map) would pass no select case


@pytest.fixture(scope="module")
def data():
    mask_cpu = random_mask((N,), M, seed=1)
    mask_gpu = mask_cpu.to(DEV)
    dst = rand((N, H), torch.bfloat16, seed=2)
    src = rand((M, H), torch.float32, seed=3)
    plan_gpu = mt.MergePlan(mask_gpu)
    plan_cpu = mt.MergePlan(mask_cpu, device=DEV)
    yield dict(mask_cpu=mask_cpu, mask_gpu=mask_gpu, dst=dst, src=src, plan_gpu=plan_gpu, plan_cpu=plan_cpu)
    torch.cuda.synchronize()


def _case(name, d):
    src = d["src"]
    acc = name.endswith("_accumulate")
    if name.startswith("triton_cpu"):
        return (lambda x: mt.masked_row_scatter_(x, d["mask_cpu"], src, path="triton", accumulate=acc)), 0
    if name == "merge_cpu":
        return (lambda x: mt.merge_multimodal_embeddings(x, src, d["mask_cpu"], path="triton")), 0
    if name.startswith("fused_gpu"):
        cfg = KernelConfig(16, 512, 8, 1, True)
        return (lambda x: executor.merge_triton(x, d["mask_gpu"], src, acc, config=cfg)), 0
    if name.startswith("two_pass_gpu"):  # through the row map: see test_peak_extra_memory
        cfg = KernelConfig(16, 512, 8, 1, False)
        return (lambda x: executor.merge_triton(x, d["mask_gpu"], src, acc, config=cfg)), TWO_PASS_LIMIT
    if name.startswith("select_gpu"):
        cfg = KernelConfig(16, 512, 8, 1, False)
        return (lambda x: executor.merge_triton(x, d["mask_gpu"], src, acc, config=cfg)), SELECT_LIMIT
    if name.startswith("triton_gpu"):  # N > 16384: the two-launch default, no row map
        return (lambda x: mt.masked_row_scatter_(x, d["mask_gpu"], src, path="triton", accumulate=acc)), \
            SELECT_LIMIT
    if name == "merge_gpu":
        return (lambda x: mt.merge_multimodal_embeddings(x, src, d["mask_gpu"], path="triton")), SELECT_LIMIT
    if name.startswith("plan_"):
        plan = d[name.replace("_accumulate", "")]
        return (lambda x: mt.masked_row_scatter_(x, src=src, plan=plan, path="triton", accumulate=acc)), 0
    raise AssertionError(name)


# path="triton" throughout (the bounds are the Triton path's; "auto" may pick another path from a tuned table)
CASES = ["triton_cpu", "triton_cpu_accumulate", "merge_cpu", "fused_gpu", "fused_gpu_accumulate",
         "two_pass_gpu", "two_pass_gpu_accumulate", "select_gpu", "select_gpu_accumulate", "triton_gpu",
         "triton_gpu_accumulate", "merge_gpu",
         "plan_gpu", "plan_cpu", "plan_gpu_accumulate"]


@pytest.mark.parametrize("name", CASES)
def test_peak_extra_memory(name, data, monkeypatch):
    if name.startswith("two_pass_gpu"):
        monkeypatch.setattr(scatter, "SELECT_BELOW", 0)
    op, limit = _case(name, data)
    dst = data["dst"]
    op(dst)  # warm-up: compiles, creates the staging arena
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(DEV)
    torch.cuda.reset_peak_memory_stats(DEV)
    op(dst)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated(DEV) - before
    assert extra <= limit, f"{name}: {extra} bytes of extra device memory, limit {limit}"
    assert torch.cuda.memory_allocated(DEV) == before, f"{name}: memory still held after the call"


def test_results_of_the_measured_calls(data):
    """The calls measured above are the real thing: one of each family, checked against torch."""
    for name in ("triton_cpu", "fused_gpu", "two_pass_gpu", "plan_cpu"):
        op, _ = _case(name, data)
        dst = rand((N, H), torch.bfloat16, seed=4)
        expected = reference(dst, data["mask_cpu"], data["src"])
        op(dst)
        assert_same(dst, expected, name)
