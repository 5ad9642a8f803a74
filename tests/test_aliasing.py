"""Inputs that share memory with the destination: PyTorch's result, or a clear error before any write.

``dst[mask] = src`` with src overlapping dst is refused by PyTorch ("refer to a single memory location"); a
src that is a view of dst's bytes in another dtype is a legal ``.to()`` copy. A mask that is a view of dst's
bytes is read before dst is written; a list item that overlaps dst is concatenated first (vLLM's own cat).
"""
from __future__ import annotations

import pytest
import torch

import mmmerge_triton as mm

from .conftest import ALL_PATHS, assert_bits_equal, assert_merged, make_mask, randn

N, H = 12, 8


def aliased_src(dst: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of dst itself, as many as the mask's true rows: the last rows, which the merge may overwrite."""
    return dst[N - int(mask.sum()):]


@pytest.mark.parametrize("scatter", [mm.masked_row_scatter_, mm.merge_multimodal_embeddings],
                         ids=["masked_row_scatter_", "merge_multimodal_embeddings"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_src_overlapping_dst_is_refused_before_writing(path, scatter):
    mask = make_mask("random50", (N,), seed=1)
    dst = randn(N, H)
    src = aliased_src(dst, mask)
    before = dst.clone()
    args = (dst, mask, src) if scatter is mm.masked_row_scatter_ else (dst, src, mask)
    with pytest.raises(ValueError, match=r"shares memory with .*Clone"):
        scatter(*args, path=path)
    assert_bits_equal(dst, before)
    with pytest.raises(RuntimeError, match="single memory location"):  # PyTorch refuses the same
        dst.index_put_((mask,), src)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_src_overlapping_dst_out_of_place_reads_the_original(path):
    """Out of place the result is new memory: src may be any rows of dst, as with dst.masked_scatter."""
    mask = make_mask("random50", (N,), seed=1)
    dst = randn(N, H)
    src = aliased_src(dst, mask)
    out = mm.masked_row_scatter(dst, mask, src, path=path)
    expected = dst.clone()
    expected[mask] = src.clone()
    assert_bits_equal(out, expected)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_src_viewing_dsts_bytes_in_another_dtype_is_a_copy_as_in_pytorch(path):
    """A bf16 src reinterpreting an fp32 dst's bytes: PyTorch's ``src.to(dst.dtype)`` copies it first."""
    mask = torch.zeros(N, dtype=torch.bool)
    mask[: N // 2] = True
    dst = randn(N, H // 2)
    src = dst.view(torch.bfloat16)[: N // 2, : H // 2]  # bf16 over the first rows: those the merge overwrites
    expected = dst.clone()
    expected[mask] = src.to(dst.dtype)  # .to() copies before the write
    mm.masked_row_scatter_(dst, mask, src, path=path)
    assert_bits_equal(dst, expected)


@pytest.mark.parametrize("layout", ["strided", "contiguous"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_mask_viewing_dsts_bytes_is_read_before_the_write(path, layout):
    """A mask made of dst's own bytes: the merged rows are those the mask held before anything was written
    (strided: each row's first byte; contiguous: the first N bytes of row 0, which the merge overwrites)."""
    dst = torch.zeros(N, H, dtype=torch.float16)
    selected = make_mask("random50", (N,), seed=3)
    selected[0] = True
    if layout == "strided":
        mask = dst.view(torch.uint8)[:, 0].view(torch.bool)  # [N] with a row stride
    else:
        mask = dst.view(torch.uint8).reshape(-1)[:N].view(torch.bool)
    mask.view(torch.uint8).copy_(selected.view(torch.uint8))
    src = randn(int(selected.sum()), H, dtype=torch.float16, seed=4)
    before = dst.clone()
    mm.masked_row_scatter_(dst, mask, src, path=path)
    assert_merged(dst, before, selected, src, False, path)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_an_item_overlapping_dst_is_concatenated_first_as_vllm_does(path):
    mask = make_mask("blocks", (N,))
    k = int(mask.sum())
    dst = randn(N, H)
    items = [randn(2, H, seed=5), dst[N - (k - 2):]]  # the second item is dst's own last rows
    expected = dst.clone()
    expected[mask] = torch.cat(items)  # vLLM: cat (a copy), then index_put
    mm.merge_multimodal_embeddings(dst, items, mask, path=path)
    assert_bits_equal(dst, expected)


def test_disjoint_views_of_one_buffer_are_not_refused():
    buffer = randn(2 * N, H)
    dst, src_rows = buffer[:N], buffer[N:]
    mask = make_mask("random50", (N,), seed=2)
    src = src_rows[: int(mask.sum())]
    expected = dst.clone()
    expected[mask] = src
    mm.masked_row_scatter_(dst, mask, src, path="auto")
    assert_bits_equal(dst, expected)
