"""path="auto": which path, and which kernel configuration, merges a given input."""
from __future__ import annotations

import torch

from .scatter import KernelConfig, as_rows, default_config

_decisions: dict = {}


def choose(dst: torch.Tensor, mask: torch.Tensor, src: torch.Tensor) -> tuple[str, KernelConfig | None]:
    """The rule: the Triton path on CUDA whenever dst's rows form a 2-D view with unit column stride;
    otherwise index_put, which takes any layout (and on the CPU, where Triton has no compiled path).
    Decisions are cached per (device, dtypes, H, log2 N, log2 M, mask device, layout)."""
    n = mask.numel()
    m = src.shape[0]
    on_device = mask.device.type != "cpu"
    key = (dst.device, dst.dtype, src.dtype, dst.shape[-1], n.bit_length(), m.bit_length(), on_device,
           dst.dim() == 2 and dst.stride(-1) == 1)
    found = _decisions.get(key)
    if found is None:
        if not dst.is_cuda:
            found = ("index_put", None)
        elif as_rows(dst) is None:
            found = ("index_put", None)
        else:
            found = ("triton", default_config(dst.shape[-1], m, n, on_device))
        if key[-1]:  # only cache plain 2-D layouts: others recheck as_rows
            _decisions[key] = found
    return found
