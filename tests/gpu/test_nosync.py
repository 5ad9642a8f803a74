"""No host sync: each case runs once to compile its kernels (and stage the arena), then again on fresh
inputs under torch.cuda.set_sync_debug_mode("error"), where any synchronizing CUDA call made through torch
raises. Everything the checked call needs (GPU masks, plans, inputs, references) is made before.
check_count=True with a GPU mask must sync: that case proves the mode is on.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton import executor  # noqa: E402
from mmmerge_triton.kernel_config import KernelConfig  # noqa: E402

from gpu_helpers import assert_same, dev, rand, random_mask, reference, sync_debug_error  # noqa: E402

DEV = dev()
N, H, M = 2000, 128, 600
N_BIG = 20000  # past the fused kernel's 16384 rows: a device mask takes the two-pass default


def _inputs(n=N, seed=0):
    mask_cpu = random_mask((n,), M, seed=seed)
    mask_gpu = mask_cpu.to(DEV)
    dst = rand((n, H), torch.bfloat16, seed=seed + 1)
    src = rand((M, H), torch.float32, seed=seed + 2)
    return mask_cpu, mask_gpu, dst, src


def _case(name):
    """(op, dst, expected): op(d) runs the merge on d (in place) and returns the tensor to check."""
    n = N_BIG if name.endswith("_big") else N
    mask_cpu, mask_gpu, dst, src = _inputs(n)
    acc = "accumulate" in name
    mask = mask_gpu if "gpu" in name else mask_cpu
    expected = reference(dst, mask_cpu, src, acc)
    if name.startswith("triton_") or name.startswith("auto_"):
        path = name.split("_")[0]

        def op(d):
            mt.masked_row_scatter_(d, mask, src, path=path, accumulate=acc)
            return d
    elif name.startswith("fused_") or name.startswith("two_pass_"):
        cfg = KernelConfig(16, 128, 8, 1, name.startswith("fused_"))

        def op(d):
            executor.merge_triton(d, mask, src, acc, config=cfg)
            return d
    elif name.startswith("merge_list_plan_"):  # items read in place, row map from a plan built before
        items = [src[:100], src[100:400].view(3, 100, H), [src[400:]]]
        plan = mt.MergePlan(mask, device=DEV)

        def op(d):
            return mt.merge_multimodal_embeddings(d, items, plan=plan)
    elif name.startswith("merge_list_"):  # views of one tensor: the multi-item kernel, tables staged pinned
        items = [src[:100], src[100:400].view(3, 100, H), [src[400:]]]

        def op(d):
            return mt.merge_multimodal_embeddings(d, items, mask)
    elif name.startswith("merge_items_apart_"):  # separate allocations: the same kernel, other offsets
        items = [src[:100].clone(), src[100:101].clone(), src[101:].clone()]

        def op(d):
            return mt.merge_multimodal_embeddings(d, items, mask)
    elif name.startswith("merge_"):
        def op(d):
            return mt.merge_multimodal_embeddings(d, src, mask)
    elif name.startswith("plan_"):
        plan = mt.MergePlan(mask, device=DEV)  # built before the checked call

        def op(d):
            mt.masked_row_scatter_(d, src=src, plan=plan, accumulate=acc)
            return d
    elif name.startswith("out_of_place_"):
        def op(d):
            return mt.masked_row_scatter(d, mask, src, accumulate=acc)
    elif name.startswith("index_put_"):
        def op(d):
            mt.masked_row_scatter_(d, mask, src, path="index_put", accumulate=acc)
            return d
    elif name.startswith("check_count_"):
        def op(d):
            mt.masked_row_scatter_(d, mask, src, path="triton", check_count=True)
            return d
    elif name.startswith("three_d_"):
        mask3 = mask.view(20, n // 20)
        dst3_expected = expected.view(20, n // 20, H)

        def op(d):
            d3 = d.view(20, n // 20, H)
            mt.masked_row_scatter_(d3, mask3, src, accumulate=acc)
            return d3
        expected = dst3_expected
    else:
        raise AssertionError(name)
    return op, dst, expected


CASES = [
    "triton_cpu", "auto_cpu", "triton_gpu", "auto_gpu", "auto_gpu_big",
    "fused_gpu", "two_pass_gpu", "two_pass_gpu_big",
    "triton_cpu_accumulate", "auto_gpu_accumulate", "fused_gpu_accumulate", "two_pass_gpu_accumulate",
    "merge_cpu", "merge_gpu", "merge_list_cpu", "merge_list_gpu", "merge_items_apart_cpu", "merge_items_apart_gpu",
    "merge_list_plan_cpu", "merge_list_plan_gpu",
    "plan_gpu", "plan_cpu", "plan_gpu_accumulate", "plan_cpu_accumulate",
    "out_of_place_cpu", "out_of_place_gpu",
    "three_d_cpu", "three_d_gpu",
    "index_put_cpu",
    "check_count_cpu",  # a CPU mask is counted on the host: check_count costs no sync
]


@pytest.mark.parametrize("name", CASES)
def test_no_sync(name):
    op, dst, expected = _case(name)
    op(dst.clone())  # warm-up: compiles the kernels this exact layout needs
    fresh = dst.clone()
    torch.cuda.synchronize()
    with sync_debug_error():
        out = op(fresh)  # in place: fresh itself; out of place: a new tensor
    torch.cuda.synchronize()
    assert_same(out, expected, name)


def test_many_cpu_mask_calls_without_sync():
    """Back-to-back CPU-mask merges with different masks: the staging ring never syncs the host through torch."""
    masks = [random_mask((N,), M, seed=s) for s in range(40)]
    _, _, dst, src = _inputs()
    mt.masked_row_scatter_(dst.clone(), masks[0], src, path="triton", accumulate=True)  # warm-up
    out = dst.clone()
    torch.cuda.synchronize()
    with sync_debug_error():
        for m in masks:
            mt.masked_row_scatter_(out, m, src, path="triton", accumulate=True)
    expected = dst.clone()
    for m in masks:
        expected = reference(expected, m, src, True)
    assert_same(out, expected)


@pytest.mark.parametrize("how", ["api", "plan", "merge"])
def test_check_count_with_gpu_mask_syncs(how):
    """check_count=True with a device mask counts it on the host: a sync, which "error" mode turns into a
    RuntimeError. Nothing is written."""
    mask_cpu, mask_gpu, dst, src = _inputs()
    plan = mt.MergePlan(mask_gpu)
    before = dst.clone()
    torch.cuda.synchronize()
    with sync_debug_error():
        with pytest.raises(RuntimeError, match="synchroniz"):
            if how == "api":
                mt.masked_row_scatter_(dst, mask_gpu, src, check_count=True)
            elif how == "plan":
                mt.masked_row_scatter_(dst, src=src, plan=plan, check_count=True)
            else:
                mt.merge_multimodal_embeddings(dst, src, mask_gpu, check_count=True)
    torch.cuda.synchronize()
    assert_same(dst, before)
