"""A device mask's row copy, launched to start while the launch before it runs (the block counts, or the row
map's scan; scatter.dependent_launch: compute capability 9.0 and later), reads its source rows before it waits.
These tests check what that early read relies on: the kernels queued before have finished when the copy starts
(their writes to src and to the mask are seen), the counts, map and count are read only after the launch before
has flushed them, and the same holds in a CUDA graph, with the host far ahead of the GPU, and in ADD mode; plus
that the launch really is a dependent one where the device allows it (else these tests would pass on the plain
launch alone).
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

from mmmerge_triton import executor, scatter  # noqa: E402
from mmmerge_triton.kernel_config import KernelConfig  # noqa: E402

from gpu_helpers import assert_same, capture, dev, gpu_sleep, rand, random_mask, reference  # noqa: E402

DEV = dev()
TWO_LAUNCH = KernelConfig(1, 1024, 8, 1, False)  # the DEVICE_ROWS kind; 1024-wide steps: H = 2500 takes three
N, H, M = 20000, 2500, 6000
ROUNDS = 24


def _merge(dst, mask, src, accumulate=False):
    executor.merge_triton(dst, mask, src, accumulate, config=TWO_LAUNCH)


@pytest.fixture(params=["select", "one_launch_scan", "counted_scan"], autouse=True)
def scan(request, monkeypatch):
    """No row map, as shipped at this N (scatter.selects: the block counts, then the copy that selects its rows
    from them); or the row map (scatter.SELECT_BELOW lowered past N) scanned in one launch, or in two
    (scatter.COUNTED_FROM lowered past N): then three launches in a chain, each a dependent of the one before
    where the device allows."""
    if request.param != "select":
        monkeypatch.setattr(scatter, "SELECT_BELOW", 0)
        monkeypatch.setattr(scatter, "COUNTED_FROM", 2**31 if request.param == "one_launch_scan" else 1)
    assert scatter.selects(N) == (request.param == "select")
    return request.param


def test_dependent_launch_is_used_where_the_device_allows(scan):
    dst, src = rand((N, H), torch.bfloat16, 1), rand((M, H), torch.bfloat16, 2)
    mask = random_mask((N,), M, seed=3).to(DEV)
    _merge(dst, mask, src)
    expected = torch.cuda.get_device_capability(DEV)[0] >= 9 and torch.version.hip is None
    assert scatter.dependent_launch(DEV.index) == expected
    copies = scatter._mask_select_copy if scan == "select" else scatter._row_copy
    keys = [key for key in copies._cache if key[0] == DEV.index and key[-1] == TWO_LAUNCH]
    assert keys and any(key[-2] for key in keys) == expected, keys  # after the counts or scan: the field before
    # the config
    if scan != "one_launch_scan":  # the copy, or the map's scan, a dependent of the block counts' (their key's last)
        counts_keys = [key for key in scatter._mask_block_counts._cache if key[0] == DEV.index]
        assert counts_keys and any(key[-1] for key in counts_keys) == expected, counts_keys


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("written", ["src", "mask", "both"])
def test_writes_queued_just_before_the_merge_are_seen(written, accumulate):
    """Each round rewrites src and/or the mask in a kernel queued behind a long spin, right before the merge,
    with no sync in between: a copy that read src before those writes landed would move stale rows."""
    base = rand((N, H), torch.float32, 4)
    masks = [random_mask((N,), M, seed=10 + r).to(DEV) for r in range(ROUNDS)]
    srcs = [rand((M, H), torch.bfloat16, 100 + r) for r in range(ROUNDS)]
    mask, src = masks[0].clone(), srcs[0].clone()
    results = []
    torch.cuda.synchronize()
    for r in range(ROUNDS):
        gpu_sleep(2_000_000)  # the host runs ahead: every round is queued before the GPU reaches it
        if written in ("src", "both"):
            src.copy_(srcs[r])
        if written in ("mask", "both"):
            mask.copy_(masks[r])
        dst = base.clone()
        _merge(dst, mask, src, accumulate)
        results.append(dst)
    torch.cuda.synchronize()
    for r, got in enumerate(results):
        m_r = masks[r] if written in ("mask", "both") else masks[0]
        s_r = srcs[r] if written in ("src", "both") else srcs[0]
        assert_same(got, reference(base, m_r, s_r, accumulate), f"round {r}")


def test_in_a_cuda_graph_with_new_contents_each_replay():
    base = rand((N, H), torch.bfloat16, 5)
    dst, mask, src = base.clone(), random_mask((N,), M, seed=6).to(DEV), rand((M, H), torch.bfloat16, 7)

    def step():
        dst.copy_(base)
        _merge(dst, mask, src)

    graph = capture(step)
    for r in range(6):
        new_mask, new_src = random_mask((N,), M, seed=20 + r).to(DEV), rand((M, H), torch.bfloat16, 30 + r)
        gpu_sleep(1_000_000)
        mask.copy_(new_mask)
        src.copy_(new_src)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(dst, reference(base, new_mask, new_src), f"replay {r}")
