"""The pinned staging ring (mmmerge_triton/staging.py): a CPU mask's row map is written into pinned host
memory that the kernel reads when it runs, and the ring reuses that memory lap after lap. Many back-to-back
CPU-mask merges with different masks, with the GPU held back by sleeps so that it runs laps behind the
host, must all stay right: a region rewritten before its kernel ran would scatter rows to the wrong places.
Lists of items stage their tables there too, copied to the ring's device mirror. Each test takes a fresh
arena (the module's dict of arenas is swapped for the test), of the default size. (The ring's protocol under
threads, destroyed streams and growth is checked on a fake GPU in tests/test_staging.py, and on the GPU in
test_threads.py.)
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton import staging  # noqa: E402

from gpu_helpers import assert_same, dev, gpu_sleep, random_mask  # noqa: E402

DEV = dev()


@pytest.fixture
def arena(monkeypatch):
    """A fresh arena for this device (the module's dict of arenas is swapped for the test); its counters
    ``switches`` (quarter switches) and ``growths`` start at 0."""
    monkeypatch.setattr(staging, "_ARENAS", {})
    ar = staging.arena(DEV.index)
    yield ar
    torch.cuda.synchronize()  # nothing may still read the arena once the fixture drops it


def _int_src(k, h, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, (k, h), generator=g).float().to(DEV)  # sums stay exact in fp32


def _replay_reference(n, h, plan):
    """The same sequence of merges through torch (each index_put_ syncs, which is fine here)."""
    expected = torch.zeros(n, h, device=DEV)
    for mask, src, acc in plan():
        expected.index_put_((mask.to(DEV),), src, accumulate=acc)
    return expected


def test_3000_calls_lap_the_ring(arena):
    ar = arena
    rows_per_quarter = ar.quarter_bytes // 4
    k_big = rows_per_quarter // 3 + 1  # two such maps fit in a quarter, a third does not
    k_small = 1000
    n, h = 3 * k_big, 4
    bases = {k_big: [random_mask((n,), k_big, seed=s) for s in range(2)],
             k_small: [random_mask((n,), k_small, seed=10 + s) for s in range(2)]}
    srcs = {k_big: _int_src(k_big, h, 1), k_small: _int_src(k_small, h, 2)}
    calls = 3000

    def sequence():
        for i in range(calls):
            k = k_small if i % 4 == 3 else k_big
            mask = torch.roll(bases[k][i % 2], shifts=(i * 7919) % n)
            yield mask, srcs[k], i % 5 != 0  # every fifth call overwrites

    def merge(i, dst, mask, src, acc):
        if not acc and i % 10 == 5:  # some overwrites as item lists: row map and item tables staged together
            mt.merge_multimodal_embeddings(dst, [src[:17], src[17:500], src[500:]], mask, path="triton")
        else:
            mt.masked_row_scatter_(dst, mask, src, accumulate=acc, path="triton")

    dst = torch.zeros(n, h, device=DEV)
    merge(0, dst.clone(), bases[k_big][0], srcs[k_big], True)  # compile
    merge(5, dst.clone(), bases[k_big][0], srcs[k_big], False)
    merge(0, dst.clone(), bases[k_big][0], srcs[k_big], False)
    torch.cuda.synchronize()
    for i, (mask, src, acc) in enumerate(sequence()):
        if i % 64 == 0:
            gpu_sleep(20_000_000)  # ~10 ms: the host runs more than a lap ahead, then waits on the fence
        merge(i, dst, mask, src, acc)
    torch.cuda.synchronize()
    # 3 big maps and a small one per 4 calls, 2 big maps per quarter: about 1125 switches (281 laps)
    assert ar.switches >= calls // 4, f"only {ar.switches} quarter switches: the ring did not lap"
    assert ar.growths == 0
    assert_same(dst, _replay_reference(n, h, sequence))


def test_growth_keeps_pending_maps_alive(arena):
    """A row map larger than a quarter grows the arena (twice here) while earlier maps are still queued
    (the GPU sleeps): the retired buffers must stay valid until the kernels that read them have run."""
    ar = arena
    q_rows = ar.quarter_bytes // 4
    n, h = 2 * q_rows + 4096, 2
    sizes = [100] * 6 + [q_rows + 100] + [100] * 6 + [2 * q_rows + 2000] + [100] * 20 + [q_rows // 2] * 12
    masks = [random_mask((n,), k, seed=i) for i, k in enumerate(sizes)]
    srcs = {k: _int_src(k, h, k) for k in set(sizes)}

    def sequence():
        for mask, k in zip(masks, sizes):
            yield mask, srcs[k], True

    dst = torch.zeros(n, h, device=DEV)
    mt.masked_row_scatter_(dst.clone(), masks[0], srcs[100], path="triton", accumulate=True)  # compile
    torch.cuda.synchronize()
    quarter_before = ar.quarter_bytes
    gpu_sleep(100_000_000)  # ~50 ms: every merge below is queued behind it
    for mask, src, acc in sequence():
        mt.masked_row_scatter_(dst, mask, src, accumulate=acc, path="triton")
    torch.cuda.synchronize()
    assert ar.growths == 2
    assert ar.quarter_bytes >= 4 * quarter_before
    assert_same(dst, _replay_reference(n, h, sequence))


def test_many_distinct_masks_overwrite(arena):
    """Overwrites of distinct row sets into distinct buffers, queued behind a sleep: each buffer's final
    content shows which row map its kernel read."""
    ar = arena
    k = ar.quarter_bytes // 4 // 2 + 7  # one map per quarter: a lap every 4 calls
    n, h = 2 * k, 8
    n_bufs = 24
    masks = [random_mask((n,), k, seed=100 + i) for i in range(n_bufs)]
    src = _int_src(k, h, 3)
    dsts = [torch.zeros(n, h, device=DEV) for _ in range(n_bufs)]
    mt.masked_row_scatter_(dsts[0].clone(), masks[0], src, path="triton")  # compile
    torch.cuda.synchronize()
    gpu_sleep(50_000_000)
    for d, m in zip(dsts, masks):
        mt.masked_row_scatter_(d, m, src, path="triton")
    torch.cuda.synchronize()
    for i, (d, m) in enumerate(zip(dsts, masks)):
        expected = torch.zeros(n, h, device=DEV)
        expected[m.to(DEV)] = src
        assert_same(d, expected, f"buffer {i}")


def test_growth_keeps_item_tables_in_flight_alive(arena):
    """Lists of items stage their tables in the ring and copy them to its device mirror, which is made on
    first use on the stream current then (s1 here). A row map larger than a quarter grows the ring (and the
    mirror) while item merges queued on the default stream behind a sleep still read the old mirror; s1 then
    allocates and fills memory of the mirror's size. Had the old mirror been freed at the growth, s1's pool
    would hand it out and the queued merges would read 0xFF bytes."""
    ar = arena
    s1 = torch.cuda.Stream()
    q_rows = ar.quarter_bytes // 4
    n, h = 2 * q_rows + 4096, 4
    k_items, k_big = 3000, q_rows + 100
    masks = [random_mask((n,), k_items, seed=200 + i) for i in range(8)]
    big_mask = random_mask((n,), k_big, seed=300)
    src, big_src = _int_src(k_items, h, 4), _int_src(k_big, h, 5)
    splits = [(0, 7, 900, 2999, k_items), (0, 1500, k_items), (0, 1, 2, 3, 1000, k_items)]

    def items(i):
        cuts = splits[i % len(splits)]
        return [src[a:b] for a, b in zip(cuts[:-1], cuts[1:])]

    dsts = [torch.zeros(n, h, device=DEV) for _ in masks]
    scratch = torch.zeros(n, h, device=DEV)
    s1.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s1):  # compile every variant; the mirror is made on s1
        for i in range(len(splits)):
            mt.merge_multimodal_embeddings(scratch, items(i), masks[0], path="triton")
    mt.masked_row_scatter_(scratch, big_mask, big_src, path="triton")
    torch.cuda.synchronize()
    # A fresh ring of the default size again, whose mirror s1 makes.
    staging._ARENAS.clear()
    ar = staging.arena(DEV.index)
    with torch.cuda.stream(s1):
        mt.merge_multimodal_embeddings(scratch, items(0), masks[0], path="triton")
    torch.cuda.synchronize()
    mirror_bytes = ar._mirror.numel()
    gpu_sleep(50_000_000)  # ~25 ms on the default stream: everything below is queued behind it
    for i, (d, m) in enumerate(zip(dsts, masks)):
        mt.merge_multimodal_embeddings(d, items(i), m, path="triton")
        if i == 3:  # the first half read the old mirror
            mt.masked_row_scatter_(scratch, big_mask, big_src, path="triton")
    assert ar.growths == 1
    with torch.cuda.stream(s1):  # runs at once: s1 is idle
        junk = [torch.full((mirror_bytes,), 255, dtype=torch.uint8, device=DEV) for _ in range(4)]
    torch.cuda.synchronize()
    del junk
    for i, (d, m) in enumerate(zip(dsts, masks)):
        expected = torch.zeros(n, h, device=DEV)
        expected[m.to(DEV)] = src
        assert_same(d, expected, f"item merge {i}")
