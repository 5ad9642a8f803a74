"""Every adversarial input run twice: the first call of its signature (core._prepare runs: every argument
check, the decision, and the entry memoized under the signature), then a memo hit of the entry that call made
(core._prepare skipped), with outcomes identical to each other and to the memo switched off (core._signature
returning None: every call prepared): the tensors returned and written, bit for bit; or the same exception type
and text, with nothing written. Then interleaved with good calls of the same signature, in both orders: a bad
call must not poison the entry of its signature, and a hit must not skip a check the bad call needs (issue 22).

A check added to core._prepare and not to what a hit runs (core.check_call, the executor), or the reverse,
shows here as a difference. So that two prepared runs are never compared by mistake, core.merge_ is spied on
(Memo): a good plain call must be prepared on its first call and a memo hit on its second
(assert_prepared_then_hit), and a bad call between good calls of its signature must hit their entry
(HIT_BY_THE_BAD_CALL). The Triton path runs under the interpreter; ``auto_triton`` is path="auto" made to choose
it, as the tables do on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import mmmerge_triton as mm
from mmmerge_triton import core, dispatch

from .conftest import DTYPE_PAIR_IDS, DTYPE_PAIRS, assert_bits_equal, make_auto_choose_triton

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # make_dual's

# M = 9 true rows: a source one row short (8) stays in M's quarter-octave bucket, so in the signature too.
N, H, M = 16, 16, 9
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

PATHS = ("auto", "auto_triton", "triton", "index_put", "index_copy", "masked_scatter")
TRITON_PATHS = ("auto_triton", "triton")
SCATTERS = ("masked_row_scatter_", "masked_row_scatter")
IN_PLACE = ("merge_multimodal_embeddings", "masked_row_scatter_")  # they merge into the caller's own dst
TENSOR_ENTRIES = ("merge_multimodal_embeddings", *SCATTERS)


# ---- inputs ---------------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """One call's arguments. ``watched``: tensors besides dst whose bytes the call may not change but as the
    memo switched off does (a buffer dst and src view). ``run(api)``: the call and what to compare of it, where
    the plain ``(api(dst, mask, src),)`` is not enough (gradients, inference mode, forward-mode AD)."""

    dst: torch.Tensor
    mask: object
    src: object
    kwargs: dict = field(default_factory=dict)
    watched: tuple = ()
    run: Callable | None = None


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mask_of(seed: int, n: int = N, m: int = M) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator(seed))[:m]] = True
    return mask


def randn(*shape, dtype=F32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed + 1000)).to(dtype)


def plain(seed, dst_dtype=F32, src_dtype=F32, **kwargs) -> Inputs:
    return Inputs(randn(N, H, dtype=dst_dtype, seed=seed), mask_of(seed), randn(M, H, dtype=src_dtype, seed=seed + 1),
                  kwargs)


def changed(**fields) -> Callable[[int], Inputs]:
    """A plain input with some arguments replaced: each field a function of the plain Inputs."""
    def make(seed):
        inputs = plain(seed)
        for name, value in fields.items():
            setattr(inputs, name, value(inputs))
        return inputs
    return make


def weighted_grads(leaves: Callable):
    """run(): the call, then backward of a weighted sum of its result; the result and the gradients of
    ``leaves(inputs)``."""
    def run(api, inputs):
        out = api(inputs.dst, inputs.mask, inputs.src)
        weight = torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape) % 7
        (out * weight).sum().backward()
        return (out.detach(), out.requires_grad, *(leaf.grad for leaf in leaves(inputs)))
    return run


def requiring_grad(which: str) -> Callable[[int], Inputs]:
    """dst_leaf: dst a leaf that requires grad (in place PyTorch refuses); dst_view: dst = leaf * 1 and src a
    leaf (legal in place); src: src alone."""
    def make(seed):
        inputs = plain(seed)
        if which == "dst_leaf":
            inputs.dst.requires_grad_()
            inputs.run = weighted_grads(lambda i: (i.dst,))
        elif which == "dst_view":
            base = inputs.dst.requires_grad_()
            inputs.dst, inputs.watched = base * 1, (base,)
            inputs.src.requires_grad_()
            inputs.run = weighted_grads(lambda i: (base, i.src))
        else:
            inputs.src.requires_grad_()
            inputs.run = weighted_grads(lambda i: (i.src,))
        return inputs
    return make


def inference(inside: bool) -> Callable[[int], Inputs]:
    """Inference tensors, merged inside inference mode (in place is legal) or outside it (in place is not)."""
    def run(api, inputs):
        with torch.inference_mode(inside):
            return (api(inputs.dst, inputs.mask, inputs.src),)

    def make(seed):
        with torch.inference_mode():
            inputs = plain(seed)
        inputs.run = run
        return inputs
    return make


def forward_ad(seed) -> Inputs:
    """dst and src duals: the merged rows take src's tangent. The duals view dst and src (make_dual), so an in
    place merge writes dst's bytes."""
    inputs = plain(seed)
    dst_tangent, src_tangent = randn(N, H, seed=seed + 2), randn(M, H, seed=seed + 3)

    def run(api, inputs):
        with fwAD.dual_level():
            out = api(fwAD.make_dual(inputs.dst, dst_tangent), inputs.mask, fwAD.make_dual(inputs.src, src_tangent))
            primal, tangent = fwAD.unpack_dual(out)
            return primal.clone(), ("no tangent" if tangent is None else tangent.clone())

    inputs.run = run
    return inputs


def mask_of_dst_bytes(layout: str) -> Callable[[int], Inputs]:
    """A mask made of a float16 dst's own bytes (contiguous: its first N bytes, which the merge overwrites;
    strided: each row's first byte), holding 0 or 7."""
    def make(seed):
        dst = torch.zeros(N, H, dtype=F16)
        bytes_ = dst.view(torch.uint8)
        mask = (bytes_.reshape(-1)[:N] if layout == "contiguous" else bytes_[:, 0]).view(torch.bool)
        selected = mask_of(seed)
        mask.view(torch.uint8).copy_(selected.to(torch.uint8) * 7)
        return Inputs(dst, mask, randn(M, H, dtype=F16, seed=seed))
    return make


def twin_of_mask_of_dst_bytes(layout: str) -> Callable[[int], Inputs]:
    """The good call of the same signature: a mask of its own memory, of the same strides and alignment."""
    def make(seed):
        inputs = plain(seed, F16, F16)
        if layout == "strided":
            rows = torch.zeros(N, 2 * H, dtype=torch.bool)
            rows[:, 0] = inputs.mask
            inputs.mask = rows[:, 0]
        return inputs
    return make


def shared_buffer(kind: str) -> Callable[[int], Inputs]:
    """dst and src as views of one buffer (``watched``): column halves and every other row are disjoint (merged,
    as PyTorch merges them); the last rows of dst and straddling columns share bytes (refused)."""
    def make(seed):
        mask = mask_of(seed)
        if kind == "column_halves":
            buf = randn(N, 2 * H, seed=seed)
            return Inputs(buf[:, :H], mask, buf[:M, H:], watched=(buf,))
        if kind == "every_other_row":
            buf = randn(2 * N, H, seed=seed)
            return Inputs(buf[::2], mask, buf[1:2 * M:2], watched=(buf,))
        if kind == "straddling_columns":
            buf = randn(N, 2 * H, seed=seed)
            return Inputs(buf[:, :H], mask, buf[:M, H // 2:H // 2 + H], watched=(buf,))
        if kind == "dst_rows":  # src the last rows of dst itself, in dst's dtype: PyTorch refuses the write
            dst = randn(N, H, seed=seed)
            return Inputs(dst, mask, dst[N - M:])
        dst = randn(N, H, seed=seed)  # "dst_bytes_as_bf16": src reads dst's bytes in another dtype: a .to() copy
        return Inputs(dst, mask, dst.view(BF16)[:M, :H])
    return make


def twin_of_shared_buffer(kind: str) -> Callable[[int], Inputs]:
    """The good call of the same signature: the same views (strides, alignment), of separate buffers."""
    def make(seed):
        mask = mask_of(seed)
        if kind in ("column_halves", "straddling_columns"):
            start = H if kind == "column_halves" else H // 2
            return Inputs(randn(N, 2 * H, seed=seed)[:, :H], mask, randn(M, 2 * H, seed=seed + 1)[:, start:start + H])
        if kind == "every_other_row":
            return Inputs(randn(2 * N, H, seed=seed)[::2], mask, randn(2 * M, H, seed=seed + 1)[1::2])
        if kind == "dst_rows":
            return plain(seed)
        return Inputs(randn(N, H, seed=seed), mask, randn(M, 2 * H, seed=seed + 1).to(BF16)[:, :H])
    return make


def negated(which: str, dst_dtype=F32, src_dtype=F32) -> Callable[[int], Inputs]:
    """dst or src with the negative bit (torch._neg_view of memory holding -values): PyTorch reads and writes
    through the bit, the kernels read memory raw."""
    def make(seed):
        inputs = plain(seed, dst_dtype, src_dtype)
        setattr(inputs, which, torch._neg_view(-getattr(inputs, which)))
        return inputs
    return make


def bool_bytes(seed) -> Inputs:
    """A mask whose true bytes are 2 and 255 (a uint8 tensor viewed as bool): each counts as True."""
    selected = mask_of(seed)
    raw = torch.where(selected, torch.tensor([2, 255], dtype=torch.uint8).repeat(N // 2), 0).to(torch.uint8)
    inputs = plain(seed)
    inputs.mask = raw.view(torch.bool)
    return inputs


def odd_address(seed) -> Inputs:
    """A float16 dst one byte past an aligned address: the Triton path cannot take it."""
    raw = bytearray(2 * N * H + 1)
    dst = torch.frombuffer(raw, dtype=F16, offset=1, count=N * H).view(N, H)
    dst.copy_(randn(N, H, dtype=F16, seed=seed))
    return Inputs(dst, mask_of(seed), randn(M, H, dtype=F16, seed=seed + 1))


def every_other_dst_row(seed) -> Inputs:
    """dst the even rows of a buffer (a row stride of 2H): the odd rows are watched too."""
    inputs = plain(seed)
    buf = torch.cat([inputs.dst, randn(N, H, seed=seed + 2)], 1).view(2 * N, H)
    inputs.dst, inputs.watched = buf[::2], (buf,)
    return inputs


def three_dims(seed) -> Inputs:
    """dst [B, S, H] with a [B, S] mask."""
    inputs = plain(seed)
    inputs.dst, inputs.mask = inputs.dst.view(2, N // 2, H), inputs.mask.view(2, N // 2)
    return inputs


def count_3d(seed) -> Inputs:
    """dst [2, 8, H], a [2, 8] mask of 2 true rows, 3 source rows, check_count=True (test_errors.py's case)."""
    mask = torch.zeros(2, N // 2, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True
    return Inputs(randn(2, N // 2, H, seed=seed), mask, randn(3, H, seed=seed + 1), {"check_count": True})


def column(seed) -> Inputs:
    """H = 1, src [M, 1] with a column stride of M (the column stride of one column does not matter)."""
    return Inputs(randn(N, 1, seed=seed), mask_of(seed), randn(1, M, seed=seed + 1).t())


# ---- cases ----------------------------------------------------------------------------------------------------

class Case(NamedTuple):
    make: Callable[[int], Inputs]  # seed -> fresh inputs
    entries: tuple = TENSOR_ENTRIES
    good: bool = False  # a good plain call: prepared on its first call, a memo hit on its second (a list: unkeyed)
    paths: tuple = PATHS


def _plain_cases() -> dict:
    cases = {}
    for (src_dtype, dst_dtype), name in zip(DTYPE_PAIRS, DTYPE_PAIR_IDS):
        cases[f"plain[{name}]"] = Case(lambda s, d=dst_dtype, t=src_dtype: plain(s, d, t), (*TENSOR_ENTRIES, "items"),
                                       good=True)
        cases[f"accumulate[{name}]"] = Case(lambda s, d=dst_dtype, t=src_dtype: plain(s, d, t, accumulate=True),
                                            SCATTERS, good=True)
    return cases


CASES = {
    **_plain_cases(),
    "accumulate_false": Case(lambda s: plain(s, accumulate=False), SCATTERS, good=True),
    "check_count_true": Case(lambda s: plain(s, check_count=True), good=True),
    "bool_bytes_2_and_255": Case(bool_bytes, good=True),
    "dst_rows_strided": Case(every_other_dst_row, good=True),
    "mask_strided": Case(changed(mask=lambda i: torch.stack([i.mask, ~i.mask], 1)[:, 0]), good=True),
    "mask_expanded_all_true": Case(changed(mask=lambda i: torch.ones(1, dtype=torch.bool).expand(N),
                                           src=lambda i: randn(N, H, seed=7)), good=True),
    "one_column_src_strided": Case(column, good=True),
    "inference_inside_inference_mode": Case(inference(True), good=True),
    # A count mismatch with a CPU mask: vLLM's error, nothing written.
    "count_one_short": Case(changed(src=lambda i: i.src[:-1].clone()), (*TENSOR_ENTRIES, "items")),
    "count_one_over": Case(changed(src=lambda i: torch.cat([i.src, i.src[:1]]))),
    "count_mask_empty": Case(changed(mask=lambda i: torch.zeros(N, dtype=torch.bool))),
    "count_3d_check_count": Case(count_3d, SCATTERS),
    # Shared memory.
    "src_is_dsts_rows": Case(shared_buffer("dst_rows"), (*TENSOR_ENTRIES, "items")),
    "src_is_dsts_bytes_as_bf16": Case(shared_buffer("dst_bytes_as_bf16")),
    "src_straddles_dsts_columns": Case(shared_buffer("straddling_columns")),
    "column_halves_of_one_buffer": Case(shared_buffer("column_halves")),
    "every_other_row_of_one_buffer": Case(shared_buffer("every_other_row")),
    "mask_of_dsts_bytes": Case(mask_of_dst_bytes("contiguous")),
    "mask_of_dsts_bytes_strided": Case(mask_of_dst_bytes("strided")),
    # What a tensor's bytes do not say.
    "src_negative_bit": Case(negated("src"), (*TENSOR_ENTRIES, "items")),
    "dst_negative_bit": Case(negated("dst")),  # path="triton" refuses it: its first call prepares nothing
    # Gradients: the registered out-of-place op (in place, dst.copy_ of its result, which PyTorch refuses for a
    # leaf), whose implementation runs core.merge_ on dst's copy, memo and all.
    "dst_leaf_requires_grad": Case(requiring_grad("dst_leaf")),
    "dst_view_and_src_require_grad": Case(requiring_grad("dst_view"), (*TENSOR_ENTRIES, "items")),
    "src_requires_grad": Case(requiring_grad("src")),
    # Inference tensors, and forward-mode tangents (PyTorch's index_put_ under a function transform).
    "inference_outside_inference_mode": Case(inference(False)),
    "forward_ad_duals": Case(forward_ad, (*TENSOR_ENTRIES, "items")),
    # Empty sizes, odd layouts (a 3-D dst has no signature: prepared on every call), dtypes left to index_put.
    "empty_m": Case(changed(mask=lambda i: torch.zeros(N, dtype=torch.bool), src=lambda i: i.src[:0])),
    "empty_h": Case(changed(dst=lambda i: i.dst[:, :0], src=lambda i: i.src[:, :0])),
    "dst_3d": Case(three_dims),
    "src_columns_strided": Case(changed(src=lambda i: torch.cat([i.src, i.src], 1)[:, ::2])),
    "dst_transposed": Case(changed(dst=lambda i: i.dst.t().contiguous().t())),
    "dst_odd_address": Case(odd_address),
    "float64": Case(changed(dst=lambda i: i.dst.double(), src=lambda i: i.src.double())),
    # Bad arguments.
    "mask_one_short": Case(changed(mask=lambda i: i.mask[:-1].clone())),
    "mask_uint8": Case(changed(mask=lambda i: i.mask.to(torch.uint8))),
    "mask_float": Case(changed(mask=lambda i: i.mask.float())),
    "mask_extra_dim": Case(changed(mask=lambda i: i.mask[None])),
    "mask_on_meta": Case(changed(mask=lambda i: i.mask.to("meta"))),
    "mask_python_list": Case(changed(mask=lambda i: i.mask.tolist())),
    "src_on_meta": Case(changed(src=lambda i: i.src.to("meta"))),
    "src_hidden_mismatch": Case(changed(src=lambda i: i.src[:, :-1])),
    "src_1d": Case(changed(src=lambda i: i.src[0])),
    "src_3d": Case(changed(src=lambda i: i.src[None])),
    "src_int32": Case(changed(src=lambda i: i.src.int())),
    "dst_int64": Case(changed(dst=lambda i: i.dst.long())),
    "dst_0d": Case(changed(dst=lambda i: i.dst[0, 0], mask=lambda i: torch.tensor(True))),
    "accumulate_1": Case(lambda s: plain(s, accumulate=1), SCATTERS),
    "check_count_1": Case(lambda s: plain(s, check_count=1)),
    "path_unknown": Case(lambda s: plain(s, path="fast"), paths=("auto",)),
    "path_not_a_str": Case(lambda s: plain(s, path=3), paths=("auto",)),
}


# ---- running a call -------------------------------------------------------------------------------------------

def entry_point(entry: str, path: str, kwargs: dict) -> Callable:
    """api(dst, mask, src): the call by ``entry`` (``items``: merge_multimodal_embeddings of a two-item list)."""
    kwargs = {"path": path, **kwargs}
    if entry == "merge_multimodal_embeddings":
        return lambda dst, mask, src: mm.merge_multimodal_embeddings(dst, src, mask, **kwargs)
    if entry == "items":
        return lambda dst, mask, src: mm.merge_multimodal_embeddings(dst, [src[:2], src[2:]], mask, **kwargs)
    scatter = getattr(mm, entry)
    return lambda dst, mask, src: scatter(dst, mask, src, **kwargs)


def snapshot(x):
    """What is compared of a result: a tensor's values (through a negative bit) as they are now; else x."""
    if isinstance(x, torch.Tensor):
        return x.detach().resolve_neg().clone()
    return x


def version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # an inference tensor has none
        return None


class Outcome(NamedTuple):
    error: type | None
    message: str
    values: tuple  # the results, then dst's and watched tensors' values after the call
    returned_dst: bool  # the call returned dst itself (the in-place entry points do)
    bumps: int | None  # how far the call moved dst's version counter


def outcome(inputs: Inputs, entry: str, path: str) -> Outcome:
    """Runs the call; on an error, asserts that dst and the watched tensors are as they were."""
    api = entry_point(entry, path, inputs.kwargs)
    watched = (inputs.dst, *inputs.watched)
    before, version_before = tuple(map(snapshot, watched)), version(inputs.dst)
    try:
        got = inputs.run(api, inputs) if inputs.run else (api(inputs.dst, inputs.mask, inputs.src),)
    except Exception as error:  # noqa: BLE001 - compared with the other run's, whatever it is
        for i, (t, b) in enumerate(zip(watched, before)):
            assert_bits_equal(snapshot(t), b, f"tensor {i} written before {type(error).__name__}: {error}")
        return Outcome(type(error), str(error), (), False, None)
    after = version(inputs.dst)
    bumps = None if after is None else after - version_before
    return Outcome(None, "", tuple(map(snapshot, (*got, *watched))), got[0] is inputs.dst, bumps)


def assert_same(actual: Outcome, expected: Outcome, what: str) -> None:
    assert (actual.error, actual.message) == (expected.error, expected.message), (
        f"{what}: {actual.error} {actual.message!r}, where {expected.error} {expected.message!r}")
    assert (actual.returned_dst, actual.bumps) == (expected.returned_dst, expected.bumps), what
    assert len(actual.values) == len(expected.values), what
    for i, (a, e) in enumerate(zip(actual.values, expected.values)):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"{what}, value {i}: {a!r}"
            assert_bits_equal(a, e, f"{what}, value {i}")
        else:
            assert a == e, f"{what}, value {i}"


class Call(NamedTuple):
    """A call's outcome and what each run of core.merge_ in it did (a call that needs gradients runs it in the
    registered op, and again in the backward pass's scatter). ``runs``: "hit" (its signature's entry, memoized
    by an earlier call: core._prepare not called), "prepared" (core._prepare ran and memoized an entry under the
    signature), "unkeyed" (core._prepare ran for a call without a signature: key None), "transformed" (under a
    function transform: PyTorch's op, no entry), or "raised". ``found``: how each run found its entry, whether it
    then raised or not: as ``runs``, and "refused" where core._prepare raised for a signature (nothing memoized)."""

    outcome: Outcome
    runs: list
    found: list


class Memo:
    """A spy on the memo: core.merge_, core._prepare and core._merge_by_torch wrapped to tell Call's labels
    apart (a run that calls neither of the last two is a hit)."""

    def __init__(self, monkeypatch):
        self.runs, self.found = [], []
        merge_, prepare, merge_by_torch = core.merge_, core._prepare, core._merge_by_torch
        run = {}  # the current run of core.merge_: the key core._prepare was called with, whether it raised

        def spied_prepare(key, *args):
            run["key"], run["refused"] = key, True
            prepared = prepare(key, *args)
            run["refused"] = False
            return prepared

        def spied_merge_by_torch(*args, **kwargs):
            run["transformed"] = True
            return merge_by_torch(*args, **kwargs)

        def spied_merge(*args, **kwargs):
            run.clear()
            raised = True
            try:
                merge_(*args, **kwargs)
                raised = False
            finally:
                if "transformed" in run:
                    found = "transformed"
                elif "key" not in run:
                    found = "hit"
                elif run["key"] is None:
                    found = "unkeyed"
                else:
                    found = "refused" if run["refused"] else "prepared"
                self.found.append(found)
                self.runs.append("raised" if raised else found)

        monkeypatch.setattr(core, "merge_", spied_merge)
        monkeypatch.setattr(core, "_prepare", spied_prepare)
        monkeypatch.setattr(core, "_merge_by_torch", spied_merge_by_torch)

    def run(self, inputs: Inputs, entry: str, path: str) -> Call:
        start = len(self.runs)
        result = outcome(inputs, entry, path)
        return Call(result, self.runs[start:], self.found[start:])


def memo_off(monkeypatch, inputs: Inputs, entry: str, path: str) -> Outcome:
    """The outcome with the memo switched off: core._signature returns None, so every call is prepared (checked
    and decided) afresh, none a hit."""
    with monkeypatch.context() as patch:
        patch.setattr(core, "_signature", lambda *args: None)
        call = Memo(patch).run(inputs, entry, path)
    assert not {"hit", "prepared", "refused"} & set(call.found), f"the memo is not off: {call.found}"
    return call.outcome


def assert_prepared_then_hit(first: Call, second: Call, what: str, keyed: bool) -> None:
    """Two calls of one signature (``keyed``): the first prepared and memoized its entry and merged through it,
    the second merged through it too, preparing nothing (a memo hit, not a second first call). A call without a
    signature (a list of items) is prepared on both."""
    if not keyed:
        assert (first.runs, second.runs) == (["unkeyed"], ["unkeyed"]), f"{what}: {first.runs}, then {second.runs}"
        return
    assert first.runs == ["prepared"], f"{what}: first call {first.runs}"
    assert core._prepared, f"{what}: no entry memoized"
    assert second.runs == ["hit"], f"{what}: second call {second.runs}: not a memo hit"


@pytest.fixture
def route(monkeypatch):
    """use(path) -> the path to pass: ``auto_triton`` makes path="auto" choose the Triton path for every input it
    can take (as the tables do on a GPU), and lists read in place. Fresh decisions and entries before the first
    call, and after the test."""
    def use(path: str) -> str:
        if path == "auto_triton":
            make_auto_choose_triton(monkeypatch)
        if path in TRITON_PATHS:
            monkeypatch.setattr(dispatch, "items_in_place_pays", lambda *args: True)
        dispatch.clear_cache()
        return "auto" if path == "auto_triton" else path

    yield use
    dispatch.clear_cache()


def _twice_params():
    for name, case in CASES.items():
        for path in case.paths:
            for entry in case.entries:
                yield pytest.param(name, path, entry, id=f"{name}-{path}-{entry}")


@pytest.mark.parametrize("name, path, entry", list(_twice_params()))
def test_first_call_and_cache_hit_agree(monkeypatch, route, name, path, entry):
    """The same input, fresh copies, twice after clear_cache: both outcomes identical, and the memo switched
    off's. Where the first call memoized an entry, the second is a memo hit (whatever it then raises)."""
    case = CASES[name]
    api_path = route(path)
    spy = Memo(monkeypatch)
    first = spy.run(case.make(0), entry, api_path)
    second = spy.run(case.make(0), entry, api_path)
    assert_same(first.outcome, memo_off(monkeypatch, case.make(0), entry, api_path),
                "first call against the memo switched off")
    assert_same(second.outcome, first.outcome, "memo hit against the first call")
    if "prepared" in first.found:
        assert not {"prepared", "refused"} & set(second.found), (
            f"first call {first.found}, second {second.found}: not a memo hit")
    if case.good:
        assert_prepared_then_hit(first, second, f"{name} by {entry}", keyed=entry != "items")


# ---- interleaved with good calls of the same signature --------------------------------------------------------

# name -> (the bad (or unusual) input, a good input of the same signature where there is one)
PAIRS = {
    "count_one_short": (CASES["count_one_short"].make, plain),
    "count_one_over": (CASES["count_one_over"].make, plain),
    "mask_one_short": (CASES["mask_one_short"].make, plain),
    "mask_uint8": (CASES["mask_uint8"].make, plain),
    "src_is_dsts_rows": (shared_buffer("dst_rows"), twin_of_shared_buffer("dst_rows")),
    "src_is_dsts_bytes_as_bf16": (shared_buffer("dst_bytes_as_bf16"), twin_of_shared_buffer("dst_bytes_as_bf16")),
    "src_straddles_dsts_columns": (shared_buffer("straddling_columns"), twin_of_shared_buffer("straddling_columns")),
    "column_halves_of_one_buffer": (shared_buffer("column_halves"), twin_of_shared_buffer("column_halves")),
    "every_other_row_of_one_buffer": (shared_buffer("every_other_row"), twin_of_shared_buffer("every_other_row")),
    "mask_of_dsts_bytes": (mask_of_dst_bytes("contiguous"), twin_of_mask_of_dst_bytes("contiguous")),
    "mask_of_dsts_bytes_strided": (mask_of_dst_bytes("strided"), twin_of_mask_of_dst_bytes("strided")),
    "src_negative_bit": (negated("src"), plain),
    # bf16 <- fp32: where the interpreter's Triton cast (truncating) and index_put (rounding) differ, so that a
    # hit that runs another path than the general one shows in the bits.
    "dst_negative_bit": (negated("dst", BF16, F32), lambda seed: plain(seed, BF16, F32)),
    "dst_leaf_requires_grad": (requiring_grad("dst_leaf"), plain),
    "dst_view_and_src_require_grad": (requiring_grad("dst_view"), plain),
    "src_requires_grad": (requiring_grad("src"), plain),
    "inference_outside_inference_mode": (inference(False), plain),
    "forward_ad_duals": (forward_ad, plain),
    "empty_m": (CASES["empty_m"].make, plain),
    "src_columns_strided": (CASES["src_columns_strided"].make, plain),
    "check_count_1": (CASES["check_count_1"].make, plain),
    "path_unknown": (CASES["path_unknown"].make, plain),
}


# The bad inputs of their good twin's signature: after a good call, every run of core.merge_ in the bad call is
# a memo hit of its entry, so a check that only core._prepare makes shows here. The others differ in a field of
# the signature (M's bucket, the mask's dtype, src's strides, either negative bit, the path), have none (a flag
# that is not a bool) or merge under a function transform (forward-mode AD): prepared afresh, as the first call.
HIT_BY_THE_BAD_CALL = {
    "count_one_short", "src_is_dsts_rows", "src_is_dsts_bytes_as_bf16",
    "src_straddles_dsts_columns", "column_halves_of_one_buffer", "every_other_row_of_one_buffer",
    "mask_of_dsts_bytes", "mask_of_dsts_bytes_strided", "dst_leaf_requires_grad",
    "dst_view_and_src_require_grad", "src_requires_grad", "inference_outside_inference_mode",
}


@pytest.mark.parametrize("order", ["good_first", "bad_first"])
@pytest.mark.parametrize("entry", IN_PLACE)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", PAIRS)
def test_a_bad_call_between_good_calls_of_its_signature(monkeypatch, route, name, path, entry, order):
    """good, bad, good (or bad, good, good) after clear_cache: each outcome the memo switched off's; every good
    call prepared (the first call) or a memo hit (the last one: the entry of its signature was kept); and a
    bad call after a good one of its signature a memo hit of that call's entry (HIT_BY_THE_BAD_CALL)."""
    make_bad, make_good = PAIRS[name]
    api_path = route(path)
    spy = Memo(monkeypatch)
    calls = [("good", make_good, 0), ("bad", make_bad, 1), ("good", make_good, 2)]
    if order == "bad_first":
        calls = [calls[1], calls[0], calls[2]]
    for i, (kind, make, seed) in enumerate(calls):
        call = spy.run(make(seed), entry, api_path)
        assert_same(call.outcome, memo_off(monkeypatch, make(seed), entry, api_path),
                    f"call {i} ({kind}) against the memo switched off")
        if kind == "good":
            allowed = {0: [["prepared"]], 2: [["hit"]]}.get(i, [["prepared"], ["hit"]])
            assert call.runs in allowed, (
                f"call {i} (good) was {call.runs}" + (": the entry of its signature was lost" if i == 2 else ""))
        elif i == 1:
            hit = bool(call.found) and set(call.found) == {"hit"}
            assert hit == (name in HIT_BY_THE_BAD_CALL), f"call 1 (bad) found its entry thus: {call.found}"
