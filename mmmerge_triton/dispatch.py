"""path="auto": which path, and which kernel configuration, merges a given input.

Tuned tables (written by ``mmmerge-tune``) live in ``configs/<device name>.json``, the name as
``torch.cuda.get_device_name()`` gives it with spaces made underscores; ``MMMERGE_CONFIG_DIR`` points to
another folder. Each entry holds, for one (mask device, src dtype, dst dtype, N, H, M), the path with the
lowest loop time and the best Triton configuration (by loop time; a device mask's by device time: tune.select).
At run time the nearest entry wins: same mask device, the closest dtype pair (by element sizes), then the
smallest distance in log2 N, log2 H and log2 M. For a device mask the kind of kernel then follows N: under
kernel_config.FUSED_BELOW rows the entry's best one-launch configuration, and a one-launch winner is not carried
past FUSED_REACH times the N it was measured at, nor past FUSED_REACH x FUSED_BELOW (the untuned rule's reach):
there the two-launch default. A PyTorch path's win is not carried to an input that casts where its entry did not,
or the other way (the cast is a launch of its own there): the Triton path's untuned configuration. A table's
two-launch configuration carried to fewer source rows than its entry's takes proportionally fewer rows per
program (a power of two), so that the launch keeps the entry's number of programs: a small M with many rows
per program leaves SMs idle.
Without a usable table (none for this device, unreadable, or written for another device) the heuristic
below decides, after one warning. Inputs the Triton path cannot take (``triton_refusal``: not CUDA, a dtype
other than fp32/fp16/bf16, 2**31 mask rows or more, a destination without a row view or with the negative
bit) take index_put.

``decide`` is the one entry point: core.py asks it once per input signature (its prepared entries are memoized;
see core.py), explain() returns what it returns, executor.py runs it. The
table's rules read N and M through their quarter-octave bucket (``bucket``: exact below 8, else the top three
bits), and a decision is cached per (device, dtypes, H, bucket of N, bucket of M, mask device): a function of
its cache key alone, so the same input gets the same decision whatever came before, for a dict lookup.
"""
from __future__ import annotations

import functools
import json
import math
import os
import warnings
from pathlib import Path

import torch

from .inputs import TRITON_DTYPES, as_rows
from .kernel_config import (FUSED_BELOW, FUSED_REACH, PATHS, POSITIONS, Decision, KernelConfig, default_config,
                            default_of_kind, launch_kind)
from .rowmap import MAX_ROWS
from .scatter import supports

TABLE_VERSION = 1
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_NAME_SIZES = {"fp32": 4, "fp16": 2, "bf16": 2}


def _pytorch(path: str, reason: str, items: int = 0) -> Decision:
    return Decision(path, None, None, items > 1, reason)


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


def _distance(key: dict, mask: str, src: str, dst: str, n: int, hidden: int, m: int) -> tuple:
    dtype_gap = abs(_NAME_SIZES[key["src"]] - _NAME_SIZES[src]) + abs(_NAME_SIZES[key["dst"]] - _NAME_SIZES[dst])
    exact = (key["src"], key["dst"]) != (src, dst)
    shape_gap = (abs(math.log2(key["n"]) - math.log2(max(n, 1))) + abs(math.log2(key["hidden"]) - math.log2(max(hidden, 1)))
                 + abs(math.log2(key["rows"] + 1) - math.log2(m + 1)))  # the table's "rows" is M
    return (key["mask"] != mask, dtype_gap, exact, shape_gap)


def nearest_entry(table: dict, mask: str, src: str, dst: str, n: int, hidden: int, m: int) -> dict:
    return min(table["entries"], key=lambda e: _distance(e["key"], mask, src, dst, n, hidden, m))


def _heuristic(dst: torch.Tensor, mask_on_device: bool, n: int, m: int) -> Decision:
    if not dst.is_cuda:
        return _pytorch("index_put", "CPU tensors: index_put (Triton has no compiled CPU path)")
    cfg = default_config(dst.shape[-1], m, n, mask_on_device)
    return Decision("triton", None, cfg, False, "heuristic: the Triton row copy on CUDA (kernel_config.default_config)")


def bucket(x: int) -> int:
    """The quarter-octave bucket of a count, as the value the rules read: x below 8, else x with all but its
    top three bits cleared (so 16384 = FUSED_BELOW starts a bucket)."""
    if x < 8:
        return x
    shift = x.bit_length() - 3
    return x >> shift << shift


def _table_decision(dst: torch.Tensor, on_device: bool, src_dtype: torch.dtype, n: int, m: int) -> Decision:
    """The table's (or the heuristic's) decision for N = n and M = m, both bucket values."""
    if not dst.is_cuda:
        return _heuristic(dst, on_device, n, m)
    table = load_table(torch.cuda.get_device_name(dst.device).replace(" ", "_"))
    if table is None:
        return _heuristic(dst, on_device, n, m)
    mask_name, src_name, dst_name = ("gpu" if on_device else "cpu"), _NAMES[src_dtype], _NAMES[dst.dtype]
    return decide_from_table(table, mask_name, src_name, dst_name, n, dst.shape[-1], m)


def decide_from_table(table: dict, mask: str, src: str, dst: str, n: int, hidden: int, m: int) -> Decision:
    """The decision a table gives for one input, described by its mask device ("cpu"/"gpu"), dtype names
    ("fp32"/"fp16"/"bf16") and N, H, M. (A KernelConfig's ``rows`` is rows per program; an entry key's
    ``rows`` is M.)"""
    entry = nearest_entry(table, mask, src, dst, n, hidden, m)
    best = entry["best"]
    config = KernelConfig(**best["config"]) if best["config"] else None
    times = ", ".join(f"{p} {t:.1f}" for p, t in sorted(entry["loop_us"].items(), key=lambda kv: kv[1]))
    reason = f"tuned table {table_file_name(table['device'])}, nearest key {entry['key']}: loop µs {times}"
    if config is not None and mask == "gpu":
        if n < FUSED_BELOW and best.get("fused_config"):
            # Below FUSED_BELOW the one-launch kernel: at the H100 sweep's 48 such points its default took 0.43-0.96x
            # the two-launch default's loop time (3-36 µs less) and trailed its device time by at most 2.5 µs
            # (tests/test_untuned.py, DEVICE_SLACK_US).
            config = KernelConfig(**best["fused_config"])
            reason += f"; N is under {FUSED_BELOW}, so its best one-launch configuration"
        elif config.fused and n > FUSED_REACH * min(entry["key"]["n"], FUSED_BELOW):
            # The one-launch kernel's prefix re-reads grow as N squared: not carried past where it was measured,
            # nor past the untuned rule's reach (the H100 table's one-launch winners at N = 65536 beat a
            # two-launch kind since made faster: at N = 70000 they ran 1.16-1.61x its default, 2026-12-06-s5).
            # The two-launch default, not the entry's runner-up of that kind: measured where the kind lost, at
            # another N, and before its row copy overlapped the scan (the N = 16384 entry's 512-wide steps ran
            # 1.50-1.54x a copy at N = 32768, H = 4096, 5%, the default 1.25-1.31x: 2026-12-06-s7/scan_copy_quick).
            reason += (f"; N is over {FUSED_REACH}x the entry's or {FUSED_REACH}x {FUSED_BELOW}, so the two-launch "
                       "default")
            return Decision(best["path"], None, default_of_kind(hidden, fused=False, m=m), False, reason)
    if config is not None and config.fused and hidden != entry["key"]["hidden"]:
        # A one-launch tile serves the row length it was measured at only: the H100 table's winners of 32 rows
        # per program at H = 1024 (5% ahead of the default in loop time there) ran 1.2-1.6x the default's
        # device time at H = 1152 (bench/results/h100/2026-12-06-s6/untuned_*.log, four runs, two machines).
        config = default_of_kind(hidden, fused=True)
        reason += f"; H is not the entry's {entry['key']['hidden']}, so the one-launch default"
    if config is not None and not config.fused and config.rows > 1 and m < entry["key"]["rows"]:
        # Fewer source rows than measured: fewer rows per program, so that as many programs share the work.
        share = config.rows * m // max(entry["key"]["rows"], 1)
        fewer = 1 << (share.bit_length() - 1) if share > 1 else 1
        if fewer < config.rows:
            config = config._replace(rows=fewer)
            reason += f"; {fewer} rows per program, as many programs as at the entry's M"
    if best["path"] != "triton" and (entry["key"]["src"] == entry["key"]["dst"]) != (src == dst):
        # A PyTorch path casts src in a launch and a copy of its own, which the Triton path fuses: its win at an
        # entry without a cast says nothing of an input with one (or the other way). On the H200, index_put's loop-
        # time wins at N = 256, bf16 -> bf16 (0.94-0.98x the Triton path's, host-bound) carried to N = 700 with a
        # cast ran 2.2-2.3x the Triton path's loop time there (bench/results/h200/2026-12-06-s13/untuned_49c88af.log).
        measured = "without" if entry["key"]["src"] == entry["key"]["dst"] else "with"
        reason += f"; {best['path']} was measured {measured} a cast, so the Triton path's untuned configuration"
        return Decision("triton", None, default_config(hidden, m, n, mask == "gpu"), False, reason)
    return Decision(best["path"], None, config if best["path"] == "triton" else None, False, reason)




def triton_refusal(dst: torch.Tensor, mask: torch.Tensor, src_dtype: torch.dtype,
                   src: torch.Tensor | None = None) -> str | None:
    """Why the Triton path cannot merge ``src`` (or rows of ``src_dtype``) into ``dst`` at ``mask`` (None: it
    can). path="auto" then takes index_put; path="triton" raises with this reason."""
    if not supports(dst.device):
        return (f"it runs on CUDA tensors (the destination is on {dst.device}); on a CPU, set TRITON_INTERPRET=1 "
                "before importing mmmerge_triton")
    if dst.dtype not in TRITON_DTYPES or src_dtype not in TRITON_DTYPES:
        return f"it moves float32, float16 and bfloat16 rows (got {src_dtype} into {dst.dtype})"
    if mask.numel() > MAX_ROWS:
        return f"its row maps are int32: at most {MAX_ROWS} mask rows (got {mask.numel()})"
    # The negative bit (torch._neg_view, z.conj().imag) makes PyTorch write -value to dst's memory; the kernels
    # write raw. (A source's bit is resolved by executor.run; no real dtype carries the conjugate bit.)
    if dst.is_neg():
        return "the destination has the negative bit (a lazily negated view, e.g. z.conj().imag)"
    for t, name in ((dst, "destination"), (src, "source")):  # a tensor at an odd byte, e.g. frombuffer(offset=1)
        if t is not None and t.data_ptr() % t.element_size():
            return f"the {name}'s address is not a multiple of its element size ({t.element_size()} bytes)"
    if not (dst.dim() == 2 and dst.stride(1) == 1) and as_rows(dst) is None:
        return (f"the destination's leading dims must flatten to rows without a copy (shape {tuple(dst.shape)}, "
                f"strides {dst.stride()})")
    return None


_decisions: dict = {}


def choose(dst: torch.Tensor, mask: torch.Tensor, src_dtype: torch.dtype, m: int) -> Decision:
    """The table's decision for inputs the Triton path can take, cached per (device, dtypes, H, bucket of N,
    bucket of M, mask device), the rules reading the bucket values."""
    n, on_device = bucket(mask.numel()), mask.is_cuda
    key = (dst.get_device(), dst.dtype, src_dtype, dst.shape[-1], n, bucket(m), on_device)
    found = _decisions.get(key)
    if found is None:
        found = _decisions[key] = _table_decision(dst, on_device, src_dtype, n, key[5])
    return found


def decide(dst: torch.Tensor, mask: torch.Tensor, src_dtype: torch.dtype, m: int, path: str = "auto",
           src: torch.Tensor | None = None, *, plan: bool = False, items: int = 0,
           items_readable: bool = False) -> Decision:
    """The whole decision for merging ``m`` source rows of ``src_dtype`` (``src`` itself where it is one
    tensor) into ``dst`` at ``mask`` by ``path``: "auto" (the rules above), "triton" (raises ValueError where it
    cannot run; else the table's Triton configuration, or the untuned rule's where the table picks another
    path), or a PyTorch path by name. ``plan``: the merge reads a MergePlan's row map. ``items``: the number of
    items of a list source (0 for a tensor); ``items_readable``: they can be read in place (one row stride, no
    memory shared with dst, no gradient, no negative bit: core.decision_for's facts of the call)."""
    if path not in ("auto", "triton"):
        return _pytorch(path, f"path={path!r} asked for by name", items)
    refusal = triton_refusal(dst, mask, src_dtype, src)
    if refusal:
        if path == "triton":
            raise ValueError(f"path='triton' cannot merge these inputs: {refusal}. path='auto' takes index_put there")
        return _pytorch("index_put", f"the Triton path cannot merge these inputs: {refusal}", items)
    found = choose(dst, mask, src_dtype, m)
    if found.path != "triton":
        if path == "auto":
            return found._replace(concatenate=items > 1)
        n = bucket(mask.numel())
        found = Decision("triton", None, default_config(dst.shape[-1], bucket(m), n, mask.is_cuda), False,
                         f"path='triton' asked for by name; the untuned rule's configuration ({found.reason})")
    in_place = items > 1 and items_readable and items_in_place_pays(items, m, mask.numel(), dst, src_dtype)
    return found._replace(kind=launch_kind(found.config, mask, plan, in_place), concatenate=items > 1 and not in_place)


POSITION_PATHS = ("triton", "index_put", "index_copy")
"""The paths of a merge at row positions (masked_scatter takes a mask)."""


def decide_positions(dst: torch.Tensor, positions: torch.Tensor, src_dtype: torch.dtype, m: int,
                     path: str = "auto", src: torch.Tensor | None = None) -> Decision:
    """The decision for merging ``m`` rows of ``src_dtype`` into ``dst`` [N, H] at ``positions`` by ``path``.
    The Triton path runs the row copy of a CPU mask's map with the map given: the table's CPU-mask entry of
    (N, H, M) decides it. Device positions take the Triton path wherever it can run, whatever the entry's
    winner: it alone skips a position out of range without a sync or a device assert."""
    if path not in ("auto", "triton"):
        return _pytorch(path, f"path={path!r} asked for by name")
    n = dst.shape[0]
    refusal = triton_refusal(dst, positions, src_dtype, src)
    if refusal is None and positions.is_cpu and n > MAX_ROWS:
        refusal = f"CPU positions are staged as int32: at most {MAX_ROWS} rows (got {n})"
    if refusal:
        if path == "triton":
            raise ValueError(f"path='triton' cannot merge these inputs: {refusal}. path='auto' takes index_copy there")
        return _pytorch("index_copy", f"the Triton path cannot merge these inputs: {refusal}")
    found = _positions_choice(dst, src_dtype, bucket(n), bucket(m))
    if found.path != "triton":
        if path == "auto" and positions.is_cpu:
            return found._replace(path="index_copy" if found.path == "masked_scatter" else found.path)
        found = Decision("triton", None, default_config(dst.shape[-1], bucket(m), n, False), False,
                         f"the untuned rule's configuration ({found.reason}), since "
                         + ("path='triton' was asked for by name" if path == "triton" else
                            "device positions are read in place, out-of-range ones skipped"))
    return found._replace(kind=POSITIONS)


def _positions_choice(dst: torch.Tensor, src_dtype: torch.dtype, n: int, m: int) -> Decision:
    """The table's CPU-mask decision of (N, M) buckets, cached as ``choose`` caches a mask's."""
    key = (dst.get_device(), dst.dtype, src_dtype, dst.shape[-1], n, m, POSITIONS)
    found = _decisions.get(key)
    if found is None:
        found = _decisions[key] = _table_decision(dst, False, src_dtype, n, m)
    return found


# Lists of items, read in place or concatenated first. Loop-time model of the two ways to merge a list (µs, bytes per µs), fit to the H100 host of bench/results/h100
# (probe_items_host.log, suite_history/suite_items_rule_fit.json; checked against suite_items_*.json, a later
# run, in tests/test_items.py): a merge's host time is about 40 µs plus
# 0.002 µs per mask row (the host row map); reading items in place adds about 100 µs plus 1.2 µs per item
# (item table, staging, copy), concatenating them 0.33 µs per item (torch.cat); the device copies at 2.9 TB/s.
_MERGE_HOST_US, _MASK_ROW_HOST_US = 40.0, 0.002
_TABLE_HOST_US, _ITEM_HOST_US, _CAT_ITEM_HOST_US = 100.0, 1.2, 0.33
_COPY_BYTES_PER_US = 2.9e6


def items_in_place_pays(n_items: int, m: int, n: int, dst: torch.Tensor, src_dtype: torch.dtype) -> bool:
    """Whether reading the items in place beats concatenating them first, in loop time (the larger of host and
    device time, as calls overlap). In place halves the device work (one read and one write of the rows, where
    cat + scatter does both twice) but costs more host time per item. Never past MAX_ROWS mask rows: the
    item tables and row maps are int32."""
    if n > MAX_ROWS or m > MAX_ROWS:
        return False
    device_us = m * dst.shape[-1] * (src_dtype.itemsize + dst.element_size()) / _COPY_BYTES_PER_US
    host_us = _MERGE_HOST_US + _MASK_ROW_HOST_US * n
    in_place = max(host_us + _TABLE_HOST_US + _ITEM_HOST_US * n_items, device_us)
    concatenated = max(host_us + _CAT_ITEM_HOST_US * n_items, 2 * device_us)
    return in_place < concatenated


_dependents: list = []


def on_clear(clear) -> None:
    """Register ``clear()`` of a cache built from decisions (core.py's prepared entries), to run with clear_cache."""
    _dependents.append(clear)


def clear_cache() -> None:
    """Forget loaded tables and cached decisions (after writing a new table, or in tests)."""
    _decisions.clear()
    load_table.cache_clear()
    for clear in _dependents:
        clear()
