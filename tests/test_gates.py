"""The gates in front of the Triton path, on the CPU: inputs whose meaning is not all in their bytes (the
negative bit, forward-mode tangents, torch.func's wrappers) get PyTorch's result from every entry point, on
the first call of a signature and on a memo hit of its entry (core._prepared); and an entry keeps only what its
key decides.
PyTorch's index_put on the same inputs is the oracle. The Triton path runs under the interpreter, which reads
tensors' memory raw as the compiled kernels do; ``auto`` is made to choose it, as on a GPU."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, jvp, vmap

import mmmerge_triton as mm
from mmmerge_triton import KernelConfig, core, dispatch, kernel_config

from .conftest import assert_bits_equal

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # make_dual's

N, H, M = 40, 16, 17
ENTRIES = ("masked_row_scatter", "masked_row_scatter_", "merge_multimodal_embeddings", "items")
IN_PLACE = {"masked_row_scatter_", "merge_multimodal_embeddings", "items"}
TRANSFORM_REFUSAL = "path='triton' cannot merge under a function transform"


@pytest.fixture(autouse=True)
def triton_auto(monkeypatch):
    """path="auto" chooses the Triton path for every input it can take (as the tables do on a GPU), and lists
    are read in place by the multi-item kernel; fresh decisions and entries."""
    monkeypatch.setattr(dispatch, "_table_decision",
                        lambda *args: kernel_config.Decision("triton", None, KernelConfig(2, 32), False, "test"))
    monkeypatch.setattr(dispatch, "items_in_place_pays", lambda *args: True)
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def make(n=N, m=M, h=H, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:m]] = True
    return torch.randn(n, h, generator=g), mask, torch.randn(m, h, generator=g)


def merge(entry, dst, mask, src, path):
    """The merge by one entry point; returns its result (dst itself for the in-place ones)."""
    if entry == "masked_row_scatter":
        return mm.masked_row_scatter(dst, mask, src, path=path)
    if entry == "masked_row_scatter_":
        return mm.masked_row_scatter_(dst, mask, src, path=path)
    if entry == "merge_multimodal_embeddings":
        return mm.merge_multimodal_embeddings(dst, src, mask, path=path)
    return mm.merge_multimodal_embeddings(dst, [src[:5], src[5:]], mask, path=path)  # two items


def torch_merge(entry, dst, mask, src):
    """PyTorch's merge of the same inputs: index_put_ in place, or index_put (of the items' torch.cat)."""
    if entry == "items":
        src = torch.cat([src[:5], src[5:]])
    if entry in IN_PLACE:
        return dst.index_put_((mask,), src.to(dst.dtype))
    return dst.index_put((mask,), src.to(dst.dtype))


def assert_same(actual, expected, what="result"):
    """Bit for bit, as the values read (through a negative bit)."""
    assert_bits_equal(actual.resolve_neg(), expected.resolve_neg(), what)


# The negative bit (issue 21, item 1). PyTorch reads and writes through it; the kernels read and write memory raw.

def negated(t):
    """A view that reads t's values from memory holding -t: torch._neg_view (contiguous)."""
    return torch._neg_view(-t)


def public_negated(t):
    """The same through public ops: the imaginary part of a conjugated complex tensor (column stride 2)."""
    return torch.complex(torch.zeros_like(t), -t).conj().imag


@pytest.mark.parametrize("path", ["triton", "auto", "index_put"])
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("view", [negated, public_negated], ids=["neg_view", "conj_imag"])
def test_a_source_with_the_negative_bit_merges_its_values(entry, path, view):
    h = H if view is negated else 1  # one column: the column stride of conj().imag does not matter then
    for seed in range(2):  # the first call of the signature, then its entry
        dst, mask, values = make(h=h, seed=seed)
        src = view(values)
        assert src.is_neg() and torch.equal(src, values)
        out = merge(entry, dst.clone(), mask, src, path)
        assert_same(out, torch_merge(entry, dst.clone(), mask, src), f"call {seed}")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("view", [negated, public_negated], ids=["neg_view", "conj_imag"])
def test_a_destination_with_the_negative_bit(entry, view):
    """path="auto" takes index_put (explain says why); path="triton" refuses it in place, naming the bit, before
    any write (out of place it merges into a fresh tensor, which has no bit)."""
    h = H if view is negated else 1
    for seed in range(2):
        values, mask, src = make(h=h, seed=seed)
        dst = view(values)
        assert dst.is_neg()
        out = merge(entry, dst, mask, src, "auto")
        assert_same(out, torch_merge(entry, view(values), mask, src), f"auto, call {seed}")
        dst = view(values)
        if entry in IN_PLACE:
            with pytest.raises(ValueError, match="the destination has the negative bit"):
                merge(entry, dst, mask, src, "triton")
            assert_same(dst, view(values), "nothing written")
        else:
            assert_same(merge(entry, dst, mask, src, "triton"), torch_merge(entry, dst, mask, src), "out of place")
    decision = mm.explain(view(values), src, mask)
    assert decision.path == "index_put" and "negative bit" in decision.reason


# Forward-mode AD (item 2). The merged rows take src's tangent, the others keep dst's.

@pytest.mark.parametrize("path", ["auto", "index_put"])
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("duals", ["dst and src", "src"])
def test_forward_ad_gives_pytorchs_tangents(entry, path, duals):
    dst, mask, src = make()
    dst_tangent, src_tangent = torch.randn(N, H), torch.randn(M, H)
    merge(entry, dst.clone(), mask, src, path)  # the signature's entry, made outside forward AD

    def inputs():  # fresh tangents too: an in-place merge writes dst's tangent, which make_dual does not copy
        d = fwAD.make_dual(dst.clone(), dst_tangent.clone()) if duals == "dst and src" else dst.clone()
        return d, fwAD.make_dual(src, src_tangent)

    with fwAD.dual_level():
        target, values = inputs()
        out = merge(entry, target, mask, values, path)
        target, values = inputs()
        expected = torch_merge(entry, target, mask, values)
        (value, tangent), (expected_value, expected_tangent) = fwAD.unpack_dual(out), fwAD.unpack_dual(expected)
        assert tangent is not None, "the merge dropped the tangents"
        assert_same(value, expected_value, "primal")
        assert_same(tangent, expected_tangent, "tangent")


@pytest.mark.parametrize("entry", ENTRIES)
def test_forward_ad_refuses_path_triton_before_any_write(entry):
    dst, mask, src = make()
    with fwAD.dual_level():
        target = fwAD.make_dual(dst.clone(), torch.randn(N, H))
        with pytest.raises(ValueError, match=TRANSFORM_REFUSAL):
            merge(entry, target, mask, fwAD.make_dual(src, torch.randn(M, H)), "triton")
        assert_same(fwAD.unpack_dual(target).primal, dst, "nothing written")


# torch.func's transforms (item 7). Their wrappers have no storage and no host reads; PyTorch's index_put works.

TRANSFORM_PATHS = ["auto", "index_put", "masked_scatter", "index_copy"]


def merged_by(entry, mask, path):
    """f(dst, src): the merge into a copy of dst (in place on the copy for the in-place entry points), by
    ``path``, or by PyTorch's index_put (None)."""
    if path is None:
        return lambda d, s: torch_merge(entry, d.clone(), mask, s)
    return lambda d, s: merge(entry, d.clone(), mask, s, path)


@pytest.mark.parametrize("path", TRANSFORM_PATHS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_vmap_grad_and_jvp_give_pytorchs_results(entry, path):
    dst, mask, src = make()
    merge(entry, dst.clone(), mask, src, path)  # the signature's entry, made outside the transforms
    ours, theirs = merged_by(entry, mask, path), merged_by(entry, mask, None)
    batch_dst, batch_src = torch.randn(3, N, H), torch.randn(3, M, H)
    assert_same(vmap(ours)(batch_dst, batch_src), vmap(theirs)(batch_dst, batch_src), "vmap")

    def loss(f):
        return lambda d, s: (f(d, s) * torch.arange(H)).pow(2).sum()

    for got, want in zip(grad(loss(ours), argnums=(0, 1))(dst, src), grad(loss(theirs), argnums=(0, 1))(dst, src)):
        assert_same(got, want, "grad")
    tangents = (torch.randn(N, H), torch.randn(M, H))
    for got, want in zip(jvp(ours, (dst, src), tangents), jvp(theirs, (dst, src), tangents)):
        assert_same(got, want, "jvp")


def outcome(run):
    """What ``run()`` gives: ("value", its result), or (the error's type, its message)."""
    try:
        return "value", run()
    except Exception as error:  # noqa: BLE001 - compared with PyTorch's, whatever it is
        return type(error), str(error)


@pytest.mark.parametrize("entry", ENTRIES)
def test_plain_tensors_merged_inside_a_transformed_function(entry):
    """The transform wraps none of the merge's tensors (made outside the function), but it is on: host reads
    (.numpy() of the mask) fail under grad and jvp, and PyTorch refuses there to write a captured tensor in
    place. So the signature's memoized entry is not taken (core.transformed: PyTorch's index_put_ merges): the
    outcome is PyTorch's, result or error."""
    dst, mask, src = make()
    merge(entry, dst.clone(), mask, src, "auto")  # the signature's entry

    def scaled(merged_by_entry):  # the copy of dst is made outside: one made inside would be wrapped
        target = dst.clone()
        return lambda x: x * merged_by_entry(target)

    for name, transform in {"grad": lambda f: grad(lambda x: f(x).sum())(torch.ones(N, H)),
                            "jvp": lambda f: jvp(f, (torch.ones(N, H),), (torch.ones(N, H),))[1],
                            "vmap": lambda f: vmap(f)(torch.ones(2, N, H))[1]}.items():
        ours = outcome(lambda: transform(scaled(lambda t: merge(entry, t, mask, src, "auto"))))
        theirs = outcome(lambda: transform(scaled(lambda t: torch_merge(entry, t, mask, src))))
        assert ours[0] == theirs[0], f"{name}: {ours} where PyTorch gives {theirs}"
        if ours[0] == "value":
            assert_same(ours[1], theirs[1], name)
        else:
            assert ours[1] == theirs[1], name


@pytest.mark.parametrize("entry", ENTRIES)
def test_transforms_under_a_dispatch_mode(entry):
    """A dispatch mode sends other calls to the registered ops, which have no batching rule or jvp: under a
    transform PyTorch's op runs instead."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    dst, mask, src = make()
    batch_dst, batch_src = torch.randn(2, N, H), torch.randn(2, M, H)
    expected = vmap(merged_by(entry, mask, None))(batch_dst, batch_src)
    tangents = (torch.randn(N, H), torch.randn(M, H))
    expected_jvp = jvp(merged_by(entry, mask, None), (dst, src), tangents)
    with Passthrough():
        assert_same(vmap(merged_by(entry, mask, "auto"))(batch_dst, batch_src), expected, "vmap")
        for got, want in zip(jvp(merged_by(entry, mask, "auto"), (dst, src), tangents), expected_jvp):
            assert_same(got, want, "jvp")


@pytest.mark.parametrize("entry", ENTRIES)
def test_transforms_refuse_path_triton_and_count_mismatches(entry):
    dst, mask, src = make()
    with pytest.raises(ValueError, match=TRANSFORM_REFUSAL):
        vmap(merged_by(entry, mask, "triton"))(torch.randn(2, N, H), torch.randn(2, M, H))
    with pytest.raises(ValueError, match=f"Attempted to assign .*{M - 1} multimodal tokens to {M} placeholders"):
        grad(lambda s: merged_by(entry, mask, "auto")(dst, s).sum())(src[1:])


# An entry keeps only what its key decides (item 12).

@pytest.mark.parametrize("path", ["auto", "triton"])
def test_a_first_call_with_a_wrong_mask_length_does_not_poison_its_signature(memo_spy, path):
    """The mask's length against N is a field of the key (core._signature): a first call with a mask one row
    short has a key of its own, raises in prepare and memoizes nothing; the good call after it prepares its own
    key once and merges PyTorch's result, and the call after that is a memo hit."""
    dst, mask, src = make()
    with pytest.raises(ValueError, match="is_multimodal has shape"):
        mm.merge_multimodal_embeddings(dst, src, mask[1:].clone(), path=path)  # aligned as mask
    left = dict(core._prepared)  # what the failed call memoized
    for seed in range(2):  # the good call after the failed one, then a hit
        dst, mask, src = make(seed=seed)
        before = dst.clone()
        mm.merge_multimodal_embeddings(dst, src, mask, path=path)
        assert_same(dst, torch_merge("merge_multimodal_embeddings", before, mask, src), f"good call {seed}")
    memo_spy.assert_failed_first_call_kept_nothing(left)
