"""merge_requests: one bad request among eight fails alone (its rows untouched bit for bit, its status False)
while the seven others merge as a per-request torch reference does, for a CPU mask (every path) and for the
device-mask forms (the Triton kernels under the interpreter, and the PyTorch form), called on CPU tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mmmerge_triton as mm
from mmmerge_triton import inputs
from mmmerge_triton import requests as rq
from mmmerge_triton.kernels.request_rows import request_rows_kernel
from mmmerge_triton.paths import PATHS

from .conftest import DTYPE_PAIR_IDS, DTYPE_PAIRS, INTERPRETED, assert_bits_equal, randn, seeded

merge_requests = getattr(mm, "merge_requests", rq.merge_requests)  # exported from the package by the lead

needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="the Triton path on CPU tensors needs TRITON_INTERPRET=1")
CPU_PATHS = [pytest.param(p, marks=needs_interpreter) if p in ("triton", "auto") else p for p in PATHS + ("auto",)]
DEVICE_FORMS = [pytest.param(True, marks=needs_interpreter, id="triton"), pytest.param(False, id="torch")]

H = 37
LENGTHS = (9, 0, 17, 5, 23, 12, 1, 30)  # eight requests, one of them without rows
LEAD, TAIL = 2, 3  # padding rows before the first request and after the last (false in the mask)
BAD_KINDS = ("too_many", "too_few", "none")


def exact(rows: int, hidden: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values k/16 with |k| <= 256: exact in float32, float16 and bfloat16, so every cast is exact and the
    interpreter's truncating bf16 cast agrees with PyTorch's rounding: comparisons are bit for bit."""
    return (torch.randint(-256, 257, (rows, hidden), generator=seeded(seed)).float() / 16).to(dtype)


def offsets_of(lengths=LENGTHS, lead=LEAD) -> list[int]:
    return [lead + int(x) for x in np.concatenate([[0], np.cumsum(lengths)])]


def request_mask(lengths=LENGTHS, lead=LEAD, tail=TAIL, seed=0, at_least=2) -> torch.Tensor:
    """[N] bool: about half of each request's rows true (at least ``at_least`` where it has that many), the
    padding false."""
    g = seeded(seed)
    parts = [torch.zeros(lead, dtype=torch.bool)]
    for length in lengths:
        part = torch.rand(length, generator=g) < 0.5
        part[: min(at_least, length)] = True
        parts.append(part)
    parts.append(torch.zeros(tail, dtype=torch.bool))
    return torch.cat(parts)


def counts_of(mask: torch.Tensor, offsets: list[int]) -> list[int]:
    return [int(mask[a:b].sum()) for a, b in zip(offsets[:-1], offsets[1:])]


def embeddings(counts, bad: int | None, bad_kind: str | None, dtype, form: str = "tensor", seed: int = 1):
    """Per-request embeddings: counts[r] rows each, except request ``bad`` (too many, too few, or none)."""
    out = []
    for r, count in enumerate(counts):
        rows = count
        if r == bad:
            rows = {"too_many": count + 3, "too_few": count - 1, "none": 0}[bad_kind]
        values = exact(rows, H, dtype, seed + r)
        if r == bad and bad_kind == "none":
            out.append([])
        elif form == "tensor":
            out.append(values)
        elif form == "items":  # split into pieces, one of them 3-D, one nested, one empty
            cut = rows // 2
            out.append([values[:cut], [values[cut:cut], values[cut:]]] if rows % 2 else
                       [values[:cut].reshape(1, cut, H), values[cut:]])
        else:
            raise ValueError(form)
    return out


def rows_of(entry) -> torch.Tensor:
    """A request's embeddings as one [m, H] tensor (the items flattened and concatenated)."""
    flat = inputs.flatten_items(entry, "entry")
    return torch.cat(flat) if flat else torch.zeros(0, H)


def reference(dst, mask, per_request, offsets):
    """torch, request by request: ``out[a:b][mask[a:b]] = rows.to(dtype)`` for each request whose true rows
    equal its embedding rows; the others untouched. Returns (out, status)."""
    out = dst.clone()
    status = []
    for r, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        rows = rows_of(per_request[r])
        ok = int(mask[a:b].sum()) == rows.shape[0]
        status.append(ok)
        if ok:
            out[a:b][mask[a:b]] = rows.to(dst.dtype)
    return out, torch.tensor(status, dtype=torch.bool)


def check(dst_before, out, status, mask, per_request, offsets, bad=None):
    expected, expected_status = reference(dst_before, mask, per_request, offsets)
    assert_bits_equal(status.cpu(), expected_status, "status")
    if bad is not None:
        assert not expected_status[bad] and expected_status.sum() == len(offsets) - 2, "the case must have one bad request"
        a, b = offsets[bad], offsets[bad + 1]
        assert_bits_equal(out[a:b], dst_before[a:b], "the bad request's rows")
    assert_bits_equal(out, expected, "merged batch")


def run_device_form(dst, mask, per_request, offsets, use_triton: bool) -> torch.Tensor:
    """The device-mask merge (what a mask on the GPU runs), on CPU tensors."""
    items, request_rows = rq._request_items(per_request, dst)
    flat = [t for request in items for t in request]
    return rq._merge_device_mask(dst, mask, flat, np.asarray(offsets, dtype=np.int64), request_rows, use_triton)


# ---- one bad request among eight ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 4, 7])
@pytest.mark.parametrize("bad_kind", BAD_KINDS)
@pytest.mark.parametrize("path", CPU_PATHS)
def test_cpu_mask_one_bad_request_fails_alone(path, bad_kind, bad):
    mask = request_mask(seed=bad)
    offsets = offsets_of()
    per_request = embeddings(counts_of(mask, offsets), bad, bad_kind, torch.float32)
    dst = randn(mask.numel(), H, dtype=torch.bfloat16, seed=9)
    out = dst.clone()
    status = merge_requests(out, per_request, mask, offsets, path=path)
    assert status.dtype == torch.bool and status.device.type == "cpu" and status.shape == (8,)
    check(dst, out, status, mask, per_request, offsets, bad)


@pytest.mark.parametrize("bad", [0, 4, 7])
@pytest.mark.parametrize("bad_kind", BAD_KINDS)
@pytest.mark.parametrize("use_triton", DEVICE_FORMS)
def test_device_mask_one_bad_request_fails_alone(use_triton, bad_kind, bad):
    mask = request_mask(seed=10 + bad)
    offsets = offsets_of()
    per_request = embeddings(counts_of(mask, offsets), bad, bad_kind, torch.float16)
    dst = randn(mask.numel(), H, dtype=torch.float32, seed=9)
    out = dst.clone()
    status = run_device_form(out, mask, per_request, offsets, use_triton)
    assert status.dtype == torch.bool and status.shape == (8,)
    check(dst, out, status, mask, per_request, offsets, bad)


@pytest.mark.parametrize(("src_dtype", "dst_dtype"), DTYPE_PAIRS, ids=DTYPE_PAIR_IDS)
@pytest.mark.parametrize("mask_kind", ["cpu", pytest.param("device_triton", marks=needs_interpreter), "device_torch"])
def test_every_dtype_pair_with_items(mask_kind, src_dtype, dst_dtype):
    mask = request_mask(seed=3)
    offsets = offsets_of()
    per_request = embeddings(counts_of(mask, offsets), 5, "too_many", src_dtype, form="items")
    dst = randn(mask.numel(), H, dtype=dst_dtype, seed=4)
    out = dst.clone()
    if mask_kind == "cpu":
        status = merge_requests(out, per_request, mask, offsets, path="triton" if INTERPRETED else "index_put")
    else:
        status = run_device_form(out, mask, per_request, offsets, mask_kind == "device_triton")
    check(dst, out, status, mask, per_request, offsets, bad=5)


@pytest.mark.parametrize("use_triton", DEVICE_FORMS)
def test_device_forms_agree_bit_for_bit_on_random_values(use_triton):
    """Random fp32 values into fp32 (no rounding anywhere): both device forms equal the reference, with
    several bad requests and mixed item layouts (slices of one tensor: read in place; a transposed item:
    concatenated first)."""
    lengths = (40, 3, 0, 65, 18, 7, 29, 11)
    mask = request_mask(lengths, seed=21)
    offsets = offsets_of(lengths)
    counts = counts_of(mask, offsets)
    pool = randn(sum(counts) + 10, H, seed=22)
    per_request, at = [], 0
    for r, count in enumerate(counts):
        rows = count + (1 if r in (3, 6) else 0)
        per_request.append(pool[at : at + rows] if r != 4 else pool[at : at + rows].t().contiguous().t())
        at += rows
    dst = randn(mask.numel(), H, seed=23)
    out = dst.clone()
    status = run_device_form(out, mask, per_request, offsets, use_triton)
    assert status.tolist() == [r not in (3, 6) for r in range(8)]
    check(dst, out, status, mask, per_request, offsets)


@pytest.mark.parametrize("form", ["cpu", pytest.param("device_triton", marks=needs_interpreter), "device_torch"])
def test_rows_outside_every_request(form):
    """A CPU mask refuses a true row outside every request (nothing written); a device mask never reads nor
    writes one."""
    mask = request_mask(seed=5)
    mask[0] = mask[-1] = True  # in the leading and trailing padding
    offsets = offsets_of()
    counts = counts_of(mask, offsets)
    per_request = embeddings(counts, None, None, torch.float32)
    dst = randn(mask.numel(), H, seed=6)
    out = dst.clone()
    if form == "cpu":
        with pytest.raises(ValueError, match=r"is_multimodal has 2 true rows outside every request .*first at row 0"):
            merge_requests(out, per_request, mask, offsets)
        assert_bits_equal(out, dst, "nothing written")
        return
    status = run_device_form(out, mask, per_request, offsets, form == "device_triton")
    assert status.all()
    inside = mask.clone()
    inside[0] = inside[-1] = False
    check(dst, out, status, inside, per_request, offsets)


# ---- edge cases ----------------------------------------------------------------------------------------------

def edge_cases():
    """(name, lengths, lead, tail, per-request rows as a function of the counts)."""
    return {
        "one_request": ((20,), 0, 0, lambda c: c),
        "one_request_bad": ((20,), 0, 0, lambda c: [c[0] - 1]),
        "all_empty_requests": ((0, 0, 0), 4, 5, lambda c: c),
        "zero_row_request_with_embeddings": ((6, 0, 6), 0, 0, lambda c: [c[0], 2, c[2]]),
        "requests_without_placeholders": ((6, 5, 4), 1, 1, lambda c: c),
        "no_requests": ((), 3, 3, lambda c: c),
    }


EDGE_FORMS = ["cpu_index_put", pytest.param("cpu_triton", marks=needs_interpreter),
              pytest.param("device_triton", marks=needs_interpreter), "device_torch"]


@pytest.mark.parametrize("form", EDGE_FORMS)
@pytest.mark.parametrize("case", list(edge_cases()))
def test_edge_cases(case, form):
    lengths, lead, tail, rows_for = edge_cases()[case]
    at_least = 0 if case == "requests_without_placeholders" else 2
    mask = request_mask(lengths, lead, tail, seed=7, at_least=at_least)
    if case == "requests_without_placeholders":
        mask[:] = False
    offsets = offsets_of(lengths, lead)
    counts = counts_of(mask, offsets)
    per_request = [exact(m, H, torch.float32, seed=r) for r, m in enumerate(rows_for(counts))]
    dst = randn(mask.numel(), H, dtype=torch.float16, seed=8)
    out = dst.clone()
    if form.startswith("cpu"):
        status = merge_requests(out, per_request, mask, offsets, path=form[4:])
    else:
        status = run_device_form(out, mask, per_request, offsets, form == "device_triton")
    assert status.shape == (len(lengths),)
    check(dst, out, status, mask, per_request, offsets)


@pytest.mark.parametrize("form", EDGE_FORMS)
def test_zero_sized_inputs(form):
    for n, hidden in ((0, 8), (6, 0)):
        dst = torch.ones(n, hidden)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[:2] = True
        offsets = [0, n // 2, n]
        per_request = [torch.ones(int(mask[: n // 2].sum()), hidden), torch.ones(0, hidden)]
        out = dst.clone()
        if form.startswith("cpu"):
            status = merge_requests(out, per_request, mask, offsets, path=form[4:])
        else:
            status = run_device_form(out, mask, per_request, offsets, form == "device_triton")
        assert status.tolist() == [True, True]
        assert_bits_equal(out, dst)


@needs_interpreter
@pytest.mark.parametrize("extra", [0, 1], ids=["matching", "too_many"])
def test_request_rows_kernel_walks_a_request_longer_than_one_block(extra):
    """A request longer than BLOCK and PREFIX_CHUNK: counted over several chunks, its row map written over
    several blocks with the ranks carried across them (or, one slot off, all -1)."""
    lengths = (3, 2 * 1024 + 517, 4)
    mask = request_mask(lengths, seed=11)
    offsets = offsets_of(lengths)
    counts = counts_of(mask, offsets)
    slots = [counts[0], counts[1] + extra, counts[2]]
    src_starts = np.concatenate([[0], np.cumsum(slots)])
    rows = torch.full((int(src_starts[-1]),), 99, dtype=torch.int32)
    status = torch.full((3,), 7, dtype=torch.uint8)
    request_rows_kernel[(3,)](mask.view(torch.uint8), torch.tensor(offsets, dtype=torch.int32),
                              torch.from_numpy(src_starts.astype(np.int32)), rows, status, BLOCK=1024,
                              PREFIX_CHUNK=1024)
    true_rows = np.flatnonzero(mask.numpy())
    a, b = src_starts[1], src_starts[2]
    expected = true_rows.copy() if not extra else np.concatenate(
        [true_rows[:a], np.full(b - a, -1), true_rows[a + counts[1]:]])
    assert rows.tolist() == expected.tolist()
    assert status.tolist() == [1, int(not extra), 1]


@needs_interpreter
def test_request_rows_kernel_writes_minus_one_for_a_mismatching_request():
    """The row map: a matching request's slots hold its true rows in order, a mismatching one's all -1,
    whatever its count (above or below its slots); the status byte per request."""
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    offsets = torch.tensor([0, 4, 8, 10], dtype=torch.int32)  # true rows per request: 3, 3, 1
    src_starts = torch.tensor([0, 3, 5, 8], dtype=torch.int32)  # slots: 3 (match), 2 (too few), 3 (too many)
    rows = torch.full((8,), 99, dtype=torch.int32)
    status = torch.full((3,), 7, dtype=torch.uint8)
    request_rows_kernel[(3,)](mask.view(torch.uint8), offsets, src_starts, rows, status, BLOCK=1024, PREFIX_CHUNK=4096)
    assert rows.tolist() == [0, 2, 3, -1, -1, -1, -1, -1]
    assert status.tolist() == [1, 0, 0]


def test_all_matching_requests_equal_one_merge():
    mask = request_mask(seed=13)
    offsets = offsets_of()
    per_request = embeddings(counts_of(mask, offsets), None, None, torch.float32, form="items")
    dst = randn(mask.numel(), H, seed=14)
    out = dst.clone()
    status = merge_requests(out, per_request, mask, offsets, path="index_put")
    assert status.all()
    whole = dst.clone()
    mm.merge_multimodal_embeddings(whole, [rows_of(e) for e in per_request], mask, path="index_put")
    assert_bits_equal(out, whole)


@pytest.mark.parametrize("form", ["cpu", "device_torch"])
def test_float64_merges_through_pytorch(form):
    """float64 (training code's gradcheck dtype): the PyTorch paths, same semantics."""
    mask = request_mask(seed=20)
    offsets = offsets_of()
    per_request = embeddings(counts_of(mask, offsets), 6, "too_many", torch.float64)
    dst = randn(mask.numel(), H, dtype=torch.float64, seed=21)
    out = dst.clone()
    if form == "cpu":
        status = merge_requests(out, per_request, mask, offsets)
    else:
        status = run_device_form(out, mask, per_request, offsets, False)
    check(dst, out, status, mask, per_request, offsets, bad=6)


def test_row_offsets_forms():
    mask = request_mask(seed=15)
    offsets = offsets_of()
    per_request = embeddings(counts_of(mask, offsets), 2, "too_few", torch.float32)
    dst = randn(mask.numel(), H, seed=16)
    results = []
    for form in (offsets, tuple(offsets), np.asarray(offsets, dtype=np.int32), torch.tensor(offsets)):
        out = dst.clone()
        results.append((merge_requests(out, per_request, mask, form, path="index_put"), out))
    for status, out in results[1:]:
        assert_bits_equal(status, results[0][0])
        assert_bits_equal(out, results[0][1])


def test_device_form_is_differentiable():
    """The PyTorch form (what "auto" runs where gradients are needed): gradients reach the matching requests'
    embeddings and dst's rows that were not overwritten, none the skipped request's embeddings."""
    mask = request_mask((4, 5), 0, 0, seed=17)
    offsets = offsets_of((4, 5), 0)
    counts = counts_of(mask, offsets)
    good = torch.randn(counts[0], 3, requires_grad=True)
    bad = torch.randn(counts[1] + 1, 3, requires_grad=True)
    base = torch.randn(mask.numel(), 3, requires_grad=True)
    dst = base * 1.0
    status = rq._merge_device_mask(dst, mask, [good, bad], np.asarray(offsets), np.array([counts[0], counts[1] + 1]),
                                   False)
    assert status.tolist() == [True, False]
    dst.sum().backward()
    assert_bits_equal(good.grad, torch.ones_like(good))
    assert bad.grad is None or not bad.grad.any(), "the skipped request's embeddings took a gradient"
    expected = torch.ones(mask.numel(), 3)
    expected[: offsets[1]][mask[: offsets[1]]] = 0
    assert_bits_equal(base.grad, expected)


# ---- errors: named, and raised before anything is written ----------------------------------------------------

def error_cases():
    mask = request_mask((4, 5), 0, 0, seed=18)
    offsets = offsets_of((4, 5), 0)
    c = counts_of(mask, offsets)
    good = [torch.ones(c[0], H), torch.ones(c[1], H)]
    n = mask.numel()
    return mask, {
        "offsets_too_short": (good, [0, n], ValueError, r"row_offsets must hold R \+ 1 = 3 ints"),
        "offsets_2d": (good, [[0, 4, n]], ValueError, "row_offsets must hold"),
        "offsets_decreasing": (good, [0, 5, 4], ValueError, r"non-decreasing, got row_offsets\[2\] = 4 < row_offsets\[1\] = 5"),
        "offsets_negative": (good, [-1, 4, n], ValueError, r"within \[0, N\] = \[0, 9\]"),
        "offsets_past_n": (good, [0, 4, n + 1], ValueError, r"row_offsets\[-1\] = 10"),
        "offsets_float": (good, [0.0, 4.0, 9.0], TypeError, "row_offsets must be ints"),
        "offsets_bool": (good, [False, True, True], TypeError, "row_offsets must be ints"),
        "offsets_none": (good, None, TypeError, r"row_offsets must be R \+ 1 host ints .*got NoneType"),
        "offsets_int": (good, n, TypeError, r"row_offsets must be R \+ 1 host ints .*got int"),
        "offsets_str": (good, "049", TypeError, r"row_offsets must be R \+ 1 host ints .*got str"),
        "offsets_float_tensor_with_grad": (good, torch.tensor([0.0, 4.0, 9.0], requires_grad=True), TypeError,
                                           "row_offsets must be ints"),
        "not_a_list": (torch.ones(c[0] + c[1], H), offsets, TypeError, "mm_embeds_per_request must be a list"),
        "wrong_hidden": ([good[0], torch.ones(c[1], H + 1)], offsets, ValueError, r"mm_embeds_per_request\[1\]"),
        "wrong_dtype": ([good[0], torch.ones(c[1], H, dtype=torch.int32)], offsets, TypeError,
                        r"mm_embeds_per_request\[1\]"),
        "item_not_a_tensor": ([good[0], [good[1], 3]], offsets, TypeError, r"mm_embeds_per_request\[1\]"),
        "bad_path": (good, offsets, ValueError, "path must be"),
    }


@pytest.mark.parametrize("case", list(error_cases()[1]))
def test_errors_name_the_argument_and_write_nothing(case):
    mask, cases = error_cases()
    per_request, offsets, error, pattern = cases[case]
    dst = randn(mask.numel(), H, seed=19)
    out = dst.clone()
    with pytest.raises(error, match=pattern):
        merge_requests(out, per_request, mask, offsets, path="nope" if case == "bad_path" else "index_put")
    assert_bits_equal(out, dst, "nothing written")


def test_inputs_embeds_and_mask_errors():
    mask = torch.zeros(6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \[N, H\]"):
        merge_requests(torch.zeros(2, 3, 4), [], mask.view(2, 3), [0])
    with pytest.raises(ValueError, match="is_multimodal has shape"):
        merge_requests(torch.zeros(5, 4), [], mask, [0])
    with pytest.raises(TypeError, match="inputs_embeds must be"):
        merge_requests(torch.zeros(6, 4, dtype=torch.int32), [], mask, [0])
    with pytest.raises(TypeError, match="is_multimodal must be a bool"):
        merge_requests(torch.zeros(6, 4), [], mask.int(), [0])


# ---- memory shared with inputs_embeds; items at odd addresses (issue 21, items 8 and 6) ---------------------

ALIAS_LENGTHS, ALIAS_TAIL = (6, 5), 8  # two requests, then padding rows (false in the mask) to alias


def merge_form(out, per_request, mask, offsets, form: str) -> torch.Tensor:
    """merge_requests with a CPU mask (form "cpu_<path>"), or a device-mask form run on CPU tensors."""
    if form.startswith("cpu"):
        return merge_requests(out, per_request, mask, offsets, path=form[4:])
    return run_device_form(out, mask, per_request, offsets, form == "device_triton")


def aliasing_cases():
    """name: per-request embeddings as views of ``out`` (dst itself), given out, the offsets and the counts."""
    def tail(out, k):
        return out[out.shape[0] - ALIAS_TAIL : out.shape[0] - ALIAS_TAIL + k]

    return {
        # the lone good request's one item: a tensor overlapping dst, which merge_multimodal_embeddings refuses
        "lone_item_of_padding_rows": lambda out, o, c: [tail(out, c[0]), exact(c[1] + 1, H, out.dtype, 3)],
        "lone_item_of_its_own_rows": lambda out, o, c: [out[o[0] + 1 : o[0] + 1 + c[0]], []],
        "lone_item_in_a_list": lambda out, o, c: [[tail(out, c[0])], exact(c[1] - 1, H, out.dtype, 3)],
        "rows_of_the_other_request": lambda out, o, c: [out[o[1] : o[1] + c[0]], exact(c[1], H, out.dtype, 3)],
        "every_request": lambda out, o, c: [tail(out, c[0]), [out[o[0] : o[0] + 1], tail(out, c[1] - 1)]],
        "another_dtype_view": lambda out, o, c: [tail(out, c[0]).view(torch.bfloat16), []],
    }


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 bits read as bf16
@pytest.mark.parametrize("form", EDGE_FORMS)
@pytest.mark.parametrize("case", list(aliasing_cases()))
def test_embeddings_sharing_memory_with_inputs_embeds_merge_as_vllm(case, form):
    """A request whose embeddings are inputs_embeds' own rows merges as vLLM merges the batch (its embeddings
    concatenated, so read before anything is written): the other requests are not failed with it, and a
    lone such item is neither refused (today, with a CPU mask: a ValueError naming multimodal_embeddings,
    an argument merge_requests does not have) nor read while written (today, the Triton device form)."""
    mask = request_mask(ALIAS_LENGTHS, 0, ALIAS_TAIL, seed=30)
    offsets = offsets_of(ALIAS_LENGTHS, 0)
    counts = counts_of(mask, offsets)
    dst = exact(mask.numel(), H, torch.float16, seed=31)
    out = dst.clone()
    per_request = aliasing_cases()[case](out, offsets, counts)
    frozen = aliasing_cases()[case](dst.clone(), offsets, counts)  # the same embeddings, values as before
    status = merge_form(out, per_request, mask, offsets, form)
    expected, expected_status = reference(dst, mask, frozen, offsets)
    assert_bits_equal(status, expected_status, "status")
    assert_bits_equal(out, expected, "merged batch")


@pytest.mark.parametrize("form", EDGE_FORMS)
def test_lone_item_of_rows_the_merge_writes_first(form):
    """A request's one item is rows of dst that the merge writes before it reaches them in order (rows 2-5
    take rows 0-3): read before anything is written (today, the Triton device form read rows 2 and 3 after
    writing them: a lone item sharing dst's memory was kept in place, not copied)."""
    mask = torch.zeros(12, dtype=torch.bool)
    mask[2:6] = True
    offsets = [0, 8, 12]
    dst = exact(12, H, torch.float32, seed=42)
    out = dst.clone()
    status = merge_form(out, [out[0:4], []], mask, offsets, form)
    expected, expected_status = reference(dst, mask, [dst[0:4].clone(), []], offsets)
    assert_bits_equal(status, expected_status, "status")
    assert_bits_equal(out, expected, "merged batch")


def odd_address(rows: int, dtype: torch.dtype, seed: int, offset: int = 1) -> torch.Tensor:
    """An exact-valued [rows, H] tensor ``offset`` bytes past an aligned address (torch.frombuffer), so its
    address is not a multiple of its element size."""
    raw = bytearray(rows * H * dtype.itemsize + 16)
    t = torch.frombuffer(raw, dtype=dtype, offset=offset, count=rows * H).view(rows, H)
    t.copy_(exact(rows, H, dtype, seed))
    assert t.data_ptr() % dtype.itemsize
    return t


@pytest.mark.parametrize(("dtype", "offset"), [(torch.float16, 1), (torch.float32, 2), (torch.bfloat16, 3)])
@pytest.mark.parametrize("form", EDGE_FORMS)
def test_items_at_odd_addresses(form, dtype, offset):
    """Items at addresses that are not a multiple of their element size (DLPack, torch.frombuffer): merged
    from an aligned copy, alone, beside aligned items, in a bad request (today, the Triton device form:
    TypeError: cannot unpack non-iterable NoneType; with a CPU mask and path="triton", a ValueError)."""
    lengths = (7, 9, 6)
    mask = request_mask(lengths, LEAD, TAIL, seed=32)
    offsets = offsets_of(lengths)
    c = counts_of(mask, offsets)
    half = c[1] // 2
    per_request = [odd_address(c[0], dtype, 33, offset),
                   [exact(half, H, dtype, 34), odd_address(c[1] - half, dtype, 35, offset)],
                   odd_address(c[2] + 1, dtype, 36, offset)]  # one row too many: fails alone
    dst = exact(mask.numel(), H, torch.float32, seed=37)
    out = dst.clone()
    status = merge_form(out, per_request, mask, offsets, form)
    check(dst, out, status, mask, per_request, offsets, bad=2)


@pytest.mark.parametrize("form", ["cpu_index_put", "device_torch"])
def test_item_at_odd_address_keeps_its_gradient(form):
    """The aligned copy of an odd-address item passes gradients through (PyTorch's: ones where merged)."""
    mask = request_mask((5, 4), 0, 0, seed=38)
    offsets = offsets_of((5, 4), 0)
    c = counts_of(mask, offsets)
    odd = odd_address(c[0], torch.float32, 39, offset=2).requires_grad_()
    good = exact(c[1], H, torch.float32, 40).requires_grad_()
    dst = exact(mask.numel(), H, torch.float32, 41).requires_grad_()
    out = dst * 1.0
    status = merge_form(out, [odd, good], mask, offsets, form)
    assert status.tolist() == [True, True]
    expected, _ = reference(dst.detach(), mask, [odd.detach(), good.detach()], offsets)
    assert_bits_equal(out.detach(), expected)
    out.sum().backward()
    assert_bits_equal(odd.grad, torch.ones_like(odd))
    assert_bits_equal(good.grad, torch.ones_like(good))
