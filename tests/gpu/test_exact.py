"""Bit-exact agreement with torch on the GPU: ``ref = dst.clone(); ref.index_put_((mask,), src.to(dst.dtype),
accumulate=acc)``, for every (src, dst) dtype pair, a mask on the CPU and on the GPU, overwrite and
accumulate, odd shapes, forced kernel configurations, special values and non-contiguous layouts. Every
comparison covers the whole destination (and, for views, the whole buffer under it), so rows and columns
that must stay untouched are checked too.

Every distinct case costs a Triton compile, so by default the wide shapes run on three dtype pairs and
the forced-configuration sweep on one pair and two shapes; MMMERGE_GPU_FULL=1 crosses everything with
every dtype pair and every shape.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton import executor, scatter  # noqa: E402
from mmmerge_triton.kernel_config import KernelConfig  # noqa: E402
from mmmerge_triton.scatter import device_rows  # noqa: E402

from gpu_helpers import (  # noqa: E402
    DTYPE_PAIRS, assert_same, dev, first_true, pair_id, rand, random_mask, reference, special_matrix,
)

FULL = os.environ.get("MMMERGE_GPU_FULL", "") not in ("", "0")
DEV = dev()

# (N, H, M): N rows of dst, hidden size H, M rows of src (true rows of the mask).
SHAPES = [
    (1, 64, 1),  # N = 1
    (37, 1, 12),  # H = 1 (a constexpr to Triton)
    (300, 123, 100),  # odd H
    (4097, 256, 1500),  # N just past PREFIX_CHUNK (4096): prefix loops twice; fused by default on the GPU
    (64, 3584, 20),
    (33, 8192, 11),
    (17000, 96, 5000),  # N past 16384: a GPU mask takes the two-pass default
]


def shape_id(s):
    return f"N{s[0]}-H{s[1]}-M{s[2]}"


def _place(mask, on_gpu):
    return mask.to(DEV) if on_gpu else mask


# ---------------------------------------------------------------------------------------------------------
# 1. Public API, path="auto" (and "triton"), every dtype pair x mask device x mode x shape
# ---------------------------------------------------------------------------------------------------------
# Every dtype pair on the edge shapes; the wide shapes on three pairs that put each dtype on each side
# (MMMERGE_GPU_FULL=1: every pair on every shape). Each distinct case costs a Triton compile.
EDGE_SHAPES = [s for s in SHAPES if s[0] in (1, 17000) or s[1] in (1, 123)]
SOME_PAIRS = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.float16, torch.float32)]


def _api_params():
    out = []
    for shape in SHAPES:
        for pair in (DTYPE_PAIRS if FULL or shape in EDGE_SHAPES else SOME_PAIRS):
            out.append(pytest.param(pair, shape, id=f"{pair_id(pair)}-{shape_id(shape)}"))
    return out


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("mask_on_gpu", [False, True], ids=["cpu_mask", "gpu_mask"])
@pytest.mark.parametrize("pair,shape", _api_params())
def test_public_api_matches_index_put(pair, shape, mask_on_gpu, accumulate):
    src_dt, dst_dt = pair
    n, h, m = shape
    mask = _place(random_mask((n,), m, seed=n * 31 + h), mask_on_gpu)
    dst = rand((n, h), dst_dt, seed=1)
    src = rand((m, h), src_dt, seed=2)
    dst0 = dst.clone()
    expected = reference(dst, mask, src, accumulate)

    out = dst.clone()
    assert mt.masked_row_scatter_(out, mask, src, accumulate=accumulate) is out
    assert_same(out, expected, "masked_row_scatter_ auto")

    out = dst.clone()
    mt.masked_row_scatter_(out, mask, src, accumulate=accumulate, path="triton")
    assert_same(out, expected, "masked_row_scatter_ triton")

    new = mt.masked_row_scatter(dst, mask, src, accumulate=accumulate)
    assert_same(new, expected, "masked_row_scatter")
    assert_same(dst, dst0, "masked_row_scatter left its input alone")

    if not accumulate:
        out = dst.clone()
        assert mt.merge_multimodal_embeddings(out, src, mask) is out
        assert_same(out, expected, "merge_multimodal_embeddings")


# ---------------------------------------------------------------------------------------------------------
# 2. Forced kernel configurations through executor.merge_triton(..., config=cfg)
# ---------------------------------------------------------------------------------------------------------
CONFIGS = [KernelConfig(rows, bh, nw, 1, fused)
           for fused in (False, True) for rows in (1, 4, 16) for bh in (128, 512, 4096) for nw in (4, 8)]


def cfg_id(c):
    return f"{'fused' if c.fused else 'map'}-r{c.rows}-b{c.block_h}-w{c.num_warps}"


SWEEP_SHAPES = SHAPES if FULL else [(4097, 123, 1500), (3, 8192, 2)]
SWEEP_PAIRS = DTYPE_PAIRS if FULL else [(torch.bfloat16, torch.float32)]


def _sweep_params():
    out = []
    for pair in SWEEP_PAIRS:
        for shape in SWEEP_SHAPES:
            for mask_on_gpu in (False, True):
                for acc in (False, True):
                    for cfg in CONFIGS:
                        if cfg.fused and not mask_on_gpu:
                            continue  # fused is ignored for a CPU mask: the same launch as fused=False
                        out.append(pytest.param(
                            pair, shape, mask_on_gpu, acc, cfg,
                            id=f"{pair_id(pair)}-{shape_id(shape)}-{'gpu' if mask_on_gpu else 'cpu'}"
                               f"-{'add' if acc else 'copy'}-{cfg_id(cfg)}"))
    return out


@pytest.mark.parametrize("pair,shape,mask_on_gpu,accumulate,cfg", _sweep_params())
def test_forced_config_matches_index_put(pair, shape, mask_on_gpu, accumulate, cfg):
    src_dt, dst_dt = pair
    n, h, m = shape
    mask = _place(random_mask((n,), m, seed=n + 7 * h), mask_on_gpu)
    dst = rand((n, h), dst_dt, seed=3)
    src = rand((m, h), src_dt, seed=4)
    expected = reference(dst, mask, src, accumulate)
    executor.merge_triton(dst, mask, src, accumulate, config=cfg)
    assert_same(dst, expected, cfg_id(cfg))


# ---------------------------------------------------------------------------------------------------------
# 3. Special values: overflow to inf, subnormals, ±0, ±inf, NaN, in src and (for accumulate) in dst
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cpu", "gpu_fused", "gpu_two_pass"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_special_values(pair, accumulate, kind):
    src_dt, dst_dt = pair
    n, h, m = 300, 123, 100
    mask = random_mask((n,), m, seed=11)
    if kind != "cpu":
        mask = mask.to(DEV)
    dst = special_matrix(n, h, dst_dt, shift=5)
    src = special_matrix(m, h, src_dt, shift=0)
    expected = reference(dst, mask, src, accumulate)
    if kind == "cpu":
        mt.masked_row_scatter_(dst, mask, src, accumulate=accumulate, path="triton")
    else:
        cfg = KernelConfig(16, 128, 8, 1, kind == "gpu_fused")
        executor.merge_triton(dst, mask, src, accumulate, config=cfg)
    assert_same(dst, expected, kind)


@pytest.mark.parametrize("offset", [0, 1, 2, 4], ids=lambda o: f"mask_at_byte_{o}")
@pytest.mark.parametrize("kind", ["two_launch", "two_launch_counted", "two_launch_select", "one_launch"])
def test_a_device_masks_prefix_count_at_any_address(offset, kind, monkeypatch):
    """The prefix count reads a 4-byte-aligned mask in words and any other by bytes (scatter.words): a device
    mask of single-bit and 255 bytes at byte offsets 0-4, N past several steps of the scan's prefix
    (scatter.SCAN_PREFIX_CHUNK x SCAN_PREFIX_LOADS; the row map's scan in one launch, COUNTED_FROM raised past N)
    or scanned in two levels (SELECT_BELOW lowered past N), or no row map (as shipped at this N: the block counts,
    then each program's block), merged by each device kind as index_put does."""
    fused = kind == "one_launch"
    if kind in ("two_launch", "two_launch_counted"):
        monkeypatch.setattr(scatter, "SELECT_BELOW", 0)
    if kind == "two_launch":
        monkeypatch.setattr(scatter, "COUNTED_FROM", 2**31)
    n, h = 300_003 if not fused else 20_001, 8
    assert scatter.selects(n) == (kind in ("two_launch_select", "one_launch"))
    if not scatter.selects(n):
        assert scatter.counted(n) == (kind == "two_launch_counted")
    g = torch.Generator().manual_seed(offset)
    values = torch.tensor([0, 0, 0, 1, 2, 4, 8, 16, 32, 64, 128, 255], dtype=torch.uint8)
    buffer = torch.zeros(n + 8, dtype=torch.uint8)
    buffer[offset:offset + n] = values[torch.randint(0, values.numel(), (n,), generator=g)]
    mask = buffer.to(DEV)[offset:offset + n].view(torch.bool)
    m = int((buffer != 0).sum())
    dst = rand((n, h), torch.float32, seed=1)
    src = rand((m, h), torch.bfloat16, seed=2)
    expected = reference(dst, mask, src)
    executor.merge_triton(dst, mask, src, False, config=KernelConfig(8 if fused else 1, 8, 4, 1, fused))
    assert_same(dst, expected, f"offset {offset}")


def test_fp32_overflow_to_fp16_is_inf_like_torch():
    """1e5 in fp32 becomes +inf in fp16 (as src.to(torch.float16) does), -1e5 becomes -inf, 65519 -> 65504."""
    mask = torch.tensor([False, True, True, False, True])
    src = torch.tensor([[1e5, -1e5, 65519.0, 65520.0],
                        [1e-40, -1e-40, -0.0, 2.0 ** -25],
                        [float("inf"), float("-inf"), float("nan"), 70000.0]], device=DEV)
    dst = torch.zeros(5, 4, dtype=torch.float16, device=DEV)
    mt.masked_row_scatter_(dst, mask, src, path="triton")
    assert_same(dst, reference(torch.zeros_like(dst), mask, src))
    assert dst[1, 0].item() == float("inf") and dst[1, 1].item() == float("-inf")
    assert dst[1, 2].item() == 65504.0 and dst[1, 3].item() == float("inf")


# ---------------------------------------------------------------------------------------------------------
# 4. Layouts: row-strided and misaligned views, 3-D, non-contiguous src and masks
# ---------------------------------------------------------------------------------------------------------
N, H, M = 50, 96, 20
B, S = 4, 25  # 3-D cases: B * S = 100 rows


def _flat(offset, shape):
    return lambda t: t.view(-1)[offset: offset + math.prod(shape)].view(shape)


# name -> (dst storage shape, view of it, src storage shape, view of it, hidden size, triton can run it)
LAYOUTS = {
    "contiguous": ((N, H), None, (M, H), None, H, True),
    "dst_row_stride_112": ((N, 112), lambda t: t[:, :H], (M, H), None, H, True),
    "dst_row_stride_100": ((N, 100), lambda t: t[:, :H], (M, H), None, H, True),
    "dst_misaligned": ((N * H + 8,), _flat(1, (N, H)), (M, H), None, H, True),
    "dst_misaligned_strided": ((N * 100 + 8,), lambda t: t[3: 3 + N * 100].view(N, 100)[:, :H], (M, H), None, H,
                               True),
    "src_misaligned": ((N, H), None, (M * H + 8,), _flat(1, (M, H)), H, True),
    "src_row_stride": ((N, H), None, (M, 100), lambda t: t[:, :H], H, True),
    "src_col_stride": ((N, H), None, (H, M), lambda t: t.t(), H, True),  # as_rows fails: src.contiguous()
    "both_misaligned": ((N * H + 8,), _flat(2, (N, H)), (M * H + 8,), _flat(3, (M, H)), H, True),
    "h1_row_stride": ((N, 7), lambda t: t[:, 2:3], (M, 5), lambda t: t[:, 4:5], 1, True),
    "h1_col_stride": ((N, 7), lambda t: t[:, ::7], (M, 1), None, 1, True),  # [N, 1] with stride (7, 7)
    "odd_h_misaligned": ((N * 123 + 8,), _flat(5, (N, 123)), (M * 123 + 8,), _flat(1, (M, 123)), 123, True),
    "3d": ((B, S, H), None, (M, H), None, H, True),
    "3d_mask_transposed": ((B, S, H), None, (M, H), None, H, True),
    "3d_row_stride": ((B, S, 112), lambda t: t[..., :H], (M, H), None, H, True),
    "3d_not_viewable": ((B, S + 2, H), lambda t: t[:, :S], (M, H), None, H, False),
    "dst_col_stride": ((N, 2 * H), lambda t: t[:, ::2], (M, H), None, H, False),
    "mask_strided_1d": ((N, H), None, (M, H), None, H, True),
    "mask_expanded_1d": ((N, H), None, (N, H), None, H, True),  # every row true, mask stride 0
}
LAYOUT_PAIRS = [(torch.float32, torch.bfloat16), (torch.float16, torch.float32)]  # 2- and 4-byte dst and src


def _mask_for(name, shape, k, on_gpu):
    device = DEV if on_gpu else torch.device("cpu")
    if name == "mask_expanded_1d":
        return torch.ones(1, dtype=torch.bool, device=device).expand(shape)
    mask = random_mask(shape, k, seed=17)
    if name == "3d_mask_transposed":
        return mask.t().contiguous().t().to(device)  # [B, S] with strides (1, B); .to keeps dense strides
    if name == "mask_strided_1d":
        big = torch.zeros(2 * shape[0], dtype=torch.bool, device=device)
        big[::2] = mask.to(device)
        return big[::2]  # [N] with stride 2
    return mask.to(device)


def _build(name, pair, mask_on_gpu):
    src_dt, dst_dt = pair
    dshape, dview, sshape, sview, _, _ = LAYOUTS[name]
    dview = dview or (lambda t: t)
    sview = sview or (lambda t: t)
    storage = rand(dshape, dst_dt, seed=21)
    dst = dview(storage)
    src = sview(rand(sshape, src_dt, seed=22))
    mask = _mask_for(name, dst.shape[:-1], src.shape[0], mask_on_gpu)
    assert mask.shape == dst.shape[:-1] and int(mask.sum()) == src.shape[0]
    return storage, dview, dst, src, mask


def _expected_storage(storage, dview, mask, src, accumulate):
    ref_storage = storage.clone()
    dview(ref_storage).index_put_((mask.to(DEV),), src.to(storage.dtype), accumulate=accumulate)
    return ref_storage


@pytest.mark.parametrize("path", ["auto", "triton"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("mask_on_gpu", [False, True], ids=["cpu_mask", "gpu_mask"])
@pytest.mark.parametrize("pair", LAYOUT_PAIRS, ids=pair_id)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(layout, pair, mask_on_gpu, accumulate, path):
    storage, dview, dst, src, mask = _build(layout, pair, mask_on_gpu)
    triton_ok = LAYOUTS[layout][5]
    if layout == "dst_misaligned":
        assert dst.data_ptr() % 16 != 0
    if layout == "src_misaligned":
        assert src.data_ptr() % 16 != 0
    expected = _expected_storage(storage, dview, mask, src, accumulate)
    before = storage.clone()
    if path == "triton" and not triton_ok:
        with pytest.raises(ValueError, match="flatten to rows"):
            mt.masked_row_scatter_(dst, mask, src, accumulate=accumulate, path="triton")
        assert_same(storage, before, "nothing written when it raises")
        return
    mt.masked_row_scatter_(dst, mask, src, accumulate=accumulate, path=path)
    assert_same(storage, expected, f"whole buffer under the {layout} view")
    # the out-of-place form on the same view
    out = mt.masked_row_scatter(dview(before.clone()), mask, src, accumulate=accumulate, path=path)
    assert_same(out, dview(expected).contiguous(), "masked_row_scatter")


@pytest.mark.parametrize("cfg", [KernelConfig(16, 128, 8, 1, True), KernelConfig(4, 128, 4, 1, False)], ids=cfg_id)
@pytest.mark.parametrize("layout", ["mask_strided_1d", "mask_expanded_1d", "3d_mask_transposed", "dst_misaligned",
                                    "src_misaligned", "3d_row_stride"])
def test_layouts_forced_device_config(layout, cfg):
    """Non-contiguous device masks and misaligned views through both device-mask kernels explicitly."""
    storage, dview, dst, src, mask = _build(layout, (torch.float32, torch.bfloat16), True)
    expected = _expected_storage(storage, dview, mask, src, False)
    executor.merge_triton(dst, mask, src, False, config=cfg)
    assert_same(storage, expected, layout)


# ---------------------------------------------------------------------------------------------------------
# 5. Edge cases of the API: empty inputs, 1-D dst, count mismatches
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_on_gpu", [False, True], ids=["cpu_mask", "gpu_mask"])
def test_empty_inputs(mask_on_gpu):
    for n, h, m in [(0, 16, 0), (10, 16, 0), (10, 0, 3)]:
        mask = _place(random_mask((n,), m, seed=1), mask_on_gpu)
        dst = rand((n, h), torch.bfloat16, seed=1)
        before = dst.clone()
        src = rand((m, h), torch.float32, seed=2)
        for path in ("auto", "triton"):
            mt.masked_row_scatter_(dst, mask, src, path=path)
            mt.masked_row_scatter_(dst, mask, src, path=path, accumulate=True)
        if m == 0:
            assert mt.merge_multimodal_embeddings(dst, [], mask) is dst
        else:  # [] has 0 rows: placeholders are a count mismatch
            with pytest.raises(ValueError, match="Attempted to assign 0 multimodal tokens"):
                mt.merge_multimodal_embeddings(dst, [], mask, check_count=True)
        assert_same(dst, before)


@pytest.mark.parametrize("mask_on_gpu", [False, True], ids=["cpu_mask", "gpu_mask"])
@pytest.mark.parametrize("value", [False, True])
def test_one_dim_dst(value, mask_on_gpu):
    """dst [H] with a 0-dim mask: one row."""
    mask = _place(torch.tensor(value), mask_on_gpu)
    dst = rand((77,), torch.float16, seed=5)
    src = rand((int(value), 77), torch.float32, seed=6)
    expected = dst.clone()
    if value:
        expected = src[0].to(torch.float16)
    mt.masked_row_scatter_(dst, mask, src, path="triton")
    assert_same(dst, expected)


@pytest.mark.parametrize("mask_on_gpu", [False, True], ids=["cpu_mask", "gpu_mask"])
@pytest.mark.parametrize("path", ["auto", "triton", "index_put", "index_copy", "masked_scatter"])
def test_full_mask(path, mask_on_gpu):
    n, h = 257, 40
    mask = _place(torch.ones(n, dtype=torch.bool), mask_on_gpu)
    dst = rand((n, h), torch.bfloat16, seed=7)
    src = rand((n, h), torch.float32, seed=8)
    expected = reference(dst, mask, src)
    mt.masked_row_scatter_(dst, mask, src, path=path)
    assert_same(dst, expected)


@pytest.mark.parametrize("mask_on_gpu", [False, True], ids=["cpu_mask", "gpu_mask"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("path", mt.PATHS)
@pytest.mark.parametrize("pair", [(torch.float32, torch.bfloat16), (torch.float16, torch.float16)], ids=pair_id)
def test_every_path(pair, path, accumulate, mask_on_gpu):
    """Every named path agrees with the reference (the non-Triton paths are torch ops, so exact too)."""
    src_dt, dst_dt = pair
    n, h, m = 1000, 200, 333
    mask = _place(random_mask((n,), m, seed=9), mask_on_gpu)
    dst = rand((n, h), dst_dt, seed=10)
    src = rand((m, h), src_dt, seed=11)
    expected = reference(dst, mask, src, accumulate)
    mt.masked_row_scatter_(dst, mask, src, accumulate=accumulate, path=path)
    assert_same(dst, expected, path)


@pytest.mark.parametrize("path", ["auto", "triton"])
@pytest.mark.parametrize("m_delta", [-3, 3])
def test_cpu_mask_count_mismatch_raises_and_writes_nothing(m_delta, path):
    n, h, k = 100, 32, 40
    mask = random_mask((n,), k, seed=12)
    dst = rand((n, h), torch.float32, seed=13)
    before = dst.clone()
    src = rand((k + m_delta, h), torch.float32, seed=14)
    with pytest.raises(ValueError, match=f"Attempted to assign {k + m_delta} multimodal tokens to {k} placeholders"):
        mt.masked_row_scatter_(dst, mask, src, path=path)
    with pytest.raises(ValueError, match="placeholders"):
        mt.merge_multimodal_embeddings(dst, [src[:5], src[5:]], mask, path=path)
    assert_same(dst, before)


@pytest.mark.parametrize("m_delta", [-3, 3])
def test_gpu_mask_check_count_raises_and_writes_nothing(m_delta):
    n, h, k = 100, 32, 40
    mask = random_mask((n,), k, seed=12).to(DEV)
    dst = rand((n, h), torch.float32, seed=13)
    before = dst.clone()
    src = rand((k + m_delta, h), torch.float32, seed=14)
    with pytest.raises(ValueError, match="placeholders"):
        mt.masked_row_scatter_(dst, mask, src, check_count=True)
    assert_same(dst, before)


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("how", ["api", "fused", "two_pass", "plan"])
@pytest.mark.parametrize("n,k,m", [(100, 40, 30), (100, 30, 40), (5000, 2000, 1500), (5000, 1500, 2000),
                                   (50, 0, 10), (50, 50, 7)])
def test_gpu_mask_count_mismatch_semantics(n, k, m, how, accumulate):
    """Without check_count a device mask is not synced: the first min(K, M) true rows take src's first rows,
    later true rows keep their values, later src rows are unused."""
    h = 48
    mask = random_mask((n,), k, seed=n + k).to(DEV)
    dst = rand((n, h), torch.bfloat16, seed=15)
    src = rand((m, h), torch.float32, seed=16)
    j = min(k, m)
    expected = reference(dst, first_true(mask, j), src[:j], accumulate)
    if how == "api":
        mt.masked_row_scatter_(dst, mask, src, accumulate=accumulate, path="triton")
    elif how == "plan":
        mt.masked_row_scatter_(dst, src=src, plan=mt.MergePlan(mask), accumulate=accumulate)
    else:
        executor.merge_triton(dst, mask, src, accumulate, config=KernelConfig(4, 64, 4, 1, how == "fused"))
    assert_same(dst, expected)


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("mask_on_gpu", [False, True], ids=["cpu_mask", "gpu_mask"])
def test_merge_plan(mask_on_gpu, accumulate):
    n, h, m = 3000, 64, 900
    mask = _place(random_mask((n,), m, seed=30), mask_on_gpu)
    plan = mt.MergePlan(mask, device=DEV)
    assert plan.device == DEV
    dst = rand((n, h), torch.float16, seed=31)
    src = rand((m, h), torch.bfloat16, seed=32)
    expected = reference(dst, mask, src, accumulate)
    mt.masked_row_scatter_(dst, src=src, plan=plan, accumulate=accumulate)
    assert_same(dst, expected)
    assert int(plan.count.item()) == m
    # update_ with a new mask of the same shape, then merge again
    mask2 = _place(random_mask((n,), m, seed=33), mask_on_gpu)
    plan.update_(mask2)
    dst2 = rand((n, h), torch.float16, seed=34)
    expected2 = reference(dst2, mask2, src, accumulate)
    mt.masked_row_scatter_(dst2, src=src, plan=plan, accumulate=accumulate)
    assert_same(dst2, expected2)


def test_merge_plan_device_given_as_plain_cuda():
    """MergePlan(cpu_mask, device="cuda") is the natural spelling; the merge must accept it for a dst on the
    current device (torch.device("cuda") != torch.device("cuda:0"), so a plain comparison rejects it)."""
    n, h, m = 64, 32, 20
    mask = random_mask((n,), m, seed=40)
    plan = mt.MergePlan(mask, device="cuda")
    dst = rand((n, h), torch.float32, seed=41)
    src = rand((m, h), torch.float32, seed=42)
    expected = reference(dst, mask, src)
    mt.masked_row_scatter_(dst, src=src, plan=plan)
    assert_same(dst, expected)


@pytest.mark.parametrize("mask_on_gpu", [False, True], ids=["cpu_mask", "gpu_mask"])
def test_merge_multimodal_embeddings_nested_items(mask_on_gpu):
    """A nested list of items of several dtypes, leading dims flattened, taken in order. (torch.cat promotes
    the mixed dtypes to fp32 exactly, so the reference takes the fp32 concatenation.)"""
    n, h = 700, 160
    items = [rand((3, 64, h), torch.float32, seed=50), rand((100, h), torch.bfloat16, seed=51),
             [rand((17, h), torch.float16, seed=52), rand((2, 5, h), torch.float32, seed=53)]]
    flat = torch.cat([items[0].flatten(0, 1), items[1].float(), items[2][0].float(), items[2][1].flatten(0, 1)])
    mask = _place(random_mask((n,), flat.shape[0], seed=54), mask_on_gpu)
    dst = rand((n, h), torch.bfloat16, seed=55)
    expected = reference(dst, mask, flat)
    assert mt.merge_multimodal_embeddings(dst, items, mask) is dst
    assert_same(dst, expected)


# ---------------------------------------------------------------------------------------------------------
# 6. Lists of items (merge_multimodal_embeddings): the multi-item kernel reads them in place when they share
#    a dtype and a row stride (mmmerge_triton/items.py); otherwise they are concatenated first
# ---------------------------------------------------------------------------------------------------------
ITEM_LAYOUTS = ["views", "separate", "reversed", "row_strided", "misaligned", "empty_item", "many", "one_row_items",
                "mixed_strides", "mixed_dtypes"]


def make_items(layout, dtype, h, seed=60):
    """A list of items [m_i, H] (or [a, b, H]) of ``dtype`` laid out as ``layout`` names."""
    counter = [seed]

    def r(*shape, dt=dtype):
        counter[0] += 1
        return rand(shape, dt, seed=counter[0])

    if layout == "views":  # slices of one tensor, one of them 3-D
        big = r(200, h)
        return [big[:50], big[50:51], big[51:120].view(3, 23, h), big[120:200]]
    if layout == "separate":
        return [r(30, h), r(1, h), r(64, h), r(5, h)]
    if layout == "reversed":  # later items lie before the first one: negative offsets
        big = r(100, h)
        return [big[60:100], big[0:25], big[25:60]]
    if layout == "row_strided":  # every item a [:, :h] view of a wider tensor, one shared row stride
        return [r(30, h + 16)[:, :h], r(20, h + 16)[:, :h], r(7, h + 16)[:, :h]]
    if layout == "misaligned":  # data pointers off 16 bytes
        return [r(30 * h + 8)[1:1 + 30 * h].view(30, h), r(20 * h + 8)[3:3 + 20 * h].view(20, h)]
    if layout == "empty_item":
        return [r(10, h), r(0, h), r(20, h), r(0, h)]
    if layout == "many":  # 37 items: six binary-search steps
        return [r(1 + (i * 5) % 7, h) for i in range(37)]
    if layout == "one_row_items":
        return [r(1, h) for _ in range(5)]
    if layout == "mixed_strides":  # no common row stride: concatenated
        return [r(10, h), r(12, h + 8)[:, :h]]
    if layout == "mixed_dtypes":  # concatenated (torch.cat promotes exactly)
        other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
        return [r(10, h), r(12, h, dt=other)]
    raise AssertionError(layout)


def cat_items(items, h):
    return torch.cat([t.reshape(-1, h) for t in items])


@pytest.mark.parametrize("mask_on_gpu", [False, True], ids=["cpu_mask", "gpu_mask"])
@pytest.mark.parametrize("pair", SOME_PAIRS, ids=pair_id)
@pytest.mark.parametrize("layout", ITEM_LAYOUTS)
def test_item_lists(layout, pair, mask_on_gpu):
    src_dt, dst_dt = pair
    h = 100
    items = make_items(layout, src_dt, h)
    flat = cat_items(items, h)
    n = flat.shape[0] * 2 + 3
    mask = _place(random_mask((n,), flat.shape[0], seed=61), mask_on_gpu)
    dst = rand((n, h), dst_dt, seed=62)
    expected = reference(dst, mask, flat)
    for path in ("auto", "triton"):
        out = dst.clone()
        assert mt.merge_multimodal_embeddings(out, items, mask, path=path) is out
        assert_same(out, expected, f"{layout} {path}")


@pytest.mark.parametrize("mask_on_gpu", [False, True], ids=["cpu_mask", "gpu_mask"])
@pytest.mark.parametrize("h", [1, 96, 4096])
@pytest.mark.parametrize("layout", ["views", "separate", "misaligned"])
def test_item_lists_hidden_sizes(layout, h, mask_on_gpu):
    items = make_items(layout, torch.float32, h)
    flat = cat_items(items, h)
    n = flat.shape[0] + 17
    mask = _place(random_mask((n,), flat.shape[0], seed=63), mask_on_gpu)
    dst = rand((n, h), torch.bfloat16, seed=64)
    expected = reference(dst, mask, flat)
    mt.merge_multimodal_embeddings(dst, items, mask, path="triton")
    assert_same(dst, expected)


@pytest.mark.parametrize("mask_on_gpu", [False, True], ids=["cpu_mask", "gpu_mask"])
def test_item_lists_with_a_plan_and_3d_dst(mask_on_gpu):
    h = 64
    items = make_items("separate", torch.float16, h)
    flat = cat_items(items, h)
    dst = rand((4, 50, h), torch.float32, seed=65)
    mask = _place(random_mask((4, 50), flat.shape[0], seed=66), mask_on_gpu)
    expected = reference(dst, mask, flat)
    plan = mt.MergePlan(mask, device=DEV)
    mt.merge_multimodal_embeddings(dst, items, plan=plan)
    assert_same(dst, expected)


@pytest.mark.parametrize("delta", [-7, 7])
@pytest.mark.parametrize("how", ["mask", "plan"])
def test_item_lists_gpu_mask_count_mismatch(how, delta):
    """A device mask with K != M true rows, no check: the first min(K, M) true rows take the first rows."""
    h = 40
    items = make_items("separate", torch.float32, h)
    flat = cat_items(items, h)
    m = flat.shape[0]
    k = m + delta
    n = 2 * m
    mask = random_mask((n,), k, seed=67).to(DEV)
    dst = rand((n, h), torch.float16, seed=68)
    j = min(k, m)
    expected = reference(dst, first_true(mask, j), flat[:j])
    if how == "plan":
        mt.merge_multimodal_embeddings(dst, items, plan=mt.MergePlan(mask), path="triton")
    else:
        mt.merge_multimodal_embeddings(dst, items, mask, path="triton")
    assert_same(dst, expected)


def test_item_lists_cpu_mask_count_mismatch_raises():
    h = 40
    items = make_items("separate", torch.float32, h)
    m = cat_items(items, h).shape[0]
    mask = random_mask((2 * m,), m - 1, seed=69)
    dst = rand((2 * m, h), torch.float16, seed=70)
    before = dst.clone()
    with pytest.raises(ValueError, match=f"30 \\+ 1 \\+ 64 \\+ 5 = {m} multimodal tokens to {m - 1} placeholders"):
        mt.merge_multimodal_embeddings(dst, items, mask, path="triton")
    assert_same(dst, before)


@pytest.mark.parametrize("mask_on_gpu", [False, True], ids=["cpu_mask", "gpu_mask"])
@pytest.mark.parametrize("pair", SOME_PAIRS, ids=pair_id)
def test_merge_items_accumulate(pair, mask_on_gpu):
    """The multi-item kernel's ADD mode (reached through items.merge_items; the public list merge overwrites)."""
    from mmmerge_triton import items as mm_items
    from mmmerge_triton.kernel_config import default_config

    src_dt, dst_dt = pair
    h = 100
    items = make_items("row_strided", src_dt, h)
    flat = cat_items(items, h)
    n, m = 3 * flat.shape[0], flat.shape[0]
    mask = _place(random_mask((n,), m, seed=71), mask_on_gpu)
    dst = rand((n, h), dst_dt, seed=72)
    expected = reference(dst, mask, flat, True)
    stride = mm_items.common_row_stride(items)
    assert stride == h + 16
    rowmap = device_rows(mask, m) if mask_on_gpu else None  # a device mask's map: the caller's (executor.run)
    mm_items.merge_items(dst, mask, mm_items.ItemList.of(items), stride, True, default_config(h, m, n, mask_on_gpu),
                         rowmap)
    assert_same(dst, expected)
