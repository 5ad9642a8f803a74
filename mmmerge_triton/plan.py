"""MergePlan: a mask's row map built once and kept on the device, for merges that reuse one mask."""
from __future__ import annotations

import numpy as np
import torch

from .rowmap import RowMap, host_rows
from .scatter import mask_bytes, mask_to_rows
from .staging import arena

_HEAD = 4  # int32 slots before the row map: the count, then padding that keeps ``rows`` 16-byte aligned


def _require_bool(mask) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")


class MergePlan:
    """The row map of a bool mask, resident on one device: ``rows`` [N] int32 (``rows[offsets[i]] = i``
    for every true ``mask[i]``) and ``count`` [1] int32, the number of true rows.

    Build it once per prompt and pass ``plan=`` to every merge that uses the same mask: deepstack layers
    (one accumulate launch per layer, no prefix sum redone), or a CUDA graph (the captured kernel reads
    ``rows`` and ``count`` from the device, so ``update_`` with a new mask of the same N, then a replay,
    merges the new prompt).

    mask: bool [...] (flattened to N rows), on the CPU or on a CUDA device.
    device: where the merges run; defaults to the mask's device.
    """

    def __init__(self, mask: torch.Tensor, device: torch.device | str | None = None):
        _require_bool(mask)
        self.device = torch.device(device) if device is not None else mask.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.shape = mask.shape
        self.num_rows = mask.numel()
        # One buffer, [count, pad, pad, pad, rows...]: a CPU mask's count and rows arrive in one copy.
        self._buffer = torch.empty(_HEAD + max(self.num_rows, 1), dtype=torch.int32, device=self.device)
        self.count, self.rows = self._buffer[:1], self._buffer[_HEAD:]
        self.update_(mask)

    def update_(self, mask: torch.Tensor) -> "MergePlan":
        """Rebuild the row map in place from a new mask of the same shape (no sync; capturable in a CUDA
        graph when the mask is on the plan's device; with a CPU mask, call it outside the graph)."""
        _require_bool(mask)
        if mask.shape != self.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}; this plan was built for {tuple(self.shape)}")
        if mask.device.type != "cpu" and mask.device != self.device:
            raise ValueError(f"mask is on {mask.device}; it must be on the CPU or on the plan's device ({self.device})")
        self.mask = mask
        if mask.device.type == "cpu":
            rows = host_rows(mask)
            self.host_count = int(rows.size)
            head = np.zeros(_HEAD, dtype=np.int32)
            head[0] = rows.size
            if self.device.type == "cuda":  # staged in the pinned ring (fenced until the copy has read it)
                if torch._C._cuda_isCurrentStreamCapturing():  # a replay would re-read a ring slot reused since
                    raise RuntimeError("MergePlan.update_ with a CPU mask cannot be captured in a CUDA graph: "
                                       "update outside the graph, or capture the update from a mask on the device")
                index = self.device.index
                pinned, _ = arena(index).put_packed([head, rows], torch._C._cuda_getCurrentRawStream(index))
                staged = pinned.view(torch.int32)
            else:
                staged = torch.from_numpy(np.concatenate([head, rows]))
            self._buffer[: _HEAD + rows.size].copy_(staged[: _HEAD + rows.size], non_blocking=True)
        else:
            self.host_count = None
            mask_to_rows(mask_bytes(mask), self.rows, self.count, self.num_rows)
        return self

    @property
    def rowmap(self) -> RowMap:
        return RowMap(self.rows, self.count)

    def __repr__(self) -> str:
        known = f"count={self.host_count}" if self.host_count is not None else "count on device"
        return f"MergePlan(num_rows={self.num_rows}, {known}, device={self.device})"
