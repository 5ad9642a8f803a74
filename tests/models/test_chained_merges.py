"""HF transformers: ``chained_merges()``, and the forwards that enable() runs in it (``_CHAINED_FORWARDS``).

Qwen2.5-Omni and Qwen3-Omni merge audio, image and video, Qwen2-VL image and video, each by an out-of-place
``inputs_embeds = inputs_embeds.masked_scatter(mask_k, features_k)``. With the switch on, the first merge of a
forward copies the embeddings and the later ones write into that copy in place: one N x H copy instead of K.
These tests prove, on tiny random models (tiny_omni.py): the logits, and with gradients every gradient, equal
the stock run's bit for bit; a spy on the module's ``masked_row_scatter`` / ``masked_row_scatter_`` sees one
out-of-place merge and K-1 in-place ones into its result (every merge out of place where a gradient is
recorded); a caller's own ``inputs_embeds`` is never written. And, for direct calls in ``chained_merges()``:
what goes in place and what does not (another tensor, a head changed in place, a source that needs grad or
aliases the head), nesting, threads; ``enable()`` / ``disable()`` of the wrapped forwards; torch.compile.

The promise ``chained_merges()`` asks of its caller: no one else holds the intermediate results (they are the
same tensor as the last one). HF's forwards rebind ``inputs_embeds``; these tests do not treat a kept
intermediate result as a feature.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import threading
from typing import NamedTuple

import pytest
import torch

pytest.importorskip("transformers")

import tiny_omni  # noqa: E402  (tests/models is on sys.path: pytest's rootdir-relative "prepend" import)
import tiny_vlms  # noqa: E402
from mmmerge_triton.integrations import transformers as hf  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
MODELS = [
    pytest.param(name, marks=pytest.mark.skipif(not tiny_omni.available(name), reason=f"transformers lacks {name}"))
    for name in tiny_omni.MODELS
]
# The audited forwards, typed again here so that the test checks the integration's table.
CHAINED_FORWARDS = (
    ("transformers.models.qwen2_5_omni.modeling_qwen2_5_omni", "Qwen2_5OmniThinkerForConditionalGeneration"),
    ("transformers.models.qwen2_5_omni.modeling_qwen2_5_omni", "Qwen2_5OmniThinkerModel"),
    ("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe", "Qwen3OmniMoeThinkerForConditionalGeneration"),
    ("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe", "Qwen3OmniMoeThinkerModel"),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLModel"),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLModel"),
    ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeModel"),
)


@pytest.fixture(autouse=True)
def integration_off():
    """Every test starts and ends with the integration off (even when a test fails while it is on)."""
    hf.disable()
    yield
    hf.disable()


@pytest.fixture(scope="module")
def models():
    """get(name, device) -> (model, inputs) of tiny_omni.build(name) on device, built once per module."""
    built = {}

    def get(name: str, device: str):
        if (name, device) not in built:
            model, inputs = tiny_omni.build(name)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            built[name, device] = model.to(device), inputs
        return built[name, device]

    yield get
    built.clear()


class Merge(NamedTuple):
    in_place: bool  # masked_row_scatter_ (True) or masked_row_scatter (False)
    dst: torch.Tensor
    out: torch.Tensor


@pytest.fixture
def merges(monkeypatch) -> list[Merge]:
    """Every row merge the switch runs during the test, in order (the module's ``masked_row_scatter`` and
    ``masked_row_scatter_`` replaced by spies that call them)."""
    calls = []

    def spy(in_place: bool, merge):
        def call(dst, *args, **kwargs):
            out = merge(dst, *args, **kwargs)
            if not kwargs.get("accumulate", False):  # a deepstack add (Qwen3-VL), not a merge
                calls.append(Merge(in_place, dst, out))
            return out

        return call

    monkeypatch.setattr(hf, "masked_row_scatter", spy(False, hf.masked_row_scatter))
    monkeypatch.setattr(hf, "masked_row_scatter_", spy(True, hf.masked_row_scatter_))
    return calls


@contextlib.contextmanager
def language_model_inputs(model):
    """The ``inputs_embeds`` each call of the text model receives (HF passes it by keyword)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["inputs_embeds"])

    handle = tiny_omni.text_model(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def assert_chained(calls: list[Merge], k: int, text_inputs: list[torch.Tensor]) -> None:
    """One out-of-place merge, then k-1 in place into its result, which the text model then receives."""
    assert [c.in_place for c in calls] == [False] + [True] * (k - 1), "one copy, then in place"
    head = calls[0].out
    assert all(c.dst is head and c.out is head for c in calls[1:]), "the in-place merges write the first result"
    assert len(text_inputs) == 1 and text_inputs[0] is head, "the text model receives the one copy"


@contextlib.contextmanager
def frozen(model):
    """Gradients recorded (grad mode on), but no parameter requires one: the chain still writes in place."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p in params:
            p.requires_grad_(True)


GRAD_MODES = {
    "no_grad": lambda model: torch.no_grad(),
    "inference_mode": lambda model: torch.inference_mode(),
    "grad_mode_frozen_model": frozen,
}


# ----------------------------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("grad_mode", list(GRAD_MODES))
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_merges_chain_and_logits_match_stock(models, merges, device, name, grad_mode):
    """With the switch on, a forward's K merges are one out-of-place row merge and K-1 in-place ones into its
    result, which the text model receives; the logits are the stock logits bit for bit. Under no_grad,
    inference_mode, and grad mode with every parameter frozen (nothing records a gradient). Qwen2.5-Omni also
    with ``use_audio_in_video`` (audio and video tokens interleaved)."""
    model, inputs = models(name, device)
    with GRAD_MODES[grad_mode](model):
        expected = model(**inputs).logits
        assert not merges, "the stock run goes through PyTorch"
        with hf.enabled(), language_model_inputs(model) as text_inputs:
            logits = model(**inputs).logits
    assert torch.equal(logits, expected)
    assert_chained(merges, tiny_omni.merges(name), text_inputs)


@pytest.mark.parametrize("trainable", ["all", "vision"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_stock_all_merges_out_of_place(models, merges, device, name, trainable):
    """Training (grad mode on, parameters that require grad): the logits, the gradient of every encoder
    output and of every parameter equal the stock run's, and every merge ran out of place, as HF's does.
    ``vision``: only the vision tower trains, so the merge into the text embeddings (which need no grad) of a
    source that needs one is out of place too."""
    model, inputs = models(name, device)
    vision = "model.visual." if tiny_omni.merging_module(model) is not model else "visual."
    frozen_params = [p for n, p in model.named_parameters() if trainable == "vision" and not n.startswith(vision)]
    try:
        for p in frozen_params:
            p.requires_grad_(False)
        stock = tiny_omni.forward_backward(model, lambda: model(**inputs).logits)
        with hf.enabled():
            merged = tiny_omni.forward_backward(model, lambda: model(**inputs).logits)
    finally:
        for p in frozen_params:
            p.requires_grad_(True)
    tiny_vlms.assert_runs_equal(merged, stock)
    assert [c.in_place for c in merges] == [False] * tiny_omni.merges(name)


@pytest.mark.parametrize("with_ids", [False, True], ids=["inputs_embeds", "input_ids+inputs_embeds"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_callers_inputs_embeds_left_unchanged(models, merges, device, name, with_ids):
    """The caller's own ``inputs_embeds`` (HF does not embed input_ids) is never written: the first merge copies
    it. Without input_ids HF finds the placeholders by comparing the embeddings with each token's embedding,
    before each merge, on the partly merged tensor: the logits still equal stock's."""
    model, inputs = models(name, device)
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids" or with_ids}
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        before = embeds.clone()
        expected = model(inputs_embeds=embeds, **kwargs).logits
        with hf.enabled(), language_model_inputs(model) as text_inputs:
            logits = model(inputs_embeds=embeds, **kwargs).logits
    assert torch.equal(embeds, before), "the caller's inputs_embeds was written"
    assert torch.equal(logits, expected)
    assert merges[0].dst is embeds
    assert_chained(merges, tiny_omni.merges(name), text_inputs)


@pytest.mark.skipif(not tiny_omni.available("qwen2_5_omni"), reason="transformers lacks Qwen2.5-Omni")
@pytest.mark.parametrize("device", DEVICES)
def test_placeholder_masks_see_in_place_merges(models, merges, monkeypatch, device):
    """Without input_ids, HF computes the video mask from the embeddings after the image merge, which the chain
    wrote in place. Built so that this matters: one video placeholder of the caller's embeddings is a text
    token's, and the first image feature equals the video token's embedding; so the video mask HF computes
    after the image merge holds that image row and has 8 rows, as many as the video features (a merge left
    for later would leave 7, and HF's count check would raise). The logits equal stock's."""
    model, inputs = models("qwen2_5_omni", device)
    embed = model.get_input_embeddings()
    merging = tiny_omni.merging_module(model)
    stock_image_features = merging.get_image_features

    def image_features(*args, **kwargs):
        output = stock_image_features(*args, **kwargs)
        if isinstance(output, torch.Tensor):  # transformers 4.57: the features themselves
            video_token = embed(torch.tensor(tiny_omni.VIDEO, device=output.device))
            return torch.cat([video_token[None], output[1:]])
        first, *rest = output.pooler_output
        video_token = embed(torch.tensor(tiny_omni.VIDEO, device=first.device))
        output.pooler_output = (torch.cat([video_token[None], first[1:]]), *rest)
        return output

    monkeypatch.setattr(merging, "get_image_features", image_features)
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        embeds = embed(inputs["input_ids"])
        first_video = int((inputs["input_ids"][0] == tiny_omni.VIDEO).nonzero()[0, 0])
        embeds[0, first_video] = embed(torch.tensor(5, device=device))  # a text token
        expected = model(inputs_embeds=embeds, **kwargs).logits
        with hf.enabled(), language_model_inputs(model) as text_inputs:
            logits = model(inputs_embeds=embeds, **kwargs).logits
    assert torch.equal(logits, expected)
    assert_chained(merges, 3, text_inputs)


# ------------------------------------------------------------------------------------------------ direct calls


def _emb(device, seed=0) -> torch.Tensor:
    return torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(seed)).to(device)


def _steps(device, n=3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mask [2, 6, 1], source [K, 8]) of n row merges into a [2, 6, 8] tensor; the masks overlap (a later
    merge overwrites rows of an earlier one, as PyTorch's sequence does)."""
    steps = []
    for i in range(n):
        mask = torch.rand(2, 6, 1, generator=torch.Generator().manual_seed(10 + i)) < 0.5
        mask[0, i] = True
        source = torch.randn(int(mask.sum()), 8, generator=torch.Generator().manual_seed(20 + i))
        steps.append((mask.to(device), source.to(device)))
    return steps


def _stock_chain(x: torch.Tensor, steps) -> torch.Tensor:
    """PyTorch's result of the merges one after another (switch off)."""
    for mask, source in steps:
        x = hf._STOCK_MASKED_SCATTER(x, mask, source)
    return x


@pytest.mark.parametrize("device", DEVICES)
def test_chain_writes_into_first_result(merges, device):
    """Three calls, each rebinding x: PyTorch's result; the first call copies, the next two write into its
    result and return it (so the intermediate results are that same tensor: the caller's promise is not to
    keep them). The input is left as it was."""
    x0, steps = _emb(device), _steps(device)
    before = x0.clone()
    results = []
    with hf.enabled(), hf.chained_merges():
        x = x0
        for mask, source in steps:
            x = x.masked_scatter(mask, source)
            results.append(x)
    assert torch.equal(x, _stock_chain(before, steps))
    assert torch.equal(x0, before) and results[0] is not x0
    assert results[1] is results[0] and results[2] is results[0]
    assert [c.in_place for c in merges] == [False, True, True]


NOT_THE_HEAD = ("another tensor", "elementwise mask on the head", "source a view of the head")


def _not_the_head(head: torch.Tensor, steps, device) -> dict:
    """Calls in a chain that must not write the head: (self, mask, source) by name (NOT_THE_HEAD)."""
    mask, source = steps[1]
    elementwise = torch.rand(2, 6, 8, generator=torch.Generator().manual_seed(3)).lt(0.5).to(device)
    rows = int(mask.sum())
    return {
        "another tensor": (_emb(device, seed=7), mask, source),
        "elementwise mask on the head": (head, elementwise, _emb(device, seed=8).view(-1)[:int(elementwise.sum())]),
        "source a view of the head": (head, mask, head.view(-1, 8)[1:rows + 1]),
    }


@pytest.mark.parametrize("case", NOT_THE_HEAD)
@pytest.mark.parametrize("device", DEVICES)
def test_chain_other_calls_out_of_place(device, case):
    """In a chain, a call on another tensor than the last result, a call on the head that is not a row merge,
    and one whose source is a view of the head (in place, rows would be read after being written) go out of
    place: PyTorch's result, the head and self left alone, and the next call of the chain still correct."""
    x0, steps = _emb(device), _steps(device)
    with hf.enabled(), hf.chained_merges():
        head = x0.masked_scatter(*steps[0])
        head_before = head.clone()
        self, mask, source = _not_the_head(head, steps, device)[case]
        self_before = self.clone()
        expected = hf._STOCK_MASKED_SCATTER(self_before, mask, source.clone())
        out = self.masked_scatter(mask, source)
        assert out is not self and out is not head
        assert torch.equal(out, expected)
        assert torch.equal(head, head_before), "the head was written"
        assert torch.equal(self, self_before)
        final = out.masked_scatter(*steps[2])
    assert torch.equal(final, _stock_chain(expected, steps[2:]))


@pytest.mark.parametrize("device", DEVICES)
def test_head_changed_in_place_ends_chain(merges, device):
    """A head written in place between two calls (its version moved: someone else holds it) is not written
    again: the next call copies it."""
    x0, steps = _emb(device), _steps(device)
    with hf.enabled(), hf.chained_merges():
        head = x0.masked_scatter(*steps[0])
        head.mul_(2)
        kept = head.clone()
        out = head.masked_scatter(*steps[1])
    assert out is not head and torch.equal(head, kept)
    assert torch.equal(out, _stock_chain(kept, steps[1:2]))
    assert [c.in_place for c in merges] == [False, False]


@pytest.mark.parametrize("grad", [True, False], ids=["grad_enabled", "no_grad"])
@pytest.mark.parametrize("device", DEVICES)
def test_source_requiring_grad(merges, device, grad):
    """A source that requires grad, with gradients recorded: the call goes out of place (the head is left
    alone) and the source's gradient is PyTorch's. Under no_grad nothing is recorded: in place."""
    x0, steps = _emb(device), _steps(device)
    source = steps[1][1].clone().requires_grad_()
    weight = _emb(device, seed=5)
    with hf.enabled(), hf.chained_merges(), torch.set_grad_enabled(grad):
        head = x0.masked_scatter(*steps[0])
        kept = head.clone()
        out = head.masked_scatter(steps[1][0], source)
    assert torch.equal(out, _stock_chain(kept, [(steps[1][0], source.detach())]))
    assert [c.in_place for c in merges] == [False, not grad]
    if grad:
        assert out is not head and torch.equal(head, kept)
        (out * weight).sum().backward()
        reference = source.detach().clone().requires_grad_()
        (hf._STOCK_MASKED_SCATTER(kept, steps[1][0], reference) * weight).sum().backward()
        assert torch.equal(source.grad, reference.grad)
    else:
        assert out is head


@pytest.mark.parametrize("device", DEVICES)
def test_nested_blocks_restore_outer_chain(merges, device):
    """An inner block starts its own chain (a call on the outer head copies it) and, on exit, the outer chain
    goes on writing into its head."""
    x0, steps = _emb(device), _steps(device)
    with hf.enabled(), hf.chained_merges():
        head = x0.masked_scatter(*steps[0])
        with hf.chained_merges():
            inner = head.masked_scatter(*steps[1])
            inner_next = inner.masked_scatter(*steps[2])
        outer_next = head.masked_scatter(*steps[1])
    assert inner is not head and inner_next is inner and outer_next is head
    assert torch.equal(inner, _stock_chain(x0, steps))
    assert torch.equal(head, _stock_chain(x0, steps[:2]))
    assert [c.in_place for c in merges] == [False, False, True, True]


@pytest.mark.parametrize("device", DEVICES)
def test_chain_per_thread(device):
    """A thread's chain is its own: thread A opens a block and merges (its head); thread B, outside any block
    and then in a block of its own, merges into A's head out of place and chains its own; then A's next call
    still writes into A's head. Every result is PyTorch's."""
    x0, steps = _emb(device), _steps(device)
    other = _emb(device, seed=7)
    a_started, b_done = threading.Event(), threading.Event()
    results, errors = {}, []

    def thread_a():
        try:
            with hf.chained_merges():
                head = x0.masked_scatter(*steps[0])
                results["a_head_before"] = head.clone()
                results["a_head"] = head
                a_started.set()
                assert b_done.wait(10), "thread B did not finish"
                results["a_next"] = head.masked_scatter(*steps[1])
        except Exception as error:  # noqa: BLE001 (reported by the main thread)
            errors.append(error)
            a_started.set()

    def thread_b():
        try:
            assert a_started.wait(10), "thread A did not start"
            head = results["a_head"]
            results["b_outside"] = head.masked_scatter(*steps[1])
            with hf.chained_merges():
                results["b_on_a_head"] = head.masked_scatter(*steps[2])
                own = other.masked_scatter(*steps[0])
                results["b_own"], results["b_own_next"] = own, own.masked_scatter(*steps[1])
        except Exception as error:  # noqa: BLE001 (reported by the main thread)
            errors.append(error)
        finally:
            b_done.set()

    with hf.enabled():
        threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    a_head = results["a_head_before"]
    assert torch.equal(results["b_outside"], _stock_chain(a_head, steps[1:2]))
    assert torch.equal(results["b_on_a_head"], _stock_chain(a_head, steps[2:3]))
    assert results["b_outside"] is not results["a_head"] and results["b_on_a_head"] is not results["a_head"]
    assert results["b_own_next"] is results["b_own"]
    assert torch.equal(results["b_own_next"], _stock_chain(other, steps[:2]))
    assert results["a_next"] is results["a_head"], "A's chain was lost"
    assert torch.equal(results["a_next"], _stock_chain(x0, steps[:2]))


@pytest.mark.parametrize("device", DEVICES)
def test_outside_a_block_every_call_out_of_place(merges, device):
    """Outside any chained_merges() block every row merge copies, as before; inside a block with the switch
    off, PyTorch's own masked_scatter runs (out of place)."""
    x0, steps = _emb(device), _steps(device)
    with hf.enabled():
        x1 = x0.masked_scatter(*steps[0])
        x2 = x1.masked_scatter(*steps[1])
    assert x1 is not x0 and x2 is not x1
    assert [c.in_place for c in merges] == [False, False]
    with hf.chained_merges():
        y1 = x0.masked_scatter(*steps[0])
        y2 = y1.masked_scatter(*steps[1])
    assert y2 is not y1 and len(merges) == 2
    expected = _stock_chain(x0, steps[:2])
    assert torch.equal(x2, expected) and torch.equal(y2, expected)
    assert torch.equal(x1, _stock_chain(x0, steps[:1]))


# --------------------------------------------------------------------------------------------- enable/disable


def _chained_classes() -> list[type]:
    classes = []
    for module_name, class_name in CHAINED_FORWARDS:
        try:
            classes.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):
            pass
    return classes


def test_enable_wraps_chained_forwards_disable_restores():
    """enable() installs a wrapped ``forward`` on each audited class the installed transformers has (wrapping
    the class's own function); a second enable() changes nothing; disable() puts back the very objects."""
    classes = _chained_classes()
    assert classes, "transformers has none of the audited models"
    originals = {cls: cls.__dict__["forward"] for cls in classes}
    hf.enable()
    patched = {cls: cls.__dict__["forward"] for cls in classes}
    for cls in classes:
        assert patched[cls] is not originals[cls], cls.__name__
        assert patched[cls].__wrapped__ is originals[cls], f"{cls.__name__}: not HF's own forward wrapped once"
    hf.enable()
    assert all(cls.__dict__["forward"] is patched[cls] for cls in classes), "enable() twice wrapped again"
    hf.disable()
    assert all(cls.__dict__["forward"] is originals[cls] for cls in classes)


@pytest.mark.skipif(not tiny_omni.available("qwen2vl"), reason="transformers lacks Qwen2-VL")
def test_model_built_while_enabled_runs_stock_after_disable(merges):
    """A model built while enabled runs HF's own forward after disable() (no row merge; the same logits), and
    its ``forward`` looked up while enabled still runs after disable(), through PyTorch."""
    with torch.no_grad():
        with hf.enabled():
            model, inputs = tiny_omni.build("qwen2vl")
            kept_forward = model.model.forward
            expected = model(**inputs).logits
            hidden = model.model(**inputs).last_hidden_state
        enabled_merges = len(merges)
        logits = model(**inputs).logits
        kept_hidden = kept_forward(**inputs).last_hidden_state
    assert enabled_merges == 2 * tiny_omni.merges("qwen2vl")
    assert len(merges) == enabled_merges, "a row merge ran after disable()"
    assert torch.equal(logits, expected) and torch.equal(kept_hidden, hidden)


# --------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.skipif(not tiny_omni.available("qwen2vl"), reason="transformers lacks Qwen2-VL")
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_as_stock(models, merges, device):
    """``torch.compile(fullgraph=True)`` of a Qwen2-VL forward, the switch on, traces without a break (HF's two
    masked_scatter calls in the graph, which the eager backend runs, out of place) and gives the stock logits.
    HF's vision tower and its M-RoPE index cannot trace fullgraph (``lengths.tolist()``, ``.tolist()`` of the
    token types): their outputs are computed eagerly and passed in (``mm_encoder_outputs``, ``position_ids``)."""
    model, inputs = models("qwen2vl", device)
    inner = model.model
    if "mm_encoder_outputs" not in inspect.signature(inner.forward).parameters:
        pytest.skip("this transformers' Qwen2-VL takes no encoder outputs (mm_encoder_outputs), so its vision "
                    "tower, which cannot trace fullgraph, would run in the graph")
    with torch.no_grad():
        expected = model(**inputs).logits
        kwargs = {k: v for k, v in inputs.items() if not k.startswith("pixel_values")}
        kwargs["position_ids"] = inner.compute_3d_position_ids(
            input_ids=inputs["input_ids"], inputs_embeds=None, image_grid_thw=inputs["image_grid_thw"],
            video_grid_thw=inputs["video_grid_thw"], attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"])
        encoded = dict(
            image=inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True),
            video=inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True))

    def compiled_logits(on: bool):
        graphs = []

        def backend(graph_module, example_inputs):  # the eager backend, keeping the graph
            graphs.append(graph_module)
            return graph_module.forward

        torch._dynamo.reset()
        try:
            compiled = torch.compile(model, fullgraph=True, backend=backend)
            with torch.no_grad(), hf.enabled() if on else contextlib.nullcontext():
                return compiled(**kwargs, mm_encoder_outputs=dict(encoded)).logits, graphs
        finally:
            torch._dynamo.reset()

    try:
        stock, _ = compiled_logits(False)
    except Exception as error:  # noqa: BLE001 (HF's model itself does not trace: nothing to compare)
        pytest.skip(f"HF's Qwen2-VL does not compile fullgraph here, switch off: {type(error).__name__}")
    logits, graphs = compiled_logits(True)
    assert torch.equal(stock, expected) and torch.equal(logits, expected)
    assert len(graphs) == 1
    assert sum(node.target == "masked_scatter" for node in graphs[0].graph.nodes) == 2
    # The eager backend runs the graph's Tensor.masked_scatter calls, the switch's: out of place, no chain.
    assert [c.in_place for c in merges] == [False, False]
