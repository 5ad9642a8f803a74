"""Sizes at and past 2**31 elements: 64-bit offsets everywhere. dst is [2**18 + 3, 8192] bf16 (2**31 + 24576
elements, 4.3 GB); the selected rows sit at the very end (and around row 2**18, where a 32-bit element
offset wraps). dst holds a cheap closed-form pattern, so the whole tensor is checked chunk by chunk
against the pattern with the merged rows patched in: no second full-size tensor. Skipped below 20 GB free.
"""
import bisect
import gc

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton import executor, kernel_config, scatter  # noqa: E402
from mmmerge_triton.kernel_config import KernelConfig  # noqa: E402

from gpu_helpers import assert_same, dev, rand  # noqa: E402

DEV = dev()
GIB = 1 << 30
N = 2 ** 18 + 3
H = 8192
DT = torch.bfloat16
CHUNK = 4096  # rows per verification step
assert N * H > 2 ** 31


def need_free(gib):
    free, _ = torch.cuda.mem_get_info(DEV)
    if free < gib * GIB:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / GIB:.1f} GiB free")


@pytest.fixture(autouse=True)
def _release():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def pattern_at(rows: torch.Tensor) -> torch.Tensor:
    """dst's initial value at ``rows`` (int tensor on the GPU): small integers, exact in bf16, row-dependent."""
    cols = torch.arange(H, device=DEV, dtype=torch.int32)[None, :]
    return ((rows.to(torch.int32)[:, None] * 7 + cols) % 251 - 125).to(DT)


def pattern(r0, r1):
    return pattern_at(torch.arange(r0, r1, device=DEV, dtype=torch.int32))


def fill(dst):
    for r0 in range(0, dst.shape[0], CHUNK):
        dst[r0: r0 + CHUNK] = pattern(r0, min(dst.shape[0], r0 + CHUNK))


def verify(dst, rows_sorted, values):
    """dst == pattern everywhere, except dst[rows_sorted[j]] == values[j] (rows_sorted: a sorted list)."""
    rows_gpu = torch.tensor(rows_sorted, device=DEV, dtype=torch.int64)
    for r0 in range(0, dst.shape[0], CHUNK):
        r1 = min(dst.shape[0], r0 + CHUNK)
        exp = pattern(r0, r1)
        lo, hi = bisect.bisect_left(rows_sorted, r0), bisect.bisect_left(rows_sorted, r1)
        if hi > lo:
            exp[rows_gpu[lo:hi] - r0] = values[lo:hi]
        if not torch.equal(dst[r0:r1], exp):
            assert_same(dst[r0:r1], exp, f"rows {r0}:{r1}")


# The selected rows: the last 58, a few around 2**18 (row * H crosses 2**31 there) and at the start.
SEL = sorted({0, 1, 1000, 2 ** 18 - 2, 2 ** 18 - 1, 2 ** 17} | set(range(N - 58, N)))
M = len(SEL)


def _mask():
    mask = torch.zeros(N, dtype=torch.bool)
    mask[torch.tensor(SEL)] = True
    return mask


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("kind", ["cpu", "gpu_auto", "gpu_fused", "gpu_two_pass", "plan"])
def test_rows_past_2_31_elements(kind, accumulate):
    need_free(20)
    src_dt = torch.float32 if accumulate else DT
    dst = torch.empty(N, H, dtype=DT, device=DEV)
    try:
        fill(dst)
        src = rand((M, H), src_dt, seed=1)
        mask = _mask()
        if kind == "cpu":
            mt.masked_row_scatter_(dst, mask, src, accumulate=accumulate, path="triton")
        elif kind == "gpu_auto":
            mt.masked_row_scatter_(dst, mask.to(DEV), src, accumulate=accumulate)
        elif kind == "plan":
            mt.masked_row_scatter_(dst, src=src, plan=mt.MergePlan(mask.to(DEV)), accumulate=accumulate)
        else:
            cfg = KernelConfig(16, 512, 8, 1, kind == "gpu_fused")
            executor.merge_triton(dst, mask.to(DEV), src, accumulate, config=cfg)
        rows = torch.tensor(SEL, device=DEV)
        values = src.to(DT)
        if accumulate:
            values = (pattern_at(rows).float() + values.float()).to(DT)
        verify(dst, SEL, values)
    finally:
        del dst


def test_gather_past_2_31_elements():
    """GATHER (the backward's mode) at the far end of a > 2**31-element dense tensor."""
    need_free(20)
    dst = torch.empty(N, H, dtype=DT, device=DEV)
    try:
        fill(dst)
        plan = mt.MergePlan(_mask().to(DEV))
        cfg = kernel_config.default_config(H, M, N, False)
        out = scatter.gather_rows(dst, plan.rows, plan.count, M, torch.float32, cfg)
        assert_same(out, pattern_at(torch.tensor(SEL, device=DEV)).float())
    finally:
        del dst


FALSE_ROWS = [0, 7, 2 ** 17, 2 ** 18, 2 ** 18 + 6]  # dst rows that keep the pattern
M_BIG = 2 ** 18 + 3  # src rows: M_BIG * H > 2**31
N_BIG = M_BIG + len(FALSE_ROWS)


@pytest.mark.parametrize("kind", ["cpu", "gpu_auto", "gpu_fused"])
def test_src_past_2_31_elements(kind):
    """src [2**18 + 3, 8192] bf16: compact-side offsets past 2**31 too; every row of dst but five moves. With a
    CPU mask the staged row map (2**18 + 3 int32) is larger than an arena quarter (1 MiB): the arena grows."""
    need_free(20)
    dst = torch.empty(N_BIG, H, dtype=DT, device=DEV)
    src = None
    try:
        fill(dst)
        src = torch.empty(M_BIG, H, dtype=DT, device=DEV)
        src.normal_(generator=torch.Generator(device=DEV).manual_seed(2))  # no fp32 temporary
        mask = torch.ones(N_BIG, dtype=torch.bool)
        mask[torch.tensor(FALSE_ROWS)] = False
        if kind == "cpu":
            mt.masked_row_scatter_(dst, mask, src, path="triton")
        elif kind == "gpu_auto":
            mt.masked_row_scatter_(dst, mask.to(DEV), src)
        else:
            executor.merge_triton(dst, mask.to(DEV), src, False, config=KernelConfig(16, 512, 8, 1, True))
        false_gpu = torch.tensor(FALSE_ROWS, device=DEV, dtype=torch.int64)
        for r0 in range(0, N_BIG, CHUNK):
            r1 = min(N_BIG, r0 + CHUNK)
            rows = torch.arange(r0, r1, device=DEV, dtype=torch.int64)
            is_false = torch.isin(rows, false_gpu)
            j = (rows - torch.searchsorted(false_gpu, rows)).clamp(max=M_BIG - 1)  # src row of a true row
            exp = src[j]
            exp[is_false] = pattern_at(rows[is_false])
            if not torch.equal(dst[r0:r1], exp):
                assert_same(dst[r0:r1], exp, f"rows {r0}:{r1}")
        # and back: GATHER every true row into src's memory (no third big tensor), checked chunk by chunk
        if kind == "gpu_auto":
            mask_gpu = mask.to(DEV)
            plan = mt.MergePlan(mask_gpu)
            true_rows = mask_gpu.nonzero().flatten()
            expected_last = src[-CHUNK:].clone()
            src.zero_()
            scatter.row_copy(dst, src, plan.rows, plan.count, scatter.GATHER,
                             kernel_config.default_config(H, M_BIG, N_BIG, False))
            assert_same(src[-CHUNK:], expected_last, "GATHER: the last rows are src's again")
            for j0 in range(0, M_BIG, CHUNK):
                j1 = min(M_BIG, j0 + CHUNK)
                if not torch.equal(src[j0:j1], dst[true_rows[j0:j1]]):
                    assert_same(src[j0:j1], dst[true_rows[j0:j1]], f"GATHER rows {j0}:{j1}")
    finally:
        del dst, src


@pytest.mark.parametrize("order", ["forward", "backward"])
@pytest.mark.parametrize("mask_kind", ["cpu", "gpu"])
def test_item_list_offsets_past_2_31_elements(mask_kind, order):
    """Items read in place (the multi-item kernel) at both ends of one [2**18 + 3, 8192] buffer: their element
    offsets from the first item pass +2**31 (forward) or -2**31 (backward)."""
    need_free(12)
    big = torch.empty(M_BIG, H, dtype=DT, device=DEV)
    try:
        big.normal_(generator=torch.Generator(device=DEV).manual_seed(3))
        head, tail = big[:5], big[-7:]
        items = [head, tail] if order == "forward" else [tail, head]
        flat = torch.cat(items)
        n = 64
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.tensor([1, 2, 10, 20, 30, 40, 41, 50, 60, 61, 62, 63])] = True
        dst = rand((n, H), DT, seed=4)
        expected = dst.clone()
        expected[mask.to(DEV)] = flat
        mt.merge_multimodal_embeddings(dst, items, mask.to(DEV) if mask_kind == "gpu" else mask, path="triton")
        assert_same(dst, expected)
    finally:
        del big


MASK_ROWS = 2 ** 31 - 1  # the most rows an int32 row map addresses (rowmap.MAX_ROWS)


def test_a_device_mask_of_2_31_minus_1_rows():
    """A device mask of 2**31 - 1 rows (dst [2**31 - 1, 1] fp16): the counted scan's last blocks reach past
    2**31 bytes (64-bit mask offsets), and the rows chosen at both ends move, with nothing else written."""
    need_free(12)
    assert scatter.counted(MASK_ROWS)
    chosen = [0, 5, 2 ** 30, MASK_ROWS - 2 ** 20, MASK_ROWS - 17, MASK_ROWS - 1]
    mask = torch.zeros(MASK_ROWS, dtype=torch.bool, device=DEV)
    mask[torch.tensor(chosen, device=DEV)] = True
    dst = torch.zeros(MASK_ROWS, 1, dtype=torch.float16, device=DEV)
    src = torch.arange(1, len(chosen) + 1, dtype=torch.float32, device=DEV)[:, None]
    try:
        mt.masked_row_scatter_(dst, mask, src, path="triton")
        assert dst[torch.tensor(chosen, device=DEV), 0].tolist() == src[:, 0].tolist()
        assert int(torch.count_nonzero(dst)) == len(chosen)
    finally:
        del dst, mask


def test_requests_on_a_device_mask_of_2_31_minus_1_rows():
    """merge_requests over a device mask of 2**31 - 1 rows: the last request ends at row 2**31 - 1, so its
    programs' last steps index past 2**31 - 1 - BLOCK (64-bit lanes in request_rows_kernel). The middle
    request has one embedding row too many: its status is False and its rows keep their zeros."""
    need_free(12)
    chosen = [0, 5, 2 ** 30, MASK_ROWS - 2 ** 20, MASK_ROWS - 17, MASK_ROWS - 1]
    offsets = [0, 2 ** 30, MASK_ROWS - 40, MASK_ROWS]
    mask = torch.zeros(MASK_ROWS, dtype=torch.bool, device=DEV)
    mask[torch.tensor(chosen, device=DEV)] = True
    dst = torch.zeros(MASK_ROWS, 1, dtype=torch.float16, device=DEV)
    rows = [torch.full((k, 1), float(r + 1), device=DEV) for r, k in enumerate((2, 3, 2))]
    try:
        status = mt.merge_requests(dst, rows, mask, offsets, path="triton")
        assert status.tolist() == [True, False, True]
        assert dst[torch.tensor(chosen, device=DEV), 0].tolist() == [1, 1, 0, 0, 3, 3]
        assert int(torch.count_nonzero(dst)) == 4
    finally:
        del dst, mask
