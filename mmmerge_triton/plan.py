"""MergePlan: a mask's row map built once and kept on the device, for merges that reuse one mask."""
from __future__ import annotations

import numpy as np
import torch

from .rowmap import RowMap, check_fits, host_rows, refuse_capture
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

    mask: bool [...] (flattened to N <= 2**31 - 1 rows), on the CPU or on a CUDA device. Any nonzero byte
        counts as true. The plan merges the mask as it was at the last ``update_``: a mask changed in place
        since then raises a ValueError at the next merge (``check_current``; its version counter tells, so a
        write through ``.numpy()`` or DLPack goes unseen). An inference tensor has no version counter: the
        plan keeps its own copy of such a mask, so every path merges that copy.
    device: where the merges run; defaults to the mask's device.

    Streams, as for any tensor: ``__init__`` and ``update_`` write the map on the stream current then. A
    merge on another stream must be ordered after that write (``stream.wait_stream(writer)``); an
    ``update_`` must be ordered after the merges still queued elsewhere that read the old map; and a plan
    dropped while another stream's merges are queued must be kept alive until they have run, or marked
    with ``plan.record_stream(stream)`` first. Threads may merge with one plan at once; updating it while
    another thread merges with it is a race, as for any tensor.
    """

    def __init__(self, mask: torch.Tensor, device: torch.device | str | None = None):
        _require_bool(mask)
        check_fits(mask.numel(), "MergePlan")
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
        if mask.device.type == "cpu":  # a replay would re-read a ring slot reused since
            refuse_capture(self.device, "MergePlan.update_ with a CPU mask cannot be captured in a CUDA graph: "
                                        "update outside the graph, or capture the update from a mask on the device")
        if mask.is_inference():  # no version counter to watch: keep a copy that no one else can change
            mask, version = mask.clone(), None
        else:
            version = mask._version
        if mask.device.type == "cpu":
            rows = host_rows(mask)
            head = np.zeros(_HEAD, dtype=np.int32)
            head[0] = rows.size
            used = _HEAD + rows.size
            if self.device.type == "cuda":  # staged in the pinned ring, the copy that reads it in one session
                with arena(self.device.index) as ring:
                    ring.put_into([head, rows], self._buffer[:used].view(torch.uint8))
            else:
                self._buffer[:used].copy_(torch.from_numpy(np.concatenate([head, rows])))
            self.host_count = int(rows.size)
        else:
            mask_to_rows(mask_bytes(mask), self.rows, self.count, self.num_rows)
            self.host_count = None
        self.mask, self._built_from, self._version = mask, mask, version
        return self

    def check_current(self, mask_name: str = "mask") -> None:
        """Raise a ValueError (naming ``mask_name``) if the plan's mask was changed in place, or replaced,
        since the plan was built or last updated: its row map would be stale. Cheap (no sync): the API calls
        it before every merge with a plan, on every path."""
        mask = self.mask
        if mask is not self._built_from:
            raise ValueError(f"plan.mask was replaced after the plan was built; call plan.update_({mask_name}) "
                             "to merge a new mask")
        if self._version is not None and mask._version != self._version:
            raise ValueError(f"{mask_name} was changed in place after its MergePlan was built or last updated "
                             f"(version {self._version}, now {mask._version}), so the plan's row map is stale: "
                             f"call plan.update_({mask_name}) after changing it")

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """``Tensor.record_stream`` for the plan's device memory: freed, it is not reused before the work
        queued on ``stream`` so far has run. For a plan dropped while merges on ``stream`` may be queued."""
        if self._buffer.is_cuda:
            self._buffer.record_stream(stream)
        if self._version is None and self.mask.is_cuda:
            self.mask.record_stream(stream)  # the plan's own copy of an inference mask

    @property
    def rowmap(self) -> RowMap:
        return RowMap(self.rows, self.count)

    def __repr__(self) -> str:
        known = f"count={self.host_count}" if self.host_count is not None else "count on device"
        return f"MergePlan(num_rows={self.num_rows}, {known}, device={self.device})"
