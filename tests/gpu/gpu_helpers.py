"""Helpers shared by the GPU tests and sanitize.py: the reference, bitwise comparison, inputs, masks.

Plain functions, no pytest import: sanitize.py uses them too. Import only on a CUDA machine.
"""
from __future__ import annotations

import contextlib
import math

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_PAIRS = tuple((s, d) for s in DTYPES for d in DTYPES)  # (src dtype, dst dtype)
_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def dev(index: int | None = None) -> torch.device:
    """A CUDA device with an explicit index (torch.device("cuda") compares unequal to cuda:0)."""
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


def pair_id(pair) -> str:
    return f"{_SHORT[pair[0]]}-to-{_SHORT[pair[1]]}"


def reference(dst: torch.Tensor, mask: torch.Tensor, src: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """torch's answer, on dst's device: a copy of dst after index_put_((mask,), src.to(dst.dtype), accumulate)."""
    ref = dst.clone()
    ref.index_put_((mask.to(dst.device),), src.to(dst.dtype), accumulate=accumulate)
    return ref


def assert_same(actual: torch.Tensor, expected: torch.Tensor, where: str = "") -> None:
    """Bitwise equality (so -0.0 differs from 0.0), except that NaNs only need to sit at the same places
    (a cast may canonicalise a NaN payload)."""
    where = f" ({where})" if where else ""
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}{where}"
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}{where}"
    expected = expected.to(actual.device)
    nan_a, nan_e = actual.isnan(), expected.isnan()
    if not torch.equal(nan_a, nan_e):
        n = int((nan_a != nan_e).sum())
        first = tuple((nan_a != nan_e).nonzero()[0].tolist())
        raise AssertionError(f"NaN positions differ at {n} elements{where}; first {first}: "
                             f"got {actual[first].item()!r}, expected {expected[first].item()!r}")
    bits = _BITS[actual.dtype]
    a = actual.masked_fill(nan_e, 0).contiguous().view(bits)
    e = expected.masked_fill(nan_e, 0).contiguous().view(bits)
    if not torch.equal(a, e):
        bad = (a != e).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(f"{bad.shape[0]} of {a.numel()} elements differ{where}; first at {first}: "
                             f"got {actual[first].item()!r}, expected {expected[first].item()!r}")


def random_mask(shape, k: int, seed: int = 0) -> torch.Tensor:
    """A CPU bool mask of ``shape`` with exactly ``k`` true entries at seeded random places."""
    shape = tuple(shape)
    n = math.prod(shape)
    assert 0 <= k <= n
    g = torch.Generator().manual_seed(seed)
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=g)[:k]] = True
    return flat.view(shape)


def first_true(mask: torch.Tensor, k: int) -> torch.Tensor:
    """A copy of ``mask`` that keeps only its first ``k`` true entries (in flattened order)."""
    flat = mask.reshape(-1).clone()
    idx = flat.nonzero().flatten()
    flat[idx[k:]] = False
    return flat.view(mask.shape)


def rand(shape, dtype: torch.dtype, seed: int = 0, device=None, scale: float = 1.0) -> torch.Tensor:
    """Seeded normal values of ``dtype`` on a CUDA device (generated in fp32, then cast)."""
    device = dev() if device is None else torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    t = torch.randn(tuple(shape), generator=g, device=device, dtype=torch.float32)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(dtype)


def _signed(v: int, nbits: int) -> int:
    return v - (1 << nbits) if v >= 1 << (nbits - 1) else v


_PATTERNS = {  # smallest/largest subnormal, -smallest subnormal, NaNs with payloads, smallest normal, max
    torch.float32: (32, [0x00000001, 0x007FFFFF, 0x80000001, 0x7FC00001, 0xFFC00000, 0x7F800001, 0x00800000,
                         0x7F7FFFFF, 0x80000000]),
    torch.float16: (16, [0x0001, 0x03FF, 0x8001, 0x7E01, 0xFE00, 0x7C01, 0x0400, 0x7BFF, 0x8000]),
    torch.bfloat16: (16, [0x0001, 0x007F, 0x8001, 0x7FC1, 0xFFC0, 0x7F81, 0x0080, 0x7F7F, 0x8000]),
}


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """1-D CPU tensor of ``dtype``: ±0, ±inf, NaNs, values that overflow fp16 (1e5 -> inf, 65519 -> 65504,
    65520 -> inf), values that round to fp16/bf16 subnormals or to ±0, every dtype's subnormals, maxima."""
    inf, nan = float("inf"), float("nan")
    vals = [0.0, -0.0, inf, -inf, nan, 1.0, -1.5, 1e5, -1e5, 65504.0, 65519.0, 65520.0, -7e4, 3.0e38, -3.0e38,
            1e-40, -1e-40, 1e-45, 2.0 ** -24, -(2.0 ** -24), 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14, 2.0 ** -15,
            2.0 ** -126, 2.0 ** -127, 2.0 ** -133, -(2.0 ** -133), 1 / 3, 0.1, 1.00048828125, 255.5, 257.0]
    t = torch.tensor(vals, dtype=torch.float64).to(dtype)
    nbits, pats = _PATTERNS[dtype]
    extra = torch.tensor([_signed(p, nbits) for p in pats], dtype=_BITS[dtype]).view(dtype)
    return torch.cat([t, extra])


def special_matrix(rows: int, h: int, dtype: torch.dtype, shift: int, device=None) -> torch.Tensor:
    """[rows, h] of special values, each row a rotation of special_values(dtype) (shifted by ``shift``)."""
    sv = special_values(dtype)
    r = torch.arange(rows)[:, None]
    c = torch.arange(h)[None, :]
    idx = (r * 7 + c + shift) % sv.numel()
    return sv[idx].to(dev() if device is None else device)


@contextlib.contextmanager
def sync_debug_error():
    """torch.cuda.set_sync_debug_mode("error") for the block; the previous mode afterwards."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def gpu_sleep(cycles: int) -> bool:
    """Queue a kernel that spins for ``cycles`` clocks on the current stream; False if torch lacks it."""
    fn = getattr(torch.cuda, "_sleep", None)
    if fn is None:
        return False
    fn(int(cycles))
    return True


def capture(fn, before_capture=lambda: None) -> torch.cuda.CUDAGraph:
    """PyTorch's recipe: warm up on a side stream (compiles, allocates, stages what a first call stages), run
    ``before_capture``, then capture ``fn`` into a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    before_capture()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g
