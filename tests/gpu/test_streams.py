"""Streams and devices: the kernels run on the caller's current stream of the tensors' device; the pinned
staging ring fences every stream that read a region; tensors on cuda:1 while cuda:0 is current work on every
path, without a sync, and leave the current device alone."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton import executor  # noqa: E402
from mmmerge_triton.kernel_config import KernelConfig  # noqa: E402

from gpu_helpers import assert_same, dev, gpu_sleep, rand, random_mask, reference, sync_debug_error  # noqa: E402

DEV = dev()
N, H, M = 4000, 256, 1200
KINDS = ["cpu", "gpu_fused", "gpu_two_pass", "plan_gpu", "plan_cpu"]
SLEEP_CYCLES = 400_000_000  # ~0.2-0.3 s of GPU time


def _op(kind, mask_cpu, src, accumulate=False, device=DEV):
    """A function d -> None that merges into d with the given kind of mask."""
    if kind == "cpu":
        return lambda d: mt.masked_row_scatter_(d, mask_cpu, src, accumulate=accumulate, path="triton")
    if kind.startswith("plan_"):
        plan = mt.MergePlan(mask_cpu.to(device) if kind == "plan_gpu" else mask_cpu, device=device)
        return lambda d: mt.masked_row_scatter_(d, src=src, plan=plan, accumulate=accumulate)
    cfg = KernelConfig(16, 256, 8, 1, kind == "gpu_fused")
    mask_gpu = mask_cpu.to(device)
    return lambda d: executor.merge_triton(d, mask_gpu, src, accumulate, config=cfg)


@pytest.mark.parametrize("kind", KINDS)
def test_runs_on_the_current_stream(kind):
    """The default stream is kept busy; the merge is issued on stream s and read back on s. Had it been
    launched on another stream, the copy on s would see dst unchanged."""
    mask = random_mask((N,), M, seed=1)
    dst = rand((N, H), torch.bfloat16, seed=2)
    src = rand((M, H), torch.float32, seed=3)
    expected = reference(dst, mask, src).cpu()
    op = _op(kind, mask, src)
    op(dst.clone())  # warm-up (compile)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    if not gpu_sleep(SLEEP_CYCLES):  # on the default stream
        pytest.skip("torch.cuda._sleep is unavailable")
    with torch.cuda.stream(s):
        op(dst)
        host = dst.to("cpu")  # a synchronous copy on s: waits for s only
    busy = not torch.cuda.default_stream().query()
    torch.cuda.synchronize()
    assert busy, "the default stream finished its sleep too early for this test to mean anything"
    assert_same(host, expected, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_made_on_one_stream_used_on_another(kind):
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    mask = random_mask((N,), M, seed=4)
    warm = _op(kind, mask, rand((M, H), torch.float32, seed=5))
    warm(rand((N, H), torch.bfloat16, seed=6))  # compile
    torch.cuda.synchronize()
    with torch.cuda.stream(s1):
        gpu_sleep(SLEEP_CYCLES // 4)  # the inputs are late: only stream order makes them visible to s2
        dst = rand((N, H), torch.bfloat16, seed=6)
        src = rand((M, H), torch.float32, seed=5)
        original = dst.clone()
    s2.wait_stream(s1)
    with torch.cuda.stream(s2):
        op = _op(kind, mask, src)  # a plan is built on s2 too
        op(dst)
        dst.record_stream(s2)
        src.record_stream(s2)
    s2.synchronize()
    torch.cuda.synchronize()
    assert_same(dst, reference(original, mask, src), kind)


def test_staging_ring_across_two_streams():
    """CPU-mask merges alternate between two streams (each accumulating into its own dst), one of them
    regularly held back by a sleep: the ring must fence both streams before it reuses a region."""
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    n, h, k = 60000, 8, 40000  # 160 KB row maps: several per quarter, many laps over the run
    bases = [random_mask((n,), k, seed=i) for i in range(3)]
    src = torch.randint(-8, 8, (k, h), device=DEV).float()
    dsts = [torch.zeros(n, h, device=DEV), torch.zeros(n, h, device=DEV)]
    streams = (s1, s2)
    calls = 600

    def mask_of(i):
        return torch.roll(bases[i % 3], shifts=(i * 7919) % n)

    mt.masked_row_scatter_(dsts[0].clone(), bases[0], src, accumulate=True, path="triton")  # compile
    torch.cuda.synchronize()
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for i in range(calls):
        which = i % 2
        with torch.cuda.stream(streams[which]):
            if which == 0 and i % 20 == 0:
                gpu_sleep(20_000_000)  # ~10 ms: s1 falls more than a lap (24 maps) behind the host
            mt.masked_row_scatter_(dsts[which], mask_of(i), src, accumulate=True, path="triton")
    torch.cuda.synchronize()
    for which in (0, 1):
        expected = torch.zeros(n, h, device=DEV)
        for i in range(which, calls, 2):
            expected.index_put_((mask_of(i).to(DEV),), src, accumulate=True)
        assert_same(dsts[which], expected, f"stream {which + 1}")


def test_item_tables_across_two_streams():
    """Lists of items accumulated alternately on two streams, one regularly held back: every call stages a
    different item table (other splits, other mask) through the pinned ring into its stream's device buffer,
    so a table overwritten before its kernel ran would show as a wrong sum."""
    from mmmerge_triton import items as mm_items
    from mmmerge_triton.kernel_config import default_config

    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    n, h, k = 3000, 64, 2000
    base = random_mask((n,), k, seed=11)
    src = torch.randint(-8, 8, (k, h), device=DEV).float()
    dsts = [torch.zeros(n, h, device=DEV), torch.zeros(n, h, device=DEV)]
    streams, calls = (s1, s2), 200
    cfg = default_config(h, k, n, False)

    def inputs(i):
        splits = [1 + (i * 37 + j * 11) % 97 for j in range(3 + i % 29)]
        cuts = sorted({min(k, sum(splits[: j + 1])) for j in range(len(splits))} | {k})
        items = [src[a:b] for a, b in zip([0] + cuts[:-1], cuts) if b > a]
        return mm_items.ItemList.of(items), torch.roll(base, shifts=(i * 7919) % n)

    first_items, first_mask = inputs(0)
    mm_items.merge_items(dsts[0].clone(), first_mask, first_items, h, True, cfg)  # compile
    torch.cuda.synchronize()
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for i in range(calls):
        which = i % 2
        with torch.cuda.stream(streams[which]):
            if which == 0 and i % 10 == 0:
                gpu_sleep(20_000_000)  # ~10 ms: stream 1 falls behind while the host stages more tables
            items, mask = inputs(i)
            mm_items.merge_items(dsts[which], mask, items, h, True, cfg)
    torch.cuda.synchronize()
    for which in (0, 1):
        expected = torch.zeros(n, h, device=DEV)
        for i in range(which, calls, 2):
            expected.index_put_((inputs(i)[1].to(DEV),), src, accumulate=True)
        assert_same(dsts[which], expected, f"stream {which + 1}")


@pytest.mark.parametrize("mask_kind", ["cpu", "gpu"])
def test_plan_built_on_one_stream_used_on_another(mask_kind):
    """MergePlan's rule, as for any tensor: the stream that merges waits for the one that built the plan
    (wait_stream), and a plan dropped while that stream's merges are queued is marked with record_stream.
    Here the plan is built late on s_build (behind a sleep), used later still on s_use, then dropped; s_build
    at once allocates memory of the plan's size and zeroes it. Without record_stream the allocator could hand
    the plan's buffer out again, and the merge would read a count of 0."""
    import gc

    s_build, s_use = torch.cuda.Stream(), torch.cuda.Stream()
    mask = random_mask((N,), M, seed=21)
    dst = rand((N, H), torch.bfloat16, seed=22)
    src = rand((M, H), torch.float32, seed=23)
    expected = reference(dst, mask, src, True)
    warm = mt.MergePlan(mask.to(DEV) if mask_kind == "gpu" else mask, device=DEV)
    mt.masked_row_scatter_(dst.clone(), src=src, plan=warm, accumulate=True, path="triton")  # compile
    del warm
    torch.cuda.synchronize()
    s_build.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s_build):
        gpu_sleep(SLEEP_CYCLES // 8)  # the map is written late
        plan = mt.MergePlan(mask.to(DEV, non_blocking=True) if mask_kind == "gpu" else mask, device=DEV)
    s_use.wait_stream(s_build)
    with torch.cuda.stream(s_use):
        gpu_sleep(SLEEP_CYCLES // 4)  # the merge runs after s_build has moved on
        mt.masked_row_scatter_(dst, src=src, plan=plan, accumulate=True, path="triton")
    plan.record_stream(s_use)
    del plan
    gc.collect()
    with torch.cuda.stream(s_build):
        junk = [torch.zeros(N + 8, dtype=torch.int32, device=DEV) for _ in range(4)]
    torch.cuda.synchronize()
    del junk
    assert_same(dst, expected, mask_kind)


# ---------------------------------------------------------------------------------------------------------
# Two GPUs: tensors on cuda:1 while cuda:0 is current
# ---------------------------------------------------------------------------------------------------------
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
NO_SYNC_PATHS = ("triton", "auto")


@two_gpus
@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("mask_kind", ["cpu", "gpu"])
@pytest.mark.parametrize("path", ("auto",) + mt.PATHS)
def test_other_device(path, mask_kind, accumulate):
    d1 = torch.device("cuda", 1)
    with torch.cuda.device(0):
        mask = random_mask((N,), M, seed=7)
        if mask_kind == "gpu":
            mask = mask.to(d1)
        dst = rand((N, H), torch.bfloat16, seed=8, device=d1)
        src = rand((M, H), torch.float32, seed=9, device=d1)
        expected = reference(dst, mask, src, accumulate)
        mt.masked_row_scatter_(dst.clone(), mask, src, accumulate=accumulate, path=path)  # warm-up
        torch.cuda.synchronize(d1)
        assert torch.cuda.current_device() == 0
        # index_put_ with a CPU mask does not sync, except PyTorch's own accumulate=True on a non-current
        # device (seen on two H100s: the same call on the current device does not): allowed there only.
        no_sync = path in NO_SYNC_PATHS or (path == "index_put" and mask_kind == "cpu" and not accumulate)
        if no_sync:
            with sync_debug_error():
                mt.masked_row_scatter_(dst, mask, src, accumulate=accumulate, path=path)
        else:
            mt.masked_row_scatter_(dst, mask, src, accumulate=accumulate, path=path)
        assert torch.cuda.current_device() == 0
        assert torch.cuda.current_stream().device == torch.device("cuda", 0)
    torch.cuda.synchronize(d1)
    assert_same(dst, expected, path)


@two_gpus
@pytest.mark.parametrize("kind", KINDS)
def test_other_device_kernels_and_plans(kind):
    """Every Triton variant (staged CPU mask, fused, two-pass, plans) on cuda:1 while cuda:0 is current, on
    cuda:1's current stream (a non-default one), without a sync. cuda:1's default stream is kept busy, so a
    launch on any other stream than s1 would show in the read-back."""
    d1 = torch.device("cuda", 1)
    with torch.cuda.device(0):
        mask = random_mask((N,), M, seed=10)
        dst = rand((N, H), torch.float16, seed=11, device=d1)
        src = rand((M, H), torch.bfloat16, seed=12, device=d1)
        expected = reference(dst, mask, src, True).cpu()
        op = _op(kind, mask, src, accumulate=True, device=d1)
        op(dst.clone())  # warm-up
        s1 = torch.cuda.Stream(device=d1)
        s1.wait_stream(torch.cuda.current_stream(d1))
        torch.cuda.synchronize(d1)
        with torch.cuda.device(d1):
            if not gpu_sleep(SLEEP_CYCLES):  # on cuda:1's default stream
                pytest.skip("torch.cuda._sleep is unavailable")
        # torch.cuda.stream(s1) makes s1 current on cuda:1 and also switches the current device to cuda:1;
        # the inner device guard switches back to cuda:0 while s1 stays cuda:1's current stream.
        with torch.cuda.stream(s1), torch.cuda.device(0):
            assert torch.cuda.current_device() == 0
            assert torch.cuda.current_stream(d1) == s1
            with sync_debug_error():
                op(dst)
            assert torch.cuda.current_device() == 0
            host = dst.to("cpu")  # copied on cuda:1's current stream, s1
        busy = not torch.cuda.default_stream(d1).query()
        torch.cuda.synchronize(d1)
        assert torch.cuda.current_device() == 0
    assert busy, "cuda:1's default stream finished its sleep too early for this test to mean anything"
    assert_same(host, expected, kind)


@two_gpus
def test_staging_rings_of_two_devices():
    """CPU-mask merges interleaved on cuda:0 and cuda:1: one arena per device, both right."""
    n, h, k = 20000, 16, 9000
    devs = [torch.device("cuda", 0), torch.device("cuda", 1)]
    src = [torch.randint(-8, 8, (k, h), device=d).float() for d in devs]
    dsts = [torch.zeros(n, h, device=d) for d in devs]
    bases = [random_mask((n,), k, seed=i) for i in range(2)]
    calls = 200
    for i in range(calls):
        which = i % 2
        mt.masked_row_scatter_(dsts[which], torch.roll(bases[which], i * 31), src[which], accumulate=True,
                               path="triton")
    for which, d in enumerate(devs):
        torch.cuda.synchronize(d)
        expected = torch.zeros(n, h, device=d)
        for i in range(which, calls, 2):
            expected.index_put_((torch.roll(bases[which], i * 31).to(d),), src[which], accumulate=True)
        assert_same(dsts[which], expected, str(d))
