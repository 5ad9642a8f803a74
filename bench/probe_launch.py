"""What each primitive of a merge's host path costs on this host: the floor a memo hit is built from.
(It probes package internals: the row_copy kernel, the pinned ring, tools.timing's spin calibration.)

    python bench/probe_launch.py --out DIR      # writes DIR/probe_launch_<device>.json, prints every finding

The JSON holds the figures (µs) and the ``environment`` (with the code's ``commit``, tools/bench.code_commit).

Host µs (medians over 2000 calls, the GPU kept busy by a spin so no launch waits) of: tensor attribute
reads, the grad/compile/dispatch-mode queries, a CPU mask's numpy forms (view, count, row map, byte copy),
the ring session, and a launch of row_copy_kernel at four depths: ``kernel[grid](...)``, the compiled
kernel's ``run``, the launcher's C entry, the C entry with raw int pointers. Next to them: a tiny torch op,
index_put with a CPU mask.
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from mmmerge_triton.kernels.row_copy import row_copy_kernel
from mmmerge_triton.staging import arena
from mmmerge_triton.tools import timing
from mmmerge_triton.tools.bench import environment

DEV = torch.device("cuda", 0)


def spin(us: float) -> None:
    torch.cuda._sleep(int(us * timing._cycles_per_us(DEV)))


def host_us(fn, calls: int = 2000) -> float:
    fn()
    torch.cuda.synchronize()
    spin(80_000)
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    torch.cuda.synchronize()
    overhead = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        overhead.append(time.perf_counter_ns() - start)
    return (statistics.median(samples) - statistics.median(overhead)) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}

    n, h = 512, 4096
    dst = torch.randn(n, h, device=DEV, dtype=torch.bfloat16)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[100:356] = True
    m = int(mask.sum())
    src = torch.randn(m, h, device=DEV, dtype=torch.bfloat16)
    rows_np = np.flatnonzero(mask.numpy()).astype(np.int32)
    rows_dev = torch.from_numpy(rows_np).to(DEV)
    ring = arena(0)
    version = torch.autograd.graph.increment_version

    prims = {
        "type(t) is Tensor": lambda: type(dst) is torch.Tensor,
        "t.shape": lambda: dst.shape,
        "t.shape[0] (tuple unpack)": lambda: dst.shape[0],
        "t.stride()": lambda: dst.stride(),
        "t.stride(0)": lambda: dst.stride(0),
        "t.dtype": lambda: dst.dtype,
        "t.device": lambda: dst.device,
        "t.get_device()": lambda: dst.get_device(),
        "t.is_cpu": lambda: mask.is_cpu,
        "t.is_cuda": lambda: dst.is_cuda,
        "t.data_ptr()": lambda: dst.data_ptr(),
        "t.dim()": lambda: dst.dim(),
        "t.layout": lambda: dst.layout,
        "t.is_inference()": lambda: dst.is_inference(),
        "t.requires_grad": lambda: dst.requires_grad,
        "t.is_contiguous()": lambda: dst.is_contiguous(),
        "torch.is_grad_enabled()": torch.is_grad_enabled,
        "torch.compiler.is_compiling()": torch.compiler.is_compiling,
        "_len_torch_dispatch_stack()": torch._C._len_torch_dispatch_stack,
        "_cuda_getCurrentRawStream(0)": lambda: torch._C._cuda_getCurrentRawStream(0),
        "_cuda_isCurrentStreamCapturing()": torch._C._cuda_isCurrentStreamCapturing,
        "_cuda_getDevice()": torch._C._cuda_getDevice,
        "increment_version(dst)": lambda: version(dst),
        "lock acquire+release": (lambda lock: lambda: (lock.acquire(), lock.release()))(threading.Lock()),
        "dict.get(10-tuple)": (lambda d, k: lambda: d.get(k))({}, (1, 2, 3, 4, 5, 6, 7, 8, 9, torch.bfloat16)),
        "mask.numpy()": lambda: mask.numpy(),
        "np.count_nonzero(mask.numpy())": lambda: np.count_nonzero(mask.numpy()),
        "np.flatnonzero(mask.numpy())": lambda: np.flatnonzero(mask.numpy()),
        "ring session": lambda: ring.__enter__() and ring.__exit__(None, None, None),
        "tiny torch op (dst[0,0].add_(0))": (lambda t: lambda: t.add_(0))(dst[0, :1]),
        "index_put, CPU mask": lambda: dst.index_put_((mask,), src),
    }
    for name, fn in prims.items():
        results[name] = host_us(fn)

    # Launches of row_copy_kernel at four depths (COPY, no count, one row per program, 4096-wide steps).
    kernel = row_copy_kernel
    grid = (m, 1)
    call_args = (dst, src, rows_dev, rows_dev, m, h, dst.stride(0), src.stride(0))
    constexprs = dict(MODE=0, HAS_COUNT=False, ROWS=1, BLOCK_H=4096)
    compiled = kernel[grid](*call_args, **constexprs, num_warps=8, num_stages=1)
    run, function, packed = compiled.run, compiled.function, compiled.packed_metadata
    stream = torch._C._cuda_getCurrentRawStream(0)
    results["launch: kernel[grid](...)"] = host_us(
        lambda: kernel[grid](*call_args, **constexprs, num_warps=8, num_stages=1))
    cvals = tuple(constexprs.values())
    results["launch: compiled.run(...)"] = host_us(
        lambda: run(m, 1, 1, torch._C._cuda_getCurrentRawStream(0), function, packed, None, None, None,
                    *call_args, *cvals))
    try:
        results["CudaLauncher.__call__ source"] = inspect.getsource(type(run).__call__)
    except Exception as error:  # noqa: BLE001 (a probe: record what there is)
        results["CudaLauncher.__call__ source"] = repr(error)
    c_launch = getattr(run, "launch", None)
    results["launcher attributes"] = sorted(k for k in vars(run)) if hasattr(run, "__dict__") else repr(run)
    ints = (dst.data_ptr(), src.data_ptr(), rows_dev.data_ptr(), rows_dev.data_ptr(), m, h, dst.stride(0),
            src.stride(0))
    if c_launch is not None:
        coop, pdl = getattr(run, "launch_cooperative_grid", False), getattr(run, "launch_pdl", False)
        forms = {
            "3.6 form": lambda a: c_launch(m, 1, 1, stream, function, coop, pdl, None, None, packed, None, None,
                                           None, *a, *cvals),
            "3.6 form b": lambda a: c_launch(m, 1, 1, stream, function, coop, pdl, None, None, packed, None, None,
                                             None, *a),
        }
        for label, form in forms.items():
            try:
                form(call_args)
                torch.cuda.synchronize()
                results[f"launch: C entry, tensors ({label})"] = host_us(lambda: form(call_args))
                results[f"launch: C entry, int pointers ({label})"] = host_us(lambda: form(ints))
                ref = dst.clone()
                dst.zero_()
                form(ints)
                torch.cuda.synchronize()
                results[f"C entry ({label}) wrote the rows"] = bool(torch.equal(dst[mask.to(DEV)], src))
                dst.copy_(ref)
                break
            except Exception as error:  # noqa: BLE001
                results[f"C entry ({label}) error"] = repr(error)[:300]

    results["device"] = torch.cuda.get_device_name()
    results["versions"] = {"torch": torch.__version__, "triton": __import__("triton").__version__}
    name = torch.cuda.get_device_name().replace(" ", "_")
    path = args.out / f"probe_launch_{name}.json"  # the figures (µs) and where they were taken; the rest: the log
    figures = {k: v for k, v in results.items() if type(v) is float}
    path.write_text(json.dumps({"environment": environment(DEV), **figures}, indent=1))
    for k, v in results.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
    main()
