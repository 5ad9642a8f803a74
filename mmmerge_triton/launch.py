"""Launch a @triton.jit kernel through its compiled binary once the JIT has built it.

``kernel[grid](...)`` binds every argument, hashes the specialization and builds launch metadata on each
call: 17.8 µs per launch on the H100 host, against 7.5 µs for ``CompiledKernel.run`` called directly and
5.9 µs for the launcher's C entry given addresses as ints (bench/results/h100/probe_launch_*.json).
``FastKernel`` looks the binary up by a key that the caller builds from what the JIT specializes on (dtypes,
16-byte alignment of pointers, ints equal to 1 or divisible by 16, 32- or 64-bit ints, constexprs, launch
options, device), or from finer facts that imply them (the raw sizes); on a miss the JIT picks (or compiles)
the binary and launches, and the binary is kept under that key, bound (``bind``) to a one-line launch.
tests/gpu/test_launch.py checks the key against the JIT's own choice.
Under ``TRITON_INTERPRET=1`` there is no binary: every call goes through the JIT.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
import triton

INTERPRET = bool(triton.knobs.runtime.interpret)

Bound = Callable[..., None]
"""``bound(grid_x, stream, *args)``: one launch of a compiled kernel over a (grid_x, 1, 1) grid on ``stream``
(a raw cudaStream_t), with the runtime arguments in order (tensors, objects with data_ptr(), or addresses as
ints) and the constexprs it was bound with. The caller makes the kernel's device current."""

# CudaLauncher.__call__ of Triton 3.5-3.6: (grid, stream, function, *args) -> C entry with the scratch buffers.
_KNOWN_CALL = ["self", "gridX", "gridY", "gridZ", "stream", "function", "args"]


def bind(run, function, packed, constexprs: tuple) -> Bound:
    """A compiled kernel's launch as one call. Where this Triton's launcher is the known one and the kernel
    needs no scratch memory, its C entry is called directly (its Python wrapper allocates nothing then);
    else CompiledKernel.run."""
    c_entry = getattr(run, "launch", None)
    try:
        known = list(inspect.signature(type(run).__call__).parameters) == _KNOWN_CALL
    except (TypeError, ValueError):
        known = False
    if (known and c_entry is not None and getattr(run, "global_scratch_size", 1) == 0
            and getattr(run, "profile_scratch_size", 1) == 0):
        coop, pdl = run.launch_cooperative_grid, run.launch_pdl

        def bound(grid_x, stream, *args):
            # Scratch buffers None; metadata and both launch hooks None (the JIT's profiler hooks are not called).
            c_entry(grid_x, 1, 1, stream, function, coop, pdl, None, None, packed, None, None, None, *args,
                    *constexprs)
    else:
        def bound(grid_x, stream, *args):
            run(grid_x, 1, 1, stream, function, packed, None, None, None, *args, *constexprs)
    return bound


class FastKernel:
    """``launch(key, grid, args, constexprs, options, device_index)`` runs ``kernel[grid](*args, **constexprs,
    num_warps=, num_stages=)``, skipping the JIT's per-call work once ``key`` has been seen, and returns the
    kernel bound to those constexprs (None under the interpreter): a later launch of the same key can call it.

    grid: (grid_x, 1). args: the runtime parameters in order (tensors, or objects with data_ptr() and dtype, or
    ints). options: (num_warps, num_stages), or with a third, launch_pdl (a programmatic dependent launch).
    constexprs: the values of the constexpr parameters, which must come last in the kernel's signature.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        params = inspect.signature(kernel.fn).parameters.values()
        self.constexpr_names = tuple(p.name for p in params if "constexpr" in str(p.annotation))
        self._cache: dict = {}

    def launch(self, key, grid: tuple, args: tuple, constexprs: tuple, options: tuple,
               device_index: int) -> Bound | None:
        if INTERPRET:
            self.kernel[grid](*args, **dict(zip(self.constexpr_names, constexprs)))
            return None
        entry = self._cache.get(key)
        if entry is None or device_index != torch._C._cuda_getDevice():
            with torch.cuda.device(device_index):
                return self._launch_slow(entry, key, grid, args, constexprs, options, device_index)
        entry[0](grid[0], torch._C._cuda_getCurrentRawStream(device_index), *args)
        return entry[0]

    def _launch_slow(self, entry, key, grid, args, constexprs, options, device_index) -> Bound:
        if entry is None:
            num_warps, num_stages, *pdl = options
            compiled = self.kernel[grid](*args, **dict(zip(self.constexpr_names, constexprs)),
                                         num_warps=num_warps, num_stages=num_stages,
                                         **({"launch_pdl": True} if pdl and pdl[0] else {}))
            # Read .run before .function: the module loads (on the current device) on first access of .run.
            run = compiled.run
            # (bound launch, binary): tests/gpu/test_launch.py compares the binary with the JIT's choice.
            self._cache[key] = entry = (bind(run, compiled.function, compiled.packed_metadata, constexprs),
                                        compiled.function)
            return entry[0]
        entry[0](grid[0], torch._C._cuda_getCurrentRawStream(device_index), *args)
        return entry[0]
