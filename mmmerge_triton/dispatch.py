"""path="auto": which path, and which kernel configuration, merges a given input.

Tuned tables (written by ``mmmerge-tune``) live in ``configs/<device name>.json``, the name as
``torch.cuda.get_device_name()`` gives it with spaces made underscores; ``MMMERGE_CONFIG_DIR`` points to
another folder. Each entry holds, for one (mask device, src dtype, dst dtype, N, H, M), the path with the
lowest loop time and the best Triton configuration. At run time the nearest entry wins: same mask device,
the closest dtype pair (by element sizes), then the smallest distance in log2 N, log2 H and log2 M. For a
device mask the kind of kernel then follows N: under scatter.FUSED_BELOW rows the entry's best one-launch
configuration, and a one-launch winner is not carried past FUSED_REACH times the N it was measured at. A
two-launch configuration carried to fewer source rows than its entry's takes proportionally fewer rows per
program (a power of two), so that the launch keeps the entry's number of programs: a small M with many rows
per program leaves SMs idle.
Without a usable table (none for this device, unreadable, or written for another device) the heuristic
below decides, after one warning. Decisions are cached per (device, dtypes, H, log2 N, log2 M, mask
device), so dispatch costs a dict lookup per call. A dst whose rows form no 2-D view takes index_put
whatever the table says (api._merge_ checks).
"""
from __future__ import annotations

import functools
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .paths import PATHS
from .scatter import FUSED_BELOW, KernelConfig, default_config

TABLE_VERSION = 1
FUSED_REACH = 1.5  # a fused (one-launch) winner serves N up to this multiple of its entry's N (or FUSED_BELOW)
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_NAME_SIZES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Decision:
    path: str
    config: KernelConfig | None
    reason: str


def table_file_name(device_name: str) -> str:
    """The table's file name for a device, shared by the tuner and the loader."""
    return device_name.replace(" ", "_") + ".json"


def table_dir() -> Path:
    return Path(os.environ.get("MMMERGE_CONFIG_DIR") or Path(__file__).parent / "configs")


@functools.lru_cache(maxsize=None)
def load_table(device_name: str) -> dict | None:
    """The tuned table of ``device_name``, or None (with one warning) if it is missing, unreadable, or foreign."""
    path = table_dir() / table_file_name(device_name)
    if not path.exists():
        warnings.warn(f"mmmerge_triton: no tuned table for {device_name} ({path}); path='auto' uses the heuristic "
                      "rule. Run `mmmerge-tune` to write one.", stacklevel=3)
        return None
    try:
        with open(path) as f:
            table = json.load(f)
        _check_table(table, device_name)
    except (OSError, ValueError, KeyError, TypeError) as error:
        warnings.warn(f"mmmerge_triton: ignoring the tuned table {path} ({error}); path='auto' uses the heuristic "
                      "rule.", stacklevel=3)
        return None
    return table


def _check_table(table: dict, device_name: str) -> None:
    if table.get("version") != TABLE_VERSION:
        raise ValueError(f"table version {table.get('version')!r}, expected {TABLE_VERSION}")
    if table.get("device") != device_name:
        raise ValueError(f"written for {table.get('device')!r}")
    if not table["entries"]:
        raise ValueError("no entries")
    for entry in table["entries"]:
        if set(entry["key"]) != {"mask", "src", "dst", "n", "hidden", "rows"}:
            raise ValueError(f"bad key {entry['key']}")
        if entry["best"]["path"] not in PATHS:
            raise ValueError(f"unknown path {entry['best']['path']!r}")
        if entry["best"]["config"] is not None:
            KernelConfig(**entry["best"]["config"])


def _distance(key: dict, mask: str, src: str, dst: str, n: int, hidden: int, rows: int) -> tuple:
    dtype_gap = abs(_NAME_SIZES[key["src"]] - _NAME_SIZES[src]) + abs(_NAME_SIZES[key["dst"]] - _NAME_SIZES[dst])
    exact = (key["src"], key["dst"]) != (src, dst)
    shape_gap = (abs(math.log2(key["n"]) - math.log2(max(n, 1))) + abs(math.log2(key["hidden"]) - math.log2(max(hidden, 1)))
                 + abs(math.log2(key["rows"] + 1) - math.log2(rows + 1)))
    return (key["mask"] != mask, dtype_gap, exact, shape_gap)


def nearest_entry(table: dict, mask: str, src: str, dst: str, n: int, hidden: int, rows: int) -> dict:
    return min(table["entries"], key=lambda e: _distance(e["key"], mask, src, dst, n, hidden, rows))


def _heuristic(dst: torch.Tensor, mask_on_device: bool, n: int, rows: int) -> Decision:
    if not dst.is_cuda:
        return Decision("index_put", None, "CPU tensors: index_put (Triton has no compiled CPU path)")
    cfg = default_config(dst.shape[-1], rows, n, mask_on_device)
    return Decision("triton", cfg, "heuristic: the Triton row copy on CUDA (scatter.default_config)")


def decide(dst: torch.Tensor, mask: torch.Tensor, src_dtype: torch.dtype, rows: int) -> Decision:
    """The decision for merging ``rows`` source rows of ``src_dtype`` into ``dst`` at ``mask``, with its reason
    (uncached: explain() and the cache below use it)."""
    n, hidden = mask.numel(), dst.shape[-1]
    on_device = mask.is_cuda
    if not dst.is_cuda:
        return _heuristic(dst, on_device, n, rows)
    table = load_table(torch.cuda.get_device_name(dst.device).replace(" ", "_"))
    if table is None:
        return _heuristic(dst, on_device, n, rows)
    mask_name, src_name, dst_name = ("gpu" if on_device else "cpu"), _NAMES[src_dtype], _NAMES[dst.dtype]
    return decide_from_table(table, mask_name, src_name, dst_name, n, hidden, rows)


def decide_from_table(table: dict, mask: str, src: str, dst: str, n: int, hidden: int, rows: int) -> Decision:
    """The decision a table gives for one input, described by its mask device ("cpu"/"gpu"), dtype names
    ("fp32"/"fp16"/"bf16") and N, H, M."""
    entry = nearest_entry(table, mask, src, dst, n, hidden, rows)
    best = entry["best"]
    config = KernelConfig(**best["config"]) if best["config"] else None
    times = ", ".join(f"{p} {t:.1f}" for p, t in sorted(entry["loop_us"].items(), key=lambda kv: kv[1]))
    reason = f"tuned table {table_file_name(table['device'])}, nearest key {entry['key']}: loop µs {times}"
    if config is not None and mask == "gpu":
        if n < FUSED_BELOW and best.get("fused_config"):
            # Below FUSED_BELOW the one-launch kernel is the faster kind wherever it was measured.
            config = KernelConfig(**best["fused_config"])
            reason += f"; N is under {FUSED_BELOW}, so its best one-launch configuration"
        elif config.fused and n > FUSED_REACH * entry["key"]["n"] and best.get("unfused_config"):
            # The one-launch kernel's prefix re-reads grow as N squared: not carried past where it was measured.
            config = KernelConfig(**best["unfused_config"])
            reason += f"; N is over {FUSED_REACH}x the entry's, so its best two-launch configuration"
    if config is not None and not config.fused and config.rows > 1 and rows < entry["key"]["rows"]:
        # Fewer source rows than measured: fewer rows per program, so that as many programs share the work.
        share = config.rows * rows // max(entry["key"]["rows"], 1)
        fewer = 1 << (share.bit_length() - 1) if share > 1 else 1
        if fewer < config.rows:
            config = config._replace(rows=fewer)
            reason += f"; {fewer} rows per program, as many programs as at the entry's M"
    return Decision(best["path"], config, reason)


_decisions: dict = {}


def choose(dst: torch.Tensor, mask: torch.Tensor, src_dtype: torch.dtype, rows: int) -> tuple[str, KernelConfig | None]:
    """(path, config) for path="auto", cached per (device, dtypes, H, log2 N, log2 M, mask device). The
    layout of dst is the caller's to check (a dst without a 2-D row view takes index_put)."""
    key = (dst.get_device(), dst.dtype, src_dtype, dst.shape[-1], mask.numel().bit_length(), rows.bit_length(),
           mask.is_cuda)
    found = _decisions.get(key)
    if found is None:
        decision = decide(dst, mask, src_dtype, rows)
        found = _decisions[key] = (decision.path, decision.config)
    return found


def clear_cache() -> None:
    """Forget loaded tables and cached decisions (after writing a new table, or in tests)."""
    _decisions.clear()
    load_table.cache_clear()
