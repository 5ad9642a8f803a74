"""Row positions on CUDA: ``indexed_row_scatter_(dst, positions, src)`` / ``indexed_row_scatter`` against PyTorch's
``index_copy_`` / ``index_add_`` of ``src.to(dst.dtype)`` into a clone of dst, bit for bit: every dtype pair,
int32 and int64 positions on the CPU and on the device, every path. Device positions are never synced, and on the
Triton path one outside [0, N) is skipped (no device assert: the context stays usable); ``check=True`` copies them
to the host (one sync) and raises for them as for CPU ones. N*H past 2**31; CUDA graphs (device positions
captured, replayed after their contents change; CPU positions refused); threads on streams of their own. The host
checks, the memo, autograd and compile in depth: tests/test_positions.py (CPU, under the Triton interpreter).
"""
import gc
import threading

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402

from gpu_helpers import DTYPE_PAIRS, assert_same, capture, dev, pair_id, rand, sync_debug_error  # noqa: E402

DEV = dev()
GIB = 1 << 30
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
I32, I64 = torch.int32, torch.int64
PLACES = ("cpu_positions", "gpu_positions")
PDTYPES = {"int32": I32, "int64": I64}
PATHS = ("auto", "triton", "index_copy", "index_put")
TRITON_PATHS = ("auto", "triton")  # where device positions out of range are skipped (PyTorch's ops assert)


def positions_of(kind: str, n: int, m: int, dtype=I64, seed: int = 0) -> torch.Tensor:
    """[m] distinct rows of [0, n) on the CPU: sorted, reversed, random order, or every row (m = n)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if kind == "sorted":
        p = perm[:m].sort().values
    elif kind == "reversed":
        p = perm[:m].sort(descending=True).values
    elif kind == "random":
        p = perm[:m]
    elif kind == "all_rows":
        p = perm
    else:
        raise ValueError(kind)
    return p.to(dtype)


def place(positions: torch.Tensor, where: str) -> torch.Tensor:
    return positions.to(DEV) if where == "gpu_positions" else positions


def reference(dst: torch.Tensor, positions: torch.Tensor, src: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """PyTorch's answer on dst's device: a clone of dst after index_copy_ (index_add_) of src.to(dst.dtype)."""
    out = dst.clone()
    index = positions.to(dst.device, torch.long)
    values = src.to(dst.dtype)
    return out.index_add_(0, index, values) if accumulate else out.index_copy_(0, index, values)


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, where: str = "") -> None:
    """Bit for bit (assert_same), float64 included."""
    if actual.dtype == F64:
        assert expected.dtype == F64 and actual.shape == expected.shape, where
        assert torch.equal(actual.view(I64), expected.view(I64)), where
    else:
        assert_same(actual, expected, where)


# ---- PyTorch's result, every pair, both position dtypes and places, every path ----------------------------------

SHAPES = [  # (N, H, M)
    (1, 64, 1),  # N = 1
    (37, 1, 12),  # H = 1
    (300, 123, 100),  # odd H
    (4097, 256, 1500),
    (64, 3584, 64),  # M = N
    (33, 8192, 0),  # M = 0
]
SOME_PAIRS = [(F32, BF16), (BF16, F16), (F16, F32)]


def _params():
    for shape in SHAPES:
        for pair in (DTYPE_PAIRS if shape[:2] == (300, 123) else SOME_PAIRS):
            yield pytest.param(pair, shape, id=f"{pair_id(pair)}-N{shape[0]}-H{shape[1]}-M{shape[2]}")


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("pdtype", PDTYPES.values(), ids=PDTYPES.keys())
@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("pair, shape", list(_params()))
def test_every_path_is_pytorchs(pair, shape, where, pdtype, accumulate):
    src_dt, dst_dt = pair
    n, h, m = shape
    positions = place(positions_of("random", n, m, pdtype, seed=n + h), where)
    dst, src = rand((n, h), dst_dt, seed=1), rand((m, h), src_dt, seed=2)
    dst0 = dst.clone()
    expected = reference(dst, positions, src, accumulate)
    for path in PATHS:
        out = dst.clone()
        assert mt.indexed_row_scatter_(out, positions, src, accumulate=accumulate, path=path) is out
        assert_same(out, expected, f"in place, path={path}")
    new = mt.indexed_row_scatter(dst, positions, src, accumulate=accumulate)
    assert_same(new, expected, "out of place")
    assert_same(dst, dst0, "out of place left dst")


@pytest.mark.parametrize("kind", ["sorted", "reversed", "random", "all_rows"])
@pytest.mark.parametrize("where", PLACES)
def test_orders(where, kind):
    n, h = 500, 96
    positions = place(positions_of(kind, n, n if kind == "all_rows" else 170, I32, seed=3), where)
    dst, src = rand((n, h), BF16, seed=4), rand((positions.shape[0], h), F32, seed=5)
    for accumulate in (False, True):
        out = dst.clone()
        mt.indexed_row_scatter_(out, positions, src, accumulate=accumulate)
        assert_same(out, reference(dst, positions, src, accumulate), f"accumulate={accumulate}")


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("path", ["auto", "index_copy", "index_put"])
def test_float64_on_the_pytorch_paths(path, where):
    """float64 goes through PyTorch (auto takes it there), exact; path="triton" refuses it, writing nothing."""
    n, h, m = 200, 40, 70
    positions = place(positions_of("random", n, m, seed=6), where)
    for dst_dt, src_dt in ((F64, F64), (F64, F32), (F32, F64), (BF16, F64)):
        dst, src = rand((n, h), F32, seed=7).to(dst_dt), rand((m, h), F32, seed=8).to(src_dt)
        for accumulate in (False, True):
            out = dst.clone()
            mt.indexed_row_scatter_(out, positions, src, accumulate=accumulate, path=path)
            assert_equal(out, reference(dst, positions, src, accumulate), f"{dst_dt} <- {src_dt}")
        before = dst.clone()
        with pytest.raises(ValueError, match="float64"):
            mt.indexed_row_scatter_(dst, positions, src, path="triton")
        assert_equal(dst, before)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_index_add_is_one_fp32_add_rounded_once(dtype):
    """The accumulate reference above is CUDA's index_add_; the package adds in fp32 and rounds once. They agree
    for one add per element (this checks it, with cancellations and carries), so the comparisons are exact."""
    dst = rand((512, 256), dtype, seed=9, scale=64.0)
    src = rand((512, 256), dtype, seed=10)
    positions = torch.arange(512, device=DEV)
    assert_same(reference(dst, positions, src, True), (dst.float() + src.float()).to(dtype))


# ---- layouts ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("path", PATHS)
def test_strided_views(path, where):
    """dst a column slice of a wider buffer (the rest of the buffer kept), src every other row of a buffer,
    positions every other entry of a buffer: the result is PyTorch's."""
    n, h, m = 400, 100, 150
    buf = rand((n, h + 28), BF16, seed=11)
    dst = buf[:, 12:12 + h]
    src = rand((2 * m, h), F32, seed=12)[::2]
    pos_buf = torch.full((2 * m,), -1, dtype=I64)
    pos_buf[::2] = positions_of("random", n, m, seed=13)
    positions = place(pos_buf, where)[::2]
    for accumulate in (False, True):
        whole = buf.clone()
        expected = whole.clone()
        expected[:, 12:12 + h] = reference(whole[:, 12:12 + h], positions, src, accumulate)
        mt.indexed_row_scatter_(dst, positions, src, accumulate=accumulate, path=path)
        assert_same(buf, expected, f"accumulate={accumulate}")


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("path", PATHS)
def test_positions_with_the_negative_bit(path, where):
    """positions whose values are p and whose bytes are -p (torch._neg_view): written at p, as index_copy_
    reads them (read raw, device ones would all be skipped as out of range, silently)."""
    n, h, m = 300, 64, 90
    rows = positions_of("random", n, m, seed=14)
    positions = torch._neg_view(place(-rows, where))
    assert positions.is_neg() and torch.equal(positions.cpu(), rows)
    dst, src = rand((n, h), BF16, seed=15), rand((m, h), F32, seed=16)
    out = dst.clone()
    mt.indexed_row_scatter_(out, positions, src, path=path)
    assert_same(out, reference(dst, rows, src))


# ---- device positions: never synced; out of range skipped; check=True ----------------------------------------------

N, H, M = 2000, 128, 600


def _inputs(pdtype=I64, seed=0):
    positions = positions_of("random", N, M, pdtype, seed=seed).to(DEV)
    return rand((N, H), BF16, seed=seed + 1), positions, rand((M, H), F32, seed=seed + 2)


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("entry", ["in_place", "out_of_place"])
@pytest.mark.parametrize("pdtype", PDTYPES.values(), ids=PDTYPES.keys())
@pytest.mark.parametrize("path", ["auto", "triton"])
def test_device_positions_never_sync(path, pdtype, entry, accumulate):
    dst, positions, src = _inputs(pdtype)
    bad = positions.clone()
    bad[::7] = N + 5  # out of range: skipped, still without a sync
    expected = reference(dst, positions, src, accumulate)
    keep = (bad >= 0) & (bad < N)
    expected_bad = reference(dst, bad[keep], src[keep], accumulate)

    def op(d, p):
        if entry == "in_place":
            return mt.indexed_row_scatter_(d, p, src, accumulate=accumulate, path=path)
        return mt.indexed_row_scatter(d, p, src, accumulate=accumulate, path=path)

    op(dst.clone(), positions)  # warm-up: compiles
    fresh, fresh_bad = dst.clone(), dst.clone()
    torch.cuda.synchronize()
    with sync_debug_error():
        out = op(fresh, positions)
        out_bad = op(fresh_bad, bad)
    torch.cuda.synchronize()
    assert_same(out, expected)
    assert_same(out_bad, expected_bad, "out-of-range positions skipped")


def test_empty_and_cpu_positions_never_sync():
    dst, positions, src = _inputs()
    cpu = positions.cpu()
    mt.indexed_row_scatter_(dst.clone(), cpu, src, path="triton")  # warm-up
    empty = torch.zeros(0, dtype=I64, device=DEV)
    fresh = dst.clone()
    torch.cuda.synchronize()
    with sync_debug_error():
        mt.indexed_row_scatter_(fresh, empty, src[:0])
        mt.indexed_row_scatter_(fresh, cpu, src, path="triton")  # checked on the host, staged: no sync either
        mt.indexed_row_scatter_(fresh, cpu, src, path="triton", check=True)  # CPU ones: check costs nothing
    torch.cuda.synchronize()
    assert_same(fresh, reference(reference(dst, cpu, src), cpu, src))


def test_backward_with_device_positions_never_syncs():
    dst, positions, src = _inputs()
    d = dst.float().requires_grad_()
    s = src.clone().requires_grad_()
    upstream = rand((N, H), F32, seed=20)

    def step():
        (mt.indexed_row_scatter(d, positions, s) * upstream).sum().backward()

    step()  # warm-up
    d.grad = s.grad = None
    torch.cuda.synchronize()
    with sync_debug_error():
        step()
    torch.cuda.synchronize()
    ref_d = dst.float().requires_grad_()
    ref_s = src.clone().requires_grad_()
    (ref_d.index_copy(0, positions.long(), ref_s) * upstream).sum().backward()
    assert_same(d.grad, ref_d.grad, "grad_dst")
    assert_same(s.grad, ref_s.grad, "grad_src")


def _bad_values(pdtype, free_row: int):
    """Out of range for N rows; ``free_row`` is a row no other position writes (2**32 + it, cast to int32, would
    write it)."""
    values = [N, N + 1, -1, -N, 2**31 - 1, -(2**31)]
    if pdtype == I64:
        values += [2**40, -(2**40), 2**32 + free_row, 2**32 - 1, 2**63 - 1, -(2**63)]
    return values


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("pdtype", PDTYPES.values(), ids=PDTYPES.keys())
@pytest.mark.parametrize("path", TRITON_PATHS)
def test_out_of_range_device_positions_are_skipped(path, pdtype, accumulate):
    """Each bad value at a few entries (the first, one inside, the last): its src row unused, no row written for
    it, no device assert. Then a sync and a good merge: the context is healthy."""
    dst, positions, src = _inputs(pdtype, seed=30)
    rows = positions.cpu()
    free_row = min(set(range(N)) - set(rows.tolist()))
    for value in _bad_values(pdtype, free_row):
        bad = rows.clone()
        bad[[0, M // 2, M - 1]] = value
        keep = torch.ones(M, dtype=torch.bool)
        keep[[0, M // 2, M - 1]] = False
        expected = reference(dst, bad[keep], src[keep.to(DEV)], accumulate)
        out = dst.clone()
        mt.indexed_row_scatter_(out, bad.to(DEV), src, accumulate=accumulate, path=path)
        new = mt.indexed_row_scatter(dst, bad.to(DEV), src, accumulate=accumulate, path=path)
        torch.cuda.synchronize()  # a device assert would raise here
        assert_same(out, expected, f"value {value}")
        assert_same(new, expected, f"value {value}, out of place")
    every = torch.full((M,), N, dtype=pdtype, device=DEV)  # nothing in range: nothing written
    out = dst.clone()
    mt.indexed_row_scatter_(out, every, src, accumulate=accumulate, path=path)
    torch.cuda.synchronize()
    assert_same(out, dst, "all out of range")
    out = dst.clone()
    mt.indexed_row_scatter_(out, positions, src, accumulate=accumulate, path=path)
    assert_same(out, reference(dst, positions, src, accumulate), "a good merge after")


def test_repeated_device_positions_write_one_of_their_rows():
    """Undefined which row lands (as index_copy_): each element of a repeated row is one of its candidates'
    elements, every other row as PyTorch's."""
    dst, positions, src = _inputs(seed=40)
    bad = positions.clone()
    bad[5] = bad[100]  # rows 5 and 100 of src both go to one row of dst
    out = dst.clone()
    mt.indexed_row_scatter_(out, bad, src)
    torch.cuda.synchronize()
    row = int(bad[100])
    keep = torch.ones(M, dtype=torch.bool, device=DEV)
    keep[[5, 100]] = False
    expected = reference(dst, bad[keep], src[keep])
    others = torch.ones(N, dtype=torch.bool, device=DEV)
    others[row] = False
    assert_same(out[others], expected[others], "other rows")
    got = out[row]
    assert bool(((got == src[5].to(BF16)) | (got == src[100].to(BF16))).all()), "a repeated row mixes other values"


@pytest.mark.parametrize("pdtype", PDTYPES.values(), ids=PDTYPES.keys())
@pytest.mark.parametrize("path", PATHS)
def test_check_true_checks_device_positions_on_the_host(path, pdtype):
    dst, positions, src = _inputs(pdtype, seed=50)
    cases = [(N, IndexError, rf"\bpositions\[7\].*\b{N}\b"), (-1, IndexError, rf"\bpositions\[7\].*\b{N}\b"),
             (int(positions[3]), ValueError, "(?i)repeat")]
    if pdtype == I64:
        cases.append((2**32 + 3, IndexError, r"\bpositions\[7\]"))
    for value, error, message in cases:
        bad = positions.clone()
        bad[7] = value
        for accumulate in (False, True):
            before = dst.clone()
            with pytest.raises(error, match=message):
                mt.indexed_row_scatter_(dst, bad, src, accumulate=accumulate, path=path, check=True)
            with pytest.raises(error, match=message):
                mt.indexed_row_scatter(dst, bad, src, accumulate=accumulate, path=path, check=True)
            torch.cuda.synchronize()
            assert_same(dst, before, f"value {value}")
    out = dst.clone()
    mt.indexed_row_scatter_(out, positions, src, path=path, check=True)
    assert_same(out, reference(dst, positions, src))
    torch.cuda.synchronize()
    with sync_debug_error():  # check=True with device positions copies them to the host: a sync
        with pytest.raises(RuntimeError, match="synchroniz"):
            mt.indexed_row_scatter_(out, positions, src, path=path, check=True)


def test_device_positions_out_of_range_are_skipped_in_the_gradients():
    """grad_src is zero at a skipped position; grad_dst zero at the rows written, grad elsewhere."""
    dst, positions, src = _inputs(seed=60)
    bad = positions.clone()
    bad[[0, 9]] = torch.tensor([N, -3], device=DEV)
    d = dst.float().requires_grad_()
    s = src.clone().requires_grad_()
    upstream = rand((N, H), F32, seed=61)
    (mt.indexed_row_scatter(d, bad, s) * upstream).sum().backward()
    keep = torch.ones(M, dtype=torch.bool, device=DEV)
    keep[[0, 9]] = False
    want_src = torch.zeros_like(src)
    want_src[keep] = upstream[bad[keep]]
    want_dst = upstream.clone()
    want_dst[bad[keep]] = 0
    assert_same(s.grad, want_src, "grad_src")
    assert_same(d.grad, want_dst, "grad_dst")


@pytest.mark.parametrize("pdtype", PDTYPES.values(), ids=PDTYPES.keys())
def test_gradients_are_pytorchs(pdtype):
    dst, positions, src = _inputs(pdtype, seed=62)
    upstream = rand((N, H), F32, seed=63)
    for where in PLACES:
        p = place(positions.cpu(), where)
        for accumulate in (False, True):
            grads = []
            for ours in (True, False):
                d = dst.float().requires_grad_()
                s = src.clone().requires_grad_()
                if ours:
                    out = mt.indexed_row_scatter_(d * 1, p, s, accumulate=accumulate)
                else:
                    op = torch.Tensor.index_add if accumulate else torch.Tensor.index_copy
                    out = op(d * 1, 0, p.to(DEV, torch.long), s)
                (out * upstream).sum().backward()
                grads.append((out.detach(), d.grad, s.grad))
            for g, w, what in zip(*grads, ("result", "grad_dst", "grad_src")):
                assert_same(g, w, f"{where}, accumulate={accumulate}: {what}")


# ---- arguments ------------------------------------------------------------------------------------------------------

def test_positions_on_another_device_are_refused_naming_them():
    dst, positions, src = _inputs()
    before = dst.clone()
    cases = [(dst.cpu(), positions, src.cpu(), r"\bpositions\b is on cuda"),
             (dst, positions.to("meta"), src, r"\bpositions\b is on meta"),
             (dst, positions, src.cpu(), r"\bsrc\b")]
    if torch.cuda.device_count() > 1:
        other = torch.device("cuda", (DEV.index + 1) % torch.cuda.device_count())
        cases.append((dst, positions.to(other), src, rf"\bpositions\b is on {other}"))
    for d, p, s, message in cases:
        for path in PATHS:
            for op in (mt.indexed_row_scatter_, mt.indexed_row_scatter):
                with pytest.raises(ValueError, match=message):
                    op(d, p, s, path=path)
    assert_same(dst, before)


@pytest.mark.parametrize("path", PATHS)
def test_cpu_positions_out_of_range_or_repeated_raise_before_any_write(path):
    dst, positions, src = _inputs(seed=70)
    cpu = positions.cpu()
    for value, error in ((N, IndexError), (-1, IndexError), (int(cpu[0]), ValueError)):
        bad = cpu.clone()
        bad[11] = value
        for accumulate in (False, True):
            for call in (1, 2):  # the second a memo hit of the first's entry
                with pytest.raises(error):
                    mt.indexed_row_scatter_(dst, bad, src, accumulate=accumulate, path=path)
    torch.cuda.synchronize()
    assert_same(dst, _inputs(seed=70)[0])


# ---- N * H past 2**31 -----------------------------------------------------------------------------------------------

BIG_N, BIG_H = 2**18 + 3, 8192  # 2**31 + 24576 elements of bf16: 4.3 GB
BIG_ROWS = sorted({0, 1, 1000, 2**17, 2**18 - 2, 2**18 - 1, 2**18} | set(range(BIG_N - 40, BIG_N)))


def _pattern(rows: torch.Tensor) -> torch.Tensor:
    """dst's initial rows: small integers, exact in bf16."""
    cols = torch.arange(BIG_H, device=DEV, dtype=I32)[None, :]
    return ((rows.to(I32)[:, None] * 7 + cols) % 251 - 125).to(BF16)


@pytest.fixture
def _release():
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("form", ["gpu_int32", "gpu_int64", "cpu_int64"])
def test_rows_past_2_31_elements(_release, form, accumulate):
    """The positions reversed, with one out of range (N) among them on the device (skipped); each written row
    checked, and every other row against the pattern, chunk by chunk."""
    free, _ = torch.cuda.mem_get_info(DEV)
    if free < 12 * GIB:
        pytest.skip(f"needs 12 GiB of free GPU memory, {free / GIB:.1f} GiB free")
    rows = torch.tensor(BIG_ROWS[::-1], dtype=I64)
    if form != "cpu_int64":
        rows = torch.cat([rows[:5], torch.tensor([BIG_N]), rows[5:]])  # skipped
    positions = rows.to(DEV, I32 if form == "gpu_int32" else I64) if form != "cpu_int64" else rows
    src = rand((rows.shape[0], BIG_H), F32, seed=80)
    dst = torch.empty(BIG_N, BIG_H, dtype=BF16, device=DEV)
    try:
        chunk = 4096
        for r0 in range(0, BIG_N, chunk):
            dst[r0:r0 + chunk] = _pattern(torch.arange(r0, min(BIG_N, r0 + chunk), device=DEV))
        mt.indexed_row_scatter_(dst, positions, src, accumulate=accumulate)
        torch.cuda.synchronize()
        valid = rows < BIG_N
        written = rows[valid].to(DEV)
        values = src[valid.to(DEV)].to(BF16)
        if accumulate:
            values = (_pattern(written).float() + values.float()).to(BF16)
        assert_same(dst[written], values, "the rows written")
        is_written = torch.zeros(BIG_N, dtype=torch.bool, device=DEV)
        is_written[written] = True
        for r0 in range(0, BIG_N, chunk):
            r1 = min(BIG_N, r0 + chunk)
            keep = ~is_written[r0:r1]
            expected = _pattern(torch.arange(r0, r1, device=DEV))
            if not torch.equal(dst[r0:r1][keep], expected[keep]):
                assert_same(dst[r0:r1][keep], expected[keep], f"rows {r0}:{r1}")
    finally:
        del dst


# ---- CUDA graphs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("pdtype", PDTYPES.values(), ids=PDTYPES.keys())
@pytest.mark.parametrize("path", ["auto", "triton"])
def test_device_positions_captured_and_replayed(path, pdtype, accumulate):
    """The kernel reads the positions buffer at replay: new contents (new rows, some out of range) each time."""
    dst = rand((N, H), BF16, seed=90)
    src = rand((M, H), F32, seed=91)
    positions = positions_of("random", N, M, pdtype, seed=92).to(DEV)
    g = capture(lambda: mt.indexed_row_scatter_(dst, positions, src, accumulate=accumulate, path=path))
    for seed in (93, 94, 95):
        new_rows = positions_of("random", N, M, pdtype, seed=seed)
        if seed == 95:
            new_rows[::5] = -1  # skipped at replay too
        new_dst, new_src = rand((N, H), BF16, seed=seed + 10), rand((M, H), F32, seed=seed + 20)
        positions.copy_(new_rows)
        dst.copy_(new_dst)
        src.copy_(new_src)
        g.replay()
        torch.cuda.synchronize()
        keep = new_rows >= 0
        assert_same(dst, reference(new_dst, new_rows[keep], new_src[keep.to(DEV)], accumulate), f"replay {seed}")


@pytest.mark.parametrize("path", ["auto", "triton"])
def test_capturing_cpu_positions_raises(path):
    dst, positions, src = _inputs(seed=100)
    cpu = positions.cpu()
    mt.indexed_row_scatter_(dst, cpu, src, path=path)  # warm-up outside capture
    torch.cuda.synchronize()
    before = dst.clone()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="(?i)captur"):
        with torch.cuda.graph(g):
            mt.indexed_row_scatter_(dst, cpu, src, path=path)
    torch.cuda.synchronize()
    assert_same(dst, before)
    out = dst.clone()  # the device is still usable, and the same call works outside capture
    mt.indexed_row_scatter_(out, cpu, src, path=path)
    assert_same(out, reference(dst, cpu, src))


# ---- threads and streams --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("streams", ["own", "default"], ids=["own_streams", "one_default_stream"])
def test_threads(streams):
    """4 threads, each 24 merges (CPU and device positions, int32 and int64, copy and add) queued behind a sleep
    kernel on its own stream (or all on the default stream); every result checked after."""
    n_threads, per_thread = 4, 24
    mt.indexed_row_scatter_(rand((N, H), BF16), positions_of("random", N, M), rand((M, H), F32), path="triton")
    torch.cuda.synchronize()
    results, errors = [], []

    def work(t):
        try:
            stream = torch.cuda.Stream(DEV) if streams == "own" else torch.cuda.current_stream(DEV)
            with torch.cuda.stream(stream):
                if hasattr(torch.cuda, "_sleep"):
                    torch.cuda._sleep(5_000_000)  # the merges queue far ahead of the GPU
                for i in range(per_thread):
                    seed = 1000 * t + i
                    p = positions_of("random", N, M, I32 if i % 2 else I64, seed=seed)
                    p = p.to(DEV, non_blocking=False) if i % 4 < 2 else p
                    dst, src = rand((N, H), BF16, seed=seed + 1), rand((M, H), F32, seed=seed + 2)
                    expected = reference(dst, p, src, i % 3 == 0)
                    mt.indexed_row_scatter_(dst, p, src, accumulate=i % 3 == 0)
                    results.append((f"thread {t} merge {i}", dst, expected))
            stream.synchronize()
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(f"thread {t}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.cuda.synchronize()
    assert errors == []
    assert len(results) == n_threads * per_thread
    for what, got, expected in results:
        assert_same(got, expected, what)


# ---- compile and explain --------------------------------------------------------------------------------------------

def test_compiled_with_device_positions():
    torch._dynamo.reset()
    src = rand((M, H), F32, seed=110)
    table = rand((N, H), BF16, seed=111)

    def fn(scale, positions, src):
        embeds = table * scale
        return mt.indexed_row_scatter(embeds, positions, src) + 1

    compiled = torch.compile(fn, fullgraph=True)
    scale = torch.tensor(2.0, device=DEV, dtype=BF16)
    for seed in (112, 113):  # new contents, same shapes: no positions baked into the graph
        positions = positions_of("random", N, M, I32, seed=seed).to(DEV)
        assert_same(compiled(scale, positions, src), fn(scale, positions, src), f"seed {seed}")
        assert_same(fn(scale, positions, src), reference(table * scale, positions, src) + 1)
    torch._dynamo.reset()


def test_explain_on_cuda():
    dst, positions, src = _inputs()
    decision = mt.explain(dst, src, positions=positions)  # device positions: auto takes the Triton path
    assert (decision.path, decision.kind) == ("triton", "positions") and decision.config is not None, decision
    decision = mt.explain(dst, src, positions=positions.cpu(), path="triton")
    assert (decision.path, decision.kind) == ("triton", "positions"), decision
    decision = mt.explain(dst, src, positions=positions.cpu())  # the CPU-mask table entry's choice
    assert (decision.kind == "positions") == (decision.path == "triton"), decision
    for path in ("index_copy", "index_put"):
        decision = mt.explain(dst, src, positions=positions, path=path)
        assert (decision.path, decision.kind) == (path, None), decision
