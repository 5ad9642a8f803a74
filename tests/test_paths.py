"""Every path (and "auto") against the plain-loop reference: dtypes, masks, shapes, layouts, nested items."""
from __future__ import annotations

import pytest
import torch

import mmmerge_triton as mm

from .conftest import (
    ALL_PATHS,
    DTYPE_PAIR_IDS,
    DTYPE_PAIRS,
    MASK_KINDS,
    assert_bits_equal,
    assert_merged,
    make_mask,
    randn,
)

N, H = 33, 37  # N: not a multiple of any row tile; H: not a power of two


def merge_inputs(mask, hidden, src_dtype, dst_dtype, seed=0):
    dst = randn(*mask.shape, hidden, dtype=dst_dtype, seed=seed)
    src = randn(int(mask.sum()), hidden, dtype=src_dtype, seed=seed + 1)
    return dst, src


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize(("src_dtype", "dst_dtype"), DTYPE_PAIRS, ids=DTYPE_PAIR_IDS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_2d_merge_matches_reference(path, src_dtype, dst_dtype, mask_kind, accumulate):
    mask = make_mask(mask_kind, (N,))
    dst, src = merge_inputs(mask, H, src_dtype, dst_dtype)
    out = mm.masked_row_scatter_(dst.clone(), mask, src, accumulate=accumulate, path=path)
    assert_merged(out, dst, mask, src, accumulate, path)


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize(("src_dtype", "dst_dtype"), DTYPE_PAIRS, ids=DTYPE_PAIR_IDS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_3d_merge_with_2d_mask_matches_reference_over_dtypes(path, src_dtype, dst_dtype, accumulate):
    mask = make_mask("random50", (3, 11))
    dst, src = merge_inputs(mask, H, src_dtype, dst_dtype)
    out = mm.masked_row_scatter_(dst.clone(), mask, src, accumulate=accumulate, path=path)
    assert_merged(out, dst, mask, src, accumulate, path)


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_3d_merge_with_2d_mask_matches_reference_over_masks(path, mask_kind, accumulate):
    mask = make_mask(mask_kind, (3, 11))
    dst, src = merge_inputs(mask, H, torch.float32, torch.float16)
    out = mm.masked_row_scatter_(dst.clone(), mask, src, accumulate=accumulate, path=path)
    assert_merged(out, dst, mask, src, accumulate, path)


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize(("n", "hidden"), [(1, 1), (1, 123), (33, 1), (2, 130), (33, 123), (17, 64)])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_odd_sizes_match_reference(path, n, hidden, accumulate):
    mask = make_mask("random50", (n,), seed=3) if n > 1 else torch.ones(1, dtype=torch.bool)
    dst, src = merge_inputs(mask, hidden, torch.bfloat16, torch.float32)
    out = mm.masked_row_scatter_(dst.clone(), mask, src, accumulate=accumulate, path=path)
    assert_merged(out, dst, mask, src, accumulate, path)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_zero_sized_inputs_are_a_no_op(path):
    for shape, k in [((0, 8), 0), ((5, 0), 2), ((0, 3, 8), 0)]:
        dst = torch.ones(shape)
        mask = torch.zeros(shape[:-1], dtype=torch.bool)
        mask.view(-1)[:k] = True
        src = torch.ones(k, shape[-1])
        out = mm.masked_row_scatter_(dst.clone(), mask, src, path=path)
        assert_bits_equal(out, dst)


def test_larger_shape_with_multi_row_tiles_matches_reference():
    """A larger shape through tiles of several rows per program (M odd: a row tail) and a column tail."""
    mask = make_mask("random50", (3000,), seed=7)
    dst, src = merge_inputs(mask, 40, torch.float16, torch.float32)
    assert src.shape[0] >= 1024 and src.shape[0] % 2 == 1
    out = dst.clone()
    mm.executor.merge_triton(out, mask, src, False, config=mm.KernelConfig(16, 32, 8, 1, False))
    assert_merged(out, dst, mask, src, False, "triton")


# ---- layouts ------------------------------------------------------------------------------------------------

def layout_inputs(layout: str):
    """(dst, mask, src) where the named argument(s) are non-contiguous views."""
    mask = make_mask("random50", (N,), seed=5)
    k = int(mask.sum())
    dst = randn(N, H, seed=1)
    src = randn(k, H, dtype=torch.bfloat16, seed=2)
    if layout in ("dst_row_strided", "all"):
        wide = randn(N, H + 9, seed=3)
        wide[:, :H] = dst
        dst = wide[:, :H]
    if layout in ("src_column_sliced", "all"):
        wide = randn(k, H + 5, dtype=torch.bfloat16, seed=4)
        wide[:, 2 : H + 2] = src
        src = wide[:, 2 : H + 2]
    if layout == "src_transposed":
        src = src.t().contiguous().t()  # column stride k: not row-major
    if layout in ("mask_strided", "all"):
        mask = torch.stack([mask, ~mask], dim=1)[:, 0]
    return dst, mask, src


LAYOUTS = ("dst_row_strided", "src_column_sliced", "src_transposed", "mask_strided", "all")


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_non_contiguous_inputs_match_reference(path, layout, accumulate):
    dst, mask, src = layout_inputs(layout)
    assert not (dst.is_contiguous() and mask.is_contiguous() and src.is_contiguous())
    before = dst.clone()
    out = mm.masked_row_scatter_(dst, mask, src, accumulate=accumulate, path=path)
    assert out is dst
    assert_merged(dst, before, mask, src, accumulate, path)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_row_strided_3d_view_is_merged_in_place(path):
    """[B, S, H] sliced out of [B, S, W]: its rows still flatten to a view, so every path writes through it."""
    mask = make_mask("random50", (3, 7), seed=2)
    wide = randn(3, 7, H + 3, seed=3)
    dst = wide[:, :, :H]
    before_wide = wide.clone()
    src = randn(int(mask.sum()), H, seed=4)
    mm.masked_row_scatter_(dst, mask, src, path=path)
    assert_merged(dst, before_wide[:, :, :H], mask, src, False, path)
    assert_bits_equal(wide[:, :, H:], before_wide[:, :, H:], "columns outside the view")


# ---- merge_multimodal_embeddings ----------------------------------------------------------------------------

def nested_items(structure: str, hidden: int, dtype=torch.float16):
    """Items of multimodal_embeddings in several nestings, and their rows in order as one [M, H] tensor."""
    a, b, c = randn(3, hidden, dtype=dtype, seed=1), randn(2, 4, hidden, dtype=dtype, seed=2), randn(5, hidden, dtype=dtype, seed=3)
    items = {
        "tensor": a,
        "tensor_3d": b,
        "list_of_one": [a],
        "list": [a, c],
        "tuple": (a, b),
        "nested": [a, [b, (c,)]],
    }[structure]
    flat = {"tensor": [a], "tensor_3d": [b], "list_of_one": [a], "list": [a, c], "tuple": [a, b],
            "nested": [a, b, c]}[structure]
    return items, torch.cat([t.reshape(-1, hidden) for t in flat])


@pytest.mark.parametrize("structure", ["tensor", "tensor_3d", "list_of_one", "list", "tuple", "nested"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_merge_multimodal_embeddings_takes_nested_items_in_order(path, structure):
    items, rows = nested_items(structure, H)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[torch.randperm(40, generator=torch.Generator().manual_seed(1))[: rows.shape[0]]] = True
    embeds = randn(40, H, dtype=torch.bfloat16)
    before = embeds.clone()
    out = mm.merge_multimodal_embeddings(embeds, items, mask, path=path)
    assert out is embeds
    assert_merged(embeds, before, mask, rows, False, path)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_merge_multimodal_embeddings_with_3d_inputs_embeds(path):
    mask = make_mask("blocks", (2, 10))
    items = [randn(3, H, seed=1), randn(int(mask.sum()) - 3, H, seed=2)]
    rows = torch.cat(items)
    embeds = randn(2, 10, H, dtype=torch.float16)
    before = embeds.clone()
    mm.merge_multimodal_embeddings(embeds, items, mask, path=path)
    assert_merged(embeds, before, mask, rows, False, path)


# ---- in place / out of place, special values ----------------------------------------------------------------

@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_out_of_place_returns_new_tensor_and_leaves_dst_unchanged(path, accumulate):
    mask = make_mask("random50", (2, 9))
    dst, src = merge_inputs(mask, H, torch.float32, torch.bfloat16)
    before = dst.clone()
    out = mm.masked_row_scatter(dst, mask, src, accumulate=accumulate, path=path)
    assert out.data_ptr() != dst.data_ptr()
    assert_bits_equal(dst, before, "dst")
    assert_merged(out, before, mask, src, accumulate, path)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_in_place_returns_dst(path):
    mask = make_mask("random50", (N,))
    dst, src = merge_inputs(mask, H, torch.float32, torch.float32)
    assert mm.masked_row_scatter_(dst, mask, src, path=path) is dst


def special_values_dst(mask, hidden):
    """dst whose every row holds -0.0, +0.0, NaN, +-inf and normal values."""
    pattern = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), -float("inf"), 1.5, -2.25])
    return pattern.repeat(hidden // len(pattern) + 1)[:hidden].expand(*mask.shape, hidden).clone()


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_untouched_rows_keep_negative_zero_nan_and_inf_bits(path, accumulate):
    mask = make_mask("random50", (N,), seed=9)
    dst = special_values_dst(mask, 14)
    src = randn(int(mask.sum()), 14, seed=1)
    out = mm.masked_row_scatter_(dst.clone(), mask, src, accumulate=accumulate, path=path)
    assert_merged(out, dst, mask, src, accumulate, path)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_in_place_bumps_the_version_counter(path):
    """Autograd must see the write: a tensor saved for backward and then merged into must fail backward."""
    mask = make_mask("random50", (N,))
    leaf = randn(N, H).requires_grad_()
    dst = leaf * 1
    saved = dst.sin()  # saves dst for its backward
    version = dst._version
    with torch.no_grad():
        mm.masked_row_scatter_(dst, mask, randn(int(mask.sum()), H), path=path)
    assert dst._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


@pytest.mark.parametrize("path", ALL_PATHS)
def test_merge_under_inference_mode(path):
    mask = make_mask("random50", (N,))
    with torch.inference_mode():
        dst, src = merge_inputs(mask, H, torch.float16, torch.float16)
        before = dst.clone()
        mm.masked_row_scatter_(dst, mask, src, accumulate=True, path=path)
    assert_merged(dst, before, mask, src, True, path)


@pytest.mark.parametrize("shape", [(N,), (3, 11)], ids=["2d", "3d"])
def test_auto_picks_index_put_on_cpu(shape):
    mask = make_mask("random50", shape)
    dst, src = merge_inputs(mask, H, torch.float16, torch.float32)
    decision = mm.explain(dst, [src[:2], src[2:]], mask)
    assert (decision.path, decision.config) == ("index_put", None)
    assert "CPU" in decision.reason
    assert_bits_equal(dst, merge_inputs(mask, H, torch.float16, torch.float32)[0], "explain wrote nothing")


def test_explain_checks_its_inputs():
    mask = make_mask("random50", (N,))
    dst, src = merge_inputs(mask, H, torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"\bis_multimodal\b has shape"):
        mm.explain(dst, src, mask[1:])
