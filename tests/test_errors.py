"""Input errors: the exception type, a message naming the argument, and a destination left bit-identical."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mmmerge_triton as mm

from .conftest import ALL_PATHS, assert_bits_equal, randn

N, H, K = 8, 4, 3
MASK = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0], dtype=torch.bool)


def base_inputs():
    return randn(N, H, seed=1), MASK.clone(), randn(K, H, seed=2)


# Each case turns valid (dst, mask, src) into invalid ones: (dst, mask, src, exception, regex on the message).
ARGUMENT_CASES = {
    "mask_uint8": lambda d, m, s: (d, m.to(torch.uint8), s, TypeError, r"\bmask\b.*bool"),
    "mask_float": lambda d, m, s: (d, m.float(), s, TypeError, r"\bmask\b.*bool"),
    "mask_too_short": lambda d, m, s: (d, m[:-1], s, ValueError, r"\bmask\b.*shape"),
    "mask_extra_dim": lambda d, m, s: (d, m[None], s, ValueError, r"\bmask\b.*shape"),
    "mask_on_other_device": lambda d, m, s: (d, m.to("meta"), s, ValueError, r"\bmask\b is on meta"),
    "src_on_other_device": lambda d, m, s: (d, m, s.to("meta"), ValueError, r"\bsrc\b is on meta"),
    "hidden_mismatch": lambda d, m, s: (d, m, s[:, :-1], ValueError, r"\bsrc\b has hidden size 3; \bdst\b has 4"),
    "src_1d": lambda d, m, s: (d, m, s[0], ValueError, r"\bsrc\b must have shape \[M, H\]"),
    "src_3d": lambda d, m, s: (d, m, s[None], ValueError, r"\bsrc\b must have shape \[M, H\]"),
    "src_int32": lambda d, m, s: (d, m, s.to(torch.int32), TypeError, r"\bsrc\b must be float64, float32"),
    "src_complex64": lambda d, m, s: (d, m, s.to(torch.complex64), TypeError, r"\bsrc\b must be float64.*complex64"),
    "dst_int64": lambda d, m, s: (d.long(), m, s, TypeError, r"\bdst\b must be float64, float32"),
    "dst_0d": lambda d, m, s: (d[0, 0], torch.tensor(True), s, ValueError, r"\bdst\b must have shape"),
    "more_src_rows": lambda d, m, s: (d, m, torch.cat([s, s[:1]]), ValueError,
                                      r"^Attempted to assign 4 multimodal tokens to 3 placeholders$"),
    "fewer_src_rows": lambda d, m, s: (d, m, s[:2], ValueError,
                                       r"^Attempted to assign 2 multimodal tokens to 3 placeholders$"),
    "no_src_rows": lambda d, m, s: (d, m, s[:0], ValueError,
                                    r"^Attempted to assign 0 multimodal tokens to 3 placeholders$"),
    "src_rows_for_empty_mask": lambda d, m, s: (d, torch.zeros_like(m), s, ValueError,
                                                r"^Attempted to assign 3 multimodal tokens to 0 placeholders$"),
}

NON_TENSOR_CASES = {
    "dst_numpy": lambda d, m, s: (d.numpy(), m, s, TypeError, r"\bdst\b"),
    "mask_list": lambda d, m, s: (d, m.tolist(), s, TypeError, r"\bmask\b"),
    "src_numpy": lambda d, m, s: (d, m, s.numpy(), TypeError, r"\bsrc\b"),
    "src_list_of_tensor": lambda d, m, s: (d, m, [s], TypeError, r"\bsrc\b"),
}

SCATTERS = {"in_place": mm.masked_row_scatter_, "out_of_place": mm.masked_row_scatter}


def snapshot(x):
    return x.copy() if isinstance(x, np.ndarray) else x.clone()


def assert_unchanged(x, before):
    if isinstance(x, np.ndarray):
        assert np.array_equal(x.view(np.uint8), before.view(np.uint8)), "dst changed"
    else:
        assert_bits_equal(x, before, "dst")


@pytest.mark.parametrize("scatter", SCATTERS.values(), ids=SCATTERS.keys())
@pytest.mark.parametrize("case", ARGUMENT_CASES.keys())
@pytest.mark.parametrize("path", ALL_PATHS)
def test_bad_argument_raises_naming_it_and_leaves_dst_unchanged(path, case, scatter):
    dst, mask, src, error, message = ARGUMENT_CASES[case](*base_inputs())
    before = snapshot(dst)
    with pytest.raises(error, match=message):
        scatter(dst, mask, src, path=path)
    assert_unchanged(dst, before)


@pytest.mark.parametrize("scatter", SCATTERS.values(), ids=SCATTERS.keys())
@pytest.mark.parametrize("case", NON_TENSOR_CASES.keys())
def test_non_tensor_argument_raises_type_error_naming_it(case, scatter):
    dst, mask, src, error, message = NON_TENSOR_CASES[case](*base_inputs())
    before = snapshot(dst)
    with pytest.raises(error, match=message):
        scatter(dst, mask, src)
    assert_unchanged(dst, before)


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_count_mismatch_on_3d_dst_leaves_it_unchanged(path, accumulate):
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True
    dst = randn(2, 5, H)
    before = dst.clone()
    with pytest.raises(ValueError, match=r"^Attempted to assign 3 multimodal tokens to 2 placeholders$"):
        mm.masked_row_scatter_(dst, mask, randn(3, H), accumulate=accumulate, path=path, check_count=True)
    assert_bits_equal(dst, before)


# ---- keyword arguments: path, plan, missing arguments -------------------------------------------------------

def test_unknown_path_raises_value_error_naming_path():
    dst, mask, src = base_inputs()
    before = dst.clone()
    with pytest.raises(ValueError, match=r"\bpath\b must be 'auto' or one of .*'triton'.*got 'cuda'"):
        mm.masked_row_scatter_(dst, mask, src, path="cuda")
    assert_bits_equal(dst, before)


@pytest.mark.parametrize("scatter", SCATTERS.values(), ids=SCATTERS.keys())
def test_mask_and_plan_together_raise_value_error(scatter):
    dst, mask, src = base_inputs()
    before = dst.clone()
    with pytest.raises(ValueError, match=r"pass \bmask\b or plan=, not both"):
        scatter(dst, mask, src, plan=mm.MergePlan(mask))
    assert_bits_equal(dst, before)


def test_plan_of_wrong_type_raises_type_error_naming_plan():
    dst, mask, src = base_inputs()
    before = dst.clone()
    with pytest.raises(TypeError, match=r"\bplan\b must be a MergePlan, got Tensor"):
        mm.masked_row_scatter_(dst, src=src, plan=mask)
    assert_bits_equal(dst, before)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_plan_built_for_another_shape_raises_value_error(path):
    dst, mask, src = base_inputs()
    before = dst.clone()
    plan = mm.MergePlan(torch.cat([mask, mask]))
    with pytest.raises(ValueError, match=r"\bmask\b has shape \(16,\); expected \(8,\)"):
        mm.masked_row_scatter_(dst, src=src, plan=plan, path=path)
    assert_bits_equal(dst, before)


@pytest.mark.parametrize("missing", ["mask", "src"])
def test_missing_argument_raises_type_error_naming_it(missing):
    dst, mask, src = base_inputs()
    kwargs = {"mask": mask, "src": src}
    del kwargs[missing]
    before = dst.clone()
    with pytest.raises(TypeError, match=rf"\b{missing}\b is required"):
        mm.masked_row_scatter_(dst, **kwargs)
    assert_bits_equal(dst, before)


# ---- merge_multimodal_embeddings: vLLM's argument names and count message ----------------------------------

def mm_inputs(k=10):
    mask = torch.zeros(16, dtype=torch.bool)
    mask[3 : 3 + k] = True
    return randn(16, H, dtype=torch.bfloat16), mask


COUNT_EXPRESSIONS = {  # multimodal_embeddings (for 10 placeholders) -> vLLM's left-hand side
    "tensor": (lambda: randn(11, H), "11 = 11"),
    "tensor_3d": (lambda: randn(3, 4, H), "3 x 4 = 12"),
    "list": (lambda: [randn(3, H), randn(5, H)], "3 + 5 = 8"),
    "nested": (lambda: [randn(3, H), [randn(2, 4, H)]], "3 + 2 x 4 = 11"),
    "tuple_of_lists": (lambda: ([randn(1, H)], [randn(2, H), (randn(6, H), randn(2, H))]), "1 + 2 + 6 + 2 = 11"),
}


@pytest.mark.parametrize("items", COUNT_EXPRESSIONS.keys())
@pytest.mark.parametrize("path", ALL_PATHS)
def test_merge_count_mismatch_uses_vllm_message(path, items):
    make, lhs = COUNT_EXPRESSIONS[items]
    embeds, mask = mm_inputs(10)
    before = embeds.clone()
    with pytest.raises(ValueError) as info:
        mm.merge_multimodal_embeddings(embeds, make(), mask, path=path)
    assert str(info.value) == f"Attempted to assign {lhs} multimodal tokens to 10 placeholders"
    assert_bits_equal(embeds, before)


@pytest.mark.parametrize("empty", [[], (), [[]], [[], ()], ([[]],)],
                         ids=["list", "tuple", "list_of_list", "two_empties", "nested_tuple"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_merge_with_empty_item_list_and_no_placeholders_is_a_no_op(path, empty):
    """An empty list (nested or not) has 0 rows: with no placeholders it writes nothing (with placeholders the
    count check raises: tests/test_round2.py)."""
    embeds, mask = mm_inputs(10)
    mask = torch.zeros_like(mask)
    before = embeds.clone()
    assert mm.merge_multimodal_embeddings(embeds, empty, mask, path=path) is embeds
    assert_bits_equal(embeds, before)


MERGE_CASES = {  # (inputs_embeds, multimodal_embeddings, is_multimodal) -> invalid ones, error, message regex
    "item_not_tensor": lambda e, i, m: (e, [i, 3], m, TypeError, r"\bmultimodal_embeddings\b must be a tensor"),
    "item_hidden_mismatch": lambda e, i, m: (e, [i[:5], i[5:, :-1]], m, ValueError,
                                             r"\bmultimodal_embeddings item 1 \(shape \(5, 3\)\) has hidden size 3; "
                                             r"\binputs_embeds\b has 4"),
    "item_1d": lambda e, i, m: (e, [i[:9], i[9]], m, ValueError, r"\bmultimodal_embeddings\b must have shape"),
    "item_int": lambda e, i, m: (e, [i.long()], m, TypeError, r"\bmultimodal_embeddings\b must be float64, float32"),
    "second_item_int": lambda e, i, m: (e, [i[:4], i[4:].long()], m, TypeError,
                                        r"\bmultimodal_embeddings item 1 \(shape \(6, 4\)\) must be float64"),
    "embeds_int": lambda e, i, m: (e.int(), i, m, TypeError, r"\binputs_embeds\b must be float64, float32"),
    "mask_uint8": lambda e, i, m: (e, i, m.to(torch.uint8), TypeError, r"\bis_multimodal\b must be a bool"),
    "mask_wrong_shape": lambda e, i, m: (e, i, m[:-2], ValueError, r"\bis_multimodal\b has shape \(14,\)"),
    "mask_on_other_device": lambda e, i, m: (e, i, m.to("meta"), ValueError, r"\bis_multimodal\b is on meta"),
    "no_items_for_placeholders": lambda e, i, m: (e, i[:0], m, ValueError,
                                                  r"^Attempted to assign 0 = 0 multimodal tokens to 10 placeholders$"),
}


@pytest.mark.parametrize("case", MERGE_CASES.keys())
@pytest.mark.parametrize("path", ALL_PATHS)
def test_merge_bad_argument_raises_naming_it(path, case):
    embeds, mask = mm_inputs(10)
    embeds, items, mask, error, message = MERGE_CASES[case](embeds, randn(10, H), mask)
    before = embeds.clone()
    with pytest.raises(error, match=message):
        mm.merge_multimodal_embeddings(embeds, items, mask, path=path)
    assert_bits_equal(embeds, before)


def test_merge_with_is_multimodal_and_plan_raises_value_error():
    embeds, mask = mm_inputs(10)
    before = embeds.clone()
    with pytest.raises(ValueError, match=r"pass \bis_multimodal\b or plan=, not both"):
        mm.merge_multimodal_embeddings(embeds, randn(10, H), mask, plan=mm.MergePlan(mask))
    assert_bits_equal(embeds, before)


def test_merge_with_non_tensor_is_multimodal_raises_type_error():
    embeds, mask = mm_inputs(10)
    with pytest.raises(TypeError, match=r"\bis_multimodal\b"):
        mm.merge_multimodal_embeddings(embeds, randn(10, H), mask.tolist())


def test_merge_with_non_tensor_inputs_embeds_raises_type_error():
    embeds, mask = mm_inputs(10)
    with pytest.raises(TypeError, match=r"\binputs_embeds\b must be a torch.Tensor"):
        mm.merge_multimodal_embeddings(embeds.tolist(), randn(10, H), mask)


# ---- the Triton path where it cannot run ---------------------------------------------------------------------

def test_triton_path_on_cpu_without_interpreter_raises_value_error():
    code = (
        "import torch, mmmerge_triton as mm\n"
        "dst = torch.zeros(4, 8); mask = torch.tensor([True, False, True, False]); src = torch.ones(2, 8)\n"
        "try:\n"
        "    mm.masked_row_scatter_(dst, mask, src, path='triton')\n"
        "except ValueError as e:\n"
        "    assert 'TRITON_INTERPRET' in str(e) and \"path='triton'\" in str(e), e\n"
        "    assert dst.eq(0).all()\n"
        "    print('raised')\n"
        "mm.masked_row_scatter_(dst, mask, src, path='auto')\n"
        "assert dst[0].eq(1).all() and dst[1].eq(0).all()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "raised"


def test_triton_path_on_a_meta_destination_raises_value_error_naming_the_device():
    dst, mask, src = (t.to("meta") for t in base_inputs())
    with pytest.raises(ValueError, match=r"path='triton'.*CUDA tensors.*meta"):
        mm.masked_row_scatter_(dst, mask, src, path="triton")


# ---- flags, paths, layouts, nested empties, 1-D destinations -------------------------------------------------

@pytest.mark.parametrize("value", ["yes", 1, None, np.bool_(True)], ids=["str", "int", "none", "numpy_bool"])
@pytest.mark.parametrize("flag", ["accumulate", "check_count"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_flags_must_be_bool_on_every_path(path, flag, value):
    dst, mask, src = base_inputs()
    before = dst.clone()
    with pytest.raises(TypeError, match=rf"^{flag} must be a bool, got"):
        mm.masked_row_scatter_(dst, mask, src, path=path, **{flag: value})
    assert_bits_equal(dst, before)


@pytest.mark.parametrize("path", [None, 3, ["triton"]], ids=["none", "int", "list"])
def test_non_string_path_raises_type_error_naming_path(path):
    dst, mask, src = base_inputs()
    before = dst.clone()
    with pytest.raises(TypeError, match=r"^path must be a str"):
        mm.masked_row_scatter_(dst, mask, src, path=path)
    with pytest.raises(TypeError, match=r"^path must be a str"):
        mm.merge_multimodal_embeddings(dst, src, mask, path=path)
    assert_bits_equal(dst, before)


SPARSE_CASES = {
    "dst": lambda d, m, s: (d.to_sparse(), m, s, r"\bdst\b must be a dense \(strided\) tensor"),
    "mask": lambda d, m, s: (d, m.to_sparse(), s, r"\bmask\b must be a dense \(strided\) tensor"),
    "src": lambda d, m, s: (d, m, s.to_sparse(), r"\bsrc\b must be a dense \(strided\) tensor"),
}


@pytest.mark.parametrize("case", SPARSE_CASES.keys())
@pytest.mark.parametrize("path", ALL_PATHS)
def test_sparse_tensors_raise_type_error_naming_them(path, case):
    dst, mask, src, message = SPARSE_CASES[case](*base_inputs())
    with pytest.raises(TypeError, match=message):
        mm.masked_row_scatter_(dst, mask, src, path=path)


def test_sparse_item_raises_type_error_naming_it():
    embeds, mask = mm_inputs(10)
    with pytest.raises(TypeError, match=r"\bmultimodal_embeddings item 1 .*dense \(strided\)"):
        mm.merge_multimodal_embeddings(embeds, [randn(4, H), randn(6, H).to_sparse()], mask)


@pytest.mark.parametrize("selected", [True, False])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_1d_destination_with_a_0d_mask_agrees_with_pytorch_on_every_path(path, selected):
    dst = randn(H, seed=1)
    mask = torch.tensor(selected)
    src = randn(int(selected), H, seed=2)
    expected = dst.clone()
    expected[mask] = src
    mm.masked_row_scatter_(dst, mask, src, path=path)
    assert_bits_equal(dst, expected)


def test_1d_destination_with_a_1d_mask_says_what_to_pass():
    with pytest.raises(ValueError, match=r"\bis_multimodal\b has shape \(5,\); \binputs_embeds\b is 1-D.*\[N, H\]"):
        mm.merge_multimodal_embeddings(randn(5), randn(2, 5), torch.ones(5, dtype=torch.bool))


# ---- deepstack_add names its own arguments ----------------------------------------------------------------

DEEPSTACK_CASES = {
    "hidden_not_tensor": (lambda h, v, p: (h.tolist(), v, p), TypeError, r"^hidden_states must be a torch.Tensor"),
    "embeds_not_tensor": (lambda h, v, p: (h, v.tolist(), p), TypeError, r"^visual_embeds must be a torch.Tensor"),
    "no_plan": (lambda h, v, p: (h, v, None), TypeError, r"^plan must be a MergePlan"),
    "mask_not_plan": (lambda h, v, p: (h, v, p.mask), TypeError, r"^plan must be a MergePlan"),
    "hidden_mismatch": (lambda h, v, p: (h, v[:, :-1], p), ValueError, r"\bvisual_embeds\b has hidden size 3; "
                                                                         r"\bhidden_states\b has 4"),
    "count_mismatch": (lambda h, v, p: (h, v[:-1], p), ValueError, r"^Attempted to assign 2 multimodal tokens to 3"),
    "hidden_float64_int": (lambda h, v, p: (h.int(), v, p), TypeError, r"^hidden_states must be float64"),
}


@pytest.mark.parametrize("case", DEEPSTACK_CASES.keys())
def test_deepstack_add_errors_name_its_own_arguments(case):
    make, error, message = DEEPSTACK_CASES[case]
    hidden, mask, visual = base_inputs()
    hidden, visual, plan = make(hidden, visual, mm.MergePlan(mask))
    before = hidden.clone() if isinstance(hidden, torch.Tensor) else None
    with pytest.raises(error, match=message):
        mm.deepstack_add(hidden, visual, plan)
    if before is not None:
        assert_bits_equal(hidden, before)


# ---- tensors at odd addresses ---------------------------------------------------------------------------------

def odd_address(rows: int, cols: int) -> torch.Tensor:
    """A float16 [rows, cols] tensor one byte past an aligned address (torch.frombuffer(..., offset=1))."""
    raw = bytearray(2 * rows * cols + 1)
    t = torch.frombuffer(raw, dtype=torch.float16, offset=1, count=rows * cols).view(rows, cols)
    t.copy_(torch.randn(rows, cols).half())
    return t


@pytest.mark.parametrize("which", ["dst", "src"])
def test_odd_address_takes_index_put_under_auto_and_is_refused_by_triton(which):
    mask = MASK.clone()
    dst = odd_address(N, H) if which == "dst" else randn(N, H, dtype=torch.float16)
    src = odd_address(K, H) if which == "src" else randn(K, H, dtype=torch.float16, seed=2)
    assert (dst if which == "dst" else src).data_ptr() % 2 == 1
    decision = mm.explain(dst, src, mask)
    assert decision.path == "index_put" and "multiple of its element size" in decision.reason
    before = dst.clone()
    with pytest.raises(ValueError, match=r"path='triton'.*not a multiple of its element size"):
        mm.masked_row_scatter_(dst, mask, src, path="triton")
    assert_bits_equal(dst, before)
    expected = dst.clone()
    expected[mask] = src
    mm.masked_row_scatter_(dst, mask, src)
    assert_bits_equal(dst, expected)
