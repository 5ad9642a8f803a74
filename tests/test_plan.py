"""MergePlan: a mask's row map built once, reused by several merges, rebuilt in place by update_."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mmmerge_triton as mm

from .conftest import ALL_PATHS, assert_bits_equal, assert_merged, make_mask, randn

H = 37


def test_plan_holds_the_row_map_of_its_mask():
    mask = make_mask("random50", (3, 11))
    plan = mm.MergePlan(mask)
    k = int(mask.sum())
    assert plan.host_count == k and plan.num_rows == 33 and plan.shape == mask.shape
    assert plan.count.tolist() == [k]
    assert plan.rows.dtype == torch.int32
    assert plan.rows[:k].tolist() == np.flatnonzero(mask.numpy()).tolist()


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_plan_gives_the_same_result_as_the_mask(path, accumulate):
    mask = make_mask("random50", (3, 11))
    dst = randn(3, 11, H, dtype=torch.bfloat16)
    src = randn(int(mask.sum()), H, dtype=torch.float16, seed=1)
    out = mm.masked_row_scatter_(dst.clone(), src=src, plan=mm.MergePlan(mask), accumulate=accumulate, path=path)
    assert_merged(out, dst, mask, src, accumulate, path)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_plan_reused_by_several_accumulate_calls_equals_reference(path):
    """Deepstack: one plan, one accumulate per layer."""
    mask = make_mask("blocks", (40,))
    plan = mm.MergePlan(mask)
    dst = randn(40, H, dtype=torch.float16)
    expected = dst.clone()
    for layer in range(4):
        src = randn(int(mask.sum()), H, dtype=torch.float32, seed=10 + layer)
        before = dst.clone()
        mm.masked_row_scatter_(dst, src=src, plan=plan, accumulate=True, path=path)
        assert_merged(dst, before, mask, src, True, path)
        mm.masked_row_scatter_(expected, mask, src, accumulate=True, path="index_put")
    assert_bits_equal(dst, expected)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_plan_update_merges_the_new_mask(path):
    first, second = make_mask("random10", (50,), seed=1), make_mask("random90", (50,), seed=2)
    plan = mm.MergePlan(first)
    assert plan.update_(second) is plan
    assert plan.host_count == int(second.sum()) and plan.count.tolist() == [int(second.sum())]
    dst = randn(50, H)
    src = randn(int(second.sum()), H, seed=3)
    out = mm.masked_row_scatter_(dst.clone(), src=src, plan=plan, path=path)
    assert_merged(out, dst, second, src, False, path)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_plan_update_to_fewer_rows_does_not_move_stale_entries(path):
    """After an update to a mask with fewer true rows the old entries past the count must not be used."""
    plan = mm.MergePlan(make_mask("full", (20,)))
    fewer = make_mask("first", (20,))
    plan.update_(fewer)
    dst = randn(20, H)
    src = randn(1, H, seed=1)
    out = mm.masked_row_scatter_(dst.clone(), src=src, plan=plan, path=path)
    assert_merged(out, dst, fewer, src, False, path)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_plan_with_merge_multimodal_embeddings(path):
    mask = make_mask("blocks", (30,))
    items = [randn(4, H, seed=1), randn(int(mask.sum()) - 4, H, seed=2)]
    embeds = randn(30, H, dtype=torch.bfloat16)
    before = embeds.clone()
    mm.merge_multimodal_embeddings(embeds, items, plan=mm.MergePlan(mask), path=path)
    assert_merged(embeds, before, mask, torch.cat(items), False, path)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_plan_count_mismatch_raises_and_leaves_dst_unchanged(path):
    plan = mm.MergePlan(make_mask("random50", (20,)))
    dst = randn(20, H)
    before = dst.clone()
    k = plan.host_count
    with pytest.raises(ValueError, match=rf"^Attempted to assign {k + 1} multimodal tokens to {k} placeholders$"):
        mm.masked_row_scatter_(dst, src=randn(k + 1, H), plan=plan, path=path)
    assert_bits_equal(dst, before)


def test_plan_update_with_another_shape_raises_and_keeps_the_plan():
    mask = make_mask("random50", (20,))
    plan = mm.MergePlan(mask)
    with pytest.raises(ValueError, match=r"\bmask\b has shape \(21,\); this plan was built for \(20,\)"):
        plan.update_(torch.ones(21, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\bmask\b has shape \(4, 5\)"):
        plan.update_(mask.view(4, 5))
    assert plan.mask is mask and plan.host_count == int(mask.sum())


@pytest.mark.parametrize("bad", [torch.ones(20, dtype=torch.uint8), [True] * 20], ids=["uint8", "list"])
def test_plan_of_non_bool_mask_raises_type_error(bad):
    with pytest.raises(TypeError, match=r"\bmask\b must be a bool tensor"):
        mm.MergePlan(bad)
    plan = mm.MergePlan(torch.ones(20, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"\bmask\b must be a bool tensor"):
        plan.update_(bad)


def test_plan_of_empty_mask():
    plan = mm.MergePlan(torch.zeros(0, dtype=torch.bool))
    assert plan.host_count == 0 and plan.count.tolist() == [0]
    dst = torch.zeros(0, H)
    mm.masked_row_scatter_(dst, src=torch.zeros(0, H), plan=plan, path="triton")


# ---- deepstack_add: one plan, one accumulate per layer ------------------------------------------------------

def test_deepstack_add_in_inference_adds_in_place():
    mask = make_mask("random50", (2, 15), seed=4)
    plan = mm.MergePlan(mask)
    hidden = randn(2, 15, H, dtype=torch.bfloat16)
    before = hidden.clone()
    visual = randn(int(mask.sum()), H, dtype=torch.bfloat16, seed=1)
    with torch.no_grad():
        assert mm.deepstack_add(hidden, visual, plan) is hidden
    assert_merged(hidden, before, mask, visual, True, "auto")


def test_deepstack_add_with_grad_is_out_of_place_and_differentiable():
    mask = make_mask("random50", (2, 15), seed=4)
    plan = mm.MergePlan(mask)
    hidden = randn(2, 15, H).requires_grad_()
    visual = randn(int(mask.sum()), H, seed=1).requires_grad_()
    out = mm.deepstack_add(hidden, visual, plan)
    assert out is not hidden
    assert_merged(out, hidden.detach(), mask, visual.detach(), True, "auto")
    upstream = randn(2, 15, H, seed=2)
    (out * upstream).sum().backward()
    assert_bits_equal(hidden.grad, upstream, "grad hidden_states (accumulate: unchanged)")
    assert_bits_equal(visual.grad, upstream[mask], "grad visual_embeds")


# ---- a mask changed after the plan was built ---------------------------------------------------------------

def _swap_one_true_row(mask: torch.Tensor, how: str) -> None:
    """Move one true row of ``mask`` elsewhere, in place: the count stays, so only staleness tells."""
    flat = mask.view(-1)
    i, j = int(flat.nonzero()[0]), int((~flat).nonzero()[-1])
    if how == "setitem":
        flat[i], flat[j] = False, True
    elif how == "uint8_view":  # a write through another view shares the version counter
        flat.view(torch.uint8)[i], flat.view(torch.uint8)[j] = 0, 1
    else:  # copy_ from a mask of the same count
        moved = flat.clone()
        moved[i], moved[j] = False, True
        flat.copy_(moved)


@pytest.mark.parametrize("how", ["setitem", "uint8_view", "copy_"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_plan_of_a_mask_changed_in_place_raises_before_writing(path, how):
    mask = make_mask("random50", (3, 10), seed=5)
    plan = mm.MergePlan(mask)
    src = randn(plan.host_count, H, seed=6)
    _swap_one_true_row(mask, how)
    dst = randn(3, 10, H)
    before = dst.clone()
    with pytest.raises(ValueError, match=r"mask was changed in place after its MergePlan was built .* "
                                         r"call plan\.update_\(mask\)"):
        mm.masked_row_scatter_(dst, src=src, plan=plan, path=path)
    assert_bits_equal(dst, before)
    plan.update_(mask)  # then it merges the new mask
    out = mm.masked_row_scatter_(dst.clone(), src=src, plan=plan, path=path)
    assert_merged(out, dst, mask, src, False, path)


def test_stale_plan_raises_for_merge_multimodal_embeddings_and_deepstack_add():
    mask = make_mask("blocks", (30,))
    plan = mm.MergePlan(mask)
    k = plan.host_count
    _swap_one_true_row(mask, "setitem")
    embeds = randn(30, H)
    before = embeds.clone()
    with pytest.raises(ValueError, match="changed in place"):
        mm.merge_multimodal_embeddings(embeds, [randn(2, H), randn(k - 2, H)], plan=plan)
    with torch.no_grad(), pytest.raises(ValueError, match="changed in place"):
        mm.deepstack_add(embeds, randn(k, H), plan)
    assert_bits_equal(embeds, before)


def test_check_current_names_the_mask_and_sees_a_replaced_mask():
    mask = make_mask("random50", (20,))
    plan = mm.MergePlan(mask)
    plan.check_current("is_multimodal")  # fresh: no error
    mask[0] = ~mask[0]
    with pytest.raises(ValueError, match=r"^is_multimodal was changed in place .*plan\.update_\(is_multimodal\)"):
        plan.check_current("is_multimodal")
    assert plan.update_(mask) is plan
    plan.check_current()
    plan.mask = mask.clone()
    with pytest.raises(ValueError, match=r"plan\.mask was replaced"):
        plan.check_current()


@pytest.mark.parametrize("path", ALL_PATHS)
def test_plan_of_an_inference_mask_merges_the_mask_it_was_built_from(path):
    """An inference tensor has no version counter: the plan keeps a copy of the mask, so that every path
    merges what the row map was built from, whatever happens to the original."""
    with torch.inference_mode():
        mask = make_mask("random50", (30,), seed=7)
        built_from = mask.clone()
        plan = mm.MergePlan(mask)
        _swap_one_true_row(mask, "setitem")
        dst = randn(30, H)
        src = randn(plan.host_count, H, seed=8)
        out = mm.masked_row_scatter_(dst.clone(), src=src, plan=plan, path=path)
    assert plan.mask is not mask and torch.equal(plan.mask, built_from)
    assert_merged(out, dst, built_from, src, False, path)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_plan_of_a_mask_with_bytes_2_and_255(path):
    """A bool viewed from uint8 may hold any nonzero byte: true, as in PyTorch."""
    raw = torch.tensor([0, 2, 255, 1, 0, 7] * 5, dtype=torch.uint8)
    mask, clean = raw.view(torch.bool), raw != 0
    plan = mm.MergePlan(mask)
    assert plan.host_count == int(clean.sum()) and plan.count.tolist() == [int(clean.sum())]
    assert plan.rows[: plan.host_count].tolist() == clean.nonzero().flatten().tolist()
    dst = randn(30, H)
    src = randn(plan.host_count, H, seed=9)
    out = mm.masked_row_scatter_(dst.clone(), src=src, plan=plan, path=path)
    assert_merged(out, dst, clean, src, False, path)


def test_plan_of_more_than_2_31_rows_raises_before_allocating():
    huge = torch.zeros(1, dtype=torch.bool).expand(2**31)  # no memory behind it
    with pytest.raises(ValueError, match=r"MergePlan uses int32 row maps: at most 2147483647 mask rows"):
        mm.MergePlan(huge)


def test_record_stream_of_a_host_plan_does_nothing():
    plan = mm.MergePlan(make_mask("random50", (10,)))
    plan.record_stream(None)  # nothing on a device to mark
