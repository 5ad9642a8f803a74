"""The vLLM and SGLang hooks (mmmerge_triton.integrations.vllm / .sglang), against stand-in engines.

Neither engine can be installed here, so each test builds the engine's module tree in ``sys.modules``
(``types.ModuleType``, restored by monkeypatch) around a stand-in of the engine's merge function, written
after notes/integrations.md: vLLM 0.33's ``_merge_multimodal_embeddings`` (in place, flatten/cat, index_put,
its ValueError texts) and SGLang 0.5.23's ``_scatter_mm_embedding`` (cumsum ranks, index_copy_). The tests
prove that ``enable()`` replaces every binding and ``disable()`` restores it, that the replacement gives the
stand-in's results bit for bit on the engines' own test cases, with the same errors, and vLLM's plugin
entry point.
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
    """A count mismatch raises ValueError with vLLM's exact text (its count expression included), the same as
    the stand-in's, and leaves inputs_embeds unchanged."""
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
    assert not inputs_embeds.any()


def test_vllm_documented_differences(fake_vllm):
    """Where the replacement deliberately differs (its docstring): one source row for several placeholders,
    which vLLM's index_put broadcasts silently, raises the count error instead. An empty list is a no-op in
    both."""
    utils, _ = fake_vllm
    inputs_embeds = torch.zeros(5, 10)
    is_multimodal = torch.tensor([True, False, True, True, False])
    assert vllm_merge_multimodal_embeddings(inputs_embeds.clone(), [torch.ones(1, 10)], is_multimodal).sum() == 30
    mm_vllm.enable()
    with pytest.raises(ValueError, match=r"^Attempted to assign 1 = 1 multimodal tokens to 3 placeholders$"):
        utils._merge_multimodal_embeddings(inputs_embeds, [torch.ones(1, 10)], is_multimodal)
    assert utils._merge_multimodal_embeddings(inputs_embeds, [], is_multimodal) is inputs_embeds
    assert not inputs_embeds.any()


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
    device mask can report a mismatch without a sync): both directions raise an error that SGLang's
    ``except (RuntimeError, IndexError)`` catches, and dest is left unchanged. The stand-in raises too."""
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
        with pytest.raises((RuntimeError, IndexError)):
            fake_sglang._scatter_mm_embedding(dest=dest, mask=mask, src=src)
        assert not dest.any()
