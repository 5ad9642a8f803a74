"""Issue 21 (items 3, 4, 8's list part, 9, 10) and issue 20 §5 (bullets 2, 3), on the CPU; PyTorch, or vLLM's
``_merge_multimodal_embeddings`` (``torch.cat`` of a list, then ``inputs_embeds[mask] = cat.to(dtype)``), is
the oracle. The same cases on CUDA: tests/gpu/test_round2.py.
"""
from __future__ import annotations

import pytest
import torch

import mmmerge_triton as mm
from mmmerge_triton import inputs

from .conftest import ALL_PATHS, assert_bits_equal, randn

N, H, M = 10, 8, 3


def placeholders(n: int = N, k: int = M) -> torch.Tensor:
    """A CPU mask of ``n`` rows whose first ``k`` rows are true: the rows a source taken from dst's tail
    does not overlap, so that any write at all would show."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:k] = True
    return mask


def vllm_merge(inputs_embeds: torch.Tensor, embeddings, mask: torch.Tensor) -> torch.Tensor:
    """vLLM's merge on a copy of inputs_embeds: torch.cat of the flattened items (a copy), then index_put."""
    out = inputs_embeds.clone()
    flat = embeddings if isinstance(embeddings, torch.Tensor) else torch.cat(inputs.flatten_items(embeddings, "e"))
    out[mask] = flat.to(out.dtype)
    return out


# ---- 21.3: a list's dtype is torch.cat's, the promotion of all its items -----------------------------------------

# 1 + 2^-11 + 2^-40: torch.cat promotes to float64, and .to(float16) rounds through float32 to 1.0 (a tie to
# even); read as float32 (the first item's dtype) and cast once by the kernel, it became 1.0009765625.
TIE_PLUS = 1 + 2.0 ** -11 + 2.0 ** -40


def mixed_items():
    return [torch.ones(1, H), torch.full((2, H), TIE_PLUS, dtype=torch.float64)]


@pytest.mark.parametrize("path", ["auto", "index_put", "masked_scatter", "index_copy"])
def test_list_with_a_float64_item_merges_as_torch_cat_promotes(path):
    dst, mask, items = torch.zeros(N, H, dtype=torch.float16), placeholders(), mixed_items()
    expected = vllm_merge(dst, items, mask)
    assert expected[1, 0].item() == 1.0  # the oracle's double rounding
    mm.merge_multimodal_embeddings(dst, items, mask, path=path)
    assert_bits_equal(dst, expected)


def test_list_with_a_float64_item_is_refused_by_path_triton_before_writing():
    """The list is float64 (as a float64 tensor is): path='triton' names the dtype and writes nothing."""
    dst, mask = torch.zeros(N, H, dtype=torch.float16), placeholders()
    with pytest.raises(ValueError, match=r"path='triton' cannot merge .*float64"):
        mm.merge_multimodal_embeddings(dst, mixed_items(), mask, path="triton")
    assert not dst.any()


@pytest.mark.parametrize("order", ["float64_last", "float64_first"])
def test_explain_reads_the_promoted_dtype_of_a_list(order):
    items = mixed_items() if order == "float64_last" else mixed_items()[::-1]
    decision = mm.explain(torch.zeros(N, H, dtype=torch.float16), items, placeholders())
    assert decision.path == "index_put" and "float64" in decision.reason, decision


def test_items_dtype_is_torch_cats():
    for dtypes in [(torch.float16, torch.bfloat16), (torch.float32, torch.float64), (torch.bfloat16,),
                   (torch.float16, torch.float16, torch.float32)]:
        items = [torch.zeros(1, H, dtype=d) for d in dtypes]
        assert inputs.items_dtype(items) == torch.cat(items).dtype, dtypes


# ---- 21.4: a count mismatch raises on every form of the source --------------------------------------------------

COUNT_SOURCES = {  # name -> (source for 3 placeholders, the count as vLLM spells it)
    "tensor": (lambda: randn(2, H), "2 = 2"),
    "list": (lambda: [randn(1, H), randn(1, H, seed=1)], "1 + 1 = 2"),
    "nested_list": (lambda: [[randn(1, H)], [randn(1, H, seed=1)]], "1 + 1 = 2"),
    "empty_list": (lambda: [], "0"),
    "empty_tuple": (lambda: (), "0"),
    "nested_empty_list": (lambda: [[]], "0"),
    "two_nested_empties": (lambda: [[], ()], "0"),
}


@pytest.mark.parametrize("source", COUNT_SOURCES)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_count_mismatch_raises_on_every_form_of_the_source(path, source):
    make, count = COUNT_SOURCES[source]
    dst = randn(N, H)
    before = dst.clone()
    with pytest.raises(ValueError) as info:
        mm.merge_multimodal_embeddings(dst, make(), placeholders(), path=path)
    assert str(info.value) == f"Attempted to assign {count} multimodal tokens to {M} placeholders"
    assert_bits_equal(dst, before)


@pytest.mark.parametrize("empty", [[], (), [[]], [[], ()]], ids=["list", "tuple", "nested", "two_nested"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_empty_source_with_no_placeholders_leaves_dst_unchanged(path, empty):
    dst = randn(N, H)
    before = dst.clone()
    assert mm.merge_multimodal_embeddings(dst, empty, placeholders(k=0), path=path) is dst
    assert_bits_equal(dst, before)


def test_empty_source_still_checks_the_mask():
    with pytest.raises(TypeError, match=r"\bis_multimodal\b must be a bool tensor"):
        mm.merge_multimodal_embeddings(randn(N, H), [], placeholders().int())


# ---- 21.8 (list part): a one-item list overlapping dst is concatenated first, as vLLM does ----------------------

ONE_ITEM_LISTS = {"list": lambda x: [x], "nested": lambda x: [[x]], "tuple": lambda x: (x,)}


@pytest.mark.parametrize("form", ONE_ITEM_LISTS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_one_item_list_overlapping_dst_merges_as_vllm(path, form):
    """The item is dst's last rows; the mask's rows are the first ones, then the item's own rows too."""
    dst = randn(N, H)
    mask = placeholders(k=M)
    mask[-1] = True  # the item's last row is overwritten by the merge: read before the write, as cat does
    item = dst[N - M - 1:]
    expected = vllm_merge(dst, ONE_ITEM_LISTS[form](dst.clone()[N - M - 1:]), mask)
    mm.merge_multimodal_embeddings(dst, ONE_ITEM_LISTS[form](item), mask, path=path)
    assert_bits_equal(dst, expected)


def test_one_item_list_overlapping_dst_merges_with_gradients():
    base = randn(N, H).requires_grad_()
    dst = base * 1
    mask = placeholders(k=M + 1)
    expected = vllm_merge(dst.detach(), [dst.detach()[N - M - 1:]], mask)
    mm.merge_multimodal_embeddings(dst, [dst[N - M - 1:]], mask)
    assert_bits_equal(dst.detach(), expected)
    dst.sum().backward()
    assert base.grad is not None


# ---- 21.9: disjoint views of one buffer merge; views that truly share bytes are refused -------------------------

def column_halves():
    """dst the left half of each row of a buffer, src the right half of its first rows: interleaved, disjoint."""
    buf = randn(N, 2 * H)
    return buf, buf[:, :H], buf[:M, H:]


def every_other_row():
    """dst the even rows of a buffer, src its first odd rows: interleaved, disjoint."""
    buf = randn(2 * N, H)
    return buf, buf[::2], buf[1:2 * M:2]


DISJOINT_VIEWS = {"column_halves": column_halves, "every_other_row": every_other_row}


@pytest.mark.parametrize("views", DISJOINT_VIEWS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_disjoint_views_of_one_buffer_merge_as_pytorch(path, views):
    buf, dst, src = DISJOINT_VIEWS[views]()
    expected_buf = buf.clone()
    expected_dst = expected_buf.as_strided(dst.shape, dst.stride(), dst.storage_offset())
    expected_src = expected_buf.as_strided(src.shape, src.stride(), src.storage_offset())
    expected_dst[placeholders()] = expected_src  # PyTorch merges these (it cannot tell, and they are disjoint)
    mm.masked_row_scatter_(dst, placeholders(), src, path=path)
    assert_bits_equal(buf, expected_buf)


@pytest.mark.parametrize("form", ["tensor", "list"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_merge_multimodal_embeddings_takes_column_halves(path, form):
    buf, dst, src = column_halves()
    expected = buf.clone()
    expected[:, :H][placeholders()] = expected[:M, H:]
    mm.merge_multimodal_embeddings(dst, src if form == "tensor" else [src[:1], src[1:]], placeholders(), path=path)
    assert_bits_equal(buf, expected)


def test_column_halves_merge_with_gradients_as_pytorch():
    leaf = randn(N, 2 * H).requires_grad_()
    buf = leaf * 1
    mm.masked_row_scatter_(buf[:, :H], placeholders(), buf[:M, H:])
    leaf_ref = leaf.detach().clone().requires_grad_()
    buf_ref = leaf_ref * 1
    buf_ref[:, :H][placeholders()] = buf_ref[:M, H:]
    assert_bits_equal(buf.detach(), buf_ref.detach())
    weight = randn(N, 2 * H, seed=5)
    (buf * weight).sum().backward()
    (buf_ref * weight).sum().backward()
    assert_bits_equal(leaf.grad, leaf_ref.grad)


def overlapping_rows():
    """src the last rows of a contiguous dst: PyTorch refuses this write."""
    dst = randn(N, H)
    return dst, dst[N - M:]


def overlapping_columns():
    """dst the left half of a buffer, src columns straddling both halves: they share bytes."""
    buf = randn(N, 2 * H)
    return buf[:, :H], buf[:M, H // 2: H // 2 + H]


OVERLAPPING_VIEWS = {"rows": overlapping_rows, "columns": overlapping_columns}


@pytest.mark.parametrize("views", OVERLAPPING_VIEWS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_views_that_share_bytes_are_refused_before_writing(path, views):
    dst, src = OVERLAPPING_VIEWS[views]()
    before = dst.clone()
    with pytest.raises(ValueError, match=r"src shares memory with dst.*Clone src"):
        mm.masked_row_scatter_(dst, placeholders(), src, path=path)
    assert_bits_equal(dst, before)


def test_pytorch_refuses_the_contiguous_overlap():
    dst, src = overlapping_rows()
    with pytest.raises(RuntimeError, match="single memory location"):
        dst[placeholders()] = src


@pytest.mark.parametrize("case, shares", [
    (lambda b: (b[:, :H], b[:M, H:]), False),
    (lambda b: (b[:, :H], b[:M, H // 2:H // 2 + H]), True),
    (lambda b: (b[:, :H], b[:M, H - 1:H]), True),  # one column in common
    (lambda b: (b[:N // 2], b[N // 2:]), False),
    (lambda b: (b[:N // 2], b[N // 2 - 1:]), True),
    (lambda b: (b.view(-1)[::2], b.view(-1)[1::2]), False),
    (lambda b: (b[:, :H], b.view(torch.bfloat16)[:M, 2 * H:4 * H]), False),  # the right half, as bf16 pairs
    (lambda b: (b[:, :H], b.view(torch.bfloat16)[:M, 2 * H - 1:3 * H]), True),  # one bf16 half of a float
    (lambda b: (b[:1].expand(M, 2 * H), b[1:M]), False),
    (lambda b: (b[:1].expand(M, 2 * H), b[:M, 2 * H - 1:]), True),
    (lambda b: (b.t()[:H], b.t()[H:]), False),
    (lambda b: (b, randn(N, 2 * H)), False),
], ids=["column_halves", "straddling_columns", "one_column", "row_halves", "one_row", "even_odd",
        "bf16_right_half", "bf16_one_half_float", "expanded_row", "expanded_row_last_column", "transposed_halves",
        "other_allocation"])
def test_overlaps_is_exact(case, shares):
    a, b = case(randn(N, 2 * H))
    assert inputs.overlaps(a, b) is shares
    assert inputs.overlaps(b, a) is shares


# ---- 21.10: in place with gradients, a source sharing dst's memory is refused as without them -------------------

@pytest.mark.parametrize("api", ["masked_row_scatter_", "merge_multimodal_embeddings"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_in_place_with_gradients_refuses_a_source_sharing_dst(path, api):
    base = randn(N, H).requires_grad_()
    dst = base * 1  # a non-leaf that requires grad: in place is legal, the aliasing source is not
    src = dst[N - M:]
    before = dst.detach().clone()
    other = base * 1
    with pytest.raises(RuntimeError, match="single memory location"):  # PyTorch's answer to the same call
        other.index_put_((placeholders(),), other[N - M:])
    with pytest.raises(ValueError, match=r"shares memory with .*Clone"):
        if api == "masked_row_scatter_":
            mm.masked_row_scatter_(dst, placeholders(), src, path=path)
        else:
            mm.merge_multimodal_embeddings(dst, src, placeholders(), path=path)
    assert_bits_equal(dst.detach(), before)
    with torch.no_grad(), pytest.raises(ValueError, match=r"shares memory with .*Clone"):  # as without gradients
        mm.masked_row_scatter_(dst, placeholders(), src, path=path)


# ---- 20.5, bullet 2: a 1-D inputs_embeds is explained as masked_row_scatter_ explains a 1-D dst -----------------

@pytest.mark.parametrize("form", ["tensor", "list"])
def test_one_dimensional_inputs_embeds_is_explained_naming_it(form):
    embeds, mask = torch.zeros(8), torch.ones(8, dtype=torch.bool)  # N rows of H=16 meant, [N] passed
    src = torch.zeros(1, 16)
    with pytest.raises(ValueError, match=r"^is_multimodal has shape \(8,\); inputs_embeds is 1-D \(one row of H=8\), "
                                         r"so is_multimodal must be a 0-dim bool. For N rows pass inputs_embeds as "
                                         r"\[N, H\]$"):
        mm.merge_multimodal_embeddings(embeds, src if form == "tensor" else [src], mask)
    with pytest.raises(ValueError, match=r"^mask has shape \(8,\); dst is 1-D"):  # the wording it follows
        mm.masked_row_scatter_(embeds, mask, src)


# ---- 20.5, bullet 3: one wording whichever route runs (plain tensors, or a subclass through the registered ops) --

class Subclass(torch.Tensor):
    """A trivial subclass: the API takes the registered ops' route for it."""


class Wrapper(torch.Tensor):
    """A subclass with a __torch_function__ of its own, as wrappers have (this one passes every call on)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def _mask():
    return placeholders()


BAD_MERGES = {  # name -> (inputs_embeds, multimodal_embeddings, is_multimodal, keyword arguments)
    "count_list": lambda: (randn(N, H), [randn(1, H), randn(1, H)], _mask(), {}),
    "count_nested": lambda: (randn(N, H), [[randn(1, H)], randn(2, 2, H)], _mask(), {}),
    "count_tensor": lambda: (randn(N, H), randn(2, H), _mask(), {}),
    "count_empty_list": lambda: (randn(N, H), [], _mask(), {}),
    "mask_python_list": lambda: (randn(N, H), randn(M, H), _mask().tolist(), {}),
    "mask_shape": lambda: (randn(N, H), randn(M, H), _mask()[:-1], {}),
    "mask_dtype": lambda: (randn(N, H), randn(M, H), _mask().int(), {}),
    "hidden": lambda: (randn(N, H), randn(M, H + 1), _mask(), {}),
    "item_hidden": lambda: (randn(N, H), [randn(1, H), randn(2, H + 1)], _mask(), {}),
    "dst_dtype": lambda: (randn(N, H).int(), randn(M, H), _mask(), {}),
    "one_dimensional": lambda: (torch.zeros(8), torch.zeros(1, 16), torch.ones(8, dtype=torch.bool), {}),
    "path_type": lambda: (randn(N, H), randn(M, H), _mask(), {"path": 3}),
    "path_name": lambda: (randn(N, H), randn(M, H), _mask(), {"path": "fast"}),
    "check_count_type": lambda: (randn(N, H), randn(M, H), _mask(), {"check_count": 1}),
}


def _outcome(call) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        call()
    return info.type, str(info.value)


def _as(cls, x):
    if isinstance(x, torch.Tensor):
        return x.as_subclass(cls)
    if isinstance(x, (list, tuple)):
        return type(x)(_as(cls, t) for t in x)
    return x


@pytest.mark.parametrize("which", ["inputs_embeds", "multimodal_embeddings", "is_multimodal"])
@pytest.mark.parametrize("cls", [Subclass, Wrapper])
@pytest.mark.parametrize("case", BAD_MERGES)
def test_merge_errors_read_the_same_through_a_subclass(case, cls, which):
    embeds, items, mask, kwargs = BAD_MERGES[case]()
    plain = _outcome(lambda: mm.merge_multimodal_embeddings(embeds, items, mask, **kwargs))
    args = {"inputs_embeds": embeds, "multimodal_embeddings": items, "is_multimodal": mask}
    args[which] = _as(cls, args[which])
    if case == "mask_python_list" and which == "is_multimodal":
        args["inputs_embeds"] = _as(cls, embeds)  # the list itself has no subclass: subclass dst instead
    before = embeds.clone()
    assert _outcome(lambda: mm.merge_multimodal_embeddings(**args, **kwargs)) == plain
    assert_bits_equal(embeds, before)


BAD_SCATTERS = {  # name -> (dst, mask, src, keyword arguments)
    "count": lambda: (randn(N, H), _mask(), randn(2, H), {}),
    "mask_python_list": lambda: (randn(N, H), _mask().tolist(), randn(M, H), {}),
    "mask_shape": lambda: (randn(N, H), _mask()[:-1], randn(M, H), {}),
    "hidden": lambda: (randn(N, H), _mask(), randn(M, H + 1), {}),
    "accumulate_type": lambda: (randn(N, H), _mask(), randn(M, H), {"accumulate": 1}),
}


@pytest.mark.parametrize("in_place", [True, False], ids=["masked_row_scatter_", "masked_row_scatter"])
@pytest.mark.parametrize("case", BAD_SCATTERS)
def test_scatter_errors_read_the_same_through_a_subclass(case, in_place):
    dst, mask, src, kwargs = BAD_SCATTERS[case]()
    scatter = mm.masked_row_scatter_ if in_place else mm.masked_row_scatter
    plain = _outcome(lambda: scatter(dst, mask, src, **kwargs))
    before = dst.clone()
    assert _outcome(lambda: scatter(dst.as_subclass(Subclass), mask, src, **kwargs)) == plain
    assert_bits_equal(dst, before)
