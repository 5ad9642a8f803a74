"""HF transformers, one line: ``mmmerge_triton.integrations.transformers.enable()`` / ``enabled()``.

With the integration on, a transformers VLM's image merge (``inputs_embeds.masked_scatter(mask [B, S, 1], ...)``)
and Qwen3-VL's deepstack add (``Qwen3VLTextModel._deepstack_process``) run through mmmerge_triton. These tests
prove, on tiny random models (tiny_vlms.py): the logits and every gradient are bit-identical to the stock run;
aten's masked_scatter no longer runs (an mmmerge_triton op runs instead); every other ``masked_scatter`` call
still goes to PyTorch; ``disable()`` restores exactly what ``enable()`` replaced; a Qwen3-VL forward under
``torch.inference_mode()`` gives the stock logits. And that the switch behaves exactly as stock (issue 13,
part 5; issue 20, part 5): a method kept across ``disable()`` or a toggle in another thread, traced calls
(meta, FakeTensorMode, torch.export, torch.compile, vmap, grad, jit.trace), the result's layout, in-place calls
PyTorch refuses, a source aliasing self, PyTorch's error (type and text) for a call it refuses, a short source
included.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import re
import sys
import threading
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

import tiny_vlms  # noqa: E402  (tests/models is on sys.path: pytest's rootdir-relative "prepend" import)
from mmmerge_triton.integrations import transformers as hf  # noqa: E402

import transformers  # noqa: E402

# HF's Qwen3-VL deepstack add writes the hidden states in place in transformers 4.x (index_put on them) and a
# copy from 5.0 on: the switch does as the installed version does.
_DEEPSTACK_IN_PLACE = int(transformers.__version__.split(".")[0]) < 5

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
MODELS = [
    pytest.param(name, marks=pytest.mark.skipif(not tiny_vlms.available(name), reason=f"transformers lacks {name}"))
    for name in tiny_vlms.MODELS
]
DEEPSTACK_CLASSES = (
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLTextModel"),
    ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeTextModel"),
)

ATEN_MASKED_SCATTER = {torch.ops.aten.masked_scatter.default, torch.ops.aten.masked_scatter_.default}


def _deepstack_classes() -> list[type]:
    classes = []
    for module_name, class_name in DEEPSTACK_CLASSES:
        try:
            classes.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):
            pass
    return classes


@pytest.fixture(autouse=True)
def integration_off():
    """Every test starts and ends with the integration off (even when a test fails while it is on)."""
    hf.disable()
    yield
    hf.disable()


class OpRecorder(TorchDispatchMode):
    """Records every op that reaches the dispatcher while active (aten ops, and mmmerge_triton's registered
    ops: the package calls those instead of its eager path while a dispatch mode is active)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    def count(self, ops) -> int:
        return sum(op in ops for op in self.ops)

    def mmmerge_ops(self) -> collections.Counter:
        return collections.Counter(op.name() for op in self.ops if op.namespace == "mmmerge_triton")

    def merges(self, levels: int) -> collections.Counter:
        """The mmmerge ops a forward with one image merge and ``levels`` deepstack adds should record: the
        adds in place where HF's method of the installed transformers writes in place (4.x), else out of place."""
        expected = collections.Counter({"mmmerge_triton::masked_row_scatter": 1})
        expected["mmmerge_triton::masked_row_scatter_" if _DEEPSTACK_IN_PLACE else "mmmerge_triton::masked_row_scatter"] += levels
        return +expected


def _row_mask(device, shape=(2, 6), seed=0) -> torch.Tensor:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask.view(-1)[0] = True
    return mask.to(device)


def _randn(*shape, device, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


# ----------------------------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("n_images", [1, 2])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_logits_and_gradients_match_stock(name, n_images, device):
    """``with enabled():`` the forward gives the stock logits bit for bit, and the backward of a fixed random
    projection of them the stock gradients: image features, vision tower, projector and text model. Qwen3-VL
    includes the deepstack add after each of its first two layers."""
    model, inputs = tiny_vlms.build(name, n_images, device=device)
    stock = tiny_vlms.forward_backward(model, lambda: model(**inputs).logits)
    with hf.enabled():
        merged = tiny_vlms.forward_backward(model, lambda: model(**inputs).logits)
    tiny_vlms.assert_runs_equal(merged, stock)


@pytest.mark.parametrize("device", DEVICES)
def test_enable_disable_calls(device):
    """The explicit ``enable()`` / ``disable()`` pair works as ``enabled()`` does (Qwen3-VL, or Qwen2-VL on a
    transformers without it), and the model runs stock again after ``disable()``."""
    name = "qwen3vl" if tiny_vlms.available("qwen3vl") else "qwen2vl"
    model, inputs = tiny_vlms.build(name, 2, device=device)
    with torch.no_grad():
        expected = model(**inputs).logits
        hf.enable()
        try:
            with OpRecorder() as recorder:
                logits = model(**inputs).logits
        finally:
            hf.disable()
        assert recorder.mmmerge_ops() and torch.equal(logits, expected)
        with OpRecorder() as recorder:
            assert torch.equal(model(**inputs).logits, expected)
    assert not recorder.mmmerge_ops() and recorder.count(ATEN_MASKED_SCATTER) == 1


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_aten_masked_scatter_replaced(name, device):
    """The stock forward runs aten's masked_scatter once (the image merge); with the integration it never runs,
    and mmmerge_triton's masked_row_scatter op runs instead: once for the merge, plus once per deepstack level
    for Qwen3-VL, whose stock bool-mask index_put_ per level is gone too. The logits stay identical."""
    model, inputs = tiny_vlms.build(name, 2, device=device)
    with torch.no_grad():
        with OpRecorder() as stock:
            expected = model(**inputs).logits
        with hf.enabled(), OpRecorder() as merged:
            logits = model(**inputs).logits
    assert torch.equal(logits, expected)
    assert stock.count(ATEN_MASKED_SCATTER) == 1
    assert not stock.mmmerge_ops()
    assert merged.count(ATEN_MASKED_SCATTER) == 0
    levels = len(getattr(model.config.vision_config, "deepstack_visual_indexes", ()))
    assert merged.mmmerge_ops() == merged.merges(levels)
    index_put = {torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default}
    assert stock.count(index_put) - merged.count(index_put) == levels


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_model_count_mismatch_raises(name, device, monkeypatch):
    """One image token dropped from input_ids, integration on: transformers' own count check raises its
    ValueError before the merge, and the inputs are left as they were."""
    model, inputs = mismatched_inputs(name, device)
    monkeypatch.delenv("TRANSFORMERS_DISABLE_TORCH_CHECK", raising=False)
    before = {k: v.clone() for k, v in inputs.items()}
    n_tokens = int((inputs["input_ids"] == tiny_vlms.IMG).sum())
    expected = rf"Image features and image tokens do not match[,:] tokens: {n_tokens}"  # 5.x / 4.x wording
    with torch.no_grad(), hf.enabled(), pytest.raises(ValueError, match=expected):
        model(**inputs)
    for key, value in inputs.items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_model_count_mismatch_without_hf_check_behaves_as_stock(name, device, monkeypatch):
    """With transformers' check switched off (TRANSFORMERS_DISABLE_TORCH_CHECK=1) the merge sees one more
    feature row than placeholders. PyTorch's masked_scatter then takes the first rows; so does the
    integration: the forward ends the same way with and without it (same logits, or the same error)."""
    model, inputs = mismatched_inputs(name, device)
    monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")

    def outcome():
        try:
            with torch.no_grad():
                return model(**inputs).logits
        except Exception as error:  # noqa: BLE001 (the outcome compared is the error's type and text)
            return (type(error), str(error))

    stock = outcome()
    with hf.enabled():
        merged = outcome()
    if isinstance(stock, torch.Tensor):
        assert torch.equal(stock, merged)
    else:
        assert stock == merged


def mismatched_inputs(name, device):
    """A model and its 2-image inputs with the first image token turned into text: one feature row too many."""
    model, inputs = tiny_vlms.build(name, 2, device=device)
    input_ids = inputs["input_ids"].clone()
    first = (input_ids[0] == tiny_vlms.IMG).nonzero()[0, 0]
    input_ids[0, first] = 5  # a text token
    inputs = dict(inputs, input_ids=input_ids)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = (input_ids == tiny_vlms.IMG).int()
    return model, inputs


# ------------------------------------------------------------------------------------------------ direct calls


@pytest.mark.parametrize("in_place", [False, True], ids=["masked_scatter", "masked_scatter_"])
@pytest.mark.parametrize("expanded", [False, True], ids=["mask[B,S,1]", "mask.expand_as(emb)"])
@pytest.mark.parametrize("device", DEVICES)
def test_row_masks_go_to_mmmerge(device, expanded, in_place):
    """A bool mask [B, S, 1], or one broadcast over the last dim (``expand_as``: stride 0), routes to
    mmmerge_triton and gives PyTorch's result bit for bit; the in-place form returns ``self``."""
    emb = _randn(2, 6, 8, device=device)
    mask = _row_mask(device)[..., None]
    if expanded:
        mask = mask.expand_as(emb)
    src = _randn(int(mask[..., 0].sum()), 8, device=device, seed=1)
    expected = emb.clone().masked_scatter_(mask, src)
    with hf.enabled(), OpRecorder() as recorder:
        if in_place:
            out = emb.clone()
            assert out.masked_scatter_(mask, src) is out
        else:
            out = emb.masked_scatter(mask, src)
    assert torch.equal(out, expected)
    assert recorder.count(ATEN_MASKED_SCATTER) == 0
    assert sum(recorder.mmmerge_ops().values()) == 1


def _bad_calls(device) -> dict:
    """Row-broadcast masked_scatter calls that PyTorch refuses: (mask, source) for an emb [2, 6, 8]."""
    mask = _row_mask(device)[..., None]
    k = int(mask.sum())
    return {
        "one source row short": (mask, _randn(k - 1, 8, device=device, seed=1)),
        "one source element short": (mask, _randn(k * 8 - 1, device=device, seed=1)),
        "empty source": (mask, _randn(0, 8, device=device, seed=1)),
        "expanded mask, one row short": (mask.expand(2, 6, 8), _randn(k - 1, 8, device=device, seed=1)),
        "source of another dtype": (mask, _randn(k, 8, device=device, seed=1, dtype=torch.float64)),
        "mask of another length": (mask[:, :5], _randn(k, 8, device=device, seed=1)),
        "uint8 mask": (mask.to(torch.uint8), _randn(k, 8, device=device, seed=1)),
    }


_SHORT_SOURCES = ("one source row short", "one source element short", "empty source", "expanded mask, one row short")


@pytest.mark.filterwarnings("ignore:masked_scatter_ received a mask with dtype torch.uint8")
@pytest.mark.parametrize("in_place", [False, True], ids=["masked_scatter", "masked_scatter_"])
@pytest.mark.parametrize("case", list(_bad_calls("cpu")))
@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_as_stock(device, case, in_place):
    """A call PyTorch refuses raises PyTorch's error, type and text, while enabled, and leaves ``emb`` as
    PyTorch leaves it; a source shorter than the mask's true rows included (today: MaskedScatterCountError
    with vLLM's text). On CUDA PyTorch has no host check for a short source (a device-side assert, which
    ends the CUDA context): the switch raises the error PyTorch's CPU op raises there, and writes nothing."""

    def run(on: bool, device):
        emb = _randn(2, 6, 8, device=device)
        mask, source = _bad_calls(device)[case]
        with hf.enabled() if on else contextlib.nullcontext():
            call = emb.masked_scatter_ if in_place else emb.masked_scatter  # looked up while on (or off)
            outcome = _outcome(lambda: call(mask, source))
        return outcome, emb.cpu()

    merged, merged_emb = run(True, device)
    stock, stock_emb = run(False, "cpu" if device == "cuda" and case in _SHORT_SOURCES else device)
    assert not isinstance(stock, torch.Tensor)
    _assert_same_outcome(merged, stock)
    if device == "cuda" and case in _SHORT_SOURCES:
        stock_emb = _randn(2, 6, 8, device="cpu")  # nothing written
    assert torch.equal(merged_emb, stock_emb)


def _other_calls(device):
    """masked_scatter calls that are not a row scatter: (self, mask, source)."""
    emb = _randn(2, 6, 8, device=device)
    elementwise = torch.rand(2, 6, 8, generator=torch.Generator().manual_seed(3)).lt(0.5).to(device)
    row = _row_mask(device)
    n_row = int(row.sum())
    return {
        "elementwise mask": (emb, elementwise, _randn(int(elementwise.sum()), device=device, seed=1)),
        "1-D tensor": (_randn(10, device=device), torch.arange(10, device=device) % 3 == 0,
                       _randn(4, device=device, seed=1)),
        "mask [S, 1] broadcast over B": (emb, row[0][:, None], _randn(2 * int(row[0].sum()), 8, device=device)),
        "materialized [B, S, H] row mask": (emb, row[..., None].expand_as(emb).contiguous(),
                                            _randn(n_row, 8, device=device)),
        "source of another dtype": (emb, row[..., None], _randn(n_row, 8, device=device, dtype=torch.float64)),
        "int tensor": (torch.arange(96, device=device).view(2, 6, 8), row[..., None],
                       torch.arange(n_row * 8, device=device)),
        "tensor subclass": (emb.as_subclass(_Tagged), row[..., None], _randn(n_row, 8, device=device)),
    }


class _Tagged(torch.Tensor):
    """A tensor subclass that keeps its type through ops (as DTensor-like wrappers do)."""


@pytest.mark.parametrize("in_place", [False, True], ids=["masked_scatter", "masked_scatter_"])
@pytest.mark.parametrize("case", list(_other_calls("cpu")))
@pytest.mark.parametrize("device", DEVICES)
def test_other_masked_scatter_calls_go_to_pytorch(device, case, in_place):
    """Calls that are not a row scatter (an elementwise mask, a 1-D tensor, a broadcast in a leading dim, a
    materialized mask, a source of another dtype, an integer tensor), and calls on a tensor subclass (whose
    own dispatch, e.g. DTensor's, must see PyTorch's op), run PyTorch's own op while enabled: the
    same result bit for bit, or the same error, and no mmmerge_triton op."""

    def call(self, mask, source):
        if in_place:
            out = self.clone()
            return out.masked_scatter_(mask, source)
        return self.masked_scatter(mask, source)

    args = _other_calls(device)[case]
    try:
        expected = call(*args)
    except RuntimeError as error:
        expected = error
    with hf.enabled(), OpRecorder() as recorder:
        if isinstance(expected, Exception):
            with pytest.raises(type(expected), match=re.escape(str(expected))):
                call(*args)
        else:
            assert torch.equal(call(*args), expected)
    assert recorder.count(ATEN_MASKED_SCATTER) == 1
    assert not recorder.mmmerge_ops()


@pytest.mark.parametrize("device", DEVICES)
def test_direct_call_gradients(device):
    """A direct ``emb.masked_scatter(mask [B, S, 1], src)`` on tensors that need grad keeps PyTorch's
    gradients for both inputs while enabled (the merged rows pass theirs to src, the others to emb)."""
    mask = _row_mask(device)[..., None]
    weight = _randn(2, 6, 8, device=device, seed=5)
    grads = []
    for on in (False, True):
        emb = _randn(2, 6, 8, device=device).requires_grad_()
        src = _randn(int(mask.sum()), 8, device=device, seed=1).requires_grad_()
        with hf.enabled() if on else torch.enable_grad():
            (emb.masked_scatter(mask, src) * weight).sum().backward()
        grads.append((emb.grad, src.grad))
    assert torch.equal(grads[1][0], grads[0][0]) and torch.equal(grads[1][1], grads[0][1])


# --------------------------------------------------------------------------------------------- enable/disable


def test_disable_restores_exactly():
    """``disable()`` puts back the very function objects ``enable()`` replaced: ``torch.Tensor.masked_scatter``,
    ``masked_scatter_`` and the Qwen3-VL ``_deepstack_process`` methods. A second ``enable()`` is a no-op (a
    later ``disable()`` still restores the originals), and ``enabled()`` inside ``enable()`` leaves it on."""
    classes = _deepstack_classes()
    originals = (torch.Tensor.masked_scatter, torch.Tensor.masked_scatter_,
                 *(cls.__dict__["_deepstack_process"] for cls in classes))

    def current():
        return (torch.Tensor.masked_scatter, torch.Tensor.masked_scatter_,
                *(cls.__dict__["_deepstack_process"] for cls in classes))

    hf.enable()
    patched = current()
    assert all(new is not old for new, old in zip(patched, originals))
    hf.enable()
    assert all(new is same for new, same in zip(current(), patched))
    with hf.enabled():
        pass
    assert all(new is same for new, same in zip(current(), patched)), "enabled() switched off an enable()"
    hf.disable()
    assert all(new is old for new, old in zip(current(), originals))
    hf.disable()  # a second disable() is a no-op
    assert all(new is old for new, old in zip(current(), originals))
    with hf.enabled():
        assert all(new is same for new, same in zip(current(), patched))
    assert all(new is old for new, old in zip(current(), originals))


@pytest.mark.skipif(not tiny_vlms.available("qwen3vl"), reason="transformers lacks Qwen3-VL")
def test_deepstack_method_replaced():
    """Qwen3-VL's deepstack add runs the integration's method while enabled (once per deepstack level), and
    HF's own once disabled."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    model, inputs = tiny_vlms.build("qwen3vl", 1)
    calls = []
    with hf.enabled():
        replacement = Qwen3VLTextModel._deepstack_process

        def spy(self, *args):
            calls.append("mmmerge")
            return replacement(self, *args)

        Qwen3VLTextModel._deepstack_process = spy
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            Qwen3VLTextModel._deepstack_process = replacement
    assert replacement.__module__ == hf.__name__
    assert calls == ["mmmerge"] * len(model.config.vision_config.deepstack_visual_indexes)
    assert Qwen3VLTextModel._deepstack_process.__module__ == Qwen3VLTextModel.__module__


# ------------------------------------------------------------------------------------- exactly as stock (#13.5)


def _outcome(call):
    """call()'s result, or its error as (type, text): what two runs must agree on."""
    try:
        return call()
    except Exception as error:  # noqa: BLE001 (the outcome compared is the error's type and text)
        return (type(error), str(error))


def _assert_same_outcome(merged, stock):
    if isinstance(stock, torch.Tensor):
        assert isinstance(merged, torch.Tensor), merged
        assert merged.shape == stock.shape and merged.stride() == stock.stride() and merged.dtype == stock.dtype
        if type(stock) is torch.Tensor and not stock.is_meta:  # fake and meta tensors hold no values
            assert torch.equal(merged, stock)
    else:
        assert merged == stock


def test_reference_kept_across_disable_reaches_stock():
    """``torch.Tensor.masked_scatter(_)`` looked up while enabled and called after ``disable()`` (a bound
    method kept by a module, a functools.partial...) still runs: a call that is not a row scatter reaches
    PyTorch's op (today: KeyError 'masked_scatter'), and a row scatter still gives PyTorch's result."""
    hf.enable()
    kept, kept_ = torch.Tensor.masked_scatter, torch.Tensor.masked_scatter_
    hf.disable()
    emb, mask, src = _other_calls("cpu")["elementwise mask"]
    assert torch.equal(kept(emb, mask, src), emb.masked_scatter(mask, src))
    assert torch.equal(kept_(emb.clone(), mask, src), emb.clone().masked_scatter_(mask, src))
    row = _row_mask("cpu")[..., None]
    rows = _randn(int(row.sum()), 8, device="cpu", seed=1)
    assert torch.equal(kept(emb, row, rows), emb.masked_scatter(row, rows))


def test_toggling_thread_never_breaks_a_caller():
    """One thread switches the integration on and off for a second while another calls masked_scatter(_)
    (row scatters and elementwise masks): every call succeeds and gives PyTorch's result (today the caller
    sees KeyError 'masked_scatter' once disable() has run between its lookup and its call)."""
    emb, elementwise, src = _other_calls("cpu")["elementwise mask"]
    row = _row_mask("cpu")[..., None]
    rows = _randn(int(row.sum()), 8, device="cpu", seed=1)
    calls = [(elementwise, src), (row, rows)]
    expected = [emb.masked_scatter(m, s) for m, s in calls]
    stop, errors = threading.Event(), []

    def toggle():
        while not stop.is_set():
            hf.enable()
            hf.disable()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # many more thread switches per second: more chances to land in a window
    toggler = threading.Thread(target=toggle)
    toggler.start()
    try:
        deadline, n = time.monotonic() + 1.0, 0
        while time.monotonic() < deadline:
            i = n % 2
            try:
                out = emb.masked_scatter(*calls[i]) if n % 4 < 2 else emb.clone().masked_scatter_(*calls[i])
                assert torch.equal(out, expected[i])
            except Exception as error:  # noqa: BLE001 (collected and reported below)
                errors.append(error)
            n += 1
    finally:
        stop.set()
        toggler.join()
        sys.setswitchinterval(interval)
    assert not errors, f"{len(errors)} of {n} calls failed, first: {errors[0]!r}"


@pytest.mark.parametrize("in_place", [False, True], ids=["masked_scatter", "masked_scatter_"])
def test_meta_tensors_as_stock(in_place):
    """Row-broadcast masked_scatter on meta tensors (shape inference, ``init_empty_weights``-style loading)
    gives stock's meta result while enabled (today: counting the mask raises on a meta tensor)."""
    emb = torch.empty(2, 6, 8, device="meta")
    mask = torch.empty(2, 6, 1, dtype=torch.bool, device="meta")
    src = torch.empty(7, 8, device="meta")

    def call():
        return emb.clone().masked_scatter_(mask, src) if in_place else emb.masked_scatter(mask, src)

    stock = _outcome(call)
    with hf.enabled():
        _assert_same_outcome(_outcome(call), stock)


@pytest.mark.parametrize("in_place", [False, True], ids=["masked_scatter", "masked_scatter_"])
def test_fake_tensor_mode_as_stock(in_place):
    """Under FakeTensorMode (how torch.export and torch.compile trace) a row-broadcast call gives stock's
    fake result: same shape, strides and dtype (today: counting the mask is data-dependent and raises)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    emb, mask, src = _randn(2, 6, 8, device="cpu"), _row_mask("cpu")[..., None], _randn(9, 8, device="cpu")
    with FakeTensorMode() as mode:
        emb, mask, src = (mode.from_tensor(t) for t in (emb, mask, src))

        def call():
            return emb.clone().masked_scatter_(mask, src) if in_place else emb.masked_scatter(mask, src)

        stock = _outcome(call)
        with hf.enabled():
            merged = _outcome(call)
    assert isinstance(stock, torch.Tensor)
    _assert_same_outcome(merged, stock)


class _Merge(torch.nn.Module):
    """HF's inline image merge: ``inputs_embeds.masked_scatter(mask [B, S, 1], features)``, then a use."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place

    def forward(self, emb, mask, features):
        if self.in_place:
            emb = emb.clone()
            emb.masked_scatter_(mask, features)
            return emb * 2
        return emb.masked_scatter(mask, features) * 2


def _merge_inputs(seed=0, shift=0):
    """(emb [2, 6, 8], mask [2, 6, 1], features [K, 8]); ``shift`` rolls the mask: other rows, the same K."""
    mask = _row_mask("cpu").roll(shift, dims=1)[..., None]
    return _randn(2, 6, 8, device="cpu", seed=seed), mask, _randn(int(mask.sum()), 8, device="cpu", seed=seed + 1)


@pytest.mark.parametrize("in_place", [False, True], ids=["masked_scatter", "masked_scatter_"])
def test_torch_export_as_stock(in_place):
    """torch.export of a module with HF's inline merge succeeds while enabled, and the exported program gives
    stock's result, also for another mask than the traced one (today: the export raises, the count forced
    out of a traced mask)."""
    module = _Merge(in_place)
    with hf.enabled():
        program = torch.export.export(module, _merge_inputs())
    assert any(node.target in ATEN_MASKED_SCATTER for node in program.graph.nodes)
    for seed, shift in ((0, 0), (3, 1), (4, 3)):
        inputs = _merge_inputs(seed, shift)
        assert torch.equal(program.module()(*inputs), module(*inputs))


@pytest.mark.parametrize("in_place", [False, True], ids=["masked_scatter", "masked_scatter_"])
def test_torch_compile_fullgraph_as_stock(in_place):
    """``torch.compile(fullgraph=True)`` of HF's inline merge traces without a break while enabled and gives
    stock's result (today: the mask's count is forced, a graph break that fullgraph turns into an error)."""
    torch._dynamo.reset()
    module = _Merge(in_place)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    with hf.enabled():
        for seed, shift in ((0, 0), (3, 1), (4, 3)):
            inputs = _merge_inputs(seed, shift)
            assert torch.equal(compiled(*inputs), module(*inputs))
    torch._dynamo.reset()


_FIRST_COMPILE_WHILE_ENABLED = """
import torch
from mmmerge_triton.integrations import transformers as hf
x, m = torch.randn(2, 6, 8), torch.rand(2, 6, 1) < 0.5
s = torch.randn(int(m.sum()), 8)
def merge(x, m, s):
    return x.{method}(m, s) * 2
with hf.enabled():
    out = torch.compile(merge, fullgraph=True, backend="eager")(x.clone(), m, s)
print(torch.equal(out, merge(x.clone(), m, s)))
"""


@pytest.mark.parametrize("method", ["masked_scatter", "masked_scatter_"])
def test_the_first_compile_of_a_process_while_enabled_traces_whole(method):
    """Dynamo lists the Tensor methods it knows once per process, when it first compiles: if that is while the
    switch is on, PyTorch's masked_scatter is not on the list, and a fullgraph compile of a merge (which the
    switch hands to PyTorch under tracing) must still trace it, not refuse it as a skipped function. In a fresh
    process, so that no earlier compile made the list."""
    import subprocess
    done = subprocess.run([sys.executable, "-c", _FIRST_COMPILE_WHILE_ENABLED.format(method=method)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]


def _run_transformed(transform: str) -> torch.Tensor:
    """HF's inline merge under a torch.func transform, or traced by torch.jit.trace, and run."""
    emb, mask, features = _merge_inputs()
    if transform == "vmap":  # over a leading batch of 3 prompts, each with the same count
        masks = torch.stack([mask.roll(i, dims=1) for i in range(3)])
        return torch.vmap(_Merge(False))(torch.stack([emb] * 3), masks, torch.stack([features] * 3))
    if transform == "grad":
        return torch.func.grad(lambda e, m, f: _Merge(False)(e, m, f).sum())(emb, mask, features)
    traced = torch.jit.trace(_Merge(False), (emb, mask, features), check_trace=False)
    return traced(*_merge_inputs(3, 1))  # another mask than the traced one


@pytest.mark.parametrize("transform", ["vmap", "grad", "jit.trace"])
def test_function_transforms_as_stock(transform):
    """torch.vmap, torch.func.grad and torch.jit.trace of HF's inline merge run while enabled and give stock's
    result; a trace taken while enabled generalizes to another mask (today: vmap and grad raise, and
    jit.trace records the traced mask's count)."""
    stock = _outcome(lambda: _run_transformed(transform))
    assert isinstance(stock, torch.Tensor)
    with hf.enabled():
        merged = _outcome(lambda: _run_transformed(transform))
    _assert_same_outcome(merged, stock)


def _layouts() -> dict[str, torch.Tensor]:
    """self tensors [2, 6, 8] of layouts that are not the contiguous one, by name."""
    base = _randn(6, 2, 8, device="cpu")
    dense = _randn(2, 6, 8, device="cpu")
    return {
        "transposed": base.transpose(0, 1),
        "sliced": _randn(2, 6, 16, device="cpu")[..., ::2],
        "expanded": _randn(1, 6, 8, device="cpu").expand(2, 6, 8),
        "size-1 dim of odd stride": torch.as_strided(dense[:, :1], (2, 1, 8), (48, 999, 1)),
        "contiguous": dense,
    }


@pytest.mark.parametrize("layout", list(_layouts()))
def test_out_of_place_result_layout_as_stock(layout):
    """The out-of-place result has stock's strides (PyTorch returns a contiguous tensor whatever self's
    layout), so a later ``.view`` works as it does stock (today: a transposed self gives a transposed result)."""
    emb = _layouts()[layout]
    mask = _row_mask("cpu", shape=emb.shape[:-1])[..., None]
    src = _randn(int(mask.sum()), 8, device="cpu", seed=1)
    stock = emb.masked_scatter(mask, src)
    with hf.enabled(), OpRecorder() as recorder:
        merged = emb.masked_scatter(mask, src)
    _assert_same_outcome(merged, stock)
    assert merged.view(-1).shape == (emb.numel(),)
    assert recorder.count(ATEN_MASKED_SCATTER) == 0  # still a row scatter


def _refused_in_place() -> dict:
    """In-place calls PyTorch refuses: (self, mask [2, 6, 1], source)."""
    mask = _row_mask("cpu")[..., None]
    src = _randn(int(mask.sum()), 8, device="cpu", seed=1)
    leaf = _randn(2, 6, 8, device="cpu").requires_grad_()
    with torch.inference_mode():
        inference = _randn(2, 6, 8, device="cpu")
    return {
        "expanded self": (_randn(1, 6, 8, device="cpu").expand(2, 6, 8), mask, src),
        "leaf that requires grad": (leaf, mask, src),
        "view of a leaf that requires grad": (leaf[:, :], mask, src),
        "inference tensor": (inference, mask, src),
    }


@pytest.mark.parametrize("case", list(_refused_in_place()))
def test_in_place_refusals_as_stock(case):
    """An in-place call that PyTorch refuses raises PyTorch's error (type and text) while enabled, and leaves
    self as PyTorch leaves it (unchanged, but for an inference tensor, which PyTorch writes before raising).
    Today an expanded self raises another error after writing, and an inference tensor is written in full."""
    outcomes = []
    for on in (False, True):
        self, mask, source = _refused_in_place()[case]  # fresh tensors per run, the same values
        with hf.enabled() if on else contextlib.nullcontext():
            outcomes.append((_outcome(lambda: self.masked_scatter_(mask, source)), self.detach().clone()))
    (stock, stock_self), (merged, merged_self) = outcomes
    assert not isinstance(stock, torch.Tensor)
    _assert_same_outcome(merged, stock)
    assert torch.equal(merged_self, stock_self)


@pytest.mark.parametrize("overlap", ["rows before", "rows after", "all of self"])
def test_in_place_source_aliasing_self_as_stock(overlap):
    """An in-place call whose source is a view of self's own rows gives stock's result, or stock's error
    (today: the row scatter refuses what PyTorch runs)."""
    mask = torch.zeros(2, 6, 1, dtype=torch.bool)
    mask[0, 2:5] = True

    def call():
        emb = torch.arange(96, dtype=torch.float32).view(2, 6, 8)
        source = {"rows before": emb[0, 1:4], "rows after": emb[0, 3:6], "all of self": emb}[overlap]
        return emb.masked_scatter_(mask, source)

    stock = _outcome(call)
    with hf.enabled():
        _assert_same_outcome(_outcome(call), stock)


@pytest.mark.skipif(not tiny_vlms.available("qwen3vl"), reason="transformers lacks Qwen3-VL")
def test_deepstack_under_fake_tensors_as_stock():
    """Qwen3-VL's deepstack add under FakeTensorMode (torch.export, torch.compile) gives HF's fake result
    while enabled (today: building the row map reads the fake mask's values and raises)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    model, _ = tiny_vlms.build("qwen3vl", 1)
    text_model = next(m for m in model.modules() if isinstance(m, Qwen3VLTextModel))
    hidden = _randn(2, 6, 8, device="cpu")
    mask = _row_mask("cpu")
    visual = _randn(int(mask.sum()), 8, device="cpu", seed=1)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:  # HF's bool-mask indexing needs symbolic sizes
        args = [mode.from_tensor(t) for t in (hidden, mask, visual)]
        stock = _outcome(lambda: text_model._deepstack_process(*args))
        with hf.enabled():
            merged = _outcome(lambda: text_model._deepstack_process(*args))
    assert isinstance(stock, torch.Tensor)
    _assert_same_outcome(merged, stock)


# ------------------------------------------------------------------------------------- inference mode (#21.5)


@pytest.mark.skipif(not tiny_vlms.available("qwen3vl"), reason="transformers lacks Qwen3-VL")
@pytest.mark.parametrize("n_images", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_qwen3vl_forward_under_inference_mode(device, n_images):
    """A Qwen3-VL forward under ``torch.inference_mode()`` (HF serving), the switch on, gives the stock logits,
    its merge and deepstack adds through mmmerge_triton (today: the deepstack add reads the mask's version
    counter, which an inference tensor does not have: RuntimeError)."""
    model, inputs = tiny_vlms.build("qwen3vl", n_images, device=device)
    levels = len(model.config.vision_config.deepstack_visual_indexes)
    with torch.inference_mode():
        expected = model(**inputs).logits
        with hf.enabled():
            logits = model(**inputs).logits  # the eager route
            with OpRecorder() as recorder:  # the registered ops' route, counted
                recorded = model(**inputs).logits
    assert torch.equal(logits, expected) and torch.equal(recorded, expected)
    assert recorder.count(ATEN_MASKED_SCATTER) == 0
    assert recorder.mmmerge_ops() == recorder.merges(levels)


@pytest.mark.skipif(not tiny_vlms.available("qwen3vl"), reason="transformers lacks Qwen3-VL")
@pytest.mark.parametrize("device", DEVICES)
def test_deepstack_inference_mask_changed_in_place_as_stock(device):
    """Under inference mode the visual mask has no version counter: a mask changed in place between two
    deepstack adds (the same count, other rows) is read anew, as HF's own method reads it."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    model, _ = tiny_vlms.build("qwen3vl", 1, device=device)
    text_model = next(m for m in model.modules() if isinstance(m, Qwen3VLTextModel))
    runs = []
    for on in (False, True):
        with torch.inference_mode(), hf.enabled() if on else contextlib.nullcontext():
            hidden = _randn(2, 6, 8, device=device)
            mask = _row_mask(device)
            visual = _randn(int(mask.sum()), 8, device=device, seed=1)
            first = text_model._deepstack_process(hidden, mask, visual).clone()  # 4.x returns hidden itself
            mask.copy_(mask.roll(1, dims=1))
            runs.append((first, text_model._deepstack_process(hidden, mask, visual).clone(), hidden.clone()))
    (stock_first, stock_second, stock_hidden), (first, second, hidden) = runs
    assert torch.equal(first, stock_first) and torch.equal(second, stock_second)
    assert torch.equal(hidden, stock_hidden), "hidden_states written (or not) in place as HF's method does"
    assert not torch.equal(second, first)
