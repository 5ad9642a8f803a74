"""The registered torch ops: opcheck, the ops called by name, and torch.compile(fullgraph=True) on the CPU."""
from __future__ import annotations

import pytest
import torch

import mmmerge_triton as mm

from .conftest import assert_bits_equal, assert_merged, make_mask, randn

OPS = torch.ops.mmmerge_triton
H = 12


def op_inputs(requires_grad=False, dst_dtype=torch.float32, src_dtype=torch.float32):
    mask = make_mask("random50", (2, 9), seed=1)
    dst = randn(2, 9, H, dtype=dst_dtype).requires_grad_(requires_grad)
    src = randn(int(mask.sum()), H, dtype=src_dtype, seed=1).requires_grad_(requires_grad)
    return dst, mask, src


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("path", ["auto", "triton", "index_copy"])
def test_opcheck_masked_row_scatter_in_place(path, accumulate):
    dst, mask, src = op_inputs(dst_dtype=torch.bfloat16)
    torch.library.opcheck(OPS.masked_row_scatter_.default, (dst, mask, src, accumulate, path, False))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("path", ["auto", "triton"])
def test_opcheck_masked_row_scatter(path, accumulate, requires_grad):
    dst, mask, src = op_inputs(requires_grad)
    torch.library.opcheck(OPS.masked_row_scatter.default, (dst, mask, src, accumulate, path, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_masked_row_gather(dtype):
    dense, mask, src = op_inputs()
    torch.library.opcheck(OPS.masked_row_gather.default, (dense, mask, src.shape[0], dtype))


@pytest.mark.parametrize("path", ["index_put", "triton"])
def test_ops_by_name_match_reference(path):
    dst, mask, src = op_inputs(dst_dtype=torch.float16)
    out = OPS.masked_row_scatter(dst, mask, src, True, path, False)
    assert_merged(out, dst, mask, src, True, path)
    in_place = dst.clone()
    assert OPS.masked_row_scatter_(in_place, mask, src, False, path, False) is None
    assert_merged(in_place, dst, mask, src, False, path)
    gathered = OPS.masked_row_gather(dst, mask, src.shape[0], torch.float32)
    assert_bits_equal(gathered, torch.stack([dst.reshape(-1, H)[i].float() for i in mask.reshape(-1).nonzero()[:, 0]]))


def test_op_count_mismatch_raises_value_error():
    dst, mask, src = op_inputs()
    before = dst.clone()
    with pytest.raises(ValueError, match="multimodal tokens to"):
        OPS.masked_row_scatter_(dst, mask, src[1:], False, "triton", False)
    assert_bits_equal(dst, before)


def test_masked_row_gather_zero_fills_rows_past_the_mask_count():
    dense, mask, _ = op_inputs()
    k = int(mask.sum())
    out = OPS.masked_row_gather(dense, mask, k + 3, torch.float32)
    assert_bits_equal(out[:k], dense[mask])
    assert_bits_equal(out[k:], torch.zeros(3, H))


def test_compiled_merge_multimodal_embeddings_equals_eager():
    mask = make_mask("blocks", (24,))
    k = int(mask.sum())
    embeds = randn(24, H, dtype=torch.bfloat16)
    items = [randn(2, H, seed=1), randn(k - 2, H, seed=2)]

    def forward(embeds, items, mask):
        return mm.merge_multimodal_embeddings(embeds * 2, items, mask, path="triton") + 1

    compiled = torch.compile(forward, fullgraph=True, dynamic=False)
    assert_bits_equal(compiled(embeds, items, mask), forward(embeds, items, mask))


def test_compiled_masked_row_scatter_backward_equals_eager():
    mask = make_mask("random50", (2, 9), seed=3)
    upstream = randn(2, 9, H, seed=5)

    def loss(dst, src):
        out = mm.masked_row_scatter(dst * 1.5, mask, src, accumulate=True)
        return (out * upstream).sum()

    def grads(fn):
        dst = randn(2, 9, H).requires_grad_()
        src = randn(int(mask.sum()), H, seed=1).requires_grad_()
        value = fn(dst, src)
        value.backward()
        return value.detach(), dst.grad, src.grad

    compiled = grads(torch.compile(loss, fullgraph=True, dynamic=False))
    eager = grads(loss)
    torch.testing.assert_close(compiled[0], eager[0])  # the sum may be reordered by inductor
    assert_bits_equal(compiled[1], eager[1], "grad_dst")
    assert_bits_equal(compiled[2], eager[2], "grad_src")


GATHER_CASES = {  # (dense, mask, num_rows, dtype) -> a bad call of the public op, its error and message
    "mask_longer_than_dense": (lambda d, m: (d, torch.cat([m, m]), 3, torch.float32), ValueError, r"\bmask\b has shape"),
    "mask_not_bool": (lambda d, m: (d, m.to(torch.uint8), 3, torch.float32), TypeError, r"\bmask\b must be a bool"),
    "negative_rows": (lambda d, m: (d, m, -1, torch.float32), ValueError, r"num_rows must be >= 0"),
    "int_dtype": (lambda d, m: (d, m, 3, torch.int32), TypeError, r"^dtype must be"),
    "dense_int": (lambda d, m: (d.int(), m, 3, torch.float32), TypeError, r"\bdense\b must be"),
}


@pytest.mark.parametrize("case", GATHER_CASES.keys())
def test_masked_row_gather_checks_its_inputs_as_the_api_does(case):
    """The registered ops are public: a mask longer than dense once read out of bounds."""
    make, error, message = GATHER_CASES[case]
    dense, mask, _ = op_inputs()
    with pytest.raises(error, match=message):
        OPS.masked_row_gather(*make(dense, mask))
