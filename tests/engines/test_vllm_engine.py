"""The vLLM hook inside the real vLLM (0.34.0, and 0.33.0 before it; bench/engines/make_engine_env.sh builds the environment).

Skipped where vLLM does not import (CI). Every input is given both to vLLM's own ``_merge_multimodal_embeddings``
and to the replacement: the replacement must do exactly what vLLM does (the same result bits, or the same
exception type, text, cause and context), and a spy proves which route it took: this package's merge on the
fast path, vLLM's function for everything else (the issue's table: count mismatches, a wrong hidden size, a
[0, H] tensor, float64, non-bool masks, a short mask, a 1-D item, and more). Then the hook inside vLLM's code:
Qwen3-VL's ``embed_input_ids`` with and without deepstack, the default ``SupportsMultiModal.embed_input_ids``
(which imports the function at call time), every module that binds the function by name, and vLLM's plugin
loader running the entry point.

The platform: where vLLM's compiled extension does not load (the CPU engine venv, and the bundle run on the GPU
machine, which carries no compiled parts), conftest.py sets ``VLLM_TARGET_DEVICE=cpu``, vLLM's own switch, so
that ``vllm.platforms.current_platform`` is vLLM's ``CpuPlatform`` even with CUDA visible (its CUDA platform
module hard-imports the extension). The platform object is the only thing replaced: the functions under test
(``_merge_multimodal_embeddings``, Qwen3-VL's embed path, the default ``embed_input_ids``) are vLLM's own,
plain torch, and consult no platform; the ``cuda`` cases run them on CUDA tensors. The header of a run names
the platform.
"""
from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys
import types

import pytest
import torch

utils = pytest.importorskip("vllm.model_executor.models.utils", reason="needs vLLM (make_engine_env.sh)")

import vllm  # noqa: E402
from vllm.model_executor.models import interfaces  # noqa: E402

from engine_helpers import DEVICES, assert_bits_equal, assert_same_outcome, outcome, route_spies  # noqa: E402
from mmmerge_triton.integrations import vllm as mm_vllm  # noqa: E402

ENGINE = utils._merge_multimodal_embeddings
assert ENGINE is not mm_vllm._merge_multimodal_embeddings, "the hook was enabled before the tests started"
BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@pytest.fixture(autouse=True)
def spies(monkeypatch):
    """Spies on the two routes of the hook: (this package's merge, vLLM's function). The hook is disabled
    afterwards."""
    yield route_spies(monkeypatch, mm_vllm, "merge_multimodal_embeddings", ENGINE)
    mm_vllm.disable()
    assert utils._merge_multimodal_embeddings is ENGINE


def _mask(device="cpu", n=6) -> torch.Tensor:
    return (torch.arange(n) % 3 != 1).to(device)  # T F T T F T: 4 placeholders of 6


def _randn(*shape, dtype=F32, device="cpu", seed=0) -> torch.Tensor:
    # Scaled so that casts round in every direction (and overflow fp16 at times: inf is part of the bits).
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 300).to(device, dtype)


def _case(name, device):
    """(inputs_embeds, multimodal_embeddings, is_multimodal, route) of one named input, built anew (seeded) at
    each call; route is "ours" where the hook runs this package's merge, "engine" where vLLM's function must
    decide."""
    dst = _randn(6, 8, dtype=BF16, device=device, seed=1)
    mask = _mask()
    rows = lambda m, h=8, dtype=F32, seed=2: _randn(m, h, dtype=dtype, device=device, seed=seed)  # noqa: E731
    cases = {
        # The table: vLLM's function decides.
        "count mismatch, fewer rows": (dst, [rows(3)], mask, "engine"),
        "count mismatch, more rows": (dst, [rows(5)], mask, "engine"),
        "count mismatch, nested items": (dst, [[rows(1), rows(2)], rows(4).view(2, 2, 8)], mask, "engine"),
        "one row for every placeholder": (dst, [rows(1)], mask, "engine"),  # index_put broadcasts it
        "equal counts, wrong hidden size": (dst, [rows(4, h=7)], mask, "engine"),
        "[0, H] tensor with placeholders": (dst, rows(0), mask, "engine"),  # vLLM returns at once
        "float64 destination": (dst.to(F64), [rows(4)], mask, "engine"),
        "float64 source": (dst, [rows(4, dtype=F64)], mask, "engine"),
        "int32 destination": (dst.to(torch.int32), [rows(4)], mask, "engine"),
        "uint8 mask": (dst, [rows(4)], mask.to(torch.uint8), "engine"),
        "int64 index tensor as the mask": (dst, [rows(4)], mask.nonzero().squeeze(1), "engine"),
        "mask shorter than the destination": (dst, [rows(4)], mask[:5], "engine"),
        "1-D item": (dst, [rows(4)[0]], mask, "engine"),
        # More inputs vLLM handles its own way.
        "nested empty list": (dst, [[]], mask, "engine"),
        "3-D destination, 2-D mask": (dst[None], [rows(4)], mask[None], "engine"),
        "mixed item dtypes": (dst, [rows(1, dtype=BF16), rows(3, dtype=F16)], mask, "engine"),
        "expanded destination": (dst[:1].expand(6, 8), [rows(4)], mask, "engine"),
        "mask on the meta device": (dst, [rows(4)], torch.ones(6, dtype=torch.bool, device="meta"), "engine"),
        # The fast path.
        "bf16 rows into bf16": (dst, [rows(4, dtype=BF16)], mask, "ours"),
        "fp32 rows into bf16": (dst, [rows(4)], mask, "ours"),
        "fp16 rows into bf16": (dst, [rows(4, dtype=F16)], mask, "ours"),
        "bf16 rows into fp16": (dst.to(F16), [rows(4, dtype=BF16)], mask, "ours"),
        "fp32 rows into fp16": (dst.to(F16), [rows(4)], mask, "ours"),
        "fp32 rows into fp32": (dst.float(), [rows(4)], mask, "ours"),
        "bf16 rows into fp32": (dst.float(), [rows(4, dtype=BF16)], mask, "ours"),
        "a tensor, not a list": (dst, rows(4), mask, "ours"),
        "items, nested and 3-D": (dst, [[rows(1, seed=3)], (rows(1, seed=4),), rows(2, seed=5).view(1, 2, 8)], mask,
                                  "ours"),
        "strided column slices": (dst, [rows(4, h=24)[:, 8:16], rows(0, h=24)[:, 8:16]], mask, "ours"),
        "no placeholders, an empty item": (dst, [rows(0)], torch.zeros(6, dtype=torch.bool), "ours"),
        "every row a placeholder": (dst, [rows(6)], torch.ones(6, dtype=torch.bool), "ours"),
    }
    return cases[name]


ENGINE_CASES = ["count mismatch, fewer rows", "count mismatch, more rows", "count mismatch, nested items",
                "one row for every placeholder", "equal counts, wrong hidden size", "[0, H] tensor with placeholders",
                "float64 destination", "float64 source", "int32 destination", "uint8 mask",
                "int64 index tensor as the mask", "mask shorter than the destination", "1-D item",
                "nested empty list", "3-D destination, 2-D mask", "mixed item dtypes", "expanded destination",
                "mask on the meta device"]
FAST_CASES = ["bf16 rows into bf16", "fp32 rows into bf16", "fp16 rows into bf16", "bf16 rows into fp16",
              "fp32 rows into fp16", "fp32 rows into fp32", "bf16 rows into fp32", "a tensor, not a list",
              "items, nested and 3-D", "strided column slices", "no placeholders, an empty item",
              "every row a placeholder"]


def _check_route(spies, route: str) -> None:
    ours, engine = spies
    if route == "ours":
        assert (ours.returned, engine.returned + engine.raised) == (1, 0), "expected this package's merge"
    else:
        assert ours.returned == 0 and engine.returned + engine.raised == 1, "expected vLLM's function"


@pytest.mark.parametrize("name", ENGINE_CASES + FAST_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_as_vllm(spies, device, name):
    """Each input through the replacement and through vLLM's function: the same result bits, or the same
    exception (type, text, cause and context types) with the same destination; and the expected route."""
    engine = outcome(ENGINE, *_case(name, device)[:3])  # each call its own inputs, built alike (seeded)
    *inputs, route = _case(name, device)
    ours = outcome(mm_vllm._merge_multimodal_embeddings, *inputs)
    assert_same_outcome(ours, engine)
    _check_route(spies, route)


def test_table_errors_are_vllms(spies):
    """The issue's rows, spelled out: vLLM's texts and chaining reach the caller unchanged."""
    def error(name):
        dst, embeddings, mask, _ = _case(name, "cpu")
        return outcome(mm_vllm._merge_multimodal_embeddings, dst, embeddings, mask).error

    assert error("count mismatch, fewer rows") == (
        ValueError, "Attempted to assign 3 = 3 multimodal tokens to 4 placeholders", RuntimeError, RuntimeError)
    assert error("equal counts, wrong hidden size")[:3] == (ValueError, "Error during index put operation",
                                                            RuntimeError)
    assert error("mask shorter than the destination")[0] is IndexError
    assert error("1-D item")[0] is IndexError
    for name in ("[0, H] tensor with placeholders", "float64 destination", "float64 source", "uint8 mask",
                 "int64 index tensor as the mask", "one row for every placeholder"):
        assert error(name) is None, name


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_and_inference_tensors_are_vllms(spies, device):
    """A leaf that requires grad, and an inference tensor written outside inference mode: PyTorch refuses the
    in-place write, vLLM wraps the refusal as "Error during index put operation"; the replacement lets vLLM do
    it. Under inference mode (how vLLM runs) the fast path takes the inference tensor."""
    mask, rows = _mask(device), [_randn(4, 8, device=device)]
    leaf = _randn(6, 8, device=device).requires_grad_()
    assert_same_outcome(outcome(mm_vllm._merge_multimodal_embeddings, leaf, rows, mask),
                        outcome(ENGINE, leaf, rows, mask))
    with torch.inference_mode():  # (a clone outside inference mode would be a normal tensor)
        frozen, frozen_too = _randn(6, 8, device=device), _randn(6, 8, device=device)
    assert_same_outcome(outcome(mm_vllm._merge_multimodal_embeddings, frozen, rows, mask),
                        outcome(ENGINE, frozen_too, rows, mask))
    assert spies[1].raised == 2 and spies[0].returned == 0
    with torch.inference_mode():
        frozen = _randn(6, 8, device=device)
        expected = ENGINE(frozen.clone(), rows, mask)
        actual = mm_vllm._merge_multimodal_embeddings(frozen.clone(), rows, mask)
    assert_bits_equal(actual, expected, "inference mode")
    assert spies[0].returned == 1


@pytest.mark.parametrize("device", DEVICES)
def test_aliasing_source_is_vllms(spies, device):
    """A source that is a view of the destination: vLLM refuses one tensor (index_put's overlap error, wrapped)
    and takes a list (torch.cat copies first); the replacement gives both to vLLM."""
    for embeddings_of in (lambda d: d[1:5], lambda d: [d[1:3], d[3:5]]):
        dst = _randn(6, 8, device=device)
        other = dst.clone()
        assert_same_outcome(outcome(mm_vllm._merge_multimodal_embeddings, dst, embeddings_of(dst), _mask()),
                            outcome(ENGINE, other, embeddings_of(other), _mask()))
    assert spies[0].returned == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mask_mismatch_writes_nothing(spies):
    """A mask on the GPU is counted (one sync, as vLLM's index_put's nonzero), so a mismatch goes to vLLM,
    which raises before writing, instead of writing the first rows; equal counts take the fast path."""
    for n_rows in (3, 4):  # a mismatch (vLLM's function raises), then equal counts (the fast path)
        dst, rows, mask = _randn(6, 8, device="cuda"), [_randn(n_rows, 8, device="cuda")], _mask("cuda")
        assert_same_outcome(outcome(mm_vllm._merge_multimodal_embeddings, dst.clone(), rows, mask),
                            outcome(ENGINE, dst.clone(), rows, mask))
    assert spies[0].returned == 1
    dst, rows = _randn(6, 8, device="cuda"), [_randn(4, 8)]  # rows on the CPU: vLLM's function decides
    assert_same_outcome(outcome(mm_vllm._merge_multimodal_embeddings, dst.clone(), rows, _mask()),
                        outcome(ENGINE, dst.clone(), rows, _mask()))
    assert spies[0].returned == 1


# =================================================================================== inside vLLM's model code


class _TinyLanguageModel(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, device: str):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, hidden, dtype=dtype, device=device)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


def _qwen3_vl(deepstack_levels: int, hidden: int, device: str):
    """vLLM's Qwen3VLForConditionalGeneration without weights or a vLLM config: its embed_input_ids,
    _compute_deepstack_embeds and _set_deepstack_input_embeds run as in the engine, on the attributes they
    read (a tiny text embedding, the deepstack buffers)."""
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.__new__(Qwen3VLForConditionalGeneration)
    torch.nn.Module.__init__(model)
    model.language_model = _TinyLanguageModel(50, hidden, BF16, device)
    model.use_deepstack = deepstack_levels > 0
    model.deepstack_num_level = deepstack_levels
    model.visual_dim = hidden
    model.multiscale_dim = hidden * deepstack_levels
    model.config = types.SimpleNamespace(text_config=types.SimpleNamespace(hidden_size=hidden))
    model.deepstack_input_embeds = [torch.zeros(16, hidden, dtype=BF16, device=device)
                                    for _ in range(deepstack_levels)]
    return model


@pytest.mark.parametrize("deepstack_levels", [0, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_qwen3_vl_embed_input_ids(spies, device, deepstack_levels):
    """Qwen3-VL's own embed_input_ids (the function bound at import time in qwen3_vl), two images in fp32
    into bf16 embeddings, with and without deepstack (then the multiscale features are strided column slices
    merged into a zero buffer): the embeddings and the deepstack buffers bit for bit as without the hook,
    every merge through this package."""
    hidden = 16
    model = _qwen3_vl(deepstack_levels, hidden, device)
    input_ids = torch.tensor([1, 7, 7, 7, 2, 3, 7, 7, 4, 5, 6, 7], device=device)
    is_multimodal = (input_ids == 7).cpu()
    width = hidden * (1 + deepstack_levels)
    images = [_randn(3, width, device=device, seed=3), _randn(3, width, device=device, seed=4)]

    with torch.inference_mode():
        expected = model.embed_input_ids(input_ids, images, is_multimodal=is_multimodal)
        expected_deepstack = [b.clone() for b in model.deepstack_input_embeds]
        for buffer in model.deepstack_input_embeds:
            buffer.zero_()
        assert spies[0].returned == 0
        import vllm.model_executor.models.qwen3_vl as qwen3_vl

        mm_vllm.enable()
        assert qwen3_vl._merge_multimodal_embeddings is mm_vllm._merge_multimodal_embeddings
        actual = model.embed_input_ids(input_ids, images, is_multimodal=is_multimodal)
    assert_bits_equal(actual, expected, "inputs_embeds")
    for level, (a, e) in enumerate(zip(model.deepstack_input_embeds, expected_deepstack)):
        assert_bits_equal(a, e, f"deepstack buffer {level}")
    assert spies[0].returned == (2 if deepstack_levels else 1) and spies[1].returned == 0


@pytest.mark.parametrize("device", DEVICES)
def test_default_embed_input_ids_imports_at_call_time(spies, device):
    """SupportsMultiModal.embed_input_ids (vLLM's default for models that do not override it) imports the
    function from utils at each call: after enable() it gets the replacement, before it vLLM's own."""

    class TinyVLM(torch.nn.Module, interfaces.SupportsMultiModal):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.lm = _TinyLanguageModel(50, 16, BF16, device)

        def get_language_model(self):
            return self.lm

    model = TinyVLM()
    input_ids = torch.tensor([1, 9, 9, 2, 9, 3], device=device)
    images = [_randn(2, 16, dtype=F16, device=device), _randn(1, 16, dtype=F16, device=device, seed=5)]
    with torch.inference_mode():
        expected = model.embed_input_ids(input_ids, images, is_multimodal=(input_ids == 9).cpu())
        mm_vllm.enable()
        actual = model.embed_input_ids(input_ids, images, is_multimodal=(input_ids == 9).cpu())
    assert_bits_equal(actual, expected, "inputs_embeds")
    assert spies[0].returned == 1


def _modules_binding_the_function() -> dict[str, list[str]]:
    """Every vLLM module whose top level imports _merge_multimodal_embeddings: {module: [bound names]}."""
    root = pathlib.Path(vllm.__file__).parent
    found = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if utils._merge_multimodal_embeddings.__name__ not in text:
            continue
        names = [alias.asname or alias.name for node in ast.parse(text).body if isinstance(node, ast.ImportFrom)
                 for alias in node.names if alias.name == "_merge_multimodal_embeddings"]
        if names:
            found["vllm." + ".".join(path.relative_to(root).with_suffix("").parts)] = names
    return found


def test_enable_rebinds_every_module():
    """Import every vLLM module that binds the function by name at import time (llava_onevision2 as
    merge_multimodal_embeddings): enable() rebinds all of them and utils, counts them, is idempotent;
    disable() restores vLLM's function everywhere."""
    bindings = _modules_binding_the_function()
    assert len(bindings) >= 20, bindings  # 26 in vLLM 0.33.0, 30 in 0.34.0
    modules, other_vendor = {}, []
    for name in bindings:
        try:
            modules[name] = importlib.import_module(name)
        except (AssertionError, RuntimeError, ImportError) as error:
            # vLLM 0.34's per-vendor model trees: an AMD module reads the ROCm GPU's architecture at import
            # (step5/amd/mtp.py), which fails without one; enable() reaches it once imported, or from utils.
            assert ".amd." in name or ".rocm" in name, f"{name} does not import: {error!r}"
            other_vendor.append(name)
    assert len(modules) >= 20 and len(other_vendor) <= 2, (sorted(modules), other_vendor)
    bindings = {name: bindings[name] for name in modules}
    assert bindings["vllm.model_executor.models.llava_onevision2"] == ["merge_multimodal_embeddings"]
    replaced = mm_vllm.enable()
    for name, module in modules.items():
        for attr in bindings[name]:
            assert getattr(module, attr) is mm_vllm._merge_multimodal_embeddings, f"{name}.{attr}"
    assert utils._merge_multimodal_embeddings is mm_vllm._merge_multimodal_embeddings
    assert replaced >= sum(map(len, bindings.values())) + 1
    assert mm_vllm.enable() == 0
    mm_vllm.disable()
    for name, module in modules.items():
        for attr in bindings[name]:
            assert getattr(module, attr) is ENGINE, f"{name}.{attr}"


PLUGIN_PROBE = """
import vllm.model_executor.models.utils as utils
from vllm.plugins import load_general_plugins
from mmmerge_triton.integrations import vllm as hook
load_general_plugins()
print("REPLACED" if utils._merge_multimodal_embeddings is hook._merge_multimodal_embeddings else "STOCK")
"""


@pytest.mark.parametrize("switch, expected", [("1", "REPLACED"), ("0", "STOCK"), (None, "STOCK")])
def test_vllm_plugin_loader_runs_the_entry_point(monkeypatch, switch, expected):
    """vLLM's own plugin loader (load_general_plugins, called in every engine process) finds the installed
    entry point and enables the hook exactly when MMMERGE_TRITON_VLLM=1 (a fresh process each)."""
    if switch is None:
        monkeypatch.delenv(mm_vllm.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(mm_vllm.ENV_SWITCH, switch)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    done = subprocess.run([sys.executable, "-c", PLUGIN_PROBE], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == expected
