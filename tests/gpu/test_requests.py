"""merge_requests on the GPU: one bad request among eight (too many rows, too few, none) fails alone, for a
CPU mask (status on the CPU) and a GPU mask (status on the GPU), every dtype pair, under
torch.cuda.set_sync_debug_mode("error"); a GPU mask captured in a CUDA graph and replayed with new prompts
(requests turning bad and good again between replays); edge cases (no requests, one, a request without
rows, requests without embeddings, empty tensors). Every result is compared bit for bit with a per-request
torch reference over the whole destination, so untouched rows are checked too.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import numpy as np  # noqa: E402

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton import inputs  # noqa: E402
from mmmerge_triton import requests as rq  # noqa: E402

from gpu_helpers import (  # noqa: E402
    DTYPE_PAIRS, assert_same, capture, dev, pair_id, rand, reference, special_matrix, sync_debug_error,
)

merge_requests = getattr(mt, "merge_requests", rq.merge_requests)  # exported from the package by the lead

DEV = dev()
H = 320  # not a power of two: the last column block is masked
LENGTHS = (300, 0, 517, 64, 1000, 129, 1, 777)  # eight requests, one without rows
LEAD, TAIL = 5, 11  # padding rows before the first request and after the last
BAD_KINDS = ("too_many", "too_few", "none")
MASKS = ("cpu", "gpu")
PATHS = ("triton", "auto", "index_put")  # index_put: with a GPU mask, the PyTorch form


def offsets_of(lengths=LENGTHS, lead=LEAD):
    return [lead + int(x) for x in np.concatenate([[0], np.cumsum(lengths)])]


def request_mask(lengths=LENGTHS, lead=LEAD, tail=TAIL, seed=0):
    """[N] CPU bool: about half of each request's rows true (its first two at least), the padding false."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.zeros(lead, dtype=torch.bool)]
    for length in lengths:
        part = torch.rand(length, generator=g) < 0.5
        part[: min(2, length)] = True
        parts.append(part)
    parts.append(torch.zeros(tail, dtype=torch.bool))
    return torch.cat(parts)


def counts_of(mask, offsets):
    return [int(mask[a:b].sum()) for a, b in zip(offsets[:-1], offsets[1:])]


def embeddings(counts, bad, bad_kind, dtype, form="tensor", seed=1):
    """Per-request embeddings on the GPU: counts[r] rows, except request ``bad``. form "items": each request
    as a list of slices of one pool (read in place), one 3-D, one nested; "tensor": one tensor each."""
    rows = [c if r != bad else {"too_many": c + 3, "too_few": c - 1, "none": 0}[bad_kind] for r, c in enumerate(counts)]
    pool = rand((sum(rows), H), dtype, seed=seed)
    out, at = [], 0
    for r, m in enumerate(rows):
        part = pool[at : at + m]
        at += m
        if r == bad and bad_kind == "none":
            out.append([])
        elif form == "tensor":
            out.append(part)
        elif m % 2 == 0 and m:
            out.append([part[: m // 2].reshape(1, m // 2, H), [part[m // 2 :]]])
        else:
            out.append([part[: m // 2], part[m // 2 :]])
    return out


def per_request_reference(dst, mask_cpu, per_request, offsets):
    """torch's answer request by request (index_put on each matching request's rows); (out, status list)."""
    out, status = dst.clone(), []
    for r, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        flat = inputs.flatten_items(per_request[r], "entry")
        rows = torch.cat(flat) if flat else dst.new_zeros(0, dst.shape[1])
        ok = int(mask_cpu[a:b].sum()) == rows.shape[0]
        status.append(ok)
        if ok and rows.shape[0]:
            out[a:b] = reference(out[a:b], mask_cpu[a:b], rows)
    return out, status


def run_checked(dst, mask_cpu, per_request, offsets, mask_device, path, bad=None):
    """Warm up (compiles) on a clone, then merge a fresh clone under sync debug mode "error"; compare."""
    mask = mask_cpu.to(DEV) if mask_device == "gpu" else mask_cpu
    expected, expected_status = per_request_reference(dst, mask_cpu, per_request, offsets)
    merge_requests(dst.clone(), per_request, mask, offsets, path=path)
    out = dst.clone()
    torch.cuda.synchronize()
    with sync_debug_error():
        status = merge_requests(out, per_request, mask, offsets, path=path)
    torch.cuda.synchronize()
    assert status.dtype == torch.bool and status.shape == (len(offsets) - 1,)
    assert status.device == (DEV if mask_device == "gpu" else torch.device("cpu"))
    assert status.cpu().tolist() == expected_status
    if bad is not None:
        assert expected_status.count(False) == 1 and not expected_status[bad]
        assert_same(out[offsets[bad] : offsets[bad + 1]], dst[offsets[bad] : offsets[bad + 1]], "the bad request")
    assert_same(out, expected, "the batch")
    return status


@pytest.mark.parametrize("bad", [0, 4, 7])
@pytest.mark.parametrize("bad_kind", BAD_KINDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mask_device", MASKS)
def test_one_bad_request_fails_alone_without_sync(mask_device, path, bad_kind, bad):
    mask = request_mask(seed=bad)
    offsets = offsets_of()
    per_request = embeddings(counts_of(mask, offsets), bad, bad_kind, torch.float32)
    dst = rand((mask.numel(), H), torch.bfloat16, seed=9)
    run_checked(dst, mask, per_request, offsets, mask_device, path, bad)


@pytest.mark.parametrize("form", ["tensor", "items"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("mask_device", MASKS)
def test_every_dtype_pair(mask_device, pair, form):
    src_dtype, dst_dtype = pair
    mask = request_mask(seed=3)
    offsets = offsets_of()
    per_request = embeddings(counts_of(mask, offsets), 5, "too_few", src_dtype, form=form, seed=4)
    dst = rand((mask.numel(), H), dst_dtype, seed=5, scale=100.0)
    run_checked(dst, mask, per_request, offsets, mask_device, "triton", bad=5)


@pytest.mark.parametrize("mask_device", MASKS)
def test_special_values_keep_their_bits(mask_device):
    """dst and embeddings of NaNs with payloads, -0.0, infinities, subnormals: the bad request's rows and the
    text rows keep every bit, the merged rows are torch's casts."""
    mask = request_mask(seed=6)
    offsets = offsets_of()
    counts = counts_of(mask, offsets)
    pool = special_matrix(sum(counts) + 1, H, torch.float32, shift=3)
    per_request, at = [], 0
    for r, c in enumerate(counts):
        m = c + (1 if r == 2 else 0)
        per_request.append(pool[at : at + m])
        at += m
    dst = special_matrix(mask.numel(), H, torch.float16, shift=1)
    run_checked(dst, mask, per_request, offsets, mask_device, "triton", bad=2)


@pytest.mark.parametrize("mask_device", MASKS)
def test_long_requests_and_many_bad(mask_device):
    """Requests longer than request_rows_kernel's scan block (several blocks, ranks carried), and several bad
    requests at once."""
    lengths = (20000, 3, 9000, 0, 40)
    mask = request_mask(lengths, seed=7)
    offsets = offsets_of(lengths)
    counts = counts_of(mask, offsets)
    rows = [counts[0], counts[1] + 1, counts[2], 0, counts[4] - 1]
    per_request = [rand((m, 64), torch.bfloat16, seed=10 + r) for r, m in enumerate(rows)]
    dst = rand((mask.numel(), 64), torch.float32, seed=8)
    status = run_checked(dst, mask, per_request, offsets, mask_device, "triton")
    assert status.cpu().tolist() == [True, False, True, True, False]


def edge_cases():
    """name: (lengths, lead, tail, rows per request from the counts)."""
    return {
        "one_request": ((700,), 0, 0, lambda c: c),
        "one_request_bad": ((700,), 0, 0, lambda c: [c[0] + 1]),
        "no_requests": ((), 3, 4, lambda c: c),
        "all_requests_empty": ((0, 0, 0), 10, 10, lambda c: c),
        "zero_row_request_with_embeddings": ((50, 0, 60), 0, 0, lambda c: [c[0], 4, c[2]]),
        "requests_without_embeddings": ((50, 60), 0, 0, lambda c: [0, c[1]]),
    }


@pytest.mark.parametrize("path", ["triton", "index_put"])
@pytest.mark.parametrize("mask_device", MASKS)
@pytest.mark.parametrize("case", list(edge_cases()))
def test_edge_cases(case, mask_device, path):
    lengths, lead, tail, rows_for = edge_cases()[case]
    mask = request_mask(lengths, lead, tail, seed=11)
    offsets = offsets_of(lengths, lead)
    per_request = [rand((m, H), torch.float16, seed=20 + r) for r, m in enumerate(rows_for(counts_of(mask, offsets)))]
    dst = rand((mask.numel(), H), torch.bfloat16, seed=12)
    run_checked(dst, mask, per_request, offsets, mask_device, path)


@pytest.mark.parametrize("mask_device", MASKS)
def test_zero_sized_inputs(mask_device):
    for n, hidden in ((0, 8), (6, 0)):
        dst = torch.ones(n, hidden, device=DEV)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[:2] = True
        offsets = [0, n // 2, n]
        per_request = [torch.ones(int(mask[: n // 2].sum()), hidden, device=DEV), torch.ones(0, hidden, device=DEV)]
        status = run_checked(dst, mask, per_request, offsets, mask_device, "triton")
        assert status.cpu().tolist() == [True, True]


def test_gpu_mask_rows_outside_every_request_are_never_written():
    mask = request_mask(seed=13)
    mask[0] = mask[-1] = True  # in the padding
    offsets = offsets_of()
    inside = mask.clone()
    inside[0] = inside[-1] = False
    per_request = embeddings(counts_of(mask, offsets), None, None, torch.float32)
    dst = rand((mask.numel(), H), torch.float32, seed=14)
    expected, _ = per_request_reference(dst, inside, per_request, offsets)
    for path in ("triton", "index_put"):
        out = dst.clone()
        status = merge_requests(out, per_request, mask.to(DEV), offsets, path=path)
        torch.cuda.synchronize()
        assert status.all().item()
        assert_same(out, expected, path)
    with pytest.raises(ValueError, match="outside every request"):  # a CPU mask refuses it, writing nothing
        merge_requests(dst.clone(), per_request, mask, offsets)


def test_items_sharing_memory_with_dst():
    """Embeddings that are views of inputs_embeds itself: read before anything is written (concatenated)."""
    mask = request_mask((40, 30), 0, 60, seed=15)
    offsets = offsets_of((40, 30), 0)
    counts = counts_of(mask, offsets)
    dst = rand((mask.numel(), H), torch.float32, seed=16)
    n = mask.numel()
    per_request = [dst[n - counts[0] :], dst[n - 60 : n - 60 + counts[1]]]  # rows of the tail padding
    expected, _ = per_request_reference(dst, mask, [t.clone() for t in per_request], offsets)
    status = merge_requests(dst, per_request, mask.to(DEV), offsets, path="triton")
    torch.cuda.synchronize()
    assert status.cpu().tolist() == [True, True]
    assert_same(dst, expected)


@pytest.mark.parametrize("mask_device", MASKS)
@pytest.mark.parametrize("path", PATHS)
def test_lone_item_sharing_memory_with_dst(path, mask_device):
    """A request's one item is rows of dst that the merge writes before it reaches them (rows 2-5 take rows
    0-3): read before anything is written, as vLLM's concatenation of the batch reads it (issue 21.8: refused
    with a CPU mask; read in place, while written, by the kernels with a GPU mask)."""
    n = 4096
    mask = torch.zeros(n, dtype=torch.bool)
    mask[2:6] = True
    offsets = [0, 8, n]
    dst = rand((n, H), torch.float32, seed=19)
    expected, _ = per_request_reference(dst, mask, [dst[0:4].clone(), []], offsets)
    out = dst.clone()
    status = merge_requests(out, [out[0:4], []], mask.to(DEV) if mask_device == "gpu" else mask, offsets, path=path)
    torch.cuda.synchronize()
    assert status.cpu().tolist() == [True, True]
    assert_same(out, expected)


def odd_address(values: torch.Tensor, offset: int) -> torch.Tensor:
    """``values`` [m, H] copied to a CUDA tensor ``offset`` bytes past an aligned address (a storage sliced at
    that byte, as DLPack or CUDA-array-interface memory may lie), so its address is not a multiple of its
    element size. Filled through its bytes: a kernel that loads or stores it as its dtype faults."""
    size = values.element_size()
    base = torch.zeros(values.numel() * size + 16, dtype=torch.uint8, device=DEV)
    storage = base.untyped_storage()[offset:]
    t = torch.empty(0, dtype=values.dtype, device=DEV).set_(storage, 0, tuple(values.shape), (values.shape[1], 1))
    t.unsqueeze(-1).view(torch.uint8).copy_(values.to(DEV).unsqueeze(-1).view(torch.uint8))
    t.keep_alive = base
    assert t.data_ptr() % size
    return t


@pytest.mark.parametrize(("dtype", "offset"), [(torch.float16, 1), (torch.float32, 2), (torch.bfloat16, 3)])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mask_device", MASKS)
def test_items_at_odd_addresses(mask_device, path, dtype, offset):
    """Items at addresses that are not a multiple of their element size (issue 21.6: with a GPU mask, a
    TypeError, or a misaligned-address fault that ends the CUDA context where PyTorch's cat read them): merged
    from aligned copies made through their bytes, alone, beside an aligned item, in a bad request. The
    reference reads the aligned values they were made from."""
    lengths = (300, 517, 64)
    mask = request_mask(lengths, seed=20)
    offsets = offsets_of(lengths)
    c = counts_of(mask, offsets)
    half = c[1] // 2
    values = [rand((c[0], H), dtype, seed=21), rand((half, H), dtype, seed=22), rand((c[1] - half, H), dtype, seed=23),
              rand((c[2] + 1, H), dtype, seed=24)]  # the last: one row too many, a bad request
    per_request = [odd_address(values[0], offset), [values[1], odd_address(values[2], offset)],
                   odd_address(values[3], offset)]
    dst = rand((mask.numel(), H), torch.float32, seed=25)
    expected, expected_status = per_request_reference(dst, mask, [values[0], values[1:3], values[3]], offsets)
    out = dst.clone()
    status = merge_requests(out, per_request, mask.to(DEV) if mask_device == "gpu" else mask, offsets, path=path)
    torch.cuda.synchronize()
    assert status.cpu().tolist() == expected_status == [True, True, False]
    assert_same(out, expected)


def test_same_layout_on_two_streams():
    """The request tables of one layout, merged on two streams back to back: each stream stages its own (a
    table copied on one stream is reused on that stream only)."""
    mask_cpu = request_mask(seed=17)
    offsets = offsets_of()
    per_request = embeddings(counts_of(mask_cpu, offsets), 3, "too_many", torch.bfloat16)
    dst = rand((mask_cpu.numel(), H), torch.bfloat16, seed=18)
    mask = mask_cpu.to(DEV)
    expected, expected_status = per_request_reference(dst, mask_cpu, per_request, offsets)
    outs, statuses = [dst.clone() for _ in range(4)], []
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for i, out in enumerate(outs):
        with torch.cuda.stream(streams[i % 2]):
            statuses.append(merge_requests(out, per_request, mask, offsets, path="triton"))
    torch.cuda.synchronize()
    for out, status in zip(outs, statuses):
        assert status.cpu().tolist() == expected_status
        assert_same(out, expected)


# ---- CUDA graphs ----------------------------------------------------------------------------------------------


GRAPH_LENGTHS = (300, 0, 517, 64, 1000, 129, 1, 777)
GRAPH_ROWS = (150, 0, 250, 30, 500, 60, 1, 400)  # each request's embedding rows: the captured layout


def graph_prompt(seed, bad, offsets, n):
    """A CPU mask whose requests have GRAPH_ROWS true rows each, except those in ``bad`` (one more, or one
    fewer where the request has no room)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    for r, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        k = GRAPH_ROWS[r]
        if r in bad:
            k = k + 1 if k + 1 <= b - a else k - 1
        mask[a + torch.randperm(b - a, generator=g)[:k]] = True
    return mask


@pytest.mark.parametrize("form", ["tensor", "items"])
@pytest.mark.parametrize("path", ["triton", "index_put"])
def test_gpu_mask_captured_and_replayed(path, form):
    offsets = offsets_of(GRAPH_LENGTHS)
    n = offsets[-1] + TAIL
    pool = rand((sum(GRAPH_ROWS), H), torch.float32, seed=30)
    per_request, at = [], 0
    for m in GRAPH_ROWS:
        part = pool[at : at + m]
        at += m
        per_request.append(part if form == "tensor" else [part[: m // 2], part[m // 2 :]])
    mask_buf = graph_prompt(31, (), offsets, n).to(DEV)
    dst = rand((n, H), torch.bfloat16, seed=32)
    captured = {}

    def step():
        captured["status"] = merge_requests(dst, per_request, mask_buf, offsets, path=path)

    g = capture(step)
    status = captured["status"]
    assert status.device == DEV
    for seed, bad in ((40, ()), (41, (2,)), (42, (0, 6)), (43, (7,)), (44, ())):
        mask = graph_prompt(seed, bad, offsets, n)
        new_dst = rand((n, H), torch.bfloat16, seed=seed + 100)
        new_pool = rand(pool.shape, torch.float32, seed=seed + 200)
        mask_buf.copy_(mask)
        dst.copy_(new_dst)
        pool.copy_(new_pool)
        g.replay()
        torch.cuda.synchronize()
        expected, expected_status = per_request_reference(new_dst, mask, per_request, offsets)
        assert expected_status == [r not in bad for r in range(8)]
        assert status.cpu().tolist() == expected_status, f"prompt {seed}"
        assert_same(dst, expected, f"prompt {seed}, bad {bad}")


@pytest.mark.parametrize("path", ["triton", "index_put"])
def test_capturing_an_unseen_layout_raises(path):
    """A layout never merged before capture has no device tables, and none can be staged during capture:
    RuntimeError, nothing written, the device still usable; after one call outside, the capture works."""
    lengths = (37, 41, 43)  # a layout no other test merges
    mask_cpu = request_mask(lengths, 0, 0, seed=50)
    offsets = offsets_of(lengths, 0)
    per_request = [rand((c, H), torch.float16, seed=51 + r) for r, c in enumerate(counts_of(mask_cpu, offsets))]
    mask = mask_cpu.to(DEV)
    dst = rand((mask_cpu.numel(), H), torch.float16, seed=52)
    before = dst.clone()
    merge_requests(rand((9, H), torch.float16, seed=53), [rand((1, H), torch.float16, seed=54)],
                   torch.ones(9, dtype=torch.bool, device=DEV), [0, 1], path=path)  # compiles, another layout
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="has not merged before"):
        with torch.cuda.graph(g):
            merge_requests(dst, per_request, mask, offsets, path=path)
    torch.cuda.synchronize()
    assert_same(dst, before)
    expected, _ = per_request_reference(dst, mask_cpu, per_request, offsets)
    captured = {}
    g = capture(lambda: captured.update(status=merge_requests(dst, per_request, mask, offsets, path=path)))
    dst.copy_(before)
    g.replay()
    torch.cuda.synchronize()
    assert captured["status"].all().item()
    assert_same(dst, expected)


def test_capturing_a_cpu_mask_raises():
    """A CPU mask's row map is staged per call (as for merge_multimodal_embeddings): capture is refused."""
    mask = request_mask(seed=60)
    offsets = offsets_of()
    per_request = embeddings(counts_of(mask, offsets), None, None, torch.float32)
    dst = rand((mask.numel(), H), torch.bfloat16, seed=61)
    merge_requests(dst.clone(), per_request, mask, offsets, path="triton")
    torch.cuda.synchronize()
    before = dst.clone()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be"):
        with torch.cuda.graph(g):
            merge_requests(dst, per_request, mask, offsets, path="triton")
    torch.cuda.synchronize()
    assert_same(dst, before)


@pytest.mark.parametrize("path", ("triton", "auto"))
def test_gpu_mask_items_with_the_negative_bit(path):
    """An item that is a lazily negated view (torch._neg_view; z.conj().imag) merges its values, -x, as
    torch.cat then index_put would: the item table would read its memory raw, so it is concatenated first."""
    n = 2048
    mask = torch.zeros(n, dtype=torch.bool)
    mask[100:164] = True
    offsets = [0, 1024, n]
    raw = rand((64, H), torch.float32, seed=23)
    dst = rand((n, H), torch.bfloat16, seed=24)
    expected, _ = per_request_reference(dst, mask, [-raw, []], offsets)
    out = dst.clone()
    status = merge_requests(out, [torch._neg_view(raw), []], mask.to(DEV), offsets, path=path)
    torch.cuda.synchronize()
    assert status.cpu().tolist() == [True, True]
    assert_same(out, expected)


def test_gpu_mask_under_forward_ad_gives_pytorch_tangents():
    """Under forward-mode AD the kernels see no tangents: the PyTorch form runs, and the merged rows carry
    the source's tangent, as index_put would give."""
    import torch.autograd.forward_ad as fwAD

    n = 512
    mask = torch.zeros(n, dtype=torch.bool)
    mask[10:40] = True
    offsets = [0, 256, n]
    dst, dst_t = rand((n, H), torch.float32, seed=25), rand((n, H), torch.float32, seed=26)
    src, src_t = rand((30, H), torch.float32, seed=27), rand((30, H), torch.float32, seed=28)
    with fwAD.dual_level():
        out = fwAD.make_dual(dst.clone(), dst_t.clone())
        status = merge_requests(out, [fwAD.make_dual(src, src_t), []], mask.to(DEV), offsets)
        tangent = fwAD.unpack_dual(out).tangent
    assert status.cpu().tolist() == [True, True]
    expected = dst_t.clone()
    expected[mask.to(DEV)] = src_t
    assert_same(tangent, expected)
