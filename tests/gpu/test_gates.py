"""The gates in front of the Triton path on CUDA, where path="auto" takes it: the negative bit, forward-mode AD,
torch.func's vmap/grad/jvp, and an entry that keeps only what its key decides. Every entry point, a CPU and a
device mask, the first call of a signature and a memo hit of its entry (core._prepared); PyTorch's index_put on
the same inputs is the oracle, bit for bit."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import torch.autograd.forward_ad as fwAD  # noqa: E402
from torch.func import grad, jvp, vmap  # noqa: E402

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton import core, dispatch  # noqa: E402

from gpu_helpers import assert_same, dev, rand, random_mask  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

N, H, M = 1300, 320, 650
ENTRIES = ("masked_row_scatter", "masked_row_scatter_", "merge_multimodal_embeddings", "items")
IN_PLACE = {"masked_row_scatter_", "merge_multimodal_embeddings", "items"}
MASKS = ("cpu_mask", "device_mask")


@pytest.fixture(autouse=True)
def fresh_entries():
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def make(mask_kind, seed=0, dtype=torch.float32, src_dtype=torch.float32, h=H):
    mask = random_mask((N,), M, seed=seed)
    return (rand((N, h), dtype, seed=seed + 1), mask.to(dev()) if mask_kind == "device_mask" else mask,
            rand((M, h), src_dtype, seed=seed + 2))


def merge(entry, dst, mask, src, path):
    if entry == "masked_row_scatter":
        return mt.masked_row_scatter(dst, mask, src, path=path)
    if entry == "masked_row_scatter_":
        return mt.masked_row_scatter_(dst, mask, src, path=path)
    if entry == "merge_multimodal_embeddings":
        return mt.merge_multimodal_embeddings(dst, src, mask, path=path)
    return mt.merge_multimodal_embeddings(dst, [src[:100], src[100:]], mask, path=path)


def torch_merge(entry, dst, mask, src):
    if entry == "items":
        src = torch.cat([src[:100], src[100:]])
    mask = mask.to(dst.device)
    if entry in IN_PLACE:
        return dst.index_put_((mask,), src.to(dst.dtype))
    return dst.index_put((mask,), src.to(dst.dtype))


def same(actual, expected, what=""):
    assert_same(actual.resolve_neg(), expected.resolve_neg(), what)


def negated(t):
    """A view that reads t's values from memory holding -t: torch._neg_view (contiguous)."""
    return torch._neg_view(-t)


def public_negated(t):
    """The same through public ops (one column, so that the column stride 2 of .imag does not matter)."""
    return torch.complex(torch.zeros_like(t), -t).conj().imag


# The negative bit (issue 21, item 1).

@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                  (torch.bfloat16, torch.float16)], ids=["f32", "f32-to-bf16", "bf16-to-f16"])
@pytest.mark.parametrize("path", ["auto", "triton"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_a_source_with_the_negative_bit(entry, mask_kind, path, pair):
    src_dtype, dst_dtype = pair
    for seed in range(2):  # the first call of the signature, then its entry
        dst, mask, values = make(mask_kind, seed, dst_dtype, src_dtype)
        src = negated(values)
        out = merge(entry, dst.clone(), mask, src, path)
        same(out, torch_merge(entry, dst.clone(), mask, src), f"call {seed}")


@pytest.mark.parametrize("path", ["auto", "triton"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_public_negated_views_as_source_and_destination(entry, mask_kind, path):
    for seed in range(2):
        values, mask, src = make(mask_kind, seed, h=1)
        out = merge(entry, values.clone(), mask, public_negated(src), path)
        same(out, torch_merge(entry, values.clone(), mask, public_negated(src)), f"source, call {seed}")
        dst = public_negated(values)
        if path == "triton" and entry in IN_PLACE:
            with pytest.raises(ValueError, match="the destination has the negative bit"):
                merge(entry, dst, mask, src, path)
            same(dst, public_negated(values), "nothing written")
        else:
            same(merge(entry, dst, mask, src, path), torch_merge(entry, public_negated(values), mask, src),
                 f"destination, call {seed}")


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_a_destination_with_the_negative_bit(entry, mask_kind):
    for seed in range(2):
        values, mask, src = make(mask_kind, seed)
        out = merge(entry, negated(values), mask, src, "auto")
        same(out, torch_merge(entry, negated(values), mask, src), f"auto, call {seed}")
        if entry in IN_PLACE:
            dst = negated(values)
            with pytest.raises(ValueError, match="the destination has the negative bit"):
                merge(entry, dst, mask, src, "triton")
            same(dst, negated(values), "nothing written")


# Forward-mode AD (item 2).

@pytest.mark.parametrize("duals", ["dst and src", "src"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_forward_ad_gives_pytorchs_tangents(entry, mask_kind, duals):
    dst, mask, src = make(mask_kind)
    dst_tangent, src_tangent = rand((N, H), torch.float32, seed=7), rand((M, H), torch.float32, seed=8)
    merge(entry, dst.clone(), mask, src, "auto")  # the signature's entry, made outside forward AD

    def inputs():  # fresh tangents: an in-place merge writes dst's, which make_dual does not copy
        d = fwAD.make_dual(dst.clone(), dst_tangent.clone()) if duals == "dst and src" else dst.clone()
        return d, fwAD.make_dual(src, src_tangent)

    with fwAD.dual_level():
        target, values = inputs()
        out = merge(entry, target, mask, values, "auto")
        target, values = inputs()
        expected = torch_merge(entry, target, mask, values)
        (value, tangent), (expected_value, expected_tangent) = fwAD.unpack_dual(out), fwAD.unpack_dual(expected)
        assert tangent is not None, "the merge dropped the tangents"
        same(value, expected_value, "primal")
        same(tangent, expected_tangent, "tangent")


# torch.func's transforms (item 7).

def merged_by(entry, mask, path):
    if path is None:
        return lambda d, s: torch_merge(entry, d.clone(), mask, s)
    return lambda d, s: merge(entry, d.clone(), mask, s, path)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_vmap_grad_and_jvp_give_pytorchs_results(entry, mask_kind):
    dst, mask, src = make(mask_kind)
    merge(entry, dst.clone(), mask, src, "auto")  # the signature's entry, made outside the transforms
    ours, theirs = merged_by(entry, mask, "auto"), merged_by(entry, mask, None)
    batch_dst, batch_src = rand((3, N, H), torch.float32, seed=3), rand((3, M, H), torch.float32, seed=4)
    same(vmap(ours)(batch_dst, batch_src), vmap(theirs)(batch_dst, batch_src), "vmap")

    def loss(f):
        return lambda d, s: f(d, s).pow(2).sum()

    for got, want in zip(grad(loss(ours), argnums=(0, 1))(dst, src), grad(loss(theirs), argnums=(0, 1))(dst, src)):
        same(got, want, "grad")
    tangents = (rand((N, H), torch.float32, seed=5), rand((M, H), torch.float32, seed=6))
    for got, want in zip(jvp(ours, (dst, src), tangents), jvp(theirs, (dst, src), tangents)):
        same(got, want, "jvp")
    with pytest.raises(ValueError, match="path='triton' cannot merge under a function transform"):
        vmap(merged_by(entry, mask, "triton"))(batch_dst, batch_src)


# An entry keeps only what its key decides (item 12).

@pytest.mark.parametrize("mask_kind", MASKS)
def test_a_first_call_with_a_wrong_mask_length_does_not_poison_its_signature(mask_kind, memo_spy):
    """A first call with a mask one row short has a key of its own (the length is a field), raises and memoizes
    nothing; the good call after it prepares its key once and merges PyTorch's result; the next is a memo hit."""
    dst, mask, src = make(mask_kind)
    with pytest.raises(ValueError, match="is_multimodal has shape"):
        mt.merge_multimodal_embeddings(dst, src, mask[1:].clone(), path="triton")  # aligned as mask
    left = dict(core._prepared)  # what the failed call memoized
    for seed in range(2):  # the good call after the failed one, then a hit
        dst, mask, src = make(mask_kind, seed)
        expected = torch_merge("merge_multimodal_embeddings", dst.clone(), mask, src)
        mt.merge_multimodal_embeddings(dst, src, mask, path="triton")
        same(dst, expected, f"good call {seed}")
    memo_spy.assert_failed_first_call_kept_nothing(left)
