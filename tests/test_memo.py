"""The memo of prepared merges (core._prepared) on the CPU: a signature's entry is made once, by core._prepare,
and then serves every call of it (a memo hit), and each thing the signature does not fix is checked on every
call (core.check_call, the executor's count), so that a hit gets the result or error of a call prepared afresh.
Each test of a hit first makes the entry with a good call, then sends the adversarial one through the same
signature. What the key holds: one entry per value of each of its fields, none for a call without a signature.
"""
import pytest
import torch

import mmmerge_triton as mm
from mmmerge_triton import api, core, dispatch, kernel_config

from .conftest import assert_merged, make_mask, reference_merge

H = 16


@pytest.fixture(autouse=True)
def fresh_memo():
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def inputs(n: int, m: int, seed: int = 0, dtype=torch.float32, src_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:m]] = True
    return torch.randn(n, H, dtype=dtype, generator=g), mask, torch.randn(m, H, generator=g).to(src_dtype)


@pytest.fixture
def prepared(monkeypatch):
    """The signatures core._prepare is called with (None: a call without one), one per entry made."""
    made = []
    real = core._prepare
    monkeypatch.setattr(core, "_prepare", lambda *a: made.append(a[0]) or real(*a))
    return made


@pytest.mark.parametrize("path", ["auto", "triton"])
def test_one_entry_serves_a_bucket_of_sizes(prepared, path):
    """N and M vary inside their quarter-octave buckets ([160, 192) and [80, 96)): one entry, every result right."""
    for i, (n, m) in enumerate([(160, 80), (170, 90), (191, 95), (175, 81)]):
        dst, mask, src = inputs(n, m, seed=i)
        before = dst.clone()
        mm.merge_multimodal_embeddings(dst, src, mask, path=path)
        assert_merged(dst, before, mask, src, accumulate=False, path=path)
    (key,) = prepared
    assert key is not None and list(core._prepared) == [key]
    entry = core._prepared[key]
    if path == "auto":  # CPU tensors: index_put
        assert entry.decision.path == "index_put" and entry.launch is None
    else:
        assert entry.decision.path == "triton" and entry.launch.kind == entry.decision.kind == kernel_config.HOST_ROWS


@pytest.mark.parametrize("path", ["auto", "triton"])
def test_the_entry_runs_what_explain_returns(prepared, path):
    dst, mask, src = inputs(300, 100)
    mm.merge_multimodal_embeddings(dst, src, mask, path=path)
    decision = mm.explain(dst, src, mask, path=path)
    (entry,) = core._prepared.values()
    assert entry.decision == decision
    assert len(prepared) == 1  # explain() read the entry the call made


def test_explain_on_a_new_signature_makes_the_entry_the_call_hits(prepared):
    dst, mask, src = inputs(300, 100)
    decision = mm.explain(dst, src, mask, path="triton")
    assert len(prepared) == 1
    before = dst.clone()
    mm.merge_multimodal_embeddings(dst, src, mask, path="triton")
    assert len(prepared) == 1 and [e.decision for e in core._prepared.values()] == [decision]
    assert_merged(dst, before, mask, src, accumulate=False, path="triton")


@pytest.mark.parametrize("path", ["auto", "triton"])
def test_a_count_mismatch_on_a_hit_raises_vllms_error_and_writes_nothing(path):
    dst, mask, src = inputs(170, 90)
    mm.merge_multimodal_embeddings(dst, src, mask, path=path)
    dst, mask, _ = inputs(170, 90, seed=1)
    before = dst.clone()
    with pytest.raises(ValueError, match=r"Attempted to assign 89 = 89 multimodal tokens to 90 placeholders"):
        mm.merge_multimodal_embeddings(dst, torch.randn(89, H), mask, path=path)
    with pytest.raises(ValueError, match=r"Attempted to assign 89 multimodal tokens to 90 placeholders"):
        mm.masked_row_scatter_(dst, mask, torch.randn(89, H), path=path)
    assert torch.equal(dst, before)


@pytest.mark.parametrize("path", ["auto", "triton"])
def test_src_inside_dst_on_a_hit_is_refused_as_pytorch_refuses(path):
    """A src that is a view of dst's own rows, with the signature of a good call (same strides, alignment)."""
    big = torch.randn(400, H)
    dst, mask, src = big[:200], make_mask("random50", (200,)), None
    m = int(mask.sum())
    mm.merge_multimodal_embeddings(dst, torch.randn(400, H)[200 : 200 + m], mask, path=path)  # the entry
    before = big.clone()
    with pytest.raises(ValueError, match="shares memory"):
        mm.merge_multimodal_embeddings(dst, big[100 : 100 + m], mask, path=path)
    assert torch.equal(big, before)
    src = big[200 : 200 + m]  # disjoint rows of the same storage: merged
    mm.merge_multimodal_embeddings(dst, src, mask, path=path)
    assert_merged(dst, before[:200], mask, before[200 : 200 + m], accumulate=False, path=path)


def test_a_mask_made_of_dsts_bytes_on_a_hit():
    """A mask viewed from dst's own first row (contiguous, aligned: the signature of the good call before it)."""
    dst, mask, src = inputs(64, 20)
    mm.masked_row_scatter_(dst, mask, src, path="triton")  # the entry
    storage = torch.zeros(64 * H)
    dst2, mask2 = storage.view(64, H), storage.view(torch.uint8)[:64].view(torch.bool)
    storage.view(torch.uint8)[:64] = (torch.arange(64) % 3 == 0).to(torch.uint8) * 7  # bytes 0 or 7
    src2 = torch.randn(int(mask2.sum()), H)
    expected = reference_merge(dst2.clone(), mask2.clone(), src2, False)
    mm.masked_row_scatter_(dst2, mask2, src2, path="triton")
    assert torch.equal(dst2, expected)


def test_gradients_on_a_signature_take_the_registered_op(monkeypatch):
    """A call that needs gradients, of a signature with an entry, runs the registered out-of-place op (its
    autograd formula), and an in-place merge into a leaf that requires grad raises PyTorch's error."""
    dst, mask, src = inputs(170, 90)
    mm.merge_multimodal_embeddings(dst, src, mask)
    ops = []
    real, real_ = api._OPS[False]
    monkeypatch.setitem(api._OPS, False, (lambda *a: ops.append(a[3:]) or real(*a), real_))
    leaf = src.clone().requires_grad_()
    base = torch.randn(170, H, requires_grad=True)
    out = mm.masked_row_scatter(base, mask, leaf)
    out.sum().backward()
    assert ops == [(False, "auto", False)]
    assert torch.equal(leaf.grad, torch.ones_like(src)) and torch.equal(base.grad, (~mask).float()[:, None].expand(-1, H))
    dst2 = base.detach().clone().requires_grad_()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        mm.merge_multimodal_embeddings(dst2, src, mask)


def test_inference_tensors_on_a_hit():
    with torch.inference_mode():
        dst, mask, src = inputs(170, 90)
        before = dst.clone()
        mm.merge_multimodal_embeddings(dst, src, mask, path="triton")  # written in place under inference mode
        assert_merged(dst, before, mask, src, accumulate=False, path="triton")
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        mm.merge_multimodal_embeddings(dst, src, mask, path="triton")


def test_other_shapes_and_flags_on_a_hit():
    dst, mask, src = inputs(170, 90)
    mm.masked_row_scatter_(dst, mask, src, path="triton")
    with pytest.raises(ValueError, match="expected"):
        mm.masked_row_scatter_(dst, mask[:-1], src, path="triton")  # N differs from the mask's, same buckets
    with pytest.raises(TypeError, match="accumulate must be a bool"):
        mm.masked_row_scatter_(dst, mask, src, accumulate=0, path="triton")  # 0 == False, but not a bool
    with pytest.raises(TypeError, match="check_count must be a bool"):
        mm.masked_row_scatter_(dst, mask, src, check_count=0, path="triton")
    with pytest.raises(ValueError, match="path must be"):
        mm.masked_row_scatter_(dst, mask, src, path="fast")


def test_a_call_that_fails_its_checks_makes_no_entry(prepared):
    """The first call of a signature fails a check (a mask one row short): nothing is kept, and the next good
    call of that signature prepares the entry and merges right."""
    dst, mask, src = inputs(170, 90)
    with pytest.raises(ValueError, match="expected"):
        mm.masked_row_scatter_(dst, mask[:-1], src[:-1], path="triton")
    assert prepared and not core._prepared
    before = dst.clone()
    mm.masked_row_scatter_(dst, mask, src, path="triton")
    assert len(core._prepared) == 1
    assert_merged(dst, before, mask, src, accumulate=False, path="triton")


@pytest.mark.parametrize("accumulate", [False, True])
def test_every_dtype_pair_through_entries(accumulate):
    for i, (d, s) in enumerate([(d, s) for d in (torch.float32, torch.float16, torch.bfloat16)
                                for s in (torch.float32, torch.float16, torch.bfloat16)]):
        for repeat in range(2):  # the second call hits the entry
            dst, mask, src = inputs(100 + repeat, 40 + repeat, seed=10 * i + repeat, dtype=d, src_dtype=s)
            before = dst.clone()
            mm.masked_row_scatter_(dst, mask, src, accumulate=accumulate, path="triton")
            assert_merged(dst, before, mask, src, accumulate=accumulate, path="triton")


def _offset(t: torch.Tensor, elements: int) -> torch.Tensor:
    """t's values at an address ``elements`` elements past an aligned one (same shape and strides)."""
    flat = torch.empty(elements + t.numel(), dtype=t.dtype)[elements:]
    return flat.view(t.shape).copy_(t)


def _strided(t: torch.Tensor, extra: int) -> torch.Tensor:
    """t's values in rows ``extra`` elements longer than H (its row stride H + extra)."""
    out = torch.zeros(t.shape[0], t.shape[1] + extra, dtype=t.dtype)[:, : t.shape[1]]
    return out.copy_(t)


def _narrow(t: torch.Tensor, h: int) -> torch.Tensor:
    """t's first h columns, its row stride kept: only H changes."""
    return t[:, :h]


def _strided_mask(mask: torch.Tensor) -> torch.Tensor:
    every_other = torch.zeros(2 * mask.shape[0], dtype=torch.bool)
    every_other[::2] = mask
    return every_other[::2]


# One field of the key changed from the good call's (dst [170, H] fp32, mask [170], src [90, H] fp32, no flags,
# path "triton"): (dst, mask, src) -> (dst, mask, src), and the keyword arguments.
FIELDS = {
    "dst dtype": (lambda d, k, s: (d.half(), k, s), {}),
    "src dtype": (lambda d, k, s: (d, k, s.half()), {}),
    "dst row stride": (lambda d, k, s: (_strided(d, 4), k, s), {}),
    "src row stride": (lambda d, k, s: (d, k, _strided(s, 4)), {}),
    "hidden size": (lambda d, k, s: (_narrow(d, 8), k, _narrow(s, 8)), {}),
    "dst address mod 16": (lambda d, k, s: (_offset(d, 1), k, s), {}),
    "src address mod 16": (lambda d, k, s: (d, k, _offset(s, 1)), {}),
    "mask address mod 16": (lambda d, k, s: (d, _offset(k, 1), s), {}),
    "mask contiguity": (lambda d, k, s: (d, _strided_mask(k), s), {}),
    "accumulate": (lambda d, k, s: (d, k, s), {"accumulate": True}),
    "check_count": (lambda d, k, s: (d, k, s), {"check_count": True}),
    "path": (lambda d, k, s: (d, k, s), {"path": "index_put"}),
}


@pytest.mark.parametrize("field", list(FIELDS))
def test_each_field_of_the_key_makes_its_own_entry(prepared, field):
    """A call that differs from a good one in one field of its signature is prepared for itself (a hit of the
    good call's entry would run what was decided for other facts), and merges right; its repeat hits."""
    dst, mask, src = inputs(170, 90)
    mm.masked_row_scatter_(dst, mask, src, path="triton")
    change, kwargs = FIELDS[field]
    dst, mask, src = change(*inputs(170, 90, seed=1))
    kwargs = {"path": "triton", **kwargs}
    for _ in range(2):
        before = dst.clone()
        mm.masked_row_scatter_(dst, mask, src, **kwargs)
        assert_merged(dst, before, mask, src, accumulate=kwargs.get("accumulate", False), path=kwargs["path"])
    assert len(prepared) == len(set(prepared)) == len(core._prepared) == 2, f"{field}: {prepared}"


@pytest.mark.parametrize("size", ["n", "m"])
def test_another_bucket_of_n_or_m_makes_its_own_entry(prepared, size):
    mm.masked_row_scatter_(*inputs(170, 90), path="triton")  # N in [160, 192), M in [80, 96)
    dst, mask, src = inputs(200, 90) if size == "n" else inputs(170, 100)
    before = dst.clone()
    mm.masked_row_scatter_(dst, mask, src, path="triton")
    assert_merged(dst, before, mask, src, accumulate=False, path="triton")
    assert len(prepared) == len(core._prepared) == 2


def test_a_negated_dst_does_not_hit_the_entry_of_its_plain_twin():
    """dst with the negative bit (torch._neg_view): the Triton path refuses it (the kernels write raw values,
    PyTorch writes their negation); a hit of the plain call's entry would write them."""
    dst, mask, src = inputs(170, 90)
    mm.masked_row_scatter_(dst, mask, src, path="triton")
    dst, mask, src = inputs(170, 90, seed=1)
    before = dst.clone()
    with pytest.raises(ValueError, match="negative bit"):
        mm.masked_row_scatter_(torch._neg_view(dst), mask, src, path="triton")
    assert torch.equal(dst, before) and len(core._prepared) == 1


def strided_3d(dst: torch.Tensor) -> torch.Tensor:
    """dst's values in a 3-D view that is not contiguous (its rows padded), which therefore has no [N, H] view."""
    padded = torch.zeros(dst.shape[0], dst.shape[1] + 3, dtype=dst.dtype)
    padded[:, :dst.shape[1]] = dst
    return padded[:, :dst.shape[1]][None]


UNSIGNED = {
    "strided 3-D dst": lambda dst, mask, src: mm.masked_row_scatter_(strided_3d(dst), mask[None], src, path="triton"),
    "list of items": lambda dst, mask, src: mm.merge_multimodal_embeddings(dst, [src[:40], src[40:]], mask,
                                                                           path="triton"),
    "plan": lambda dst, mask, src: mm.masked_row_scatter_(dst, src=src, plan=mm.MergePlan(mask), path="triton"),
}


@pytest.mark.parametrize("form", list(UNSIGNED))
def test_a_call_without_a_signature_is_prepared_every_time(prepared, form):
    """A strided 3-D dst, a list of items, a plan: no signature, so every call is prepared and none is kept."""
    for seed in range(2):
        dst, mask, src = inputs(170, 90, seed=seed)
        before = dst.clone()
        if form == "strided 3-D dst":
            view = strided_3d(dst)
            mm.masked_row_scatter_(view, mask[None], src, path="triton")
            dst = view[0]
        else:
            UNSIGNED[form](dst, mask, src)
        assert_merged(dst, before, mask, src, accumulate=False, path="triton")
    assert prepared == [None, None] and not core._prepared


@pytest.mark.parametrize("entry", ["masked_row_scatter_", "merge_multimodal_embeddings", "masked_row_scatter"])
def test_a_contiguous_batched_dst_is_signed_as_its_rows(prepared, entry):
    """A contiguous dst [B, S, H] with its mask [B, S] merges as the [B*S, H] and [B*S] views of the same rows:
    prepared on its first call under the rows' signature, a memo hit after, PyTorch's result each time."""
    for seed in range(3):
        dst, mask, src = inputs(170, 90, seed=seed)
        before = dst.clone()
        batched, batched_mask = dst.view(2, 85, H), mask.view(2, 85)
        if entry == "masked_row_scatter_":
            mm.masked_row_scatter_(batched, batched_mask, src, path="triton")
        elif entry == "merge_multimodal_embeddings":
            mm.merge_multimodal_embeddings(batched, src, batched_mask, path="triton")
        else:
            batched.copy_(mm.masked_row_scatter(batched, batched_mask, src, path="triton"))
        assert_merged(dst, before, mask, src, accumulate=False, path="triton")
    assert len(prepared) == 1 and prepared[0] is not None and list(core._prepared) == prepared


def test_the_signature_is_none_where_a_call_has_none():
    dst, mask, src = inputs(170, 90)
    assert core._signature(dst, mask, src, False, False, "auto") is not None
    assert core._signature(dst[None], mask[None], src, False, False, "auto") is None
    assert core._signature(dst[0], mask[0], src[:1], False, False, "auto") is None  # one row: dst [H], mask []
    assert core._signature(dst, mask, src, 0, False, "auto") is None  # a flag that is not a bool
    assert core._signature(dst, mask, [src], False, False, "auto") is None
    assert core._signature(dst, mask, src.to_sparse(), False, False, "auto") is None  # no strides


def test_a_full_memo_starts_over(monkeypatch, prepared):
    monkeypatch.setattr(core, "_MAX_ENTRIES", 2)
    for i, n in enumerate((100, 200, 400)):  # three buckets of N: three signatures
        mm.masked_row_scatter_(*inputs(n, 50, seed=i), path="triton")
    assert len(prepared) == 3 and list(core._prepared) == [prepared[-1]]


def test_clear_cache_drops_the_entries():
    dst, mask, src = inputs(170, 90)
    mm.merge_multimodal_embeddings(dst, src, mask)
    assert core._prepared
    dispatch.clear_cache()
    assert not core._prepared
