"""Row positions, on the CPU: ``indexed_row_scatter_(dst, positions, src)`` and ``indexed_row_scatter`` against
PyTorch's ``index_copy_`` / ``index_add_`` of ``src.to(dst.dtype)`` into a clone of the same dst, on every path
("auto", "triton" under the Triton interpreter, "index_copy", "index_put"; ``auto_triton`` is path="auto" made to
choose the Triton path, as the tables do on a GPU). CPU positions are checked on the host before anything is
written (out of range: IndexError naming positions[j] and N; a repeat: ValueError), on the first call of a
signature, on a memo hit and with the memo off alike; argument errors name the argument; out of place, gradients,
torch.compile, the registered ops, inference tensors, explain().

The interpreter rounds a cast into bfloat16 toward zero (conftest.merge_tolerance): the Triton path is compared
within that, every PyTorch path bit for bit. Device positions (never synced, out-of-range ones skipped, CUDA
graphs, threads): tests/gpu/test_positions.py.
"""
from __future__ import annotations

import re
import warnings
from typing import Callable, NamedTuple

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import mmmerge_triton as mm
from mmmerge_triton import core, dispatch

from .conftest import assert_bits_equal, assert_close_ulps, merge_tolerance, truncate_to_bf16

N, H, M = 24, 19, 9  # H odd
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
I32, I64 = torch.int32, torch.int64
DTYPES = (F32, F16, BF16)
TORCH_DTYPES = (F64, *DTYPES)  # float64 merges through the PyTorch paths only
PATHS = ("auto", "auto_triton", "triton", "index_copy", "index_put")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # make_dual's
TRITON_PATHS = ("auto_triton", "triton")
SCATTERS = {"in_place": mm.indexed_row_scatter_, "out_of_place": mm.indexed_row_scatter}
POSITION_DTYPES = {"int32": I32, "int64": I64}


def short(dtype: torch.dtype) -> str:
    return str(dtype)[6:]


# ---- inputs and the oracle ------------------------------------------------------------------------------------

def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=F32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed + 500)).to(dtype)


def positions_of(kind: str, n: int, m: int, dtype=I64, seed: int = 0) -> torch.Tensor:
    """[m] distinct rows of [0, n): ``sorted``, ``reversed``, ``random`` (a random order), ``all_rows`` (a
    permutation of every row, m = n), ``in_order`` (0..n-1)."""
    perm = torch.randperm(n, generator=generator(seed))
    if kind == "sorted":
        p = perm[:m].sort().values
    elif kind == "reversed":
        p = perm[:m].sort(descending=True).values
    elif kind == "random":
        p = perm[:m]
    elif kind == "all_rows":
        p = perm
    elif kind == "in_order":
        p = torch.arange(n)
    else:
        raise ValueError(kind)
    return p.to(dtype)


def torch_scatter(dst: torch.Tensor, positions: torch.Tensor, src: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """PyTorch's answer: a clone of dst after index_copy_ (index_add_) of src cast to dst's dtype. (index_copy_
    takes int64 positions alone.)"""
    out = dst.detach().clone()
    index = positions.detach().resolve_neg().long()
    values = src.detach().to(dst.dtype)
    return out.index_add_(0, index, values) if accumulate else out.index_copy_(0, index, values)


def tolerance(src_dtype, dst_dtype, accumulate: bool, path: str):
    return merge_tolerance(src_dtype, dst_dtype, accumulate, "triton" if path in TRITON_PATHS else path)


def assert_scattered(out, dst_before, positions, src, accumulate: bool, path: str, what: str = "result") -> None:
    """``out`` is the scatter of src into dst_before at positions: the rows not written bit for bit dst_before's,
    the written rows PyTorch's (within the interpreter's tolerance on the Triton path)."""
    expected = torch_scatter(dst_before, positions, src, accumulate)
    assert out.shape == expected.shape and out.dtype == expected.dtype, what
    written = torch.zeros(dst_before.shape[0], dtype=torch.bool)
    written[positions.detach().resolve_neg().long()] = True
    out, dst_before = out.detach().resolve_neg(), dst_before.detach().resolve_neg()
    assert_bits_equal(out[~written], dst_before[~written], f"{what}: rows not at positions")
    tol = tolerance(src.dtype, dst_before.dtype, accumulate, path)
    candidates = [expected[written]]
    if tol.truncated_src:
        candidates.append(torch_scatter(dst_before, positions, truncate_to_bf16(src.detach()), accumulate)[written])
    assert_close_ulps(out[written], candidates, tol.ulps, f"{what}: rows at positions")


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """PyTorch's CPU ops on these tiny tensors in one thread: index_add_ runs through OpenMP, and on a busy
    2-core machine each call waited ~60 ms for its second thread (µs in one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scatter(entry: str, dst, positions, src, **kwargs):
    return SCATTERS[entry](dst, positions, src, **kwargs)


# ---- every dtype pair, both position dtypes, both modes -------------------------------------------------------

def _pair_params():
    for path in PATHS:
        dtypes = DTYPES if path == "triton" else TORCH_DTYPES
        for s in dtypes:
            for d in dtypes:
                yield pytest.param(path, s, d, id=f"{path}-{short(s)}->{short(d)}")


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("pdtype", POSITION_DTYPES.values(), ids=POSITION_DTYPES.keys())
@pytest.mark.parametrize("path, src_dtype, dst_dtype", list(_pair_params()))
def test_every_dtype_pair_is_pytorchs(route, path, src_dtype, dst_dtype, pdtype, accumulate):
    api_path = route(path)
    dst = randn(N, H, dtype=dst_dtype, seed=1)
    src = randn(M, H, dtype=src_dtype, seed=2)
    positions = positions_of("random", N, M, pdtype, seed=3)
    before = dst.clone()
    assert mm.indexed_row_scatter_(dst, positions, src, accumulate=accumulate, path=api_path) is dst
    assert_scattered(dst, before, positions, src, accumulate, path)


def test_half_types_accumulate_as_index_add():
    """accumulate adds in fp32 and rounds once, as the mask path does; PyTorch's CPU index_add_ on a half-type
    dst gives the same bits for one add per element (observed: no difference over these 4096 sums each, which
    include cancellations and carries), so the comparisons above are exact there too."""
    for dt in (F16, BF16):
        dst = randn(64, 64, dtype=dt, seed=4) * 64
        src = randn(64, 64, dtype=dt, seed=5)
        positions = torch.arange(64)
        fp32_once = (dst.float() + src.float()).to(dt)
        assert_bits_equal(torch_scatter(dst, positions, src, True), fp32_once, f"{dt} index_add_")
        out = dst.clone()
        mm.indexed_row_scatter_(out, positions, src, accumulate=True, path="index_copy")
        assert_bits_equal(out, fp32_once, f"{dt} path=index_copy")


# ---- orders and sizes -----------------------------------------------------------------------------------------

# name -> (N, H, positions as a function of the positions dtype)
SHAPES = {
    "sorted": (40, H, lambda d: positions_of("sorted", 40, 13, d)),
    "reversed": (40, H, lambda d: positions_of("reversed", 40, 13, d)),
    "random": (40, H, lambda d: positions_of("random", 40, 13, d, seed=1)),
    "all_rows_permuted": (N, H, lambda d: positions_of("all_rows", N, N, d, seed=2)),
    "all_rows_in_order": (N, 16, lambda d: positions_of("in_order", N, N, d)),
    "all_rows_reversed": (N, 16, lambda d: positions_of("in_order", N, N, d).flip(0)),
    "first_row_only": (N, H, lambda d: torch.tensor([0], dtype=d)),
    "last_row_only": (N, H, lambda d: torch.tensor([N - 1], dtype=d)),
    "n_1": (1, 7, lambda d: torch.tensor([0], dtype=d)),
    "h_1": (33, 1, lambda d: positions_of("random", 33, 11, d, seed=3)),
    "h_37_n_64": (64, 37, lambda d: positions_of("random", 64, 30, d, seed=4)),
    "h_0": (N, 0, lambda d: positions_of("random", N, M, d, seed=5)),
    "empty": (N, H, lambda d: torch.zeros(0, dtype=d)),
    "empty_n_1": (1, H, lambda d: torch.zeros(0, dtype=d)),
}


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("pdtype", POSITION_DTYPES.values(), ids=POSITION_DTYPES.keys())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_orders_and_sizes(route, shape, path, pdtype, accumulate):
    api_path = route(path)
    n, h, make = SHAPES[shape]
    positions = make(pdtype)
    dst = randn(n, h, dtype=BF16, seed=5)
    src = randn(positions.shape[0], h, dtype=F32, seed=6)
    before = dst.clone()
    assert mm.indexed_row_scatter_(dst, positions, src, accumulate=accumulate, path=api_path) is dst
    assert_scattered(dst, before, positions, src, accumulate, path)


# ---- layouts: strided and offset views, negative bits, shared bytes -----------------------------------------

class Case(NamedTuple):
    buffer: torch.Tensor  # what holds dst (compared whole: nothing outside dst's elements may change)
    dst: torch.Tensor
    positions: torch.Tensor
    src: torch.Tensor


def _plain(pdtype, n=N, h=H) -> Case:
    dst = randn(n, h, seed=7)
    return Case(dst, dst, positions_of("random", n, M, pdtype, seed=8), randn(M, h, seed=9))


def _dst_columns(pdtype) -> Case:
    buf = randn(N, H + 7, seed=10)
    return _plain(pdtype)._replace(buffer=buf, dst=buf[:, 3:3 + H])


def _dst_every_other_row(pdtype) -> Case:
    buf = randn(2 * N, H, seed=11)
    return _plain(pdtype)._replace(buffer=buf, dst=buf[1::2])


def _dst_offset_by_one_element(pdtype) -> Case:
    buf = randn(N * H + 1, seed=12)
    return _plain(pdtype)._replace(buffer=buf, dst=buf[1:].view(N, H))


def _dst_transposed(pdtype) -> Case:
    buf = randn(H, N, seed=13)
    return _plain(pdtype)._replace(buffer=buf, dst=buf.t())


def _dst_negative_bit(pdtype) -> Case:
    raw = randn(N, H, seed=14)
    return _plain(pdtype)._replace(buffer=raw, dst=torch._neg_view(raw))


def _src(make) -> Callable:
    return lambda pdtype: _plain(pdtype)._replace(src=make(randn(M, H, seed=15)))


def _positions(make) -> Callable:
    def case(pdtype):
        c = _plain(pdtype)
        return c._replace(positions=make(c.positions))
    return case


def _strided(p: torch.Tensor) -> torch.Tensor:
    buf = torch.full((2 * p.shape[0],), -1, dtype=p.dtype)  # the entries between them are out of range
    buf[::2] = p
    return buf[::2]


def _offset(p: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.full((1,), -1, dtype=p.dtype), p])[1:]  # its address 4 or 8 bytes past 16


def _positions_of_dsts_bytes(pdtype) -> Case:
    """positions viewing dst's own first row (whose bytes read as small ints: float32 subnormals), and one of
    them is row 0 itself: read before the write (or refused, as PyTorch refuses it)."""
    dst = randn(N, 20, seed=16)
    positions = dst.view(pdtype)[0, :M]
    positions.copy_(positions_of("random", N - 1, M, pdtype, seed=17) + 1)  # rows 1..N-1, then row 0 once
    positions[M // 2] = 0
    return Case(dst, dst, positions, randn(M, 20, seed=18))


LAYOUTS = {
    "dst_column_slice": _dst_columns,
    "dst_every_other_row": _dst_every_other_row,
    "dst_offset_by_one_element": _dst_offset_by_one_element,
    "dst_transposed": _dst_transposed,
    "dst_negative_bit": _dst_negative_bit,
    "src_every_other_row": _src(lambda s: torch.cat([s, s]).view(M, 2, H)[:, 0]),
    "src_column_slice": _src(lambda s: torch.cat([s, s], 1)[:, 5:5 + H]),
    "src_transposed": _src(lambda s: s.t().contiguous().t()),
    "src_expanded_row": _src(lambda s: s[:1].expand(M, H)),
    "src_negative_bit": _src(lambda s: torch._neg_view(s)),
    "positions_strided": _positions(_strided),
    "positions_offset": _positions(_offset),
    "positions_negative_bit": _positions(lambda p: torch._neg_view(-p)),  # values p, raw bytes -p
    "positions_of_dsts_bytes": _positions_of_dsts_bytes,
}
# The Triton path may refuse these dsts (no unit-stride rows; a negated dst), naming why; "auto" must merge them.
TRITON_MAY_REFUSE = {"dst_transposed": "rows", "dst_negative_bit": "negative bit"}


@pytest.mark.parametrize("entry", SCATTERS)
@pytest.mark.parametrize("pdtype", POSITION_DTYPES.values(), ids=POSITION_DTYPES.keys())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_are_pytorchs(route, layout, path, pdtype, entry):
    api_path = route(path)
    case = LAYOUTS[layout](pdtype)
    dst_before = case.dst.clone()  # dst's values (a negated view's are the negated bytes)
    buffer_before = case.buffer.clone()
    positions_before = case.positions.clone()  # read before the write: they may be dst's bytes
    src_before = case.src.clone()
    try:
        out = scatter(entry, case.dst, case.positions, case.src, path=api_path)
    except (ValueError, RuntimeError) as error:
        refusable = layout == "positions_of_dsts_bytes" or (path == "triton" and layout in TRITON_MAY_REFUSE)
        if not refusable:
            raise
        if layout in TRITON_MAY_REFUSE:
            assert isinstance(error, ValueError) and TRITON_MAY_REFUSE[layout] in str(error), error
        assert_bits_equal(case.buffer, buffer_before, f"written before {type(error).__name__}: {error}")
        return
    if entry == "in_place":
        assert out is case.dst
    else:
        assert out.is_contiguous() and not out.is_neg()
        assert_bits_equal(case.buffer, buffer_before, "out of place wrote its input")
    assert_scattered(out, dst_before, positions_before, src_before, False, path)
    if entry == "in_place" and case.buffer.data_ptr() != case.dst.data_ptr():  # nothing else of the buffer written
        whole = buffer_before.clone()
        whole.as_strided(case.dst.shape, case.dst.stride(), case.dst.storage_offset()).copy_(case.dst)
        assert_bits_equal(case.buffer, whole, "the buffer under dst")
    if layout != "positions_of_dsts_bytes":
        assert_bits_equal(case.positions.resolve_neg(), positions_before.resolve_neg(), "positions")
    assert_bits_equal(case.src.resolve_neg(), src_before.resolve_neg(), "src")


@pytest.mark.parametrize("path", PATHS)
def test_layouts_in_turn_on_one_memo(route, path):
    """The layouts above one after another and back, the memo kept: each call gets its own result (an entry
    made for one layout never runs another's inputs)."""
    api_path = route(path)
    names = [name for name in LAYOUTS
             if name not in TRITON_MAY_REFUSE and name not in ("positions_of_dsts_bytes", "positions_negative_bit")]
    for i, name in enumerate(names + names[::-1]):
        case = LAYOUTS[name](I64 if i % 3 else I32)
        before = case.dst.clone()
        mm.indexed_row_scatter_(case.dst, case.positions, case.src, accumulate=bool(i % 2), path=api_path)
        assert_scattered(case.dst, before, case.positions, case.src, bool(i % 2), path, name)


@pytest.mark.parametrize("path", PATHS)
def test_in_place_into_rows_sharing_memory_is_refused(route, path):
    """dst's rows all one row of memory (expand): index_copy_ refuses the write ("more than one element of the
    written-to tensor refers to a single memory location"), where which src row lands would depend on the order
    of the writes. Refused before anything is written; out of place (a copy) merges."""
    api_path = route(path)
    row = randn(1, H, seed=19)
    dst, positions, src = row.expand(N, H), torch.tensor(GOOD), randn(M, H, seed=20)
    with pytest.raises(RuntimeError, match="single memory location"):  # PyTorch's answer
        row.clone().expand(N, H).index_copy_(0, positions, src)
    before = row.clone()
    with pytest.raises((RuntimeError, ValueError)):
        mm.indexed_row_scatter_(dst, positions, src, path=api_path)
    assert_bits_equal(row, before)
    out = mm.indexed_row_scatter(dst, positions, src, path=api_path)
    assert_scattered(out, dst.contiguous(), positions, src, False, path)


# ---- outcomes, first call against memo hit against the memo switched off -------------------------------------

class Outcome(NamedTuple):
    error: type | None
    message: str
    values: tuple


def outcome(call: Callable, *watched: torch.Tensor) -> Outcome:
    """Runs call(); on an error, asserts that the watched tensors (dst, positions, src) are byte for byte as
    they were."""
    before = [t.detach().clone() for t in watched]
    try:
        result = call()
    except Exception as error:  # noqa: BLE001 - compared with the other runs', whatever it is
        for i, (t, b) in enumerate(zip(watched, before)):
            assert_bits_equal(t.detach(), b, f"tensor {i} written before {type(error).__name__}: {error}")
        return Outcome(type(error), str(error), ())
    return Outcome(None, "", tuple(t.detach().clone() for t in (result, *watched)))


def assert_same(actual: Outcome, expected: Outcome, what: str) -> None:
    assert (actual.error, actual.message) == (expected.error, expected.message), (
        f"{what}: {actual.error} {actual.message!r}, where {expected.error} {expected.message!r}")
    assert len(actual.values) == len(expected.values), what
    for i, (a, e) in enumerate(zip(actual.values, expected.values)):
        assert_bits_equal(a, e, f"{what}, value {i}")


@pytest.fixture
def prepared(monkeypatch):
    """The memo keys core._prepare is called with (None: a call without a signature)."""
    made = []
    real = core._prepare
    monkeypatch.setattr(core, "_prepare", lambda key, *args: made.append(key) or real(key, *args))
    return made


def memo_off(monkeypatch, call: Callable, *watched) -> Outcome:
    """The outcome with the memo switched off: core._signature returns None, so every call is prepared."""
    with monkeypatch.context() as patch:
        patch.setattr(core, "_signature", lambda *args, **kwargs: None)
        return outcome(call, *watched)


# ---- positions out of range or repeated: checked on the host, before any write --------------------------------

def _set(j: int, value) -> Callable:
    """The good positions with entry j replaced by value (int, or a function of the positions)."""
    def make(p):
        p = p.clone()
        p[j] = value(p) if callable(value) else value
        return p
    return make


GOOD = [5, 17, 0, 9, 23, 2, 11, 14, 20]  # M = 9 distinct rows of N = 24, no order; 1, 3, 4, ... unused
assert len(GOOD) == M and len(set(GOOD)) == M

# name -> (positions from the good ones (and the dtype), the error, a regex of its message, a same-signature twin)
OUT_OF_RANGE = {
    "n": (_set(4, N), 4),
    "n_plus_one": (_set(4, N + 1), 4),
    "minus_one": (_set(4, -1), 4),
    "minus_n": (_set(4, -N), 4),
    "minus_n_minus_one": (_set(4, -N - 1), 4),
    "first_entry": (_set(0, N), 0),
    "last_entry": (_set(M - 1, N + 7), M - 1),
    "int32_max": (_set(4, 2**31 - 1), 4),
    "int32_min": (_set(4, -(2**31)), 4),
    "int64_huge": (_set(4, 2**62), 4),
    "int64_min": (_set(4, -(2**63)), 4),
    "int64_wraps_to_a_free_row_in_int32": (_set(4, 2**32 + 3), 4),  # row 3 is free: a cast to int32 would pass
    "int64_wraps_to_minus_one_in_int32": (_set(4, 2**32 - 1), 4),
}
REPEATED = {
    "adjacent": _set(4, lambda p: int(p[3])),
    "apart": _set(7, lambda p: int(p[1])),
    "first_and_last": _set(M - 1, lambda p: int(p[0])),
    "all_the_same": lambda p: torch.full_like(p, 5),
    "in_sorted_order": lambda p: torch.tensor(sorted(GOOD[:-1] + [GOOD[3]]), dtype=p.dtype),
    "in_reversed_order": lambda p: torch.tensor(sorted(GOOD[:-1] + [GOOD[3]], reverse=True), dtype=p.dtype),
    "expanded": lambda p: p[:1].expand(M),  # one row M times (stride 0)
    "strided": lambda p: _strided(_set(6, lambda q: int(q[2]))(p)),
}
INT64_ONLY = {"int64_huge", "int64_min", "int64_wraps_to_a_free_row_in_int32", "int64_wraps_to_minus_one_in_int32"}


def _bad_params():
    for name in OUT_OF_RANGE:
        for pname, pdtype in POSITION_DTYPES.items():
            if pdtype == I64 or name not in INT64_ONLY:
                yield pytest.param("out_of_range", name, pdtype, id=f"out_of_range-{name}-{pname}")
    for name in REPEATED:
        for pname, pdtype in POSITION_DTYPES.items():
            yield pytest.param("repeated", name, pdtype, id=f"repeated-{name}-{pname}")


def bad_positions(kind: str, name: str, pdtype) -> tuple[torch.Tensor, type, str]:
    good = torch.tensor(GOOD, dtype=pdtype)
    if kind == "out_of_range":
        make, j = OUT_OF_RANGE[name]
        return make(good), IndexError, rf"\bpositions\[{j}\].*\b{N}\b"
    return REPEATED[name](good), ValueError, r"(?i)repeat"


FLAGS = [dict(), dict(accumulate=True), dict(check=True), dict(accumulate=True, check=True)]
GOOD_TWIN_FLAGS = (0, 3)  # where a good call of the signature runs too (the Triton path is slow interpreted)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind, name, pdtype", list(_bad_params()))
def test_bad_cpu_positions_raise_before_any_write_on_every_call(monkeypatch, route, prepared, kind, name, pdtype,
                                                                path):
    """Each bad input, in place and out of place, with each flag: its first call, a second call (a memo hit of
    the entry the first made, as the positions are checked per call), the memo switched off, and a call after a
    good call of its signature (a hit of the good call's entry) raise the spec's error with the same text, and
    write nothing; the good calls between them merge right."""
    api_path = route(path)
    positions, error, message = bad_positions(kind, name, pdtype)
    assert positions.dtype == pdtype
    for entry in SCATTERS:
        for i, flags in enumerate(FLAGS):
            what = f"{entry} {flags}"
            dispatch.clear_cache()
            del prepared[:]

            def make():
                return randn(N, H, seed=20), positions.clone(), randn(M, H, dtype=BF16, seed=21)

            def bad(dst, p, src):
                return lambda: scatter(entry, dst, p, src, path=api_path, **flags)

            first = outcome(bad(*(args := make())), *args)
            assert first.error is error and re.search(message, first.message), f"{what}: {first}"
            second = outcome(bad(*(args := make())), *args)
            assert_same(second, first, f"{what}: second call against the first")
            assert_same(memo_off(monkeypatch, bad(*(args := make())), *args), first, f"{what}: memo off")
            if i not in GOOD_TWIN_FLAGS:
                continue
            # a good call of the same shapes and dtypes, then the bad one again, then the good one
            dst, _, src = make()
            good = torch.tensor(GOOD, dtype=pdtype)
            before = dst.clone()
            out = scatter(entry, dst, good, src, path=api_path, **flags)
            assert_scattered(out, before, good, src, flags.get("accumulate", False), path, f"{what}: good call")
            keys = [k for k in prepared if k is not None]
            after_good = outcome(bad(*(args := make())), *args)
            assert_same(after_good, first, f"{what}: after a good call of its signature")
            if positions.is_contiguous():  # the same signature as the good call: no entry prepared afresh
                assert [k for k in prepared if k is not None] == keys, f"{what}: the bad call was not a memo hit"
            dst, _, src = make()
            before = dst.clone()
            out = scatter(entry, dst, good, src, path=api_path, **flags)
            assert_scattered(out, before, good, src, flags.get("accumulate", False), path, f"{what}: good call after")


@pytest.mark.parametrize("path", PATHS)
def test_one_row_positions_out_of_range_and_repeated(route, path):
    """N = 1: [1] is out of range, [0, 0] repeats (and [-1] is out of range, not the last row)."""
    api_path = route(path)
    for positions, error in [([1], IndexError), ([-1], IndexError), ([0, 0], ValueError)]:
        for pdtype in (I32, I64):
            p = torch.tensor(positions, dtype=pdtype)
            dst, src = randn(1, H, seed=22), randn(len(positions), H, seed=23)
            before = dst.clone()
            with pytest.raises(error, match=r"\bpositions\[0\].*\b1\b" if error is IndexError else "(?i)repeat"):
                mm.indexed_row_scatter_(dst, p, src, path=api_path)
            assert_bits_equal(dst, before)


@pytest.mark.parametrize("path", PATHS)
def test_all_rows_but_one_repeated(route, path):
    """M = N with one row written twice (and so one row left out): refused, whatever the order."""
    api_path = route(path)
    for order in ("in_order", "all_rows"):
        p = positions_of(order, N, N, seed=24)
        p[7] = p[8]
        dst = randn(N, H, seed=25)
        before = dst.clone()
        for accumulate in (False, True):
            with pytest.raises(ValueError, match="(?i)repeat"):
                mm.indexed_row_scatter_(dst, p, randn(N, H, seed=26), accumulate=accumulate, path=api_path)
        assert_bits_equal(dst, before)


# ---- argument errors name the argument ---------------------------------------------------------------------

def _kw(**kwargs):
    return lambda d, p, s: (d, p, s, kwargs)


# name -> (a function (dst, positions, src) -> (dst, positions, src, keyword arguments), error types, regex)
ARGUMENTS = {
    "positions_bool": (lambda d, p, s: (d, torch.ones(M, dtype=torch.bool), s, {}), TypeError, r"\bpositions\b"),
    "positions_float32": (lambda d, p, s: (d, p.float(), s, {}), TypeError, r"\bpositions\b"),
    "positions_float64": (lambda d, p, s: (d, p.double(), s, {}), TypeError, r"\bpositions\b"),
    "positions_uint8": (lambda d, p, s: (d, p.to(torch.uint8), s, {}), TypeError, r"\bpositions\b"),
    "positions_int8": (lambda d, p, s: (d, p.to(torch.int8), s, {}), TypeError, r"\bpositions\b"),
    "positions_int16": (lambda d, p, s: (d, p.to(torch.int16), s, {}), TypeError, r"\bpositions\b"),
    "positions_list": (lambda d, p, s: (d, p.tolist(), s, {}), TypeError, r"\bpositions\b"),
    "positions_numpy": (lambda d, p, s: (d, p.numpy(), s, {}), TypeError, r"\bpositions\b"),
    "positions_2d_row": (lambda d, p, s: (d, p[None], s, {}), ValueError, r"\bpositions\b"),
    "positions_2d_column": (lambda d, p, s: (d, p[:, None], s, {}), ValueError, r"\bpositions\b"),
    "positions_0d": (lambda d, p, s: (d, p[0], s[:1], {}), ValueError, r"\bpositions\b"),
    "positions_on_meta": (lambda d, p, s: (d, p.to("meta"), s, {}), ValueError, r"\bpositions\b is on meta"),
    "positions_sparse": (lambda d, p, s: (d, p.to_sparse(), s, {}), TypeError, r"\bpositions\b"),
    "one_position_more": (lambda d, p, s: (d, torch.cat([p, p.new_tensor([1])]), s, {}), ValueError,
                          r"\bpositions\b.*\bsrc\b"),
    "one_position_fewer": (lambda d, p, s: (d, p[:-1], s, {}), ValueError, r"\bpositions\b.*\bsrc\b"),
    "no_positions_for_rows": (lambda d, p, s: (d, p[:0], s, {}), ValueError, r"\bpositions\b.*\bsrc\b"),
    "positions_for_no_rows": (lambda d, p, s: (d, p, s[:0], {}), ValueError, r"\bpositions\b.*\bsrc\b"),
    "dst_3d": (lambda d, p, s: (d.view(2, N // 2, H), p, s, {}), ValueError, r"\bdst\b"),
    "dst_3d_batch_of_one": (lambda d, p, s: (d[None], p, s, {}), ValueError, r"\bdst\b"),
    "dst_1d": (lambda d, p, s: (d[0], p, s, {}), ValueError, r"\bdst\b"),
    "dst_int64": (lambda d, p, s: (d.long(), p, s, {}), TypeError, r"\bdst\b"),
    "dst_numpy": (lambda d, p, s: (d.numpy(), p, s, {}), TypeError, r"\bdst\b"),
    "src_int32": (lambda d, p, s: (d, p, s.int(), {}), TypeError, r"\bsrc\b"),
    "src_hidden_size": (lambda d, p, s: (d, p, s[:, :-1], {}), ValueError, r"\bsrc\b"),
    "src_1d": (lambda d, p, s: (d, p, s[0], {}), ValueError, r"\bsrc\b"),
    "src_3d": (lambda d, p, s: (d, p, s[None], {}), ValueError, r"\bsrc\b"),
    "src_on_meta": (lambda d, p, s: (d, p, s.to("meta"), {}), ValueError, r"\bsrc\b is on meta"),
    "src_list": (lambda d, p, s: (d, p, [s], {}), TypeError, r"\bsrc\b"),
    "src_is_dsts_rows": (lambda d, p, s: (d, p, d[N - M:], {}), ValueError, r"\bsrc\b shares memory"),
    "path_masked_scatter": (_kw(path="masked_scatter"), ValueError, r"\bpath\b"),
    "path_unknown": (_kw(path="fast"), ValueError, r"\bpath\b"),
    "path_not_a_str": (_kw(path=3), TypeError, r"\bpath\b"),
    "accumulate_int": (_kw(accumulate=1), TypeError, r"\baccumulate\b"),
    "check_int": (_kw(check=1), TypeError, r"\bcheck\b"),
    "check_count_keyword": (_kw(check_count=True), TypeError, r"check_count"),  # the mask API's name
}
PATH_CASES = {"path_masked_scatter", "path_unknown", "path_not_a_str"}
IN_PLACE_ONLY = {"src_is_dsts_rows"}  # out of place, dst's copy is written: test_out_of_place_src_of_dsts_rows


def _argument_params():
    for name in ARGUMENTS:
        for path in (["auto"] if name in PATH_CASES else PATHS):
            yield pytest.param(name, path, id=f"{name}-{path}")


@pytest.mark.parametrize("pdtype", POSITION_DTYPES.values(), ids=POSITION_DTYPES.keys())
@pytest.mark.parametrize("name, path", list(_argument_params()))
def test_argument_errors_name_the_argument_on_every_call(monkeypatch, route, name, path, pdtype):
    api_path = route(path)
    make, error, message = ARGUMENTS[name]
    for entry in SCATTERS:
        if entry == "out_of_place" and name in IN_PLACE_ONLY:
            continue
        dispatch.clear_cache()
        outcomes = []
        for run in ("first", "second", "memo_off"):
            d, p, s, kwargs = make(randn(N, H, seed=30), torch.tensor(GOOD, dtype=pdtype), randn(M, H, seed=31))
            kwargs = {"path": api_path, **kwargs}
            watched = [t for t in (d, p, s) if isinstance(t, torch.Tensor) and t.device.type == "cpu"
                       and t.layout == torch.strided]
            call = lambda: scatter(entry, d, p, s, **kwargs)  # noqa: E731
            outcomes.append(memo_off(monkeypatch, call, *watched) if run == "memo_off" else outcome(call, *watched))
        first = outcomes[0]
        assert first.error is error and re.search(message, first.message), f"{entry}: {first}"
        for run, other in zip(("second", "memo_off"), outcomes[1:]):
            assert_same(other, first, f"{entry}: {run} against the first call")


@pytest.mark.parametrize("entry", SCATTERS)
def test_path_triton_refuses_float64_naming_it(entry):
    for dst_dtype, src_dtype in ((F64, F64), (F64, F32), (F32, F64)):
        dst, src = randn(N, H, dtype=dst_dtype, seed=32), randn(M, H, dtype=src_dtype, seed=33)
        before = dst.clone()
        with pytest.raises(ValueError, match=r"path='triton'.*float64"):
            scatter(entry, dst, torch.tensor(GOOD), src, path="triton")
        assert_bits_equal(dst, before)


def test_positions_and_src_are_required():
    dst = randn(N, H)
    with pytest.raises(TypeError):
        mm.indexed_row_scatter_(dst, None, randn(M, H))
    with pytest.raises(TypeError):
        mm.indexed_row_scatter(dst, torch.tensor(GOOD), None)


# ---- positions changed between calls: no stale check, no stale values ------------------------------------------

@pytest.mark.parametrize("pdtype", POSITION_DTYPES.values(), ids=POSITION_DTYPES.keys())
@pytest.mark.parametrize("path", PATHS)
def test_positions_changed_between_calls(route, path, pdtype):
    """One positions tensor, rewritten between calls of one signature: through copy_ (its version moves) and
    through numpy (it does not). Every call merges at the values it holds then, or raises for them."""
    api_path = route(path)
    positions = torch.tensor(GOOD, dtype=pdtype)
    src = randn(M, H, dtype=F16, seed=40)
    host = positions.numpy()  # writes through it bypass the version counter
    kept = {}

    def out_of_range():
        kept[2] = int(host[2])
        host[2] = N

    steps = [
        ("as given", None, None),
        ("copy_ another permutation", lambda: positions.copy_(positions_of("random", N, M, pdtype, seed=41)), None),
        ("numpy: out of range", out_of_range, IndexError),
        ("numpy: back in range", lambda: host.__setitem__(2, kept[2]), None),
        ("numpy: a repeat", lambda: host.__setitem__(5, host[6]), ValueError),
        ("numpy: a new permutation", lambda: host.__setitem__(slice(None), list(range(N - 1, N - 1 - M, -1))), None),
        ("copy_: a repeat", lambda: positions[3:4].copy_(positions[0:1]), ValueError),
        ("copy_: -1", lambda: positions.copy_(torch.tensor(GOOD, dtype=pdtype)).__setitem__(8, -1), IndexError),
        ("copy_: the first ones", lambda: positions.copy_(torch.tensor(GOOD, dtype=pdtype)), None),
    ]
    for accumulate in (False, True):
        for what, change, error in steps:
            if change is not None:
                change()
            dst = randn(N, H, seed=42)
            before = dst.clone()
            if error is not None:
                with pytest.raises(error):
                    mm.indexed_row_scatter_(dst, positions, src, accumulate=accumulate, path=api_path)
                assert_bits_equal(dst, before, what)
                continue
            mm.indexed_row_scatter_(dst, positions, src, accumulate=accumulate, path=api_path)
            assert_scattered(dst, before, positions, src, accumulate, path, what)


@pytest.mark.parametrize("path", PATHS)
def test_a_mask_call_and_a_positions_call_of_like_tensors(route, path):
    """N = M: a bool mask [N] and int positions [N] over the same dst and src, one after the other, both
    orders: each merges by its own rule (a memo entry of one is never run for the other)."""
    api_path = route(path)
    n = 12
    src = randn(n, H, seed=43)
    mask = torch.ones(n, dtype=torch.bool)
    positions = positions_of("all_rows", n, n, seed=44)
    for order in ((0, 1), (1, 0)):
        for i in order:
            dst = randn(n, H, seed=45)
            before = dst.clone()
            if i == 0:
                mm.masked_row_scatter_(dst, mask, src, path=api_path)
                assert_scattered(dst, before, torch.arange(n), src, False, path, "mask")
            else:
                mm.indexed_row_scatter_(dst, positions, src, path=api_path)
                assert_scattered(dst, before, positions, src, False, path, "positions")


@pytest.mark.parametrize("path", PATHS)
def test_signatures_that_differ_in_the_positions_alone(route, path):
    """One dst and src; positions int64, int32, strided, offset, in turn and back, on one memo: each right."""
    api_path = route(path)
    src = randn(M, H, seed=46)
    forms = [lambda p: p, lambda p: p.int(), _strided, lambda p: _strided(p.int()), _offset, lambda p: _offset(p.int())]
    for seed, form in enumerate(forms + forms[::-1]):
        positions = form(positions_of("random", N, M, seed=47 + seed))
        dst = randn(N, H, seed=48)
        before = dst.clone()
        mm.indexed_row_scatter_(dst, positions, src, accumulate=bool(seed % 2), path=api_path)
        assert_scattered(dst, before, positions, src, bool(seed % 2), path, f"form {seed}")


# ---- out of place ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("path", PATHS)
def test_out_of_place_is_the_in_place_result_and_leaves_dst(route, path, accumulate):
    api_path = route(path)
    buf = randn(N, H + 3, dtype=BF16, seed=50)
    dst = buf[:, 1:1 + H]  # not contiguous
    positions, src = positions_of("random", N, M, I32, seed=51), randn(M, H, seed=52)
    buf_before = buf.clone()
    version = dst._version
    out = mm.indexed_row_scatter(dst, positions, src, accumulate=accumulate, path=api_path)
    assert_bits_equal(buf, buf_before, "dst's buffer")
    assert dst._version == version, "out of place bumped dst's version"
    assert out.is_contiguous() and out.data_ptr() != dst.data_ptr() and out.dtype == BF16
    in_place = dst.clone()
    mm.indexed_row_scatter_(in_place, positions, src, accumulate=accumulate, path=api_path)
    assert_bits_equal(out, in_place, "out of place against in place")
    assert_scattered(out, dst, positions, src, accumulate, path)


@pytest.mark.parametrize("path", PATHS)
def test_out_of_place_src_of_dsts_rows(route, path):
    """src viewing dst's own rows: out of place, the rows of dst's copy are written, as PyTorch's index_copy
    (out of place) merges them."""
    api_path = route(path)
    dst = randn(N, H, seed=55)
    before = dst.clone()
    positions = torch.tensor(GOOD)
    out = mm.indexed_row_scatter(dst, positions, dst[N - M:], path=api_path)
    assert_bits_equal(dst, before, "dst")
    assert_bits_equal(out, dst.index_copy(0, positions, dst[N - M:]))


@pytest.mark.parametrize("path", PATHS)
def test_in_place_bumps_dsts_version_once_written(route, path):
    """An in-place write moves dst's version counter, as index_copy_ does (autograd's saved-tensor check reads
    it); an empty merge may leave it."""
    api_path = route(path)
    dst = randn(N, H, seed=53)
    version = dst._version
    mm.indexed_row_scatter_(dst, torch.tensor(GOOD), randn(M, H, seed=54), path=api_path)
    assert dst._version > version


# ---- gradients --------------------------------------------------------------------------------------------------

def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def torch_op(d, p, s, accumulate):
    """PyTorch's differentiable out-of-place op, the gradients to match."""
    index = p.long()
    return d.index_add(0, index, s.to(d.dtype)) if accumulate else d.index_copy(0, index, s.to(d.dtype))


def grads_of(fn, positions, accumulate, dst_dtype=F32, src_dtype=F32, n=N, seed=60):
    """fn(d, p, s) -> out; the result and (grad_dst, grad_src) of sum(out * upstream)."""
    d = randn(n, H, dtype=dst_dtype, seed=seed).requires_grad_()
    s = randn(positions.shape[0], H, dtype=src_dtype, seed=seed + 1).requires_grad_()
    upstream = randn(n, H, dtype=dst_dtype, seed=seed + 2)
    out = fn(d, positions, s)
    (out * upstream).sum().backward()
    return out.detach(), _zeros_if_none(d.grad, d), _zeros_if_none(s.grad, s)


def ours(kind: str, accumulate: bool, path: str) -> Callable:
    if kind == "in_place":
        return lambda d, p, s: mm.indexed_row_scatter_(d * 1, p, s, accumulate=accumulate, path=path)
    return lambda d, p, s: mm.indexed_row_scatter(d, p, s, accumulate=accumulate, path=path)


@pytest.mark.parametrize("pdtype", POSITION_DTYPES.values(), ids=POSITION_DTYPES.keys())
@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("kind", ["in_place", "out_of_place"])
@pytest.mark.parametrize("path", PATHS)
def test_grads_are_pytorchs(route, path, kind, accumulate, pdtype):
    """fp32: the result and both gradients bit for bit those of PyTorch's index_copy / index_add."""
    api_path = route(path)
    for positions in (positions_of("random", N, M, pdtype, seed=61), torch.zeros(0, dtype=pdtype)):
        got = grads_of(ours(kind, accumulate, api_path), positions, accumulate)
        want = grads_of(lambda d, p, s: torch_op(d, p, s, accumulate), positions, accumulate)
        for g, w, what in zip(got, want, ("result", "grad_dst", "grad_src")):
            assert_bits_equal(g, w, f"M={positions.shape[0]}: {what}")


@pytest.mark.parametrize("src_dtype, dst_dtype", [(F32, BF16), (BF16, F16), (F16, F32), (BF16, F32)],
                         ids=lambda d: short(d))
@pytest.mark.parametrize("path", ["triton", "index_copy", "auto"])
def test_grads_are_cast_to_each_inputs_dtype(path, src_dtype, dst_dtype):
    positions = positions_of("random", N, M, seed=62)
    _, grad_dst, grad_src = grads_of(ours("in_place", False, path), positions, False, dst_dtype, src_dtype)
    _, want_dst, want_src = grads_of(lambda d, p, s: torch_op(d, p, s, False), positions, False, dst_dtype, src_dtype)
    assert grad_dst.dtype == dst_dtype and grad_src.dtype == src_dtype
    assert_bits_equal(grad_dst, want_dst, "grad_dst")
    assert_bits_equal(grad_src, want_src, "grad_src")


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("path", ["index_copy", "index_put", "auto"])
def test_gradcheck_and_gradgradcheck_float64(path, accumulate):
    positions = torch.tensor([4, 0, 2], dtype=I32)
    d = torch.randn(6, 3, dtype=F64, generator=generator(63), requires_grad=True)
    s = torch.randn(3, 3, dtype=F64, generator=generator(64), requires_grad=True)
    for fn in (lambda d, s: mm.indexed_row_scatter_(d.clone(), positions, s, accumulate=accumulate, path=path),
               lambda d, s: mm.indexed_row_scatter(d, positions, s, accumulate=accumulate, path=path)):
        assert torch.autograd.gradcheck(fn, (d, s))
        assert torch.autograd.gradgradcheck(fn, (d, s))


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
def test_gradcheck_float32_on_the_triton_path(accumulate):
    """The Triton path moves fp32/fp16/bf16 only: gradcheck in fp32 with loose tolerances (the op is linear)."""
    positions = torch.tensor([4, 0, 2])
    d = torch.randn(6, 3, generator=generator(65), requires_grad=True)
    s = torch.randn(3, 3, generator=generator(66), requires_grad=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*double precision floating point.*")
        for fn in (lambda d, s: mm.indexed_row_scatter_(d.clone(), positions, s, accumulate=accumulate, path="triton"),
                   lambda d, s: mm.indexed_row_scatter(d, positions, s, accumulate=accumulate, path="triton")):
            assert torch.autograd.gradcheck(fn, (d, s), eps=1e-2, atol=1e-2, rtol=1e-2, fast_mode=True)


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("path", ["triton", "index_copy"])
def test_double_backward_is_pytorchs(path, accumulate):
    """A Hessian-vector product through the scatter: its backward is differentiable again."""
    positions = positions_of("random", 11, 5, I32, seed=67)
    weight, vec = randn(11, H, seed=68), randn(5, H, seed=69)

    def hvp(fn):
        d = randn(11, H, seed=70).requires_grad_()
        s = randn(5, H, seed=71).requires_grad_()
        loss = (fn(d * 1, positions, s) ** 2 * weight).sum()
        (g_src,) = torch.autograd.grad(loss, s, create_graph=True)
        return torch.autograd.grad((g_src * vec).sum(), (d, s), allow_unused=True)

    want = hvp(lambda d, p, s: torch_op(d, p, s, accumulate))
    for kind in ("in_place", "out_of_place"):
        got = hvp(ours(kind, accumulate, path))
        for g, w, name in zip(got, want, ("d", "s")):
            if w is None:
                assert g is None or not g.any(), f"{kind}: hvp wrt {name}"
            else:  # equal values (the sign of an exact zero may differ between the two graphs)
                assert g is not None and torch.equal(g, w), f"{kind}: hvp wrt {name}"


@pytest.mark.parametrize("path", PATHS)
def test_only_src_requires_grad_with_a_plain_dst(route, path):
    api_path = route(path)
    positions = positions_of("reversed", N, M, seed=72)
    dst, src = randn(N, H, seed=73), randn(M, H, seed=74).requires_grad_()
    upstream = randn(N, H, seed=75)
    out = mm.indexed_row_scatter_(dst, positions, src, path=api_path)
    assert out is dst and out.requires_grad
    (out * upstream).sum().backward()
    assert_bits_equal(src.grad, upstream[positions])


@pytest.mark.parametrize("path", PATHS)
def test_in_place_on_a_leaf_that_requires_grad_raises_pytorchs_error_before_writing(route, path):
    api_path = route(path)
    dst = randn(N, H, seed=76).requires_grad_()
    before = dst.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        mm.indexed_row_scatter_(dst, torch.tensor(GOOD), randn(M, H, seed=77), path=api_path)
    assert_bits_equal(dst.detach(), before)


@pytest.mark.parametrize("path", PATHS)
def test_bad_positions_with_gradients_raise_before_writing(route, path):
    """A call that needs gradients takes the registered out-of-place op: the host check still runs first."""
    api_path = route(path)
    base = randn(N, H, seed=78).requires_grad_()
    dst = base * 1
    before = dst.detach().clone()
    src = randn(M, H, seed=79).requires_grad_()
    good = torch.tensor(GOOD)
    for positions, error in ((_set(4, N)(good), IndexError), (_set(4, 9)(good), ValueError)):  # GOOD[3] is 9
        for entry in SCATTERS:
            with pytest.raises(error):
                scatter(entry, dst, positions, src, path=api_path)
            assert_bits_equal(dst.detach(), before, entry)


def test_registered_in_place_op_refuses_inputs_that_need_gradients():
    dst, src = randn(N, H, seed=80), randn(M, H, seed=81).requires_grad_()
    positions = torch.tensor(GOOD)
    before = dst.clone()
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.ops.mmmerge_triton.indexed_row_scatter_(dst, positions, src, False, "auto", False)
    assert_bits_equal(dst, before)
    with torch.no_grad():
        torch.ops.mmmerge_triton.indexed_row_scatter_(dst, positions, src, False, "auto", False)
    assert_scattered(dst, before, positions, src, False, "auto")


# ---- the registered ops and torch.compile -----------------------------------------------------------------------

OPS = torch.ops.mmmerge_triton


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("path", ["auto", "triton", "index_copy"])
def test_opcheck(path, accumulate):
    positions = torch.tensor([3, 0, 5], dtype=I32)
    dst, src = randn(7, 12, dtype=BF16, seed=82), randn(3, 12, seed=83)
    torch.library.opcheck(OPS.indexed_row_scatter_.default, (dst, positions, src, accumulate, path, False))
    d, s = randn(7, 12, seed=84).requires_grad_(), randn(3, 12, seed=85).requires_grad_()
    torch.library.opcheck(OPS.indexed_row_scatter.default, (d, positions, s, accumulate, path, False))


@pytest.mark.parametrize("path", ["index_put", "triton"])
def test_ops_by_name(path):
    positions = positions_of("random", N, M, I32, seed=86)
    dst, src = randn(N, H, dtype=F16, seed=87), randn(M, H, seed=88)
    out = OPS.indexed_row_scatter(dst, positions, src, True, path, False)
    assert_scattered(out, dst, positions, src, True, path)
    in_place = dst.clone()
    assert OPS.indexed_row_scatter_(in_place, positions, src, False, path, False) is None
    assert_scattered(in_place, dst, positions, src, False, path)
    before = dst.clone()
    with pytest.raises(ValueError, match="(?i)repeat"):
        OPS.indexed_row_scatter_(dst, _set(1, lambda p: int(p[0]))(positions), src, False, path, False)
    with pytest.raises(IndexError, match=rf"\bpositions\[2\].*\b{N}\b"):
        OPS.indexed_row_scatter(dst, _set(2, N)(positions), src, False, path, False)
    assert_bits_equal(dst, before)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_indexed_row_scatter_equals_eager(fresh_dynamo):
    """fullgraph: the ops in the graph; new positions of the same shape give their own result (none baked in),
    and bad ones raise as eagerly, writing nothing."""
    def forward(embeds, positions, src):
        merged = mm.indexed_row_scatter(embeds * 2, positions, src, path="triton")
        in_place = embeds * 3
        mm.indexed_row_scatter_(in_place, positions, src, accumulate=True, path="triton")
        return merged + 1, in_place

    compiled = torch.compile(forward, fullgraph=True, dynamic=False)
    embeds, src = randn(N, H, dtype=BF16, seed=89), randn(M, H, seed=90)
    for seed in (91, 92):
        positions = positions_of("random", N, M, seed=seed)
        got, want = compiled(embeds, positions, src), forward(embeds, positions, src)
        for g, w in zip(got, want):
            assert_bits_equal(g, w)
        assert_scattered(want[1], embeds * 3, positions, src, True, "triton")
    with pytest.raises(IndexError, match=rf"\bpositions\[4\].*\b{N}\b"):
        compiled(embeds, _set(4, N)(torch.tensor(GOOD)), src)
    with pytest.raises(ValueError, match="(?i)repeat"):
        compiled(embeds, _set(4, 9)(torch.tensor(GOOD)), src)


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("kind", ["in_place", "out_of_place"])
def test_compiled_grads_are_pytorchs(fresh_dynamo, kind, accumulate):
    positions = positions_of("random", N, M, I32, seed=93)
    compiled = torch.compile(ours(kind, accumulate, "triton"), backend="aot_eager", fullgraph=True)
    got = grads_of(compiled, positions, accumulate)
    want = grads_of(lambda d, p, s: torch_op(d, p, s, accumulate), positions, accumulate)
    for g, w, what in zip(got, want, ("result", "grad_dst", "grad_src")):
        assert_bits_equal(g, w, what)


# ---- forward-mode AD --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["auto", "index_copy", "index_put"])
def test_forward_mode_ad_is_pytorchs(route, path):
    """dst and src duals: the primal and the tangent of PyTorch's index_copy; bad CPU positions still raise
    before anything is written."""
    api_path = route(path)
    positions = positions_of("random", N, M, I32, seed=57)
    dst, src = randn(N, H, seed=58), randn(M, H, seed=59)
    dst_tangent, src_tangent = randn(N, H, seed=60), randn(M, H, seed=61)

    def run(fn, p=positions):
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(dst.clone(), dst_tangent), p, fwAD.make_dual(src, src_tangent))
            primal, tangent = fwAD.unpack_dual(out)
            return primal.clone(), tangent.clone()

    want = run(lambda d, p, s: d.index_copy(0, p.long(), s))
    for entry in SCATTERS:
        got = run(lambda d, p, s: scatter(entry, d, p, s, path=api_path))
        assert_bits_equal(got[0], want[0], f"{entry}: primal")
        assert_bits_equal(got[1], want[1], f"{entry}: tangent")
        for bad, error in ((_set(4, N)(positions), IndexError), (_set(4, lambda p: int(p[0]))(positions), ValueError)):
            with fwAD.dual_level():
                d = fwAD.make_dual(dst.clone(), dst_tangent)
                with pytest.raises(error):
                    scatter(entry, d, bad, fwAD.make_dual(src, src_tangent), path=api_path)
                assert_bits_equal(fwAD.unpack_dual(d).primal, dst, f"{entry}: written before {error.__name__}")


# ---- inference tensors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_inference_tensors(route, path):
    api_path = route(path)
    with torch.inference_mode():
        dst, src = randn(N, H, seed=94), randn(M, H, seed=95)
        positions = torch.tensor(GOOD, dtype=I32)
        before = dst.clone()
        assert mm.indexed_row_scatter_(dst, positions, src, path=api_path) is dst  # in place inside the mode
        assert_scattered(dst, before, positions, src, False, path)
    written = dst.clone()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        mm.indexed_row_scatter_(dst, positions, src, path=api_path)
    assert_bits_equal(dst, written)
    out = mm.indexed_row_scatter(before, positions, src, accumulate=True, path=api_path)  # out of place: legal
    assert_scattered(out, before, positions, src, True, path)


# ---- explain() --------------------------------------------------------------------------------------------------

def test_explain_names_the_positions_kind_on_the_triton_path(route):
    dst, src, positions = randn(N, H), randn(M, H), torch.tensor(GOOD)
    decision = mm.explain(dst, src, positions=positions, path="triton")
    assert isinstance(decision, mm.Decision)
    assert (decision.path, decision.kind) == ("triton", "positions") and decision.config is not None, decision
    for path in ("index_copy", "index_put"):
        decision = mm.explain(dst, src, positions=positions, path=path)
        assert (decision.path, decision.kind, decision.config) == (path, None, None), decision
    decision = mm.explain(dst, src, positions=positions)  # CPU tensors: a PyTorch path (the CPU-mask entry's)
    assert decision.path in ("index_put", "index_copy") and decision.kind is None, decision
    decision = mm.explain(dst.double(), src, positions=positions)
    assert decision.path in ("index_put", "index_copy") and decision.kind is None, decision
    with pytest.raises(ValueError, match="float64"):
        mm.explain(dst.double(), src, positions=positions, path="triton")
    route("auto_triton")
    decision = mm.explain(dst, src, positions=positions)
    assert (decision.path, decision.kind) == ("triton", "positions"), decision


@pytest.mark.parametrize("path", PATHS)
def test_explain_is_what_ran(monkeypatch, route, prepared, path):
    """core.run spied: the decision each call ran is explain()'s, on the first call of a signature and on memo
    hits; explain() before the first call prepares the entry that call then hits. Nothing written by explain."""
    api_path = route(path)
    ran = []
    real_run = core.run
    monkeypatch.setattr(core, "run", lambda prepared_, *a, **k: ran.append(prepared_.decision) or real_run(
        prepared_, *a, **k))
    dst, src, positions = randn(N, H, seed=96), randn(M, H, seed=97), torch.tensor(GOOD)
    before = dst.clone()
    decision = mm.explain(dst, src, positions=positions, path=api_path)
    assert_bits_equal(dst, before, "explain wrote dst")
    assert len(prepared) == 1 and prepared[0] is not None and not ran
    for seed in range(3):
        dst = randn(N, H, seed=98 + seed)
        before = dst.clone()
        mm.indexed_row_scatter_(dst, positions, src, path=api_path)
        assert_scattered(dst, before, positions, src, False, path)
    assert ran == [decision] * 3, f"ran {ran}, explained {decision}"
    assert len(prepared) == 1, f"the calls did not hit explain()'s entry: {prepared}"
    want_kind = "positions" if path in TRITON_PATHS else None
    assert decision.kind == want_kind and (decision.path == "triton") == (path in TRITON_PATHS), decision
