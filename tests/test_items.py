"""Several multimodal items merged in one launch, read where they lie (items.merge_items and
multi_row_copy_kernel), and the fallback to torch.cat when the items share no row layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mmmerge_triton as mm
from mmmerge_triton import dispatch

ITEMS_RULE = dispatch.items_in_place_pays  # the rule itself: the fixture below forces its answer elsewhere
from mmmerge_triton import items as items_mod
from mmmerge_triton import executor as executor_mod
from mmmerge_triton import scatter
from mmmerge_triton.kernel_config import KernelConfig

from .conftest import ALL_PATHS, assert_bits_equal, assert_merged, make_mask, randn

H = 37


def item_layout(name: str):
    """(items, whether they share one row stride) for a named layout."""
    big = randn(40, H + 11, dtype=torch.float16, seed=1)
    separate = [randn(r, H, dtype=torch.float16, seed=10 + i) for i, r in enumerate((3, 5, 2))]
    layouts = {
        "separate_tensors": (separate, True),
        "slices_of_one_tensor": ([big[20:24, :H], big[2:7, :H], big[30:33, 5 : H + 5]], True),  # offsets < 0
        "empty_items_first_and_between": ([separate[0][:0], separate[1], big[:0, :H], separate[2]], True),
        "nine_items": ([randn(1 + i % 3, H, dtype=torch.float16, seed=30 + i) for i in range(9)], True),
        "single_row_items_any_stride": ([big[3:4, :H], separate[0][1:2], big[9:10, 4 : H + 4]], True),
        "different_row_strides": ([big[0:3, :H], separate[1]], False),
        "different_dtypes": ([separate[0], separate[1].float(), separate[2].bfloat16()], False),
        "column_strided_item": ([separate[0], separate[1].t().contiguous().t()], False),
        "3d_items": ([randn(2, 3, H, dtype=torch.float16, seed=5), separate[2]], True),
    }
    return layouts[name]


LAYOUTS = ["separate_tensors", "slices_of_one_tensor", "empty_items_first_and_between", "nine_items",
           "single_row_items_any_stride", "different_row_strides", "different_dtypes", "column_strided_item",
           "3d_items"]


@pytest.fixture(autouse=True)
def items_in_place(monkeypatch):
    """These CPU-sized merges would take torch.cat under the loop-time rule: force the in-place kernel."""
    monkeypatch.setattr(dispatch, "items_in_place_pays", lambda *args: True)


def test_in_place_rule_picks_the_faster_variant_at_every_measured_point():
    """items_in_place_pays against the committed H100 items suite (loop time): where one variant was over 5%
    faster, the rule must pick it."""
    import json
    from pathlib import Path
    suite = Path(__file__).parents[1] / "bench/results/h100/suite_items_NVIDIA_H100_80GB_HBM3.json"
    for record in json.loads(suite.read_text())["records"]:
        if record["items"] == 1:
            continue  # one item is merged directly, neither in place nor concatenated
        dst = torch.empty(0, record["hidden"], dtype=torch.bfloat16)
        loop = {name: r["loop_us"] for name, r in record["results"].items()}
        in_place, cat = loop["items in place (ours)"], loop["cat + ours"]
        if max(in_place, cat) < 1.05 * min(in_place, cat):
            continue  # a tie within the host's noise
        n_rows = record["items"] * record["rows_per_item"]
        pays = ITEMS_RULE(record["items"], n_rows, record["n"], dst, torch.bfloat16)
        assert pays == (in_place < cat), record


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_merge_of_several_items_matches_reference(path, layout, monkeypatch):
    items, shared = item_layout(layout)
    launches = []
    monkeypatch.setattr(executor_mod, "merge_items", lambda *args: launches.append(1) or items_mod.merge_items(*args))
    rows = torch.cat([t.reshape(-1, H).float() for t in items])
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask.view(-1)[torch.randperm(60, generator=torch.Generator().manual_seed(2))[: rows.shape[0]]] = True
    embeds = randn(2, 30, H, dtype=torch.bfloat16, seed=3)
    before = embeds.clone()
    mm.merge_multimodal_embeddings(embeds, items, mask, path=path)
    # The rows reach bf16 from fp16 (exactly representable in fp32, so the fp32 copy loses nothing).
    assert_merged(embeds, before, mask, rows.half() if layout != "different_dtypes" else rows, False, path)
    assert len(launches) == (path == "triton" and shared), "items read in place exactly when they share a layout"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_common_row_stride_detects_shared_layouts(layout):
    items, shared = item_layout(layout)
    flat = [t.reshape(-1, H) for t in items]
    assert (items_mod.common_row_stride(flat) is not None) == shared


@pytest.mark.parametrize("path", ALL_PATHS)
def test_merge_of_items_with_plan(path):
    items, _ = item_layout("slices_of_one_tensor")
    mask = torch.zeros(40, dtype=torch.bool)
    mask[[0, 1, 2, 5, 8, 9, 10, 11, 12, 20, 30, 39]] = True
    embeds = randn(40, H, seed=4)
    before = embeds.clone()
    mm.merge_multimodal_embeddings(embeds, items, plan=mm.MergePlan(mask), path=path)
    assert_merged(embeds, before, mask, torch.cat(items), False, path)


def test_several_items_into_a_destination_without_row_view_raise_value_error():
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 1] = mask[2, 3] = True
    embeds = randn(5, 3, 8).transpose(0, 1)
    before = embeds.clone()
    with pytest.raises(ValueError, match=r"path='triton' .*the destination's leading dims"):
        mm.merge_multimodal_embeddings(embeds, [randn(1, 8), randn(2, 8)], mask, path="triton")
    assert_bits_equal(embeds, before)


def guarded_items(counts, hidden, dtype):
    """Item views inside one random buffer, a guard row between and after them; returns (items, buffer)."""
    buffer = randn(sum(counts) + len(counts) + 1, hidden + 3, dtype=dtype, seed=7)
    items, at = [], 1
    for c in counts:
        items.append(buffer[at : at + c, 1 : hidden + 1])
        at += c + 1
    return items, buffer


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("m_vs_k", ["m_equals_k", "m_below_k", "m_above_k"])
@pytest.mark.parametrize("config", [KernelConfig(1, 32), KernelConfig(2, 64), KernelConfig(16, 256)],
                         ids=["rows1-bh32", "rows2-bh64", "rows16-bh256"])
def test_merge_items_with_device_row_map_moves_first_min_k_m_rows(config, m_vs_k, accumulate):
    """As row_copy: with a counted row map, the first min(K, M) true rows take the items' first rows."""
    n, hidden = 41, 123
    mask = make_mask("random50", (n,), seed=11)
    k = int(mask.sum())
    counts = {"m_equals_k": (4, k - 9, 5), "m_below_k": (4, k - 12, 5), "m_above_k": (4, k - 5, 5)}[m_vs_k]
    m = sum(counts)
    items, buffer = guarded_items(counts, hidden, torch.bfloat16)
    buffer_before = buffer.clone()
    dst = randn(n, hidden, dtype=torch.float32, seed=12)
    before = dst.clone()
    stride = items_mod.common_row_stride(items)
    assert stride == hidden + 3
    items_mod.merge_items(dst, mask, items_mod.ItemList.of(items), stride, accumulate, config,
                          scatter.device_rows(mask, m))
    moved = min(k, m)
    moved_mask = torch.zeros(n, dtype=torch.bool)
    moved_mask[torch.from_numpy(np.flatnonzero(mask.numpy())[:moved])] = True
    assert_merged(dst, before, moved_mask, torch.cat(items)[:moved], accumulate, "triton")
    assert_bits_equal(buffer, buffer_before, "item buffer (read only)")


def test_merge_items_count_mismatch_with_cpu_mask_raises_before_writing():
    items, _ = item_layout("separate_tensors")
    mask = torch.zeros(20, dtype=torch.bool)
    mask[:9] = True
    dst = randn(20, H, dtype=torch.float16)
    before = dst.clone()
    with pytest.raises(ValueError, match=r"^Attempted to assign 3 \+ 5 \+ 2 = 10 multimodal tokens to 9 placeholders$"):
        mm.merge_multimodal_embeddings(dst, items, mask, path="triton")
    assert_bits_equal(dst, before)


@pytest.mark.parametrize("layout", ["first_off", "second_off", "both_off_alike"])
def test_items_at_addresses_off_their_element_size_are_merged_right(layout):
    """An item whose address is not a multiple of its element size (torch.frombuffer(..., offset=1), DLPack)
    cannot be addressed in elements from another item: such lists are concatenated instead of read in place
    (before, the odd item was read one byte early)."""
    storage = np.zeros(4096, dtype=np.uint8)
    offsets = {"first_off": (1, 1000), "second_off": (0, 1001), "both_off_alike": (1, 1001)}[layout]

    def item(rows, byte_offset, seed):
        t = torch.frombuffer(storage, dtype=torch.float16, offset=byte_offset, count=rows * H).view(rows, H)
        t.copy_(randn(rows, H, dtype=torch.float16, seed=seed))
        return t

    items = [item(3, offsets[0], 1), item(4, offsets[1], 2)]
    assert [t.data_ptr() % 2 for t in items] == [o % 2 for o in offsets]
    assert items_mod.item_tables(items_mod.ItemList.of(items)) is None
    mask = make_mask("random50", (20,), seed=3)
    mask.view(-1)[:] = False
    mask.view(-1)[[1, 2, 5, 8, 9, 13, 19]] = True
    embeds = randn(20, H, dtype=torch.float32, seed=4)
    before = embeds.clone()
    mm.merge_multimodal_embeddings(embeds, items, mask, path="triton")
    assert_merged(embeds, before, mask, torch.cat(items), False, "triton")
