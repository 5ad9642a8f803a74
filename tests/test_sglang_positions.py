"""The SGLang hook where SGLang has row positions: ``ModelRunner._extend_forward_kwargs`` (embedding overrides at
host-built positions), against a stand-in engine; and the multimodal merge's replacement, which has no positions
in SGLang and builds no poison row list.

The stand-in ModelRunner carries SGLang 0.5.23's ``_extend_forward_kwargs`` and ``_pp_kwargs``
(srt/model_executor/model_runner.py:1755-1786) verbatim; the module tree is built in ``sys.modules`` as
tests/test_engine_hooks.py builds it for ``_scatter_mm_embedding`` (whose stand-in is reused from there).
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from mmmerge_triton.integrations import sglang as mm_sglang

from .test_engine_hooks import DEVICES, _install, raise_if_cuda_sync, sglang_scatter_mm_embedding

WIDTH = 16
VOCAB = 32
N = 10  # extend tokens of the batch


def sglang_pp_kwargs(self, pp_proxy_tensors) -> dict:
    """SGLang 0.5.23's ``ModelRunner._pp_kwargs`` (model_runner.py:1755)."""
    return {"pp_proxy_tensors": pp_proxy_tensors} if self.support_pp else {}


def sglang_extend_forward_kwargs(self, forward_batch, pp_proxy_tensors) -> dict:
    """SGLang 0.5.23's ``ModelRunner._extend_forward_kwargs`` (model_runner.py:1764); records each forward_batch."""
    CALLS.append(forward_batch)
    kwargs = self._pp_kwargs(pp_proxy_tensors)
    if forward_batch.input_embeds is not None:
        kwargs["input_embeds"] = forward_batch.input_embeds.bfloat16()
    if (
        forward_batch.replace_embeds is not None
        and forward_batch.replace_positions is not None
    ):
        # Token embedding overrides: get base embeddings, scatter replacements
        if "input_embeds" not in kwargs:
            embed_layer = self.model.get_input_embeddings()
            kwargs["input_embeds"] = embed_layer(forward_batch.input_ids)
        kwargs["input_embeds"][forward_batch.replace_positions] = (
            forward_batch.replace_embeds.to(kwargs["input_embeds"].dtype)
        )
    if not self.is_generation:
        kwargs["get_embedding"] = True
    return kwargs


CALLS: list = []  # the forward_batch of each call of the stand-in method


@pytest.fixture
def fake_sglang(monkeypatch):
    """mm_utils with the stand-in ``_scatter_mm_embedding`` and model_runner with a stand-in ModelRunner (a new
    class per test); yields (mm_utils, ModelRunner). The hook is disabled, then sys.modules restored, afterwards."""
    for cache in ("_engine", "_installed", "_runner_engine", "_runner_installed"):
        monkeypatch.setattr(mm_sglang, cache, [])
    for name in ("sglang", "sglang.srt", "sglang.srt.managers", "sglang.srt.model_executor"):
        _install(monkeypatch, name)
    mm_utils = _install(monkeypatch, "sglang.srt.managers.mm_utils", _scatter_mm_embedding=sglang_scatter_mm_embedding)
    runner = type("ModelRunner", (), {"_pp_kwargs": sglang_pp_kwargs,
                                      "_extend_forward_kwargs": sglang_extend_forward_kwargs})
    _install(monkeypatch, "sglang.srt.model_executor.model_runner", ModelRunner=runner)
    CALLS.clear()
    yield mm_utils, runner
    mm_sglang.disable()


@pytest.fixture
def spy(monkeypatch):
    """The positions handed to indexed_row_scatter_ by the hook, one entry per call (it still runs)."""
    seen = []
    real = mm_sglang.indexed_row_scatter_

    def recording(dst, positions, src, **kwargs):
        seen.append(positions)
        return real(dst, positions, src, **kwargs)

    monkeypatch.setattr(mm_sglang, "indexed_row_scatter_", recording)
    return seen


def _runner(runner_class, device="cpu", is_generation=True, support_pp=False):
    runner = runner_class()
    embedding = torch.nn.Embedding(VOCAB, WIDTH, _weight=torch.randn(VOCAB, WIDTH, generator=_gen(3)))
    embedding = embedding.to(device, torch.bfloat16)
    runner.model = types.SimpleNamespace(get_input_embeddings=lambda: embedding)
    runner.is_generation = is_generation
    runner.support_pp = support_pp
    return runner


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(embeds, positions, input_embeds=None, device="cpu"):
    """A ForwardBatch's fields that _extend_forward_kwargs reads; tensors built anew at each call."""
    move = lambda t: None if t is None else t.clone().to(device)  # noqa: E731
    return types.SimpleNamespace(input_ids=(torch.arange(N) * 7 % VOCAB).to(device), input_embeds=move(input_embeds),
                                 replace_embeds=move(embeds), replace_positions=move(positions))


def _outcome(method, runner, batch):
    """(kwargs with tensors cloned, or None; the error's (type, text), or None; batch.input_embeds afterwards)."""
    try:
        kwargs = method(runner, batch, "pp")
        kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        error = None
    except Exception as e:  # noqa: BLE001 - compared, type included
        kwargs, error = None, (type(e), str(e))
    return kwargs, error, batch.input_embeds


def _assert_same(actual, expected):
    assert actual[1] == expected[1]
    if expected[0] is None:
        assert actual[0] is None
    else:
        assert actual[0].keys() == expected[0].keys()
        for key, value in expected[0].items():
            if isinstance(value, torch.Tensor):
                assert actual[0][key].dtype == value.dtype and torch.equal(actual[0][key], value), key
            else:
                assert actual[0][key] == value, key
    if expected[2] is not None:  # written in place where input_embeds is bf16 (SGLang's .bfloat16() is a no-op)
        assert torch.equal(actual[2], expected[2])


# ======================================================================================= install and remove


def test_enable_disable_replaces_both(fake_sglang):
    """enable() sets mm_utils._scatter_mm_embedding and ModelRunner._extend_forward_kwargs (idempotent, SGLang's
    own kept as the engine); disable() puts both back."""
    mm_utils, runner = fake_sglang
    mm_sglang.enable()
    mm_sglang.enable()
    assert mm_utils._scatter_mm_embedding is mm_sglang._scatter_mm_embedding
    assert runner._extend_forward_kwargs is mm_sglang._extend_forward_kwargs
    assert mm_sglang.engine_method() is sglang_extend_forward_kwargs
    mm_sglang.disable()
    assert mm_utils._scatter_mm_embedding is sglang_scatter_mm_embedding
    assert runner._extend_forward_kwargs is sglang_extend_forward_kwargs
    mm_sglang.disable()
    assert runner._extend_forward_kwargs is sglang_extend_forward_kwargs


@pytest.mark.parametrize("runner_module", ["absent", "no method"])
def test_enable_without_the_method(fake_sglang, monkeypatch, runner_module):
    """Where model_runner does not import, or its ModelRunner has no _extend_forward_kwargs (another SGLang),
    enable() replaces _scatter_mm_embedding alone, and the method replacement refuses to guess SGLang's own."""
    mm_utils, _ = fake_sglang
    if runner_module == "absent":
        monkeypatch.setitem(sys.modules, mm_sglang.RUNNER_MODULE, None)
    else:
        _install(monkeypatch, mm_sglang.RUNNER_MODULE, ModelRunner=type("ModelRunner", (), {}))
    mm_sglang.enable()
    assert mm_utils._scatter_mm_embedding is mm_sglang._scatter_mm_embedding
    assert mm_sglang._runner_installed == []
    with pytest.raises(RuntimeError, match="was not replaced by enable"):
        mm_sglang.engine_method()


def test_reference_survives_disable(fake_sglang, spy):
    """A bound method looked up while enabled still works after disable() (SGLang's own method is kept)."""
    _, runner_class = fake_sglang
    mm_sglang.enable()
    runner = _runner(runner_class)
    bound = runner._extend_forward_kwargs
    mm_sglang.disable()
    with torch.inference_mode():
        expected = _outcome(sglang_extend_forward_kwargs, runner, _batch(torch.ones(2, WIDTH), torch.tensor([3, 1])))
        actual = _outcome(lambda r, b, p: bound(b, p), runner, _batch(torch.ones(2, WIDTH), torch.tensor([3, 1])))
    _assert_same(actual, expected)


# ===================================================================================== the fast path, exact


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("embeds_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_embeds", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_generation", [True, False])
def test_overrides_match_sglang_bitwise(fake_sglang, spy, device, embeds_dtype, input_embeds, is_generation):
    """SGLang's override write ``input_embeds[replace_positions] = replace_embeds.to(dtype)`` runs as
    indexed_row_scatter_ with SGLang's positions (unsorted, int64, on the batch's device), and the kwargs are
    SGLang's bit for bit: input_embeds from the embedding layer or forward_batch.input_embeds (.bfloat16(), in
    place where it is bf16 already), pp_proxy_tensors, get_embedding."""
    _, runner_class = fake_sglang
    runner = _runner(runner_class, device, is_generation, support_pp=True)
    embeds = (torch.randn(4, WIDTH, generator=_gen(1)) * 300).to(embeds_dtype)
    positions = torch.tensor([7, 0, 9, 4])
    base = None if input_embeds is None else torch.randn(N, WIDTH, generator=_gen(2)).to(input_embeds)
    with torch.inference_mode():
        expected = _outcome(sglang_extend_forward_kwargs, runner, _batch(embeds, positions, base, device))
        mm_sglang.enable()
        batch = _batch(embeds, positions, base, device)
        actual = _outcome(runner_class._extend_forward_kwargs, runner, batch)
    _assert_same(actual, expected)
    assert len(spy) == 1 and spy[0] is batch.replace_positions
    assert CALLS[-1] is not batch  # SGLang's own method built the kwargs from the view without overrides


def test_overrides_under_no_grad(fake_sglang, spy):
    """Under torch.no_grad (the embedding weight requires grad, its output does not) the fast path runs too."""
    _, runner_class = fake_sglang
    runner = _runner(runner_class)
    embeds, positions = torch.randn(3, WIDTH, generator=_gen(1)), torch.tensor([2, 8, 5])
    with torch.no_grad():
        expected = _outcome(sglang_extend_forward_kwargs, runner, _batch(embeds, positions))
        mm_sglang.enable()
        actual = _outcome(runner_class._extend_forward_kwargs, runner, _batch(embeds, positions))
    _assert_same(actual, expected)
    assert len(spy) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overrides_device_positions_no_sync(fake_sglang, spy):
    """With SGLang's positions on the device (as prepare_for_extend sends them), the replacement does not sync."""
    _, runner_class = fake_sglang
    runner = _runner(runner_class, "cuda")
    embeds, positions = torch.randn(3, WIDTH, generator=_gen(1)), torch.tensor([2, 8, 5])
    with torch.inference_mode():
        expected = _outcome(sglang_extend_forward_kwargs, runner, _batch(embeds, positions, device="cuda"))
        mm_sglang.enable()
        _outcome(runner_class._extend_forward_kwargs, runner, _batch(embeds, positions, device="cuda"))  # compile
        batch = _batch(embeds, positions, device="cuda")
        with raise_if_cuda_sync():
            kwargs = runner_class._extend_forward_kwargs(runner, batch, "pp")
    assert torch.equal(kwargs["input_embeds"], expected[0]["input_embeds"])
    assert len(spy) == 2


# ====================================================================== every other input: SGLang's method


def _mask_positions():
    return torch.tensor([True, False, True] + [False] * (N - 3))


# (name, replace_embeds, replace_positions, input_embeds dtype, whether indexed_row_scatter_ is tried first)
OTHER_INPUTS = [
    ("no overrides", None, None, None, False),
    ("embeds without positions", torch.ones(2, WIDTH), None, None, False),
    ("float64 embeds", torch.ones(2, WIDTH, dtype=torch.float64), torch.tensor([3, 1]), None, False),
    ("int64 embeds", torch.ones(2, WIDTH, dtype=torch.int64), torch.tensor([3, 1]), None, False),
    ("bool positions (a mask)", torch.ones(2, WIDTH), _mask_positions(), None, False),
    ("2-D positions", torch.ones(2, WIDTH), torch.tensor([[3], [1]]), None, False),
    ("one row for three positions", torch.ones(1, WIDTH), torch.tensor([3, 1, 6]), None, False),
    ("more rows than positions", torch.ones(3, WIDTH), torch.tensor([3, 1]), None, False),
    ("wrong width", torch.ones(2, WIDTH + 1), torch.tensor([3, 1]), None, False),
    ("repeated CPU position", torch.arange(2 * WIDTH, dtype=torch.float32).view(2, WIDTH), torch.tensor([3, 3]),
     torch.bfloat16, True),
    ("CPU position past the end", torch.ones(2, WIDTH), torch.tensor([3, N]), torch.bfloat16, True),
    ("negative CPU position (SGLang wraps it)", torch.ones(2, WIDTH), torch.tensor([3, -1]), torch.bfloat16, True),
]


@pytest.mark.parametrize("name, embeds, positions, input_embeds, tried", OTHER_INPUTS, ids=[c[0] for c in OTHER_INPUTS])
def test_other_inputs_go_to_sglang(fake_sglang, spy, name, embeds, positions, input_embeds, tried):
    """Inputs off the fast path, and those indexed_row_scatter_ refuses before writing (CPU positions out of
    range or repeated), get SGLang's own method on the unchanged forward_batch: its kwargs or its error (type and
    text), and forward_batch.input_embeds as it leaves it."""
    _, runner_class = fake_sglang
    runner = _runner(runner_class)
    base = None if input_embeds is None else torch.randn(N, WIDTH, generator=_gen(2)).to(input_embeds)
    with torch.inference_mode():
        expected = _outcome(sglang_extend_forward_kwargs, runner, _batch(embeds, positions, base))
        mm_sglang.enable()
        batch = _batch(embeds, positions, base)
        actual = _outcome(runner_class._extend_forward_kwargs, runner, batch)
    _assert_same(actual, expected)
    assert CALLS[-1] is batch
    assert len(spy) == int(tried)


# ================================================================ the multimodal merge: no poison row list


def test_scatter_has_no_discard_slot(fake_sglang, monkeypatch):
    """SGLang's ``_scatter_mm_embedding`` builds M + 1 row slots filled with N and sends every false row to slot M,
    so exactly one placeholder too many lands in that slot and stays unwritten without a word. The replacement's
    fast path takes the mask itself (no row list, SGLang's function not called): it writes nothing and raises."""
    mm_utils, _ = fake_sglang
    mask = torch.zeros(8, 1, dtype=torch.bool)
    mask[[1, 4, 6]] = True  # 3 placeholders
    src = torch.randn(2, 4, generator=_gen(1))  # 2 rows
    control = torch.zeros(8, 4)
    sglang_scatter_mm_embedding(dest=control, mask=mask, src=src)  # no error: row 6 left as it was
    assert torch.equal(control[[1, 4]], src) and not control[6].any()

    engine_calls = []
    monkeypatch.setattr(mm_utils, "_scatter_mm_embedding", lambda *args, **kw: engine_calls.append((args, kw)))
    mm_sglang.enable()
    dest = torch.zeros(8, 4)
    with pytest.raises(mm_sglang.ScatterCountError, match="3 placeholders"):
        mm_utils._scatter_mm_embedding(dest=dest, mask=mask, src=src)
    assert not dest.any() and engine_calls == []
