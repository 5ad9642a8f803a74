"""The vocabulary of a decision: kernel configurations of the Triton path, the kinds of launch, the ``Decision``
that names what a merge runs (dispatch.py decides it, executor.py runs it), and the untuned rule that picks a
configuration (dispatch.py's fallback)."""
from __future__ import annotations

from typing import NamedTuple

import torch


# triton.next_power_of_2 and triton.cdiv are @jit-aware helpers (~3 µs each from Python, a constexpr-unwrapping
# wrapper: more than the rest of a launch's arithmetic). Plain ints here.
def next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length() if x > 1 else 1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


PATHS: tuple[str, ...] = ("triton", "index_put", "masked_scatter", "index_copy")
"""Names accepted by ``path=`` (besides "auto"): the Triton path (executor.py) and the PyTorch runners (paths.py)."""


class KernelConfig(NamedTuple):
    """How the Triton path runs: a [rows, block_h] tile per program, looped over H.

    fused: for a mask on the device, one launch of mask_row_copy_kernel (each program counts its own
    prefix) instead of mask_to_rows_kernel + row_copy_kernel. Ignored for a CPU mask.
    """

    rows: int
    block_h: int
    num_warps: int = 8
    num_stages: int = 1
    fused: bool = False


FUSED_BELOW = 16384
"""Device masks of fewer rows take the one-launch kernel by default: its prefix re-reads (a cost that grows
as N squared) stay small there, and it saves the row-map launch. (H100, bench/results/h100/regret_history/1_*.json:
at N = 512-12000 it ran 1.1-2.6x faster in loop time than the best two-launch configuration.)"""


FUSED_REACH = 1.5
"""A one-launch winner serves N up to this multiple of the N it was measured at (dispatch: a table entry's N,
and never past FUSED_REACH x FUSED_BELOW; the untuned rule: FUSED_BELOW, see default_config)."""
FUSED_SHORT_ROW = 2048
"""Past FUSED_BELOW, up to FUSED_REACH x FUSED_BELOW rows, the untuned rule keeps the one-launch kernel where H is at
most FUSED_SHORT_ROW. In the H100 table's sweep (configs/NVIDIA_H100_80GB_HBM3.json, device time with the GPU kept
busy, the slower of image blocks and scattered rows) the one-launch default ran 0.93-0.99x the two-launch one at
N = 16384 with 90% of the rows and 1.05-1.12x with 10%; with longer rows and 10% of the rows it ran 1.16-1.74x
(the reach once covered those, by loop time, where it had looked within 5%; through the API at N = 16384, H = 4096,
5% scattered, it ran 1.74x a copy's busy time against 1.30-1.34x: 2026-12-06-s10/counted_scan_91afe13.log). At
N = 65536 it lost by 15-37% at H = 2048 with 10% of the rows (its prefix re-reads grow as N squared over its 8 rows
per program), and a held-out point there (N = 70000, H = 2048, 5%) ran 2.0x the table's choice when the rule
reached that far (bench/results/h100/2026-12-06-s4/untuned.log). tests/test_untuned.py checks the rule against the
sweep."""


SHORT_ROW = 3072
MANY_ROWS = 4096
"""The two-launch kernel takes 4 rows per program where rows are shorter than SHORT_ROW elements and M is at
least MANY_ROWS, else 1. On the H100, one row per program of 1024 or 2048 at M = 58982-117965 ran 1.11-1.79x the
best tile with a CPU mask (whose row map the kernel reads from pinned host memory) and 1.00-1.19x with a device
mask (configs/NVIDIA_H100_80GB_HBM3.json; e.g. a CPU mask, fp32->bf16, N=131072, H=1024: 1 row 443.6 µs, 4 rows
248.1, 16 rows 247.5), and 1.43-1.49x at rows of 1536 (bf16, CPU mask, N = 40000 and 100000: regret_*.json, median
of four runs); 4 rows per program came within 3% of the best tile wherever the device dominated. From rows of 3584
one row per program was as fast or 1-2% faster. Below MANY_ROWS every tile measured alike (the host dominates),
and one row per program keeps the most programs (tests/test_untuned.py checks the rule against those files)."""


def default_config(hidden: int, m: int, n: int, mask_on_device: bool) -> KernelConfig:
    """The untuned rule, used where no tuned table fits (see dispatch.py), read off the H100 sweep
    (mmmerge_triton/configs/NVIDIA_H100_80GB_HBM3.json): a CPU mask's most frequent winner was one row per
    program over 4096-wide column steps, 8 warps, and four rows per program for many short rows (SHORT_ROW); a
    device mask of under 16384 rows took the one-launch kernel with 8 rows per program (its prefix re-reads stay
    small there), and past it where rows are short (FUSED_SHORT_ROW), else the
    two-launch form. (An earlier rule of up to 16 rows per program over 512-wide steps ran 1.05-1.12x a copy
    where the table's choices ran 1.02-1.07x: bench/results/h100, columns "triton" and "auto"; the two-launch
    form at N = 20000, H = 2048 ran 1.19x the table's one-launch choice: 2026-12-06-s3/untuned.log.)"""
    fused = mask_on_device and (n < FUSED_BELOW or (n < FUSED_REACH * FUSED_BELOW and hidden <= FUSED_SHORT_ROW))
    return default_of_kind(hidden, fused=fused, m=m)


def default_of_kind(hidden: int, fused: bool, m: int = 0) -> KernelConfig:
    """The default configuration of one kind of kernel for ``m`` source rows (0: not known): one-launch (8 rows
    per program) or two-launch (4 rows per program for many short rows, SHORT_ROW; else 1), over column steps as
    wide as H up to 4096, 8 warps, 1 stage."""
    block_h = min(next_pow2(max(hidden, 1)), 4096)
    if fused:
        return KernelConfig(8, block_h, 8, 1, True)
    return KernelConfig(4 if hidden < SHORT_ROW and m >= MANY_ROWS else 1, block_h, 8, 1, False)


# The kinds of launch of the Triton path (Decision.kind; executor.py runs each, and describes what it costs).
HOST_ROWS, DEVICE_FUSED, DEVICE_ROWS, PLAN_ROWS, ITEMS = "host_rows", "device_fused", "device_rows", "plan_rows", "items"
POSITIONS = "positions"  # row positions given by the caller (indexed_row_scatter_), not a mask
KINDS = (HOST_ROWS, DEVICE_FUSED, DEVICE_ROWS, PLAN_ROWS, ITEMS, POSITIONS)


class Decision(NamedTuple):
    """What a merge runs, all of it (explain() returns it; the call runs it).

    path: "triton" or a PyTorch path (paths.RUNNERS). kind: how the Triton path launches (KINDS: host_rows,
    device_fused, device_rows, plan_rows, items, positions; executor.py runs them); None for a PyTorch path. config: the Triton
    configuration, never None on the Triton path (None on a PyTorch path). concatenate: a list of items is
    concatenated first (torch.cat) rather than read in place (kind items); False for a tensor. reason: why.
    """

    path: str
    kind: str | None
    config: KernelConfig | None
    concatenate: bool
    reason: str


def launch_kind(config: KernelConfig, mask: torch.Tensor, plan: bool, items_in_place: bool) -> str:
    """The kind of launch that merges with ``config`` at ``mask``: a list read in place, a MergePlan's row map,
    else by where the mask is (under the interpreter every mask is a CPU one)."""
    if items_in_place:
        return ITEMS
    if plan:
        return PLAN_ROWS
    if mask.is_cuda:
        return DEVICE_FUSED if config.fused else DEVICE_ROWS
    return HOST_ROWS


def row_map_config(hidden: int) -> KernelConfig:
    """The configuration of the launches that copy through a row map already in hand, which no table covers:
    the backward gather and merge_requests' copy (executor.py): the untuned rule's two-launch default."""
    return default_of_kind(hidden, fused=False)
