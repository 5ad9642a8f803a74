"""The common call, prepared once per input signature, then checked and launched lean.

Step after step an engine merges the same kinds of tensors: plain strided tensors, dst [N, H] and src [M, H]
of the same dtypes, strides and H on one device, a bool mask [N] on the CPU or there; only N, M and the
addresses change. The first call of a *signature* (everything the checks and the decision read but N, M and
the addresses, plus the quarter-octave buckets of N and M that the decision reads) runs every check of
inputs.py and asks dispatch.decide; what they found is kept under the signature. A later call of it reads the
signature (about 20 attribute reads), checks what the signature does not fix (N against the mask, the
addresses for shared memory, a CPU mask's count, gradients, inference tensors, the negative bit, function
transforms) and runs the signature's Launch (executor.py), whose kernels, bound on its first run, launch
through their C entry with addresses as ints: no check, decision, key or wrapper is rebuilt.

A call is lean only where nothing needs the general path's care: no tracing, dispatch mode, function transform
(torch.func, forward-mode AD) or gradient, no inference tensor, no negative bit, no bytes shared between dst
and src (or a device mask), nothing empty, a mask as long as dst, a device mask without check_count. ``merge``
returns False for anything else, having written nothing, and api.py runs the general path, which owns the
errors (a CPU mask's count mismatch is raised here, as CountMismatch, by rowmap.cpu_rows). An entry keeps only
what its key decides: a call that fails a per-call check (a mask of another length) prepares nothing.
"""
from __future__ import annotations

import numpy as np
import torch

from . import inputs
from .dispatch import bucket, decide, on_clear
from .executor import Launch, execute
from .paths import RUNNERS
from .rowmap import MAX_ROWS, CountMismatch

_MAX_ENTRIES = 4096  # signatures kept; a serving engine meets a few dozen (N and M buckets of one model)

_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_grad_enabled = torch.is_grad_enabled
_bump = torch.autograd.graph.increment_version
_inference_mode = torch.is_inference_mode_enabled
_forward_ad = torch.autograd.forward_ad  # its _current_level is -1 outside a dual level
_functorch_stack = torch._C._functorch.peek_interpreter_stack  # None outside torch.func's transforms


class Entry:
    """What a signature merges with: ``path`` (of dispatch.decide), the Triton path's ``launch`` (None for a
    PyTorch path), whether the mask shares dst's device (and so maybe its bytes), and the element sizes."""

    __slots__ = ("path", "launch", "mask_on_dst_device", "src_size", "dst_size")

    def __init__(self, path: str, launch: Launch | None, mask_on_dst_device: bool, src_size: int, dst_size: int):
        self.path, self.launch, self.mask_on_dst_device = path, launch, mask_on_dst_device
        self.src_size, self.dst_size = src_size, dst_size


_entries: dict = {}
on_clear(_entries.clear)  # the entries hold decisions: a new table (dispatch.clear_cache) drops them


def merge(dst, mask, src, accumulate, check_count, path) -> bool:
    """``dst[mask] = src`` (or ``+=``) in place, if this is a lean call (see the module's docstring): returns
    whether it ran. dst [N, H], mask [N] bool, src [M, H]; accumulate, check_count bool; path a str."""
    if (_is_compiling() or _dispatch_modes() or _forward_ad._current_level >= 0 or _functorch_stack() is not None
            or type(dst) is not _Tensor or type(mask) is not _Tensor or type(src) is not _Tensor
            or type(path) is not str
            or (accumulate is not True and accumulate is not False)
            or (check_count is not True and check_count is not False)):
        return False
    try:
        n, h = dst.shape
        m, h_src = src.shape
        (n_mask,) = mask.shape
        dst_ptr, src_ptr, mask_ptr = dst.data_ptr(), src.data_ptr(), mask.data_ptr()
        dst_strides, src_strides = dst.stride(), src.stride()
        # What each field stands for, in _prepare: the dtypes and layout -> inputs.check_dst/check_mask/check_src
        # and the Triton path's dtypes (dispatch.triton_refusal); the devices -> the device checks and the
        # kind of launch; the strides -> the row views (dst), the column-stride rule (src), a strided device mask
        # (mask contiguity); h, h_src -> the hidden-size check; the addresses mod 16 -> the odd-address refusal
        # and the kernels' alignment specialization; the flags and path -> check_flag/check_path and the
        # decision; the buckets of N and M -> what dispatch.decide reads of them. What no field fixes is
        # checked per call below: N against the mask, empty sizes, the negative bit, inference tensors,
        # gradients, shared bytes, a CPU mask's count (rowmap.cpu_rows or the count below).
        key = (dst.dtype, src.dtype, mask.dtype, mask.layout, dst.device, src.device, mask.device, dst_strides,
               src_strides, mask.is_contiguous(), h, h_src, dst_ptr & 15, src_ptr & 15, mask_ptr & 15, accumulate,
               check_count, path, bucket(n), bucket(m))
    except (ValueError, RuntimeError):  # not [N, H] / [M, H] / [N]; a layout without strides or storage
        return False
    # Before the entry: no key decides these. (A lazily negated view, z.conj().imag, is read raw by the kernels;
    # the decision refuses a negated dst, so it must not reach _prepare and decide for the whole signature.)
    if n_mask != n or m == 0 or h == 0 or n > MAX_ROWS or dst.is_neg() or src.is_neg():
        return False
    entry = _entries.get(key, False)
    if entry is False:
        entry = _prepare(key, dst, mask, src, accumulate, check_count, path)
    if entry is None:
        return False
    inference = dst.is_inference()  # written in place only under inference mode (PyTorch's rule)
    if (inference and not _inference_mode()) or (_grad_enabled() and (dst.requires_grad or src.requires_grad)):
        return False
    # Shared bytes: the general path reads a mask first, copies or refuses a src (PyTorch's rules).
    dst_end = dst_ptr + ((n - 1) * dst_strides[0] + (h - 1) * dst_strides[1] + 1) * entry.dst_size
    src_end = src_ptr + ((m - 1) * src_strides[0] + (h - 1) * src_strides[1] + 1) * entry.src_size
    if src_ptr < dst_end and dst_ptr < src_end:
        return False
    if entry.mask_on_dst_device and mask_ptr < dst_end and dst_ptr < mask_ptr + n:
        return False
    if entry.launch is None:  # a PyTorch path
        if mask.is_cpu:
            count = int(np.count_nonzero(mask.numpy()))
            if count != m:
                raise CountMismatch(m, count)
        RUNNERS[entry.path](dst, mask, src, accumulate)
        return True
    execute(entry.launch, dst, mask, src, accumulate,
            (mask_ptr, dst_ptr, src_ptr, n, m, h, dst_strides[0], src_strides[0]))
    if not inference:
        _bump(dst)  # the kernels write behind autograd's back
    return True


def _prepare(key, dst, mask, src, accumulate, check_count, path) -> Entry | None:
    """The entry of a new signature: None where every call of it takes the general path (a check fails, the
    mask is on the device and check_count asks for a sync, or a strided device mask). merge has checked what
    the key does not decide (the mask's length, empty sizes), so every check here is a function of the key."""
    if len(_entries) >= _MAX_ENTRIES:
        _entries.clear()
    try:
        inputs.check_path(path, tuple(RUNNERS))
        inputs.check_dst(dst, "dst")
        inputs.check_mask(mask, dst, "mask", "dst")
        inputs.check_src(src, dst, "src", "dst")
        decision = decide(dst, mask, src.dtype, bucket(src.shape[0]), path, src)
    except (TypeError, ValueError):
        _entries[key] = None
        return None
    on_device = not mask.is_cpu
    if (on_device and (check_count or not mask.is_contiguous())) or (src.stride(1) != 1 and src.shape[1] != 1):
        _entries[key] = None  # a sync asked for; a strided device mask or src, which the general path copies
        return None
    launch = None
    if decision.path == "triton":
        launch = Launch(decision.kind, decision.config, bucket(dst.shape[0]), dst.device)
    entry = _entries[key] = Entry(decision.path, launch, mask.device == dst.device, src.element_size(),
                                  dst.element_size())
    return entry
