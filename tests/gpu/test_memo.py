"""The memo of prepared merges on CUDA (core._prepared): each kind of entry (a host row map staged in the ring,
the one-launch kernel on a device mask, a device mask's block counts then the copy that selects its rows, or its
row map then the row copy), made by one call and then hit by calls of other N, M, masks and values in the same
buckets, launched through the bound C entry with addresses as ints: every result bit for bit torch's, no sync on
a hit, and the per-call checks (shared bytes, counts) on a hit.
"""
import contextlib

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton import core, dispatch, kernel_config, launch, scatter  # noqa: E402
from mmmerge_triton.kernel_config import FUSED_BELOW, KernelConfig  # noqa: E402

from gpu_helpers import (DTYPE_PAIRS, assert_same, dev, pair_id, rand, random_mask, reference,  # noqa: E402
                         sync_debug_error)

if launch.INTERPRET:
    pytest.skip("TRITON_INTERPRET is set: no bound launches", allow_module_level=True)

H = 320
# (N, M) inside one quarter-octave bucket of each: [1280, 1536) x [640, 768); past FUSED_BELOW (device masks:
# the two-launch kind), [16384, 20480) x [3072, 3584); and larger CPU masks, [40960, 49152) x [4096, 5120).
SMALL = [(1280, 640), (1300, 700), (1535, 767), (1400, 641)]
LARGE = [(FUSED_BELOW + 100, 3100), (FUSED_BELOW + 1000, 3300), (FUSED_BELOW + 2000, 3500)]
LARGER = [(41000, 4200), (45000, 4600), (49000, 5000)]
# Device masks from scatter.COUNTED_FROM (65536) rows: through a row map (device_rows_map*: scatter.SELECT_BELOW
# lowered) scanned in two levels, three bound launches; as shipped, no row map (scatter.selects), two.
COUNTED = [(66000, 4200), (72000, 4600), (81000, 5000)]
KINDS = {"host_rows": (SMALL, False, kernel_config.HOST_ROWS), "host_rows_large": (LARGER, False, kernel_config.HOST_ROWS),
         "device_fused": (SMALL, True, kernel_config.DEVICE_FUSED), "device_rows": (LARGE, True, kernel_config.DEVICE_ROWS),
         "device_rows_large": (COUNTED, True, kernel_config.DEVICE_ROWS),
         "device_rows_map": (LARGE, True, kernel_config.DEVICE_ROWS),
         "device_rows_map_counted": (COUNTED, True, kernel_config.DEVICE_ROWS)}


@pytest.fixture(autouse=True)
def fresh_memo():
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def _inputs(n, m, pair, on_device, seed):
    src_dtype, dst_dtype = pair
    mask = random_mask((n,), m, seed=seed)
    return rand((n, H), dst_dtype, seed=seed + 1), mask.to(dev()) if on_device else mask, rand((m, H), src_dtype, seed + 2)


@pytest.fixture
def through_a_map(monkeypatch):
    """A device mask's two-launch kind through its row map at any N (scatter.SELECT_BELOW lowered)."""
    monkeypatch.setattr(scatter, "SELECT_BELOW", 0)


@pytest.fixture
def two_launch(monkeypatch):
    """The decision for device masks made a two-launch one (the tuned table carries one-launch winners past
    FUSED_BELOW, up to FUSED_REACH times the N they were measured at and FUSED_REACH x FUSED_BELOW)."""
    real = core.decide

    def decide(dst, mask, *args, **kwargs):
        found = real(dst, mask, *args, **kwargs)
        if mask.is_cuda and found.path == "triton":
            return found._replace(kind=kernel_config.DEVICE_ROWS, config=KernelConfig(2, 256, 4, 1, False))
        return found
    monkeypatch.setattr(core, "decide", decide)


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("kind", list(KINDS))
def test_hits_give_torchs_result_without_a_sync(kind, pair, accumulate, request):
    if kind.startswith("device_rows"):
        request.getfixturevalue("two_launch")
    if kind.startswith("device_rows_map"):
        request.getfixturevalue("through_a_map")
    sizes, on_device, expected_kind = KINDS[kind]
    for i, (n, m) in enumerate(sizes):
        dst, mask, src = _inputs(n, m, pair, on_device, seed=10 * i)
        expected = reference(dst, mask, src, accumulate)
        torch.cuda.synchronize()
        with sync_debug_error() if i else contextlib.nullcontext():  # the first call makes the entry
            mt.masked_row_scatter_(dst, mask, src, accumulate=accumulate, path="triton")
        assert_same(dst, expected, f"{kind} N={n} M={m}")
    (entry,) = core._prepared.values()
    assert entry.decision.kind == entry.launch.kind == expected_kind and entry.launch.bound is not None
    if expected_kind == kernel_config.DEVICE_ROWS:  # the block counts' launch bound with no map or a counted scan,
        # the map's with a map
        n = sizes[0][0]
        assert entry.launch.select == scatter.selects(n) == (not kind.startswith("device_rows_map"))
        assert (entry.launch.bound_rows[0] is not None) == (entry.launch.select or scatter.counted(n))
        assert (entry.launch.bound_rows[1] is None) == entry.launch.select


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_api_calls_hit_the_entry(kind, monkeypatch, request):
    """merge_multimodal_embeddings and masked_row_scatter_ share the entry; a hit makes no new one."""
    if kind.startswith("device_rows"):
        request.getfixturevalue("two_launch")
    if kind.startswith("device_rows_map"):
        request.getfixturevalue("through_a_map")
    sizes, on_device, _ = KINDS[kind]
    made = []
    real = core._prepare
    monkeypatch.setattr(core, "_prepare", lambda *a: made.append(1) or real(*a))
    for i, (n, m) in enumerate(sizes):
        dst, mask, src = _inputs(n, m, (torch.bfloat16, torch.bfloat16), on_device, seed=i)
        expected = reference(dst, mask, src)
        mt.merge_multimodal_embeddings(dst, src, mask, path="triton")
        assert_same(dst, expected)
        mt.masked_row_scatter_(dst, mask, src, path="triton")
        assert_same(dst, expected)
    assert len(made) == 1


def test_a_device_mask_made_of_dsts_bytes_on_a_hit():
    """The mask is read before any row is written (core.check_call copies it): a hit checks the addresses."""
    n, m = 1300, 640
    dst, mask, src = _inputs(n, m, (torch.float32, torch.float32), True, seed=0)
    mt.masked_row_scatter_(dst, mask, src, path="triton")  # the entry (an aligned, contiguous device mask)
    storage = torch.zeros(n * H, dtype=torch.float32, device=dev())
    dst2, mask2 = storage.view(n, H), storage.view(torch.uint8)[:n].view(torch.bool)  # dst's first rows' bytes
    storage.view(torch.uint8)[:n] = (torch.arange(n, device=dev()) % 2 == 0).to(torch.uint8)
    src2 = rand((int(mask2.sum()), H), torch.float32, seed=5)
    expected = reference(dst2, mask2.clone(), src2)
    mt.masked_row_scatter_(dst2, mask2, src2, path="triton")
    assert_same(dst2, expected)


def test_src_inside_dst_on_a_hit_is_refused():
    n, m = 1300, 640
    dst, mask, src = _inputs(n, m, (torch.bfloat16, torch.bfloat16), False, seed=0)
    mt.masked_row_scatter_(dst, mask, src, path="triton")
    big = rand((2 * n, H), torch.bfloat16, seed=3)
    before = big.clone()
    with pytest.raises(ValueError, match="shares memory"):
        mt.masked_row_scatter_(big[:n], mask, big[n - 10 : n - 10 + m], path="triton")
    assert_same(big, before)


def test_a_count_mismatch_on_a_hit_writes_nothing():
    n, m = 1300, 640
    dst, mask, src = _inputs(n, m, (torch.bfloat16, torch.bfloat16), False, seed=0)
    mt.merge_multimodal_embeddings(dst, src, mask, path="triton")
    before = dst.clone()
    with pytest.raises(ValueError, match=f"Attempted to assign {m - 1} = {m - 1} multimodal tokens to {m} placeholders"):
        mt.merge_multimodal_embeddings(dst, src[1:], mask, path="triton")
    assert_same(dst, before)


def test_another_current_device_on_a_hit():
    """An entry bound on one device, a call made while another is current (same signature): right result (the
    executor launches under the entry's device)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dst, mask, src = _inputs(1300, 640, (torch.bfloat16, torch.bfloat16), True, seed=0)
    mt.masked_row_scatter_(dst, mask, src, path="triton")
    dst, mask, src = _inputs(1300, 640, (torch.bfloat16, torch.bfloat16), True, seed=1)
    expected = reference(dst, mask, src)
    with torch.cuda.device(1):
        mt.masked_row_scatter_(dst, mask, src, path="triton")
    assert_same(dst, expected)
