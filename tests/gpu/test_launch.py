"""The fast launcher (mmmerge_triton/launch.py) must run the binary the JIT would pick for the same arguments.

FastKernel keys its cache on what scatter.py thinks the JIT specializes on (dtypes, 16-byte alignment of
pointers, ints equal to 1 / divisible by 16 / 64-bit, constexprs, launch options, device). A key that is too
coarse would launch a binary compiled for other assumptions (a vectorized load on a misaligned pointer, a
stride taken as a multiple of 16): wrong results or a CUDA error. Three checks per argument variant:
results equal torch's, a repeat of the variant hits the cache, and for every launch the JIT's own choice
(``kernel.warmup(...)`` with the same arguments) is the very binary the cache holds for that key.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton import items as mm_items  # noqa: E402
from mmmerge_triton import core, executor, kernel_config, launch, scatter  # noqa: E402
from mmmerge_triton.kernel_config import KernelConfig  # noqa: E402

from gpu_helpers import assert_same, dev, pair_id, rand, random_mask, reference  # noqa: E402

if launch.INTERPRET:
    pytest.skip("TRITON_INTERPRET is set: the fast launcher is bypassed", allow_module_level=True)

DEV = dev()
FAST_KERNELS = {"row_copy": scatter._row_copy, "mask_row_copy": scatter._mask_row_copy,
                "mask_to_rows": scatter._mask_to_rows, "mask_block_counts": scatter._mask_block_counts,
                "mask_select_copy": scatter._mask_select_copy, "multi_row_copy": mm_items._multi_row_copy}
N, M = 40, 15

# name -> (H, dst row stride, dst offset in elements, src row stride, src offset, mask offset in bytes)
VARIANTS = {
    "aligned_h64": (64, 64, 0, 64, 0, 0),
    "dst_misaligned": (64, 64, 1, 64, 0, 0),
    "src_misaligned": (64, 64, 0, 64, 1, 0),
    "both_misaligned_2": (64, 64, 2, 64, 2, 0),
    "misaligned_4_elems": (64, 64, 4, 64, 4, 0),  # 16 bytes for fp32 (aligned), 8 for 2-byte dtypes
    "h_odd": (123, 123, 0, 123, 0, 0),
    "h_odd_stride_128": (123, 128, 0, 128, 0, 0),
    "h_one": (1, 1, 0, 1, 0, 0),
    "h_one_strided": (1, 5, 1, 3, 0, 0),
    "stride_not_16": (64, 72, 0, 66, 0, 0),
    "stride_16_h_48": (48, 64, 0, 80, 0, 0),
    "h_16": (16, 16, 0, 16, 0, 0),
    "mask_misaligned": (64, 64, 0, 64, 0, 1),
    "mask_at_4_bytes": (64, 64, 0, 64, 0, 4),  # counted in words (scatter.words), not at 16 bytes
    "all_misaligned_odd": (37, 41, 3, 39, 1, 3),
}
PAIRS = [(torch.float32, torch.bfloat16), (torch.float16, torch.float16)]


def _view(dtype, rows, h, stride, offset, seed):
    flat = rand((offset + rows * stride,), dtype, seed=seed)
    return flat[offset:].view(rows, stride)[:, :h]


def _inputs(variant, pair, mask_on_gpu, seed):
    h, dstride, doff, sstride, soff, moff = VARIANTS[variant]
    src_dt, dst_dt = pair
    dst = _view(dst_dt, N, h, dstride, doff, seed)
    src = _view(src_dt, M, h, sstride, soff, seed + 1)
    mask = random_mask((N,), M, seed=seed + 2)
    if mask_on_gpu:
        flat = torch.zeros(moff + N, dtype=torch.bool, device=DEV)
        flat[moff:] = mask.to(DEV)
        mask = flat[moff:]
    assert (dst.data_ptr() % 16 == 0) == (doff * dst.element_size() % 16 == 0)
    return dst, src, mask


@pytest.fixture
def recorded(monkeypatch):
    """Empty caches for every fast kernel and for the memo's entries that hold their bound launches (restored
    afterwards), and a log of every launch."""
    calls = []
    monkeypatch.setattr(core, "_prepared", {})
    for name, fk in FAST_KERNELS.items():
        monkeypatch.setattr(fk, "_cache", {})
        original = fk.launch

        def wrapper(key, grid, args, constexprs, options, device_index, _name=name, _orig=original):
            calls.append((_name, key, grid, args, constexprs, options, device_index))
            return _orig(key, grid, args, constexprs, options, device_index)

        monkeypatch.setattr(fk, "launch", wrapper)
    return calls


def _sizes():
    return {name: len(fk._cache) for name, fk in FAST_KERNELS.items()}


def _check_binaries(calls):
    """For every launch: the JIT, given the same arguments, picks the binary the fast cache holds."""
    assert calls, "no launch was recorded"
    for name, key, grid, args, constexprs, options, device_index in calls:
        fk = FAST_KERNELS[name]
        entry = fk._cache[key]
        with torch.cuda.device(device_index):
            compiled = fk.kernel.warmup(*args, grid=grid, **dict(zip(fk.constexpr_names, constexprs)),
                                        num_warps=options[0], num_stages=options[1],
                                        **({"launch_pdl": True} if options[2:] == (True,) else {}))
            compiled.run  # noqa: B018  (loads the module if this is a binary the cache does not hold)
        assert compiled.function == entry[1], (
            f"{name}: the JIT picks another binary than the fast cache for key {key}")


def _run(kind, dst, mask, src, accumulate):
    if kind in ("select", "two_pass", "counted"):  # the two-launch kind: as shipped at this N, no row map
        # ("select"); through the row map (SELECT_BELOW patched), scanned in two levels for "counted" (COUNTED_FROM)
        executor.merge_triton(dst, mask, src, accumulate, config=KernelConfig(4, 64, 4, 1, False))
    else:  # "cpu" and "gpu" (N is small: the fused kernel) through the public API
        mt.masked_row_scatter_(dst, mask, src, accumulate=accumulate, path="triton")


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("kind", ["cpu", "gpu", "select", "two_pass", "counted"])
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant(variant, pair, kind, accumulate, recorded, monkeypatch):
    if kind in ("two_pass", "counted"):
        monkeypatch.setattr(scatter, "SELECT_BELOW", 0)
    if kind == "counted":
        monkeypatch.setattr(scatter, "COUNTED_FROM", 1)
    mask_on_gpu = kind != "cpu"
    grew = None
    for attempt in range(3):  # fresh tensors of the same layout each time: the same cache keys
        dst, src, mask = _inputs(variant, pair, mask_on_gpu, seed=100 * attempt)
        expected = reference(dst, mask, src, accumulate)
        before = _sizes()
        _run(kind, dst, mask, src, accumulate)
        assert_same(dst, expected, f"{variant} attempt {attempt}")
        after = _sizes()
        if attempt == 0:
            grew = after != before
        else:
            assert after == before, f"a repeat of the variant missed the cache: {before} -> {after}"
    assert grew, "the first call compiled nothing into the fast cache"
    assert any(call[0] == "mask_block_counts" for call in recorded) == (kind in ("select", "counted"))
    assert any(call[0] == "mask_select_copy" for call in recorded) == (kind == "select")
    _check_binaries(recorded)


def test_alignment_and_int_classes_add_entries(recorded):
    """Each argument class the JIT specializes on gets its own entry; repeats add nothing."""
    pair = (torch.float32, torch.float32)
    steps = ["aligned_h64", "aligned_h64", "dst_misaligned", "dst_misaligned", "src_misaligned",
             "both_misaligned_2", "h_odd", "h_odd_stride_128", "h_one", "stride_not_16", "h_one_strided"]
    seen, n_expected = set(), 0
    for i, variant in enumerate(steps):
        dst, src, mask = _inputs(variant, pair, False, seed=i)
        expected = reference(dst, mask, src)
        mt.masked_row_scatter_(dst, mask, src, path="triton")
        assert_same(dst, expected, variant)
        if variant not in seen:
            seen.add(variant)
            n_expected += 1
        assert len(scatter._row_copy._cache) == n_expected, f"after {variant}"
    _check_binaries(recorded)


def test_misaligned_mask_adds_a_fused_entry(recorded):
    pair = (torch.float32, torch.float32)
    for i, (variant, n_expected) in enumerate([("aligned_h64", 1), ("aligned_h64", 1), ("mask_misaligned", 2),
                                               ("mask_misaligned", 2)]):
        dst, src, mask = _inputs(variant, pair, True, seed=i)
        expected = reference(dst, mask, src)
        mt.masked_row_scatter_(dst, mask, src, path="triton")
        assert_same(dst, expected, variant)
        assert len(scatter._mask_row_copy._cache) == n_expected, f"after {variant}"
    _check_binaries(recorded)


def test_gather_launches(recorded):
    """GATHER (the backward's mode) through scatter.gather_rows."""
    n, h, m = 300, 123, 100
    mask = random_mask((n,), m, seed=7).to(DEV)
    plan = mt.MergePlan(mask)
    for dtype in (torch.float32, torch.bfloat16):
        dense = rand((n, h), dtype, seed=8)
        cfg = kernel_config.default_config(h, m, n, False)
        out = scatter.gather_rows(dense, plan.rows, plan.count, m, torch.float16, cfg)
        assert_same(out, dense[mask].to(torch.float16))
    _check_binaries(recorded)


def test_launch_on_another_current_device_uses_the_tensors_device(recorded):
    """With two GPUs: the same key on cuda:1 while cuda:0 is current takes the device-guarded path."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    d1 = torch.device("cuda", 1)
    with torch.cuda.device(0):
        for _ in range(2):
            dst = rand((N, 64), torch.float32, device=d1, seed=1)
            src = rand((M, 64), torch.float32, device=d1, seed=2)
            mask = random_mask((N,), M, seed=3)
            expected = reference(dst, mask, src)
            mt.masked_row_scatter_(dst, mask, src, path="triton")
            assert_same(dst, expected)
            assert torch.cuda.current_device() == 0
    assert all(call[6] == 1 for call in recorded)
    _check_binaries(recorded)


# Item lists (the multi-item kernel): name -> (H, row stride shared by the items, offsets of the items in their
# buffers in elements, rows per item)
ITEM_VARIANTS = {
    "aligned": (64, 64, (0, 0, 0), (5, 9, 1)),
    "first_misaligned": (64, 64, (1, 0, 0), (5, 9, 1)),
    "later_misaligned": (64, 64, (0, 3, 0), (5, 9, 1)),
    "odd_h": (123, 123, (0, 0, 0), (5, 9, 1)),
    "row_stride_80": (64, 80, (0, 0, 0), (5, 9, 1)),
    "row_stride_66": (64, 66, (0, 0, 0), (5, 9, 1)),
    "h_one": (1, 1, (0, 0, 0), (5, 9, 1)),
    "one_row_items": (64, 64, (0, 0, 0), (1, 1, 1)),
    "two_items": (64, 64, (0, 0), (5, 9)),
    "many_items": (64, 64, (0,) * 9, (2, 1, 3, 1, 4, 1, 5, 1, 6)),
}


def _item_inputs(variant, mask_on_gpu, seed):
    h, stride, offsets, counts = ITEM_VARIANTS[variant]
    items = [_view(torch.float32, m, h, stride, off, seed + i) for i, (off, m) in enumerate(zip(offsets, counts))]
    m = sum(counts)
    mask = random_mask((N,), m, seed=seed + 50)
    if mask_on_gpu:
        mask = mask.to(DEV)
    dst = rand((N, h), torch.bfloat16, seed=seed + 51)
    return dst, items, mask


@pytest.mark.parametrize("mask_on_gpu", [False, True], ids=["cpu_mask", "gpu_mask"])
@pytest.mark.parametrize("variant", list(ITEM_VARIANTS))
def test_item_list_variant(variant, mask_on_gpu, recorded):
    grew = None
    for attempt in range(3):
        dst, items, mask = _item_inputs(variant, mask_on_gpu, seed=100 * attempt)
        assert mm_items.common_row_stride(items) is not None
        expected = reference(dst, mask, torch.cat(items))
        before = _sizes()
        mt.merge_multimodal_embeddings(dst, items, mask, path="triton")
        assert_same(dst, expected, f"{variant} attempt {attempt}")
        after = _sizes()
        if attempt == 0:
            grew = after["multi_row_copy"] > before["multi_row_copy"]
        else:
            assert after == before, f"a repeat of the variant missed the cache: {before} -> {after}"
    assert grew, "the first call compiled nothing into the multi-item kernel's fast cache"
    _check_binaries(recorded)
