"""torch.compile(fullgraph=True): the API calls the registered torch ops while tracing, so a graph holds the
merge without a break, and its results (and gradients) equal eager ones bit for bit."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402

from gpu_helpers import assert_same, dev, rand, random_mask, reference  # noqa: E402

DEV = dev()
N, H, M, VOCAB = 512, 256, 150, 1000


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _mask(kind, seed=0):
    mask = random_mask((N,), M, seed=seed)
    return mask.to(DEV) if kind == "gpu" else mask


@pytest.mark.parametrize("mask_kind", ["cpu", "gpu"])
def test_compiled_merge_multimodal_embeddings(mask_kind):
    table = rand((VOCAB, H), torch.bfloat16, seed=1)
    ids = torch.randint(0, VOCAB, (N,), device=DEV, generator=torch.Generator(device=DEV).manual_seed(2))
    mask = _mask(mask_kind)
    src = rand((M, H), torch.float32, seed=3)

    def fn(ids, mm, is_mm):
        embeds = table[ids]  # an intermediate, mutated in place by the merge
        embeds = mt.merge_multimodal_embeddings(embeds, mm, is_mm)
        return embeds * 2

    compiled = torch.compile(fn, fullgraph=True)
    eager = fn(ids, src, mask)
    assert_same(compiled(ids, src, mask), eager)
    assert_same(eager, reference(table[ids], mask, src) * 2)
    # a second prompt: another mask and other embeddings, same shapes
    mask2, src2 = _mask(mask_kind, seed=4), rand((M, H), torch.float32, seed=5)
    assert_same(compiled(ids, src2, mask2), fn(ids, src2, mask2))


@pytest.mark.parametrize("mask_kind", ["cpu", "gpu"])
def test_compiled_merge_of_a_graph_input_and_item_list(mask_kind):
    mask = _mask(mask_kind)
    items = [rand((50, H), torch.float16, seed=6), rand((100, H), torch.float16, seed=7)]
    dst = rand((N, H), torch.float32, seed=8)

    def fn(embeds, mm, is_mm):
        return mt.merge_multimodal_embeddings(embeds, mm, is_mm)

    compiled = torch.compile(fn, fullgraph=True)
    eager_dst = dst.clone()
    eager = fn(eager_dst, items, mask)
    compiled_dst = dst.clone()
    out = compiled(compiled_dst, items, mask)
    assert_same(out, eager)
    assert_same(compiled_dst, eager_dst)  # the input was mutated in place, as in eager
    assert_same(eager_dst, reference(dst, mask, torch.cat(items)))


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("mask_kind", ["cpu", "gpu"])
def test_compiled_masked_row_scatter_inplace(mask_kind, accumulate):
    mask = _mask(mask_kind)
    dst = rand((N, H), torch.float16, seed=9)
    src = rand((M, H), torch.bfloat16, seed=10)

    def fn(d, m, s):
        mt.masked_row_scatter_(d, m, s, accumulate=accumulate)
        return d + 0

    compiled = torch.compile(fn, fullgraph=True)
    d_e, d_c = dst.clone(), dst.clone()
    assert_same(compiled(d_c, mask, src), fn(d_e, mask, src))
    assert_same(d_c, d_e)
    assert_same(d_e, reference(dst, mask, src, accumulate))


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("mask_kind", ["cpu", "gpu"])
def test_compiled_masked_row_scatter_backward(mask_kind, accumulate):
    mask = _mask(mask_kind)
    dst = rand((N, H), torch.bfloat16, seed=11)
    src = rand((M, H), torch.float32, seed=12)
    grad = rand((N, H), torch.bfloat16, seed=13)

    def fn(d, m, s):
        return mt.masked_row_scatter(d, m, s, accumulate=accumulate)

    compiled = torch.compile(fn, fullgraph=True)
    results = {}
    for name, f in (("eager", fn), ("compiled", compiled), ("torch", None)):
        d = dst.clone().requires_grad_()
        s = src.clone().requires_grad_()
        if f is None:  # torch's differentiable reference
            out = d.index_put((mask.to(DEV),), s.to(d.dtype), accumulate=accumulate)
        else:
            out = f(d, mask, s)
        out.backward(grad)
        results[name] = (out.detach(), d.grad, s.grad)
    for name in ("compiled", "torch"):
        for what, a, e in zip(("out", "dst.grad", "src.grad"), results[name], results["eager"]):
            assert a is not None and e is not None, f"{name} {what} missing"
            assert_same(a, e, f"{name} {what}")
