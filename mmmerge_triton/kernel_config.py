"""Kernel configurations of the Triton path, and the untuned rule that picks one (dispatch.py's fallback)."""
from __future__ import annotations

from typing import NamedTuple


# triton.next_power_of_2 is a @jit-aware helper (~3 µs from Python): a plain int here.
def next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length() if x > 1 else 1


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


def default_config(hidden: int, n_rows: int, n_mask: int, mask_on_device: bool) -> KernelConfig:
    """The untuned rule, used where no tuned table fits (see dispatch.py), read off the H100 sweep
    (mmmerge_triton/configs/NVIDIA_H100_80GB_HBM3.json): a CPU mask's most frequent winner was one row per
    program over 4096-wide column steps, 8 warps; a device mask of under 16384 rows took the one-launch
    kernel with 8 rows per program (its prefix re-reads stay small there), a larger one the two-launch form.
    (An earlier rule of up to 16 rows per program over 512-wide steps ran 1.05-1.12x a copy where the table's
    choices ran 1.02-1.07x: bench/results/h100, columns "triton" and "auto".)"""
    return default_of_kind(hidden, fused=mask_on_device and n_mask < FUSED_BELOW)


def default_of_kind(hidden: int, fused: bool) -> KernelConfig:
    """The default configuration of one kind of kernel: one-launch (8 rows per program) or two-launch (1),
    over column steps as wide as H up to 4096, 8 warps, 1 stage."""
    block_h = min(next_pow2(max(hidden, 1)), 4096)
    return KernelConfig(8, block_h, 8, 1, True) if fused else KernelConfig(1, block_h, 8, 1, False)
