"""The SGLang hook inside the real SGLang (0.5.23; bench/engines/make_engine_env.sh builds the environment).

Skipped where SGLang does not import (CI). Every input is given both to SGLang's own ``_scatter_mm_embedding``
and to the replacement: the same result bits, or the same exception, and a spy proves the route (this
package's row scatter on the fast path, SGLang's function for the dtypes and shapes it handles its own way).
A count mismatch is where the two differ on purpose: the replacement writes nothing and raises an error of
both types SGLang's function raises. Then the hook inside SGLang's code: ``embed_mm_inputs`` with precomputed
image embeddings, with and without deepstack (split by SGLang's Qwen3-VL ``separate_deepstack_embeds``).

sgl_kernel: with CUDA visible SGLang imports its compiled kernels (``sgl_kernel``) at module level on the
import path of mm_utils. Where no sgl_kernel is installed (the CPU engine venv; the bundle run on the GPU
machine: the wheel is built for another torch), conftest.py appends tests/engines/stubs to sys.path: a stand-in
exposing only the names those imports ask for, each raising if called (stubs/sgl_kernel/__init__.py lists
them). That is the only thing replaced: ``_scatter_mm_embedding``, ``embed_mm_inputs`` and
``separate_deepstack_embeds`` are SGLang's own, plain torch, and call no sgl_kernel function (a call would raise
and fail the test); the ``cuda`` cases run them on CUDA tensors. SGLang's guarded imports (other names, other
submodules) still fail and fall back.
"""
from __future__ import annotations

import ast
import pathlib
import types

import pytest
import torch

mm_utils = pytest.importorskip("sglang.srt.managers.mm_utils", reason="needs SGLang (make_engine_env.sh)")

import sglang  # noqa: E402
from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem, MultimodalInputs  # noqa: E402

from engine_helpers import DEVICES, assert_bits_equal, assert_same_outcome, outcome, route_spies  # noqa: E402
from mmmerge_triton.integrations import sglang as mm_sglang  # noqa: E402

ENGINE = mm_utils._scatter_mm_embedding
assert ENGINE is not mm_sglang._scatter_mm_embedding, "the hook was enabled before the tests started"
BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@pytest.fixture(autouse=True)
def spies(monkeypatch):
    """Spies on the two routes of the hook: (this package's row scatter, SGLang's function). The hook is
    disabled afterwards."""
    yield route_spies(monkeypatch, mm_sglang, "masked_row_scatter_", ENGINE)
    mm_sglang.disable()
    assert mm_utils._scatter_mm_embedding is ENGINE


def _randn(*shape, dtype=F32, device="cpu", seed=0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 300).to(device, dtype)


def _mask(device="cpu", n=8) -> torch.Tensor:
    """SGLang's layout, [N, 1] bool on dest's device: 5 placeholders of 8."""
    return (torch.arange(n) % 3 != 1).to(device)[:, None]


def _case(name, device):
    """(dest, mask, src, route) of one named input, built anew (seeded) at each call."""
    dest = _randn(8, 16, dtype=BF16, device=device, seed=1)
    mask = _mask(device)
    rows = lambda m, w=16, dtype=F32: _randn(m, w, dtype=dtype, device=device, seed=2)  # noqa: E731
    cases = {
        # SGLang's function decides.
        "float64 dest": (dest.to(F64), mask, rows(5), "engine"),
        "float64 src": (dest, mask, rows(5, dtype=F64), "engine"),
        "int64 dest": (dest.to(torch.int64), mask, rows(5), "engine"),
        "uint8 mask": (dest, mask.to(torch.uint8), rows(5), "engine"),
        "equal counts, wrong width": (dest, mask, rows(5, w=15), "engine"),
        "mask shorter than dest": (dest, mask[:7], rows(5), "engine"),  # SGLang writes by the mask's rows
        "mask [1, N]": (dest, mask.view(1, 8), rows(5), "engine"),
        "1-D src": (dest, mask, rows(5)[:, 0].contiguous(), "engine"),
        "3-D dest": (dest.view(8, 4, 4), mask, rows(5).view(5, 4, 4), "engine"),
        "mask on the meta device": (dest, torch.ones(8, 1, dtype=torch.bool, device="meta"), rows(8), "engine"),
        "expanded dest": (dest[:1].expand(8, 16), mask, rows(5), "engine"),
        # The fast path.
        "bf16 src into bf16": (dest, mask, rows(5, dtype=BF16), "ours"),
        "fp32 src into bf16": (dest, mask, rows(5), "ours"),
        "fp16 src into bf16": (dest, mask, rows(5, dtype=F16), "ours"),
        "fp32 src into fp16": (dest.to(F16), mask, rows(5), "ours"),
        "bf16 src into fp32": (dest.float(), mask, rows(5, dtype=BF16), "ours"),
        "mask [N]": (dest, mask[:, 0], rows(5), "ours"),
        "src on the CPU": (dest, mask, _randn(5, 16, seed=3), "ours"),  # SGLang moves it to dest's device
        "strided src": (dest, mask, rows(5, w=48)[:, 16:32], "ours"),
        "no placeholders": (dest, torch.zeros_like(mask), rows(0), "ours"),
        "every row a placeholder": (dest, torch.ones_like(mask), rows(8), "ours"),
    }
    return cases[name]


ENGINE_CASES = ["float64 dest", "float64 src", "int64 dest", "uint8 mask", "equal counts, wrong width",
                "mask shorter than dest", "mask [1, N]", "1-D src", "3-D dest", "mask on the meta device",
                "expanded dest"]
FAST_CASES = ["bf16 src into bf16", "fp32 src into bf16", "fp16 src into bf16", "fp32 src into fp16",
              "bf16 src into fp32", "mask [N]", "src on the CPU", "strided src", "no placeholders",
              "every row a placeholder"]


@pytest.mark.parametrize("name", ENGINE_CASES + FAST_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_as_sglang(spies, device, name):
    """Each input (equal counts) through the replacement and through SGLang's function: the same result bits,
    or the same exception (type, text, cause and context types) with the same dest; and the expected route."""
    if device == "cuda":
        on_cpu = outcome(ENGINE, *_case(name, "cpu")[:3])
        if on_cpu.error and "out of bounds" in on_cpu.error[1]:
            # One such launch ends the process's CUDA context for every test after it.
            pytest.skip("SGLang's own function indexes out of bounds here (on the CPU an IndexError, on CUDA a "
                        "device-side assert); the hook hands this input to it unchanged: compared on the CPU")
    dest, mask, src, _ = _case(name, device)
    engine = outcome(ENGINE, dest, mask, src)
    *inputs, route = _case(name, device)
    ours = outcome(mm_sglang._scatter_mm_embedding, *inputs)
    assert_same_outcome(ours, engine)
    scattered, delegated = spies[0].returned, spies[1].returned + spies[1].raised
    assert (scattered, delegated) == ((1, 0) if route == "ours" else (0, 1))


def test_float64_is_sglangs(spies):
    """Issue 13: float64 (SGLang's function takes it) must not raise; it is SGLang's result, bit for bit."""
    for dest_dtype, src_dtype in ((F64, F64), (F64, F32), (BF16, F64), (F32, F64)):
        dest, src = _randn(8, 16, dtype=dest_dtype, seed=1), _randn(5, 16, dtype=src_dtype)
        expected = dest.clone()
        ENGINE(expected, _mask(), src)
        assert mm_sglang._scatter_mm_embedding(dest, _mask(), src) is None
        assert_bits_equal(dest, expected, f"{src_dtype} into {dest_dtype}")
    assert spies[0].returned == 0 and spies[1].returned == 4


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_inference_and_aliasing_are_sglangs(spies, device):
    """A leaf that requires grad, an inference tensor outside inference mode, a src that is a view of dest:
    SGLang's function (index_copy_) decides, and its error or result is the caller's."""
    leaf = _randn(8, 16, device=device).requires_grad_()
    assert_same_outcome(outcome(mm_sglang._scatter_mm_embedding, leaf, _mask(device), _randn(5, 16, device=device)),
                        outcome(ENGINE, leaf, _mask(device), _randn(5, 16, device=device)))
    with torch.inference_mode():
        frozen, frozen_too = _randn(8, 16, device=device), _randn(8, 16, device=device)
    assert_same_outcome(outcome(mm_sglang._scatter_mm_embedding, frozen, _mask(device), _randn(5, 16, device=device)),
                        outcome(ENGINE, frozen_too, _mask(device), _randn(5, 16, device=device)))
    dest, dest_too = _randn(8, 16, device=device), _randn(8, 16, device=device)
    assert_same_outcome(outcome(mm_sglang._scatter_mm_embedding, dest, _mask(device), dest[2:7]),
                        outcome(ENGINE, dest_too, _mask(device), dest_too[2:7]))
    assert spies[0].returned == 0 and spies[1].returned + spies[1].raised == 3


# (placeholders, src rows, what SGLang's own function does on the CPU)
MISMATCHES = [
    pytest.param(5, 3, RuntimeError, id="two more placeholders"),  # scatter_ out of bounds
    pytest.param(5, 7, IndexError, id="more src rows"),  # index_copy_ at the poison row, after writing rows
    pytest.param(5, 4, None, id="one more placeholder"),  # the last placeholder lands in the discard slot
]


@pytest.mark.parametrize("placeholders, n_rows, engine_error", MISMATCHES)
def test_count_mismatch_writes_nothing(spies, placeholders, n_rows, engine_error):
    """A count mismatch with a CPU mask: SGLang's function raises RuntimeError or IndexError (or, with one
    placeholder more, silently leaves it unwritten, against its own comment that a mismatch must fail);
    the replacement writes nothing and raises ScatterCountError, which is both, so every handler written for
    SGLang's errors catches it (SGLang 0.5.23's own callers have none below the scheduler's
    ``except Exception``). Never run on CUDA: SGLang's function device-asserts there."""
    mask, src = _mask(), _randn(n_rows, 16)
    assert int(mask.sum()) == placeholders
    engine_dest = _randn(8, 16, dtype=BF16, seed=1)
    engine = outcome(ENGINE, engine_dest, mask, src)
    assert (engine.error[0] if engine.error else None) is engine_error
    dest = _randn(8, 16, dtype=BF16, seed=1)
    before = dest.clone()
    with pytest.raises(mm_sglang.ScatterCountError) as raised:
        mm_sglang._scatter_mm_embedding(dest, mask, src)
    assert isinstance(raised.value, RuntimeError) and isinstance(raised.value, IndexError)
    assert str(raised.value) == f"Attempted to assign {n_rows} multimodal tokens to {placeholders} placeholders"
    assert_bits_equal(dest, before, "dest after a refused call")
    assert spies[0].returned + spies[0].raised == 0 and spies[1].returned + spies[1].raised == 0


def test_no_other_module_binds_the_function():
    """SGLang's callers look _scatter_mm_embedding up in mm_utils at call time: no SGLang module imports it by
    name (else enable() would have to rebind it there too)."""
    root = pathlib.Path(sglang.__file__).parent
    binders = []
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if "_scatter_mm_embedding" in text and any(
                isinstance(node, ast.ImportFrom) and any(a.name == "_scatter_mm_embedding" for a in node.names)
                for node in ast.walk(ast.parse(text))):
            binders.append(str(path.relative_to(root)))
    assert binders == []


def test_enable_disable():
    """enable() sets the module attribute (idempotent); disable() puts SGLang's function back."""
    mm_sglang.enable()
    mm_sglang.enable()
    assert mm_utils._scatter_mm_embedding is mm_sglang._scatter_mm_embedding
    mm_sglang.disable()
    assert mm_utils._scatter_mm_embedding is ENGINE
    mm_sglang.disable()
    assert mm_utils._scatter_mm_embedding is ENGINE


# =================================================================================== inside SGLang's model code


def _qwen3_vl_splitter(levels: int, hidden: int):
    """SGLang's Qwen3VLForConditionalGeneration without weights: its separate_deepstack_embeds on the
    attributes it reads, plus the deepstack_visual_indexes embed_mm_inputs counts."""
    from sglang.srt.models.qwen3_vl import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.__new__(Qwen3VLForConditionalGeneration)
    torch.nn.Module.__init__(model)
    model.num_deepstack_embeddings = levels
    model.deepstack_visual_indexes = list(range(levels))
    model.config = types.SimpleNamespace(hidden_size=hidden)
    return model


def _embed(device, levels, hidden=16):
    """SGLang's embed_mm_inputs on one request with two images whose embeddings are precomputed (fp32, into
    bf16 text embeddings): returns (input_embeds, the deepstack buffer or None)."""
    pad = 1000  # SGLang's placeholder value for these images (above the vocabulary, clamped before embedding)
    input_ids = torch.tensor([1, 2, pad, pad, pad, 3, 4, pad, pad, 5, 6, 7], device=device)
    width = hidden * (1 + levels)
    items = [MultimodalDataItem(modality=Modality.IMAGE, pad_value=pad, offsets=[(2, 4)],
                                precomputed_embeddings=_randn(3, width, device=device, seed=3)),
             MultimodalDataItem(modality=Modality.IMAGE, pad_value=pad, offsets=[(7, 8)],
                                precomputed_embeddings=_randn(2, width, device=device, seed=4))]
    embedding = torch.nn.Embedding(50, hidden, dtype=BF16, device=device)
    with torch.no_grad():
        embedding.weight.copy_(_randn(50, hidden, device=device, seed=5))
    model = _qwen3_vl_splitter(levels, hidden)
    with torch.inference_mode():
        input_embeds, other = mm_utils.embed_mm_inputs(
            mm_inputs_list=[MultimodalInputs(mm_items=items)], extend_prefix_lens=[0], extend_seq_lens=[12],
            input_ids=input_ids, input_embedding=embedding, multimodal_model=model,
            use_deepstack={Modality.IMAGE: True} if levels else {})
    return input_embeds, other.get("input_deepstack_embeds")


@pytest.mark.parametrize("levels", [0, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_embed_mm_inputs(spies, device, levels):
    """SGLang's embed_mm_inputs (get_embedding_and_mask, then the scatter into the text embeddings and, with
    deepstack, into the zero-filled multiscale buffer from a strided column slice): the same bits with the
    hook as without, every scatter through this package."""
    expected, expected_deepstack = _embed(device, levels)
    assert spies[0].returned == 0
    mm_sglang.enable()
    actual, actual_deepstack = _embed(device, levels)
    assert_bits_equal(actual, expected, "input_embeds")
    if levels:
        assert_bits_equal(actual_deepstack, expected_deepstack, "input_deepstack_embeds")
    assert spies[0].returned == (2 if levels else 1)
