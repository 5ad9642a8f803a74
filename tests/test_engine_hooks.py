"""The vLLM and SGLang hooks (mmmerge_triton.integrations.vllm / .sglang), against stand-in engines.

CI has neither engine, so each test builds the engine's module tree in ``sys.modules`` (``types.ModuleType``,
restored by monkeypatch) around a stand-in of the engine's merge function, written after vLLM 0.33's
``_merge_multimodal_embeddings`` (in place, flatten/cat, index_put, its ValueError texts and chaining) and
SGLang 0.5.23's ``_scatter_mm_embedding`` (cumsum ranks, index_copy_). The tests prove that ``enable()``
replaces every binding and ``disable()`` restores it, that the replacement gives the stand-in's results bit
for bit on the engines' own test cases, hands every input off its fast path to the engine's function (the
same result or error), and vLLM's plugin entry point. The same checks against the real engines are in
tests/engines/ (they skip here).
"""
from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest
import torch

from mmmerge_triton.integrations import sglang as mm_sglang
from mmmerge_triton.integrations import vllm as mm_vllm

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _install(monkeypatch, name: str, **attrs) -> types.ModuleType:
    """A fresh module ``name`` in sys.modules (and as an attribute of its parent), undone by monkeypatch."""
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    parent, _, child = name.rpartition(".")
    if parent:
        monkeypatch.setattr(sys.modules[parent], child, module, raising=False)
    return module


# ================================================================================================ vLLM stand-in


def vllm_flatten_embeddings(embeddings):
    if isinstance(embeddings, torch.Tensor):
        return embeddings.flatten(0, -2)
    return torch.cat(tuple(vllm_flatten_embeddings(t) for t in embeddings))


def vllm_embedding_count_expression(embeddings) -> str:
    if isinstance(embeddings, torch.Tensor):
        return " x ".join(str(d) for d in embeddings.shape[:-1])
    return " + ".join(vllm_embedding_count_expression(inner) for inner in embeddings)


def vllm_merge_multimodal_embeddings(inputs_embeds, multimodal_embeddings, is_multimodal):
    """vLLM 0.33.0's ``_merge_multimodal_embeddings`` (model_executor/models/utils.py:717), per the notes."""
    if len(multimodal_embeddings) == 0:
        return inputs_embeds
    mm_embeds_flat = vllm_flatten_embeddings(multimodal_embeddings)
    input_dtype = inputs_embeds.dtype
    try:
        # If is_multimodal is on CPU this avoids a D2H sync
        inputs_embeds[is_multimodal] = mm_embeds_flat.to(dtype=input_dtype)
    except RuntimeError as e:
        num_actual_tokens = len(mm_embeds_flat)
        num_expected_tokens = is_multimodal.sum().item()
        if num_actual_tokens != num_expected_tokens:
            expr = vllm_embedding_count_expression(multimodal_embeddings)
            raise ValueError(
                f"Attempted to assign {expr} = {num_actual_tokens} "
                f"multimodal tokens to {num_expected_tokens} placeholders"
            ) from e
        raise ValueError("Error during index put operation") from e
    return inputs_embeds


# A model file as vLLM's qwen3_vl.py and llava_onevision2.py are: the function bound at import time, under its
# own name and under an alias, called with keywords and positionally (with a mask on the device).
FAKE_VLM_SOURCE = '''
from vllm.model_executor.models.utils import _merge_multimodal_embeddings
from vllm.model_executor.models.utils import _merge_multimodal_embeddings as merge_multimodal_embeddings


def embed_input_ids(inputs_embeds, multimodal_embeddings, is_multimodal):
    return _merge_multimodal_embeddings(inputs_embeds=inputs_embeds, multimodal_embeddings=multimodal_embeddings,
                                        is_multimodal=is_multimodal)


def embed_by_token(inputs_embeds, multimodal_embeddings, input_ids, image_token_id):
    return merge_multimodal_embeddings(inputs_embeds, multimodal_embeddings, input_ids == image_token_id)
'''


@pytest.fixture
def fake_vllm(monkeypatch):
    """vllm.model_executor.models.utils holding the stand-in, and the model module fake_vlm that imported it;
    yields (utils, fake_vlm). The hook is disabled, then sys.modules restored, afterwards."""
    monkeypatch.delenv(mm_vllm.ENV_SWITCH, raising=False)
    monkeypatch.setattr(mm_vllm, "_engine", [])  # the hook's memory of the engine, per test
    monkeypatch.setattr(mm_vllm, "_installed", [])
    _install(monkeypatch, "vllm")
    _install(monkeypatch, "vllm.model_executor")
    _install(monkeypatch, "vllm.model_executor.models")
    utils = _install(monkeypatch, "vllm.model_executor.models.utils",
                     _merge_multimodal_embeddings=vllm_merge_multimodal_embeddings,
                     _flatten_embeddings=vllm_flatten_embeddings,
                     _embedding_count_expression=vllm_embedding_count_expression)
    fake_vlm = _install(monkeypatch, "vllm.model_executor.models.fake_vlm")
    exec(compile(FAKE_VLM_SOURCE, "<vllm fake_vlm>", "exec"), fake_vlm.__dict__)
    yield utils, fake_vlm
    mm_vllm.disable()


def _bindings(utils, fake_vlm) -> list:
    return [utils._merge_multimodal_embeddings, fake_vlm._merge_multimodal_embeddings,
            fake_vlm.merge_multimodal_embeddings]


def test_vllm_enable_replaces_every_binding(fake_vllm):
    """enable() rebinds the utils attribute and every import-time binding (its own name and an alias), returns
    how many it replaced, and is idempotent (vLLM loads plugins in several processes, maybe more than once);
    disable() restores vLLM's function everywhere."""
    utils, fake_vlm = fake_vllm
    assert mm_vllm.enable() == 3
    assert all(f is mm_vllm._merge_multimodal_embeddings for f in _bindings(utils, fake_vlm))
    assert mm_vllm.enable() == 0
    mm_vllm.disable()
    assert all(f is vllm_merge_multimodal_embeddings for f in _bindings(utils, fake_vlm))
    mm_vllm.disable()
    assert all(f is vllm_merge_multimodal_embeddings for f in _bindings(utils, fake_vlm))


def _vllm_no_sync_case(device):
    """vLLM's test_merge_multimodal_embeddings_no_sync inputs (tests/models/test_utils.py)."""
    inputs_embeds = torch.zeros([5, 10], dtype=torch.bfloat16, device=device)
    multimodal_embeddings = [torch.ones([3, 10], dtype=torch.bfloat16, device=device)]
    is_multimodal = torch.tensor([True, False, True, True, False], device="cpu")
    return inputs_embeds, multimodal_embeddings, is_multimodal


class raise_if_cuda_sync:
    """vLLM's helper: any host-device sync inside raises (no-op without CUDA)."""

    def __enter__(self):
        if torch.cuda.is_available():
            self.previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(self.previous)


@pytest.mark.parametrize("binding", ["utils attribute", "import-time binding", "alias"])
@pytest.mark.parametrize("device", DEVICES)
def test_vllm_own_test_case(fake_vllm, device, binding):
    """vLLM's no-sync test case, called positionally through each binding after enable(): in place, returns
    inputs_embeds, the stand-in's result bit for bit, and (on CUDA) no host-device sync."""
    utils, fake_vlm = fake_vllm
    inputs_embeds, multimodal_embeddings, is_multimodal = _vllm_no_sync_case(device)
    expected = vllm_merge_multimodal_embeddings(inputs_embeds.clone(), multimodal_embeddings, is_multimodal)
    mm_vllm.enable()
    merge = {"utils attribute": utils._merge_multimodal_embeddings,
             "import-time binding": fake_vlm._merge_multimodal_embeddings,
             "alias": fake_vlm.merge_multimodal_embeddings}[binding]
    with raise_if_cuda_sync():
        out = merge(inputs_embeds, multimodal_embeddings, is_multimodal)
    assert out is inputs_embeds
    assert torch.equal(out, expected) and out.dtype == expected.dtype


@pytest.mark.parametrize("device", DEVICES)
def test_vllm_call_sites(fake_vllm, device):
    """The model module's call sites reach the replacement: keywords through the import-time name, and
    positionally through the alias with a mask on the device (llava_onevision2's call); deepstack's strided
    column-slice sources into a zero buffer. Each gives the stand-in's result bit for bit."""
    _, fake_vlm = fake_vllm
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.tensor([1, 9, 9, 2, 9, 3, 9, 9]).to(device)
    embeds = torch.randn(8, 16, generator=gen).to(device, torch.bfloat16)
    items = [torch.randn(2, 16, generator=gen).to(device), torch.randn(3, 16, generator=gen).to(device)]
    wide = torch.randn(5, 3 * 16, generator=gen).to(device)  # [main | level 0 | level 1] per token
    main, multiscale = torch.split(wide, [16, 2 * 16], dim=-1)  # strided column slices, as vLLM's deepstack
    mask = (input_ids == 9).cpu()

    expected = vllm_merge_multimodal_embeddings(embeds.clone(), items, mask)
    expected_by_token = vllm_merge_multimodal_embeddings(embeds.clone(), [main], input_ids == 9)
    expected_deepstack = vllm_merge_multimodal_embeddings(embeds.new_zeros(8, 32), [multiscale], mask)

    mm_vllm.enable()
    assert fake_vlm._merge_multimodal_embeddings is mm_vllm._merge_multimodal_embeddings
    assert torch.equal(fake_vlm.embed_input_ids(embeds.clone(), items, mask), expected)
    assert torch.equal(fake_vlm.embed_by_token(embeds.clone(), [main], input_ids, 9), expected_by_token)
    assert torch.equal(fake_vlm.embed_input_ids(embeds.new_zeros(8, 32), [multiscale], mask), expected_deepstack)


# (multimodal_embeddings as shapes, mask true count, vLLM's message)
VLLM_MISMATCHES = [
    pytest.param([(2, 10)], 3, "Attempted to assign 2 = 2 multimodal tokens to 3 placeholders", id="fewer rows"),
    pytest.param([(3, 10)], 2, "Attempted to assign 3 = 3 multimodal tokens to 2 placeholders", id="more rows"),
    pytest.param([(2, 10), (2, 10)], 3, "Attempted to assign 2 + 2 = 4 multimodal tokens to 3 placeholders",
                 id="two items"),
    pytest.param((2, 2, 10), 3, "Attempted to assign 2 x 2 = 4 multimodal tokens to 3 placeholders", id="3-D tensor"),
    pytest.param([[(1, 10), (2, 10)], (2, 3, 10)], 4,
                 "Attempted to assign 1 + 2 + 2 x 3 = 9 multimodal tokens to 4 placeholders", id="nested"),
]


def _embeddings(shapes, device):
    if isinstance(shapes, tuple):
        return torch.ones(shapes, dtype=torch.bfloat16, device=device)
    return [_embeddings(s, device) for s in shapes]


@pytest.mark.parametrize("shapes, n_true, message", VLLM_MISMATCHES)
@pytest.mark.parametrize("device", DEVICES)
def test_vllm_mismatch_error_text(fake_vllm, device, shapes, n_true, message):
    """A count mismatch raises ValueError with vLLM's exact text (its count expression included) from the
    index error, as the stand-in does (the replacement hands it to the engine's function), and leaves
    inputs_embeds unchanged."""
    utils, _ = fake_vllm
    inputs_embeds = torch.zeros(6, 10, dtype=torch.bfloat16, device=device)
    is_multimodal = torch.arange(6) < n_true
    multimodal_embeddings = _embeddings(shapes, device)
    with pytest.raises(ValueError) as stock:
        vllm_merge_multimodal_embeddings(inputs_embeds, multimodal_embeddings, is_multimodal)
    assert str(stock.value) == message
    mm_vllm.enable()
    with pytest.raises(ValueError) as ours:
        utils._merge_multimodal_embeddings(inputs_embeds, multimodal_embeddings, is_multimodal)
    assert str(ours.value) == message
    assert type(ours.value.__cause__) is type(stock.value.__cause__) is RuntimeError
    assert not inputs_embeds.any()


def test_vllm_one_row_broadcast_is_vllms(fake_vllm):
    """One source row for several placeholders, which vLLM's index_put broadcasts: the replacement's count
    check refuses it before writing, then hands it to vLLM's function, which broadcasts it as before. An empty
    list is a no-op in both."""
    utils, _ = fake_vllm
    is_multimodal = torch.tensor([True, False, True, True, False])
    expected = vllm_merge_multimodal_embeddings(torch.zeros(5, 10), [torch.ones(1, 10)], is_multimodal)
    assert expected.sum() == 30
    mm_vllm.enable()
    inputs_embeds = torch.zeros(5, 10)
    assert utils._merge_multimodal_embeddings(inputs_embeds, [torch.ones(1, 10)], is_multimodal) is inputs_embeds
    assert torch.equal(inputs_embeds, expected)
    assert utils._merge_multimodal_embeddings(inputs_embeds, [], is_multimodal) is inputs_embeds


def _outcome(fn, *args):
    """(the first argument afterwards, and the error's type, text, cause type) of one call."""
    try:
        fn(*args)
        error = None
    except Exception as e:  # noqa: BLE001 - compared, type included
        error = (type(e), str(e), type(e.__cause__))
    return args[0], error


_MASK5 = torch.tensor([True, False, True, True, False])

# The table (inputs vLLM handles its own way): (name, inputs_embeds, multimodal_embeddings, is_multimodal)
VLLM_ENGINE_INPUTS = [
    ("count mismatch", torch.zeros(5, 4), [torch.ones(2, 4)], _MASK5),
    ("equal counts, wrong hidden size", torch.zeros(5, 4), [torch.ones(3, 5)], _MASK5),
    ("[0, H] tensor with placeholders", torch.zeros(5, 4), torch.ones(0, 4), _MASK5),
    ("float64 destination", torch.zeros(5, 4, dtype=torch.float64), [torch.ones(3, 4)], _MASK5),
    ("float64 source", torch.zeros(5, 4), [torch.ones(3, 4, dtype=torch.float64)], _MASK5),
    ("uint8 mask", torch.zeros(5, 4), [torch.ones(3, 4)], _MASK5.to(torch.uint8)),
    ("int64 index tensor as the mask", torch.zeros(5, 4), [torch.ones(3, 4)], _MASK5.nonzero().squeeze(1)),
    ("mask shorter than the destination", torch.zeros(5, 4), [torch.ones(3, 4)], _MASK5[:4]),
    ("1-D item", torch.zeros(5, 4), [torch.ones(4)], _MASK5),
    ("nested empty list", torch.zeros(5, 4), [[]], _MASK5),
    ("leaf that requires grad", torch.zeros(5, 4, requires_grad=True), [torch.ones(3, 4)], _MASK5),
]


@pytest.mark.parametrize("name, inputs_embeds, multimodal_embeddings, is_multimodal", VLLM_ENGINE_INPUTS,
                         ids=[case[0] for case in VLLM_ENGINE_INPUTS])
def test_vllm_hands_other_inputs_to_vllm(fake_vllm, name, inputs_embeds, multimodal_embeddings, is_multimodal):
    """Inputs off the fast path go to vLLM's function unchanged: the stand-in's result, or its exception type,
    text and cause (ValueError from the RuntimeError, "Error during index put operation", IndexError), never
    this package's own error."""
    utils, _ = fake_vllm

    def fresh():
        return inputs_embeds.detach().clone().requires_grad_(inputs_embeds.requires_grad)

    expected = _outcome(vllm_merge_multimodal_embeddings, fresh(), multimodal_embeddings, is_multimodal)
    mm_vllm.enable()
    actual = _outcome(utils._merge_multimodal_embeddings, fresh(), multimodal_embeddings, is_multimodal)
    assert actual[1] == expected[1]
    assert torch.equal(actual[0].detach(), expected[0].detach()) and actual[0].dtype == expected[0].dtype
    # The route: off the fast path, or on it and refused by the merge's checks (before writing).
    if mm_vllm.on_fast_path(inputs_embeds, multimodal_embeddings, is_multimodal):
        assert name in ("count mismatch", "equal counts, wrong hidden size", "1-D item")
        with pytest.raises((TypeError, ValueError)):
            mm_vllm.merge_multimodal_embeddings(fresh(), multimodal_embeddings, is_multimodal)


def test_vllm_fast_path_predicate():
    """on_fast_path takes what vLLM's model runner passes (bf16/fp16/fp32, a bool CPU mask, items in lists)."""
    dst = torch.zeros(5, 4, dtype=torch.bfloat16)
    assert mm_vllm.on_fast_path(dst, [torch.ones(3, 4)], _MASK5)
    assert mm_vllm.on_fast_path(dst, torch.ones(3, 4, dtype=torch.float16), _MASK5)
    assert mm_vllm.on_fast_path(dst, [[torch.ones(1, 4)], (torch.ones(2, 1, 4),)], _MASK5)
    assert not mm_vllm.on_fast_path(dst, [dst[:3]], _MASK5)  # aliasing: vLLM's function decides
    assert not mm_vllm.on_fast_path(dst.t(), [torch.ones(3, 5)], torch.ones(4, dtype=torch.bool))


def test_vllm_reference_survives_disable(fake_vllm):
    """A reference to the replacement taken while enabled still reaches vLLM's function after disable()."""
    utils, _ = fake_vllm
    mm_vllm.enable()
    merge = utils._merge_multimodal_embeddings
    mm_vllm.disable()
    inputs_embeds = torch.zeros(5, 4, dtype=torch.float64)  # off the fast path: vLLM's function runs
    merge(inputs_embeds, [torch.ones(3, 4)], _MASK5)
    assert inputs_embeds.sum() == 12


@pytest.mark.parametrize("hook, engine", [(mm_vllm, "vllm"), (mm_sglang, "sglang")])
def test_enable_without_the_engine(monkeypatch, hook, engine):
    """Without the engine, enable() says so in one line, naming it (not a bare ModuleNotFoundError)."""
    monkeypatch.setitem(sys.modules, engine, None)  # importing the engine fails as if it were absent
    monkeypatch.setitem(sys.modules, hook.TARGET_MODULE, None)  # (also where it is installed and imported)
    with pytest.raises(ModuleNotFoundError, match=rf"^mmmerge_triton\.integrations\.{engine} needs ") as raised:
        hook.enable()
    assert "\n" not in str(raised.value)


def test_vllm_entry_point():
    """The installed package declares the vLLM general plugin ``mmmerge_triton`` ->
    ``mmmerge_triton.integrations.vllm:register`` (what vLLM's load_general_plugins calls)."""
    points = [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins") if ep.name == "mmmerge_triton"]
    assert len(points) == 1
    assert points[0].value == "mmmerge_triton.integrations.vllm:register"
    assert points[0].load() is mm_vllm.register


@pytest.mark.parametrize("value, on", [(None, False), ("0", False), ("true", False), ("1", True)])
def test_vllm_register_needs_env_switch(fake_vllm, monkeypatch, value, on):
    """register() (called by vLLM in every process, with no arguments) enables the hook only when
    MMMERGE_TRITON_VLLM=1, and may be called again."""
    utils, fake_vlm = fake_vllm
    if value is not None:
        monkeypatch.setenv("MMMERGE_TRITON_VLLM", value)
    mm_vllm.register()
    mm_vllm.register()
    expected = mm_vllm._merge_multimodal_embeddings if on else vllm_merge_multimodal_embeddings
    assert all(f is expected for f in _bindings(utils, fake_vlm))


# ============================================================================================== SGLang stand-in


def sglang_scatter_mm_embedding(dest: torch.Tensor, mask: torch.Tensor, src: torch.Tensor) -> None:
    """SGLang 0.5.23's ``_scatter_mm_embedding`` (srt/managers/mm_utils.py:429), per the notes."""
    # mask: [num_tokens, 1] bool; src: [num_mm_tokens, width] in sequence order.
    src = src.to(dest.device, dest.dtype)
    num_src_rows = src.size(0)
    flat_mask = mask.view(-1)
    ranks = torch.cumsum(flat_mask, dim=0) - 1
    ranks = ranks.masked_fill(~flat_mask, num_src_rows)  # False rows -> discard slot
    rows = torch.full((num_src_rows + 1,), dest.size(0), dtype=torch.long, device=dest.device)  # poison init
    rows.scatter_(0, ranks, torch.arange(flat_mask.numel(), device=dest.device))
    dest.index_copy_(0, rows[:num_src_rows], src)


@pytest.fixture
def fake_sglang(monkeypatch):
    """sglang.srt.managers.mm_utils holding the stand-in; yields that module. The hook is disabled, then
    sys.modules restored, afterwards."""
    monkeypatch.setattr(mm_sglang, "_engine", [])
    monkeypatch.setattr(mm_sglang, "_installed", [])
    _install(monkeypatch, "sglang")
    _install(monkeypatch, "sglang.srt")
    _install(monkeypatch, "sglang.srt.managers")
    mm_utils = _install(monkeypatch, "sglang.srt.managers.mm_utils", _scatter_mm_embedding=sglang_scatter_mm_embedding)
    yield mm_utils
    mm_sglang.disable()


def test_sglang_enable_disable(fake_sglang):
    """enable() sets the module attribute that SGLang looks up at each call (idempotent); disable() puts the
    original back."""
    mm_sglang.enable()
    assert fake_sglang._scatter_mm_embedding is mm_sglang._scatter_mm_embedding
    mm_sglang.enable()
    mm_sglang.disable()
    assert fake_sglang._scatter_mm_embedding is sglang_scatter_mm_embedding
    mm_sglang.disable()
    assert fake_sglang._scatter_mm_embedding is sglang_scatter_mm_embedding


NUM_TOKENS = 64


def _make_mask(pattern: str) -> torch.Tensor:
    """SGLang's test masks, [64, 1] bool."""
    mask = torch.zeros(NUM_TOKENS, dtype=torch.bool)
    if pattern == "interleaved":
        mask[::3] = True
    elif pattern == "blocks":
        mask[5:20] = True
        mask[40:41] = True
    elif pattern == "all_true":
        mask[:] = True
    elif pattern != "all_false":
        raise ValueError(pattern)
    return mask.unsqueeze(-1)


@pytest.mark.parametrize("width", [8, 24])
@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mask_pattern", ["interleaved", "blocks", "all_true", "all_false"])
@pytest.mark.parametrize("device", DEVICES)
def test_sglang_scatter_matches_masked_scatter_bitwise(fake_sglang, device, width, src_dtype, mask_pattern):
    """SGLang's test_scatter_matches_masked_scatter_bitwise through the module attribute after enable(): a bf16
    dest, src in bf16 or fp32 (cast as ``.to()`` rounds), bit-identical to masked_scatter_. The mask is on
    dest's device, as SGLang's is. The stand-in passes the same test."""
    torch.manual_seed(0)
    mask = _make_mask(mask_pattern).to(device)
    dest = torch.randn(NUM_TOKENS, width).to(device, torch.bfloat16)
    src = torch.randn(int(mask.sum()), width, dtype=src_dtype).to(device)
    expected = dest.clone()
    expected.masked_scatter_(mask.expand_as(expected), src.to(expected.dtype))

    control = dest.clone()
    sglang_scatter_mm_embedding(dest=control, mask=mask, src=src)
    assert torch.equal(control, expected)

    mm_sglang.enable()
    actual = dest.clone()
    assert fake_sglang._scatter_mm_embedding(dest=actual, mask=mask, src=src) is None
    assert torch.equal(actual, expected)


@CUDA
def test_sglang_no_sync(fake_sglang):
    """On CUDA, with SGLang's mask on the device, the replacement does not sync the host."""
    mask = _make_mask("blocks").cuda()
    dest = torch.zeros(NUM_TOKENS, 24, dtype=torch.bfloat16, device="cuda")
    src = torch.randn(16, 24, device="cuda")
    expected = dest.clone().masked_scatter_(mask.expand_as(dest), src.to(dest.dtype))
    mm_sglang.enable()
    fake_sglang._scatter_mm_embedding(dest=dest, mask=mask, src=src)  # compile outside the check
    dest.zero_()
    with raise_if_cuda_sync():
        fake_sglang._scatter_mm_embedding(dest=dest, mask=mask, src=src)
    assert torch.equal(dest, expected)


def test_sglang_row_count_mismatch_fails_loud(fake_sglang):
    """SGLang's test_scatter_row_count_mismatch_fails_loud (a CPU test; on CUDA neither SGLang's recipe nor a
    device mask can report a mismatch without a sync): both directions raise, the replacement's error is both
    a RuntimeError and an IndexError (the two types SGLang's function raises), and dest is left unchanged."""
    src_short_mask = _make_mask("all_false")[:8]
    src_short_mask[1] = True  # 1 true
    mask_heavy = src_short_mask.clone()
    mask_heavy[2:6] = True  # 5 trues
    cases = [(src_short_mask, torch.ones(3, 4)), (mask_heavy, torch.ones(1, 4))]  # src > mask, mask > src
    for mask, src in cases:
        with pytest.raises((RuntimeError, IndexError)):
            sglang_scatter_mm_embedding(dest=torch.zeros(8, 4), mask=mask, src=src)
    mm_sglang.enable()
    for mask, src in cases:
        dest = torch.zeros(8, 4)
        with pytest.raises(mm_sglang.ScatterCountError) as raised:
            fake_sglang._scatter_mm_embedding(dest=dest, mask=mask, src=src)
        assert isinstance(raised.value, RuntimeError) and isinstance(raised.value, IndexError)
        assert not dest.any()


# Inputs SGLang's function takes (or refuses) its own way: (name, dest, mask, src)
SGLANG_ENGINE_INPUTS = [
    ("float64 dest", torch.zeros(8, 4, dtype=torch.float64), _make_mask("blocks")[:8], torch.ones(3, 4)),
    ("float64 src", torch.zeros(8, 4), _make_mask("blocks")[:8], torch.ones(3, 4, dtype=torch.float64)),
    ("int64 dest", torch.zeros(8, 4, dtype=torch.int64), _make_mask("blocks")[:8], torch.ones(3, 4)),
    ("uint8 mask", torch.zeros(8, 4), _make_mask("blocks")[:8].to(torch.uint8), torch.ones(3, 4)),
    ("wrong width", torch.zeros(8, 4), _make_mask("blocks")[:8], torch.ones(3, 5)),
]


@pytest.mark.parametrize("name, dest, mask, src", SGLANG_ENGINE_INPUTS, ids=[c[0] for c in SGLANG_ENGINE_INPUTS])
def test_sglang_hands_other_inputs_to_sglang(fake_sglang, name, dest, mask, src):
    """Issue 13: the dtypes SGLang's function accepts (float64, integer dest) work through the replacement,
    bit for bit; what it refuses (uint8 mask, wrong width) raises its own error."""
    expected = _outcome(sglang_scatter_mm_embedding, dest.clone(), mask, src)
    mm_sglang.enable()
    actual = _outcome(fake_sglang._scatter_mm_embedding, dest.clone(), mask, src)
    assert actual[1] == expected[1]
    assert torch.equal(actual[0], expected[0]) and actual[0].dtype == expected[0].dtype
    assert not mm_sglang.on_fast_path(dest, mask, src)
