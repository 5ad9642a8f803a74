"""Gradients: grad_src[j] = grad[j-th true row] (cast to src's dtype); grad_dst = grad with the true rows
zeroed (unchanged with accumulate). In place on a non-leaf and out of place, 2-D and [B, S, H]."""
from __future__ import annotations

import warnings

import pytest
import torch

import mmmerge_triton as mm

from .conftest import (
    ALL_PATHS,
    DTYPE_PAIR_IDS,
    DTYPE_PAIRS,
    assert_bits_equal,
    assert_close_ulps,
    make_mask,
    merge_tolerance,
    randn,
)

H = 19


def expected_grads(upstream, mask, accumulate):
    """(grad_dst, grad_src) of sum(out * upstream), by a loop over rows."""
    hidden = upstream.shape[-1]
    grad_dst = upstream.clone()
    rows = grad_dst.view(-1, hidden)
    picked = []
    for i, selected in enumerate(mask.reshape(-1).tolist()):
        if selected:
            picked.append(upstream.reshape(-1, hidden)[i].clone())
            if not accumulate:
                rows[i].zero_()
    grad_src = torch.stack(picked) if picked else upstream.new_zeros(0, hidden)
    return grad_dst, grad_src


def run_backward(scatter_kind, path, mask, accumulate, dst_dtype=torch.float32, src_dtype=torch.float32, seed=0):
    """Merge with autograd and backpropagate sum(out * upstream). Returns (upstream, dst.grad, src.grad)."""
    dst = randn(*mask.shape, H, dtype=dst_dtype, seed=seed).requires_grad_()
    src = randn(int(mask.sum()), H, dtype=src_dtype, seed=seed + 1).requires_grad_()
    upstream = randn(*mask.shape, H, dtype=dst_dtype, seed=seed + 2)
    if scatter_kind == "in_place":
        out = mm.masked_row_scatter_(dst * 1, mask, src, accumulate=accumulate, path=path)  # non-leaf dst
    else:
        out = mm.masked_row_scatter(dst, mask, src, accumulate=accumulate, path=path)
    (out * upstream).sum().backward()
    return upstream, dst.grad, src.grad


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("shape", [(29,), (3, 10)], ids=["2d", "3d"])
@pytest.mark.parametrize("scatter_kind", ["in_place", "out_of_place"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_grads_match_the_row_rule(path, scatter_kind, shape, accumulate):
    mask = make_mask("random50", shape, seed=1)
    upstream, grad_dst, grad_src = run_backward(scatter_kind, path, mask, accumulate)
    want_dst, want_src = expected_grads(upstream, mask, accumulate)
    assert_bits_equal(grad_dst, want_dst, "grad_dst")
    assert_bits_equal(grad_src, want_src, "grad_src")


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("mask_kind", ["empty", "full", "last", "blocks"])
def test_triton_grads_equal_index_put_grads(mask_kind, accumulate):
    mask = make_mask(mask_kind, (4, 8))
    for scatter_kind in ("in_place", "out_of_place"):
        _, triton_dst, triton_src = run_backward(scatter_kind, "triton", mask, accumulate)
        _, torch_dst, torch_src = run_backward(scatter_kind, "index_put", mask, accumulate)
        assert_bits_equal(triton_dst, torch_dst, "grad_dst")
        if mask_kind == "empty":  # nothing merged: src (0 rows) never joins the graph on either path
            assert triton_src is None and torch_src is None
        else:
            assert_bits_equal(triton_src, torch_src, "grad_src")


@pytest.mark.parametrize(("src_dtype", "dst_dtype"), DTYPE_PAIRS, ids=DTYPE_PAIR_IDS)
@pytest.mark.parametrize("path", ["triton", "index_put"])
def test_grads_are_cast_to_each_input_dtype(path, src_dtype, dst_dtype):
    mask = make_mask("random50", (29,), seed=2)
    upstream, grad_dst, grad_src = run_backward("in_place", path, mask, False, dst_dtype, src_dtype)
    want_dst, want_src = expected_grads(upstream, mask, False)
    assert grad_dst.dtype == dst_dtype and grad_src.dtype == src_dtype
    assert_bits_equal(grad_dst, want_dst, "grad_dst")
    # grad_src is grad's rows cast from dst's dtype to src's: the same rounding caveat as a merge that way.
    tol = merge_tolerance(dst_dtype, src_dtype, False, path)
    assert not tol.truncated_src
    assert_close_ulps(grad_src, [want_src.to(src_dtype)], tol.ulps, "grad_src")


@pytest.mark.parametrize("path", ALL_PATHS)
def test_only_src_requires_grad_with_plain_dst(path):
    """inputs_embeds without grad, vision features with grad: dst joins the graph through the write."""
    mask = make_mask("random50", (3, 7))
    dst = randn(3, 7, H)
    src = randn(int(mask.sum()), H, seed=1).requires_grad_()
    upstream = randn(3, 7, H, seed=2)
    out = mm.masked_row_scatter_(dst, mask, src, path=path)
    assert out.requires_grad
    (out * upstream).sum().backward()
    assert_bits_equal(src.grad, expected_grads(upstream, mask, False)[1], "grad_src")


@pytest.mark.parametrize("path", ALL_PATHS)
def test_only_dst_requires_grad(path):
    mask = make_mask("random50", (29,))
    dst = randn(29, H).requires_grad_()
    src = randn(int(mask.sum()), H, seed=1)
    upstream = randn(29, H, seed=2)
    (mm.masked_row_scatter(dst, mask, src, path=path) * upstream).sum().backward()
    assert_bits_equal(dst.grad, expected_grads(upstream, mask, False)[0], "grad_dst")


@pytest.mark.parametrize("path", ALL_PATHS)
def test_merge_multimodal_embeddings_backward(path):
    mask = make_mask("blocks", (30,))
    embeds = randn(30, H).requires_grad_()
    items = [randn(3, H, seed=1).requires_grad_(), randn(int(mask.sum()) - 3, H, seed=2).requires_grad_()]
    upstream = randn(30, H, seed=3)
    out = mm.merge_multimodal_embeddings(embeds * 1, items, mask, path=path)
    (out * upstream).sum().backward()
    want_dst, want_src = expected_grads(upstream, mask, False)
    assert_bits_equal(embeds.grad, want_dst, "grad inputs_embeds")
    assert_bits_equal(torch.cat([items[0].grad, items[1].grad]), want_src, "grad items")


@pytest.mark.parametrize("path", ALL_PATHS)
def test_in_place_on_leaf_requiring_grad_raises_runtime_error(path):
    mask = make_mask("random50", (29,))
    dst = randn(29, H).requires_grad_()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        mm.masked_row_scatter_(dst, mask, randn(int(mask.sum()), H), path=path)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_in_place_on_leaf_requiring_grad_leaves_it_unchanged(path):
    mask = make_mask("random50", (29,))
    dst = randn(29, H).requires_grad_()
    before = dst.detach().clone()
    with pytest.raises(RuntimeError):
        mm.masked_row_scatter_(dst, mask, randn(int(mask.sum()), H), path=path)
    assert_bits_equal(dst.detach(), before, "leaf")


@pytest.mark.parametrize("path", ALL_PATHS)
def test_plan_updated_between_forward_and_backward_keeps_forward_grads(path):
    first, second = make_mask("random50", (29,), seed=1), make_mask("random50", (29,), seed=2)
    assert int(first.sum()) == int(second.sum()) and not torch.equal(first, second)
    plan = mm.MergePlan(first)
    dst = randn(29, H).requires_grad_()
    src = randn(int(first.sum()), H, seed=1).requires_grad_()
    upstream = randn(29, H, seed=2)
    out = mm.masked_row_scatter(dst, src=src, plan=plan, path=path)
    plan.update_(second)
    (out * upstream).sum().backward()
    want_dst, want_src = expected_grads(upstream, first, False)
    assert_bits_equal(dst.grad, want_dst, "grad_dst")
    assert_bits_equal(src.grad, want_src, "grad_src")


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_gradcheck_float32(path, accumulate):
    """The Triton path moves fp32/fp16/bf16 only, so its gradcheck runs in fp32 with loose tolerances: the op
    is linear, so central differences are exact up to fp32 rounding."""
    mask = make_mask("random50", (2, 5), seed=3)
    dst = randn(2, 5, 3).requires_grad_()
    src = randn(int(mask.sum()), 3, seed=1).requires_grad_()

    def in_place(d, s):
        return mm.masked_row_scatter_(d.clone(), mask, s, accumulate=accumulate, path=path)

    def out_of_place(d, s):
        return mm.masked_row_scatter(d, mask, s, accumulate=accumulate, path=path)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*double precision floating point.*")
        for fn in (in_place, out_of_place):
            assert torch.autograd.gradcheck(fn, (dst, src), eps=1e-2, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("path", ["auto", "index_put", "masked_scatter", "index_copy"])
def test_gradcheck_and_gradgradcheck_float64(path, accumulate):
    """Training code runs gradcheck in float64: the PyTorch paths (and auto, which takes one) merge it."""
    mask = make_mask("random50", (2, 5), seed=3)
    dst = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    src = torch.randn(int(mask.sum()), 3, dtype=torch.float64, requires_grad=True)

    def in_place(d, s):
        return mm.masked_row_scatter_(d.clone(), mask, s, accumulate=accumulate, path=path)

    def out_of_place(d, s):
        return mm.masked_row_scatter(d, mask, s, accumulate=accumulate, path=path)

    for fn in (in_place, out_of_place):
        assert torch.autograd.gradcheck(fn, (dst, src))
        assert torch.autograd.gradgradcheck(fn, (dst, src))


def test_triton_path_refuses_float64_naming_the_dtypes():
    mask = make_mask("random50", (7,))
    dst = torch.randn(7, 3, dtype=torch.float64)
    before = dst.clone()
    with pytest.raises(ValueError, match=r"path='triton'.*float32, float16 and bfloat16.*float64"):
        mm.masked_row_scatter_(dst, mask, torch.randn(int(mask.sum()), 3, dtype=torch.float64), path="triton")
    assert_bits_equal(dst, before)


# ---- gradients on every route: eager, compiled, subclasses, dispatch modes, double backward ------------------

def torch_merge(d, mask, s, accumulate=False):
    """PyTorch's own in-place merge of a copy of d: the gradients to match."""
    return d.clone().index_put_((mask,), s.to(d.dtype), accumulate=accumulate)


def grads_of(fn, mask, accumulate=False, seed=0):
    d = randn(*mask.shape, H, seed=seed).requires_grad_()
    s = randn(int(mask.sum()), H, seed=seed + 1).requires_grad_()
    upstream = randn(*mask.shape, H, seed=seed + 2)
    (fn(d, s) * upstream).sum().backward()
    return d.grad, s.grad


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("kind", ["in_place", "out_of_place"])
def test_compiled_merge_gives_pytorchs_gradients(kind, path, accumulate):
    """Compiled, the API calls the registered ops: an in-place call that needs gradients must still give them
    (it used to reach the in-place op, which has no autograd formula, and src.grad came back None)."""
    torch._dynamo.reset()
    mask = make_mask("random50", (3, 7), seed=4)
    scatter = mm.masked_row_scatter_ if kind == "in_place" else mm.masked_row_scatter

    def ours(d, s):
        return scatter(d.clone() if kind == "in_place" else d, mask, s, accumulate=accumulate, path=path)

    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    got_dst, got_src = grads_of(compiled, mask, accumulate)
    want_dst, want_src = grads_of(lambda d, s: torch_merge(d, mask, s, accumulate), mask, accumulate)
    assert got_src is not None, "src's gradient was dropped"
    assert_bits_equal(got_dst, want_dst, "grad_dst")
    assert_bits_equal(got_src, want_src, "grad_src")


class Wrapped(torch.Tensor):
    """A tensor subclass with the default __torch_function__ (as DTensor-like wrappers go through the API's op
    route)."""


class CountingMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("route", ["subclass", "dispatch_mode"])
@pytest.mark.parametrize("kind", ["in_place", "out_of_place"])
def test_subclass_and_dispatch_mode_give_pytorchs_gradients(kind, route, path):
    mask = make_mask("random50", (3, 7), seed=5)
    scatter = mm.masked_row_scatter_ if kind == "in_place" else mm.masked_row_scatter

    def ours(d, s):
        d = d.clone()
        if route == "subclass":
            d, s = d.as_subclass(Wrapped), s.as_subclass(Wrapped)
            return scatter(d, mask, s, path=path)
        mode = CountingMode()
        with mode:
            out = scatter(d, mask, s, path=path)
        assert mode.calls > 0
        return out

    got_dst, got_src = grads_of(ours, mask)
    want_dst, want_src = grads_of(lambda d, s: torch_merge(d, mask, s), mask)
    assert got_src is not None, "src's gradient was dropped"
    assert_bits_equal(got_dst, want_dst, "grad_dst")
    assert_bits_equal(got_src, want_src, "grad_src")


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_double_backward_matches_pytorch(path, accumulate):
    """A Hessian-vector product through the merge: the backward must itself be differentiable."""
    mask = make_mask("random50", (11,), seed=6)
    weight = randn(11, H, seed=9)
    vec = randn(int(mask.sum()), H, seed=10)

    def hvp(merge):
        d = randn(11, H, seed=7).requires_grad_()
        s = randn(int(mask.sum()), H, seed=8).requires_grad_()
        loss = (merge(d * 1, s) ** 2 * weight).sum()
        (g_src,) = torch.autograd.grad(loss, s, create_graph=True)
        return torch.autograd.grad((g_src * vec).sum(), (d, s), allow_unused=True)

    for kind in (mm.masked_row_scatter_, mm.masked_row_scatter):
        got = hvp(lambda d, s: kind(d, mask, s, accumulate=accumulate, path=path))
        want = hvp(lambda d, s: torch_merge(d, mask, s, accumulate))
        for g, w, name in zip(got, want, ("d", "s")):
            if w is None:
                assert g is None or not g.any(), f"hvp wrt {name}"
            else:  # equal values (the sign of an exact zero may differ between the two graphs)
                assert g is not None and torch.equal(g, w), f"hvp wrt {name}: {g} != {w}"


def test_registered_in_place_op_refuses_inputs_that_need_gradients():
    mask = make_mask("random50", (9,))
    dst = randn(9, H)
    src = randn(int(mask.sum()), H, seed=1).requires_grad_()
    before = dst.clone()
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.ops.mmmerge_triton.masked_row_scatter_(dst, mask, src, False, "auto", False)
    assert_bits_equal(dst, before)
    with torch.no_grad():
        torch.ops.mmmerge_triton.masked_row_scatter_(dst, mask, src, False, "auto", False)
    assert_bits_equal(dst[mask], src.detach())


# ---- PyTorch's in-place rules, raised before anything is written ----------------------------------------------

def leaf_param():
    return torch.nn.Parameter(randn(9, H))


IN_PLACE_TARGETS = {  # name -> (a function giving dst to write in place, keeping what it writes into alive)
    "leaf": lambda: (lambda t: (t, t))(randn(9, H).requires_grad_()),
    "parameter": lambda: (lambda t: (t, t))(leaf_param()),
    "view_of_leaf": lambda: (lambda t: (t[1:], t))(randn(10, H).requires_grad_()),
    "unbind_output": lambda: (lambda t: (t.unbind(0)[1], t))((randn(3, 9, H).requires_grad_() * 1)),
}


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("target", IN_PLACE_TARGETS.keys())
def test_in_place_write_that_autograd_forbids_raises_pytorchs_error_first(target, path):
    mask = make_mask("random50", (9,), seed=2)
    src = randn(int(mask.sum()), H, seed=3)
    dst, owner = IN_PLACE_TARGETS[target]()
    before = owner.detach().clone()
    with pytest.raises(RuntimeError) as ours:
        mm.masked_row_scatter_(dst, mask, src, path=path)
    assert_bits_equal(owner.detach(), before, "written before raising")
    dst, _ = IN_PLACE_TARGETS[target]()
    with pytest.raises(RuntimeError) as stock:
        dst.index_put_((mask,), src)
    assert str(ours.value) == str(stock.value)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_in_place_write_to_an_inference_tensor_outside_inference_mode_raises(path):
    with torch.inference_mode():
        dst = randn(9, H)
    mask = make_mask("random50", (9,), seed=2)
    src = randn(int(mask.sum()), H, seed=3)
    before = dst.clone()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        mm.masked_row_scatter_(dst, mask, src, path=path)
    assert_bits_equal(dst, before)
    with torch.inference_mode():  # inside the mode the write is legal
        mm.masked_row_scatter_(dst, mask, src, path=path)
    assert_bits_equal(dst[mask], src)
