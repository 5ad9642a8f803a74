"""Shared helpers of the CPU test suite.

On a machine without CUDA the Triton kernels run under the Triton interpreter, which must be switched on
before ``mmmerge_triton`` (and so ``triton.jit``) is imported: hence the environment variable set here, at
import time. With CUDA the GPU tests (tests/gpu) run compiled kernels, so it is left alone.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402

import mmmerge_triton  # noqa: E402
from mmmerge_triton import launch  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_PAIRS = [(s, d) for s in DTYPES for d in DTYPES]  # (src dtype, dst dtype)
DTYPE_PAIR_IDS = [f"{str(s)[6:]}->{str(d)[6:]}" for s, d in DTYPE_PAIRS]
ALL_PATHS = (*mmmerge_triton.PATHS, "auto")

# Whether the Triton path runs under the interpreter here (a CPU machine), rather than compiled on a GPU.
INTERPRETED = launch.INTERPRET


def pytest_runtest_logreport(report) -> None:
    """With MMMERGE_FAILURES set to a file, each failure's text is appended to it as it happens: a GPU run cut
    by its time limit keeps the failures pytest would only have printed at the end (bench/run_gpu.sh sets it)."""
    path = os.environ.get("MMMERGE_FAILURES")
    if path and report.failed:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n")


MASK_KINDS = ("random10", "random50", "random90", "empty", "full", "first", "last", "blocks")


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_mask(kind: str, shape, seed: int = 0) -> torch.Tensor:
    """A bool mask of ``shape``; ``kind`` one of MASK_KINDS (first/last/blocks refer to the flattened order)."""
    n = 1
    for s in shape:
        n *= s
    if kind.startswith("random"):
        flat = torch.rand(n, generator=seeded(seed)) < int(kind[6:]) / 100
    else:
        flat = torch.zeros(n, dtype=torch.bool)
        if kind == "full":
            flat[:] = True
        elif kind == "first" and n:
            flat[0] = True
        elif kind == "last" and n:
            flat[-1] = True
        elif kind == "blocks":  # two runs of true rows, one touching the end
            flat[n // 5 : n // 2] = True
            flat[n - n // 4 :] = True
        elif kind != "empty":
            raise ValueError(kind)
    return flat.reshape(shape)


def randn(*shape, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=seeded(seed)).to(dtype)


def reference_merge(dst: torch.Tensor, mask: torch.Tensor, src: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """The expected result, by a plain loop over rows (no boolean indexing, no index_put): the j-th true row
    of ``mask`` takes ``src[j]`` cast to dst's dtype, or adds it (in fp32, rounded once to dst's dtype)."""
    hidden = dst.shape[-1]
    out = dst.detach().contiguous().clone()
    rows = out.view(-1, hidden)
    j = 0
    for i, selected in enumerate(mask.reshape(-1).tolist()):
        if not selected:
            continue
        value = src[j].detach().to(dst.dtype)
        if accumulate:
            value = (rows[i].float() + value.float()).to(dst.dtype)
        rows[i].copy_(value)
        j += 1
    assert j == src.shape[0], "reference_merge: mask and src disagree on the row count"
    return out


def truncate_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """x rounded toward zero to bfloat16 (the Triton interpreter's cast), returned as bfloat16."""
    bits = x.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two tensors of one float dtype (int64)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    int_dtype, lowest = (torch.int32, -(2**31)) if a.dtype == torch.float32 else (torch.int16, -(2**15))

    def ordered(t):  # sign-magnitude bit patterns onto a monotonic integer line (+0 and -0 both at 0)
        bits = t.contiguous().view(int_dtype).long()
        return torch.where(bits < 0, lowest - bits, bits)

    return (ordered(a) - ordered(b)).abs()


class Tolerance(NamedTuple):
    """How far the Triton path's result may be from torch's on this machine.

    ulps: distance in units in the last place of dst's dtype. truncated_src: whether src's cast to bf16 may
    truncate (then the result is also compared with the reference made from src truncated to bf16).
    """

    ulps: int = 0
    truncated_src: bool = False


EXACT = Tolerance()


def merge_tolerance(src_dtype: torch.dtype, dst_dtype: torch.dtype, accumulate: bool, path: str = "triton") -> Tolerance:
    """The tolerance of one (src dtype, dst dtype, accumulate) case.

    The PyTorch paths, and the compiled Triton kernels on a GPU, must match the reference bit for bit. The
    Triton interpreter rounds a cast into bfloat16 toward zero instead of to nearest even: a cast of fp32 or
    fp16 into bf16 may then land one ulp off, and so may the rounding of an fp32 sum into a bf16 dst (ADD).
    With ADD and a wider src both roundings happen, and the first (an ulp of src) may be many ulps of a sum
    that cancels: that case compares with a reference made from the truncated src as well.
    """
    if path != "triton" or not INTERPRETED or dst_dtype != torch.bfloat16:
        return EXACT
    wider_src = src_dtype != torch.bfloat16
    if accumulate:
        return Tolerance(ulps=1, truncated_src=wider_src)
    return Tolerance(ulps=1) if wider_src else EXACT


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Bit-identical: same dtype, shape and bit patterns (NaN and -0.0 included)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    int_dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[actual.element_size()]
    a = actual.detach().contiguous().view(int_dtype)
    e = expected.detach().contiguous().view(int_dtype)
    bad = (a != e).nonzero()
    assert bad.shape[0] == 0, (
        f"{what}: {bad.shape[0]} of {a.numel()} elements differ, first at {tuple(bad[0].tolist())}: "
        f"{actual[tuple(bad[0])].item()} != {expected[tuple(bad[0])].item()}"
    )


def assert_close_ulps(actual: torch.Tensor, candidates: list[torch.Tensor], ulps: int, what: str) -> None:
    """Every element within ``ulps`` of the same element of at least one candidate."""
    if ulps == 0 and len(candidates) == 1:
        assert_bits_equal(actual, candidates[0], what)
        return
    distance = torch.stack([ulp_distance(actual, c) for c in candidates]).amin(0)
    worst = distance.max().item() if distance.numel() else 0
    assert worst <= ulps, f"{what}: {int((distance > ulps).sum())} elements more than {ulps} ulp off (worst {worst})"


def assert_merged(
    out: torch.Tensor,
    dst_before: torch.Tensor,
    mask: torch.Tensor,
    src: torch.Tensor,
    accumulate: bool,
    path: str,
) -> None:
    """``out`` is the merge of ``src`` into ``dst_before`` at ``mask``: rows outside the mask bit-identical to
    dst_before, rows inside equal to reference_merge (within merge_tolerance for the interpreted Triton path)."""
    expected = reference_merge(dst_before, mask, src, accumulate)
    assert out.shape == dst_before.shape and out.dtype == dst_before.dtype
    flat_mask = mask.reshape(-1)
    hidden = out.shape[-1]
    out_rows = out.detach().reshape(-1, hidden)
    assert_bits_equal(out_rows[~flat_mask], dst_before.detach().reshape(-1, hidden)[~flat_mask], "untouched rows")
    tol = merge_tolerance(src.dtype, dst_before.dtype, accumulate, path)
    candidates = [expected.view(-1, hidden)[flat_mask]]
    if tol.truncated_src:
        truncated = reference_merge(dst_before, mask, truncate_to_bf16(src), accumulate)
        candidates.append(truncated.view(-1, hidden)[flat_mask])
    assert_close_ulps(out_rows[flat_mask], candidates, tol.ulps, "merged rows")


# The modules of the CPU suite: they run the Triton path on CPU tensors, which needs the interpreter.
INTERPRETER_MODULES = {"test_autograd.py", "test_errors.py", "test_items.py", "test_kernels.py", "test_ops.py",
                       "test_paths.py", "test_plan.py", "test_properties.py"}


def pytest_collection_modifyitems(config, items):
    """Where the interpreter is off (a CUDA machine, see above), skip the CPU suite rather than fail it."""
    if INTERPRETED:
        return
    skip = pytest.mark.skip(reason="the CPU suite needs the Triton interpreter: run it with TRITON_INTERPRET=1")
    here = Path(__file__).parent
    for item in items:
        if Path(item.path).parent == here and Path(item.path).name in INTERPRETER_MODULES:
            item.add_marker(skip)


def make_auto_choose_triton(monkeypatch) -> None:
    """path="auto" then chooses the Triton path wherever it can run (as the tables do on a GPU): the table's
    decision, made to say "triton" with the untuned rule's configuration."""
    from mmmerge_triton import dispatch
    from mmmerge_triton.kernel_config import default_config
    table_decision = dispatch._table_decision

    def triton_decision(dst, on_device, src_dtype, n, rows):
        found = table_decision(dst, on_device, src_dtype, n, rows)
        return found._replace(path="triton", config=default_config(dst.shape[-1], rows, n, on_device), reason="test")

    monkeypatch.setattr(dispatch, "_table_decision", triton_decision)


@pytest.fixture
def route(monkeypatch):
    """use(path) -> the path to pass: ``auto_triton`` is path="auto" made to choose the Triton path
    (make_auto_choose_triton). Fresh decisions and memo entries before the first call, and after the test."""
    from mmmerge_triton import dispatch

    def use(path: str) -> str:
        if path == "auto_triton":
            make_auto_choose_triton(monkeypatch)
        dispatch.clear_cache()
        return "auto" if path == "auto_triton" else path

    yield use
    dispatch.clear_cache()


class MemoSpy(NamedTuple):
    """The keys core._signature returned and the keys core._prepare was called with, in order (a call whose key
    is never prepared is a memo hit)."""

    signatures: list
    prepared: list

    def assert_failed_first_call_kept_nothing(self, left: dict) -> None:
        """After a first call with a mask one row short (which raised, leaving the memo as ``left``) and two good
        calls: three signatures differing in the mask's length alone, the failed call memoized nothing, the good
        call's key was prepared once and is the memo's one entry."""
        from mmmerge_triton import core
        signatures, prepared = self
        bad, good = signatures[0], signatures[1]
        assert bad is not None and signatures == [bad, good, good], "the good calls are not of one signature"
        assert sum(a != b for a, b in zip(bad, good)) == 1, "the keys differ in more than the mask's length"
        assert left == {} and prepared == [bad, good], (
            f"prepared {prepared}: the failed call memoized something, or the good call's entry was not kept")
        assert list(core._prepared) == [good]


@pytest.fixture
def memo_spy(monkeypatch) -> MemoSpy:
    """A MemoSpy recording from now on."""
    from mmmerge_triton import core
    signatures, prepared = [], []
    signature, prepare = core._signature, core._prepare

    def spied_signature(*args):
        signed = signature(*args)  # (key, addresses) or None
        signatures.append(None if signed is None else signed[0])
        return signed

    def spied_prepare(key, *args):
        prepared.append(key)
        return prepare(key, *args)

    monkeypatch.setattr(core, "_signature", spied_signature)
    monkeypatch.setattr(core, "_prepare", spied_prepare)
    return MemoSpy(signatures, prepared)
