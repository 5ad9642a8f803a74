"""Host side of mask_scan_copy_kernel (one launch, O(N) mask reads): its persistent scan workspaces and launch.

A workspace (kernels/mask_scan_copy.py, module doc) is reset by the kernel itself, but two launches must
never use one at the same time. So there is one per (device, stream), where launches queue one after the
other, and one per launch captured in a CUDA graph (a graph's replays run one after another; two graphs, or
a graph and eager calls, may run at once on different streams). A captured launch's workspace is carved
from a zeroed reserve made by an eager call before capture (torch.cuda.graph synchronizes the device before
capture begins, so its zeroing has run); with no reserve left it is zeroed inside the capture (one memset
node in the graph). Captured workspaces are kept for the process: a graph reads its own at every replay.
"""
from __future__ import annotations

import threading

import torch

from .kernel_config import KernelConfig, next_pow2
from .kernels.mask_scan_copy import STATUS, mask_scan_copy_kernel
from .launch import Bound, FastKernel
from .kernel_config import cdiv

_mask_scan_copy = FastKernel(mask_scan_copy_kernel)

LOOKBACK = 32
"""Status words a program reads per look-back step: one warp's worth, as CUB's tile status reads."""

MAX_MASK_ROWS = 2**31 - 1
"""Most mask rows the kernel takes: its status words hold counts of 31 bits."""

_HEADER = STATUS.value  # int64 words before the status words
_MIN_TILES = 1024  # smallest workspace: 8 KB of status words, so small merges never regrow it
_ALIGN = 16  # words: a workspace carved from a reserve starts 128-byte aligned

_eager: dict[tuple[int, int], torch.Tensor] = {}  # (device index, raw stream) -> workspace; (-1, 0) on CPU
_reserve: dict[int, list] = {}  # device index -> [zeroed int64 buffer, words handed out to captures]
_drawn: set[int] = set()  # devices whose reserve a capture drew on since their last eager refill
_captured: list[torch.Tensor] = []  # captured launches' workspaces: a graph may replay as long as the process lives
_lock = threading.Lock()


def workspace_words(tiles: int) -> int:
    """int64 words of a workspace for launches of up to ``tiles`` tiles: the header and one status word each."""
    return _HEADER + tiles


def workspace(device: torch.device, tiles: int) -> torch.Tensor:
    """The scan workspace [>= workspace_words(tiles)] int64 for a launch of ``tiles`` programs on ``device``'s
    current stream (under the interpreter, CPU tensors: one workspace), zeroed when new. Inside a CUDA graph
    capture: a workspace of this launch's own. No sync; a new or grown workspace, or a reserve refilled after
    a capture, costs one zeroing launch."""
    if device.type != "cuda":
        key = (-1, 0)
    elif device.index != torch._C._cuda_getDevice():
        with torch.cuda.device(device.index):
            return workspace(device, tiles)
    elif torch._C._cuda_isCurrentStreamCapturing():
        return _for_capture(device, workspace_words(tiles))
    else:
        key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
    found = _eager.get(key)
    if found is None or found.numel() < workspace_words(tiles) or device.index in _drawn:
        found = _refresh(device, key, tiles)
    return found


def _refresh(device: torch.device, key: tuple[int, int], tiles: int) -> torch.Tensor:
    """Grow the workspace of ``key`` to ``tiles`` at least (in powers of two, from _MIN_TILES), and give a CUDA
    device an undrawn zeroed reserve as large as any workspace made on it, so that a capture of a launch made
    before on any stream finds its workspace there. A workspace replaced here was allocated on this stream and
    is freed on it, so the caching allocator reuses its memory only after the launches queued on it."""
    with _lock:
        found = _eager.get(key)
        if found is None or found.numel() < workspace_words(tiles):
            found = _eager[key] = torch.zeros(workspace_words(next_pow2(max(tiles, _MIN_TILES))),
                                              dtype=torch.int64, device=device)
        if device.type == "cuda":
            reserve = _reserve.get(device.index)
            if reserve is None or reserve[1] > 0 or reserve[0].numel() < found.numel():
                words = found.numel() if reserve is None else max(found.numel(), reserve[0].numel())
                _reserve[device.index] = [torch.zeros(words, dtype=torch.int64, device=device), 0]
            _drawn.discard(device.index)
    return found


def _for_capture(device: torch.device, words: int) -> torch.Tensor:
    """A zeroed workspace of ``words`` for one captured launch, kept for the process (module doc)."""
    with _lock:
        reserve = _reserve.get(device.index)
        start = 0 if reserve is None else reserve[1]
        if reserve is not None and start + words <= reserve[0].numel():
            found = reserve[0][start : start + words]
            reserve[1] = start + cdiv(words, _ALIGN) * _ALIGN
            _drawn.add(device.index)
        else:
            found = torch.zeros(words, dtype=torch.int64, device=device)  # a memset node in the graph
        _captured.append(found)
    return found


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
