"""Host side of mask_scan_copy_kernel (one launch, O(N) mask reads): its launch, on the stream's scan workspace
(workspaces.py)."""
from __future__ import annotations

from .kernel_config import KernelConfig, cdiv
from .kernels.mask_scan_copy import mask_scan_copy_kernel
from .launch import Bound, FastKernel
from .workspaces import workspace

_mask_scan_copy = FastKernel(mask_scan_copy_kernel)

LOOKBACK = 32
"""Status words a program reads per look-back step: one warp's worth, as CUB's tile status reads."""

MAX_MASK_ROWS = 2**31 - 1
"""Most mask rows the kernel takes: its status words hold counts of 31 bits."""


def mask_scan_copy(dense, compact, mask_bytes, mode: int, cfg: KernelConfig,
                   lookback: int = LOOKBACK) -> Bound | None:
    """Move rows between ``dense`` [N, H] and ``compact`` [M, H] (unit column strides) straight from
    ``mask_bytes`` [N] uint8 on the device, in one launch of cdiv(N, cfg.rows) programs that scan the mask
    once: dense row i <-> compact row offsets[i] for true rows with offsets[i] < M; compact rows past the
    mask's count and true rows past M are left alone. mode: COPY or ADD write dense rows, GATHER compact rows.
    cfg: rows per program (a power of two), block_h, warps, stages. lookback: status words per look-back step
    (a power of two). No sync. Returns the kernel as bound for this launch (None under the interpreter, or if
    nothing moved); its arguments: (grid_x, stream, dense, compact, mask_bytes, workspace(device, grid_x), N,
    M, H, dense row stride, compact row stride).
    """
    n = dense.shape[0]
    n_rows, hidden = compact.shape
    if n > MAX_MASK_ROWS:
        raise ValueError(f"dense has {n} rows: mask_scan_copy takes at most {MAX_MASK_ROWS} (2**31 - 1)")
    if n == 0 or n_rows == 0 or hidden == 0:
        return None
    tiles = cdiv(n, cfg.rows)
    state = workspace(dense.device, tiles)
    device = dense.device.index
    sd, sc = dense.stride(0), compact.stride(0)
    # Raw sizes in the key, not their classes: they are stable per model (as scatter.row_copy's key).
    key = (device, dense.dtype, compact.dtype, dense.data_ptr() % 16, compact.data_ptr() % 16,
           mask_bytes.data_ptr() % 16, hidden, sd, sc, n_rows > 0x7FFFFFFF, mode, cfg, lookback)
    return _mask_scan_copy.launch(
        key,
        (tiles, 1),
        (dense, compact, mask_bytes, state, n, n_rows, hidden, sd, sc),
        (mode, cfg.rows, cfg.block_h, lookback),
        (cfg.num_warps, cfg.num_stages),
        device,
    )
