"""Device time of the one-launch scan copy (mmmerge_triton/scan_copy.py) against a copy of the same bytes and
the shipped device-mask kernels, on a GPU (under 3 minutes on an H100).

    python bench/scan_copy_bench.py --out DIR      # prints the tables, writes DIR/scan_copy_<device>.json

Figures: CUDA-event device time of one call, the GPU kept busy by a spin and L2 flushed before each call
(timing.device_time_us), the calls of a case interleaved in rounds and the median of the rounds kept
(timing.interleaved). Calls, on a GPU mask, bf16 -> bf16:
- copy: src into a buffer of its size, the bytes a merge must move (every ratio divides by it)
- scan: scan_copy.mask_scan_copy, one launch, O(N) mask reads (the configuration the sweep picked)
- two_launch: scatter.mask_to_rows + scatter.row_copy (the DEVICE_ROWS kind, default configuration)
- fused: scatter.mask_row_copy (the DEVICE_FUSED kind, default configuration; quadratic in N)
- api: masked_row_scatter_(path="triton"), the shipped choice of kind and tuned configuration
First a sweep of the scan's rows per program x elements per tile step (columns per step = elements / rows) x
look-back words at SWEEP_CASES; the configuration with the least geometric mean of its ratios to the copy runs
the grid (H = 4096, N in NS, DENSITIES, block and scattered masks). Each scan result is checked against
PyTorch's (``dst[mask] = src``) once per configuration and case.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from pathlib import Path

import torch
import triton

from mmmerge_triton import masked_row_scatter_, scan_copy, scatter
from mmmerge_triton.kernel_config import KernelConfig, default_of_kind
from mmmerge_triton.kernels.mask_rows import mask_to_rows_kernel
from mmmerge_triton.scatter import COPY
from mmmerge_triton.tools import timing
from mmmerge_triton.tools.bench import FLOOR, device_name, environment
from mmmerge_triton.tools.cases import Case, make_inputs
from mmmerge_triton.tools.analysis import MB

DEV = torch.device("cuda", 0)
HIDDEN = 4096
NS = (8192, 16384, 32768, 65536, 131072, 262144)
DENSITIES = (0.05, 0.5, 0.9)
PATTERNS = ("blocks", "scattered")
SWEEP_ROWS = (4, 8, 16, 32)
SWEEP_TILE = (16384, 32768)  # elements per tile step: 32K at 32 rows took 177 registers a thread (Triton 3.6, sm_90)
SWEEP_LOOKBACK = (8, 32, 128)
SWEEP_CASES = (Case(65536, HIDDEN, 0.5, "blocks", mask="gpu"), Case(65536, HIDDEN, 0.5, "scattered", mask="gpu"),
               Case(262144, HIDDEN, 0.05, "scattered", mask="gpu"))
GOAL_RATIO, GOAL_FROM_BYTES = 1.03, 64 * MB  # issue 23: at most 1.03x a copy from 64 MB moved


def scan_config(rows: int, tile: int) -> KernelConfig:
    """rows per program, columns per step as wide as H up to ``tile`` elements per step."""
    return KernelConfig(rows, min(HIDDEN, tile // rows), 8, 1)


def median_device_us(calls: dict) -> dict[str, dict]:
    """Each call's device time (µs): the median of timing.ROUNDS interleaved rounds, and the rounds."""
    taken = timing.interleaved(calls, {"device_us": lambda fn: timing.device_time_us(fn, DEV, reps=timing.ROUND_REPS)})
    return {name: {"device_us": statistics.median(t["device_us"]), "device_us_rounds": t["device_us"]}
            for name, t in taken.items()}


def check_scan(dst, mask, src, cfg: KernelConfig, lookback: int) -> None:
    """The scan's result is PyTorch's, bit for bit (the benchmark times a right kernel)."""
    out, expected = dst.clone(), dst.clone()
    expected[mask] = src
    scan_copy.mask_scan_copy(out, src, scatter.mask_bytes(mask), COPY, cfg, lookback)
    if not torch.equal(out, expected):
        raise AssertionError(f"mask_scan_copy differs from PyTorch at rows={cfg.rows} lookback={lookback}")


def sweep_case(case: Case, grid: list[tuple[KernelConfig, int]]) -> dict[str, dict]:
    """The copy and the scan in every configuration of ``grid`` at one case, in interleaved rounds."""
    dst, mask, src = make_inputs(case, DEV)
    flat = scatter.mask_bytes(mask)
    floor = torch.empty(src.shape, dtype=dst.dtype, device=DEV)
    calls = {FLOOR: lambda: floor.copy_(src)}
    for cfg, lookback in grid:
        check_scan(dst, mask, src, cfg, lookback)
        calls[config_name(cfg, lookback)] = lambda cfg=cfg, lookback=lookback: scan_copy.mask_scan_copy(
            dst, src, flat, COPY, cfg, lookback)
    return median_device_us(calls)


def sweep(quick: bool = False) -> tuple[list[dict], tuple[KernelConfig, int]]:
    """The scan's device time per configuration at SWEEP_CASES, with the copy in the same rounds; returns the
    records and the (config, lookback) of least geometric-mean ratio. ``quick``: 8 and 16 rows per program,
    look-back 32, the first two cases."""
    records = []
    ratios: dict[tuple[KernelConfig, int], list[float]] = {}
    rows_, lookbacks, cases = ((8, 16), (32,), SWEEP_CASES[:2]) if quick else (SWEEP_ROWS, SWEEP_LOOKBACK,
                                                                                SWEEP_CASES)
    grid = [(scan_config(rows, tile), lookback)
            for rows, tile, lookback in itertools.product(rows_, SWEEP_TILE, lookbacks)]
    for case in cases:
        results = sweep_case(case, grid)
        torch.cuda.empty_cache()
        copy_us = results[FLOOR]["device_us"]
        for cfg, lookback in grid:
            r = results[config_name(cfg, lookback)]
            ratios.setdefault((cfg, lookback), []).append(r["device_us"] / copy_us)
            records.append({"case": case.as_dict(), "rows": cfg.rows, "block_h": cfg.block_h, "lookback": lookback,
                            "device_us": r["device_us"], "copy_us": copy_us, "ratio": r["device_us"] / copy_us})
        print(f"sweep {case.label()}: copy {copy_us:.1f} µs; " + ", ".join(
            f"{name} {r['device_us'] / copy_us:.3f}x" for name, r in results.items() if name != FLOOR))
    best = min(ratios, key=lambda key: math.prod(ratios[key]))
    return records, best


def config_name(cfg: KernelConfig, lookback: int) -> str:
    return f"r{cfg.rows}_b{cfg.block_h}_l{lookback}"


def one_launch_scan(flat, row_map, count, m: int, block: int, chunk: int = scatter.SCAN_PREFIX_CHUNK,
                    loads: int = scatter.SCAN_PREFIX_LOADS, words: bool | None = None, trigger: bool = False) -> None:
    """The package's mask_to_rows_kernel in its one-launch form (each program counts the mask bytes before its
    block itself, ``chunk`` bytes x ``loads`` per step; by words where ``words``, default scatter.words), launched
    through the JIT: flat [N] uint8 -> row_map [>= m] int32, count [1]."""
    n = flat.numel()
    words = scatter.words(flat.data_ptr() % 16) if words is None else words
    mask_to_rows_kernel[(triton.cdiv(n, block),)](
        flat, row_map, count, row_map, n, m, BLOCK=block, TILE=block, COUNTED=False, AFTER_COUNTS=False,
        COUNTS_CHUNK=scatter.COUNTS_CHUNK, PREFIX_CHUNK=chunk, PREFIX_LOADS=loads, WORDS=words, TRIGGER=trigger,
        num_warps=8, num_stages=1)


def two_launch_and_copy(dst, flat, src, cfg: KernelConfig, after_scan: bool = True) -> tuple:
    """(two_launch, copy) of one case: the DEVICE_ROWS kind's launches (scatter.mask_to_rows into buffers made
    here once, where the executor carves them from one per call, then scatter.row_copy, overlapped where the
    device allows unless ``after_scan`` is False) from the mask's bytes ``flat``, and a copy of src into a buffer
    of its shape in dst's dtype (the bytes a merge must move)."""
    m = src.shape[0]
    row_map = torch.empty(max(m, 1), dtype=torch.int32, device=dst.device)
    count = torch.empty(1, dtype=torch.int32, device=dst.device)
    counts = torch.empty(triton.cdiv(flat.numel(), 1024), dtype=torch.int32, device=dst.device)  # >= any block's
    floor = torch.empty(src.shape, dtype=dst.dtype, device=dst.device)

    def two_launch():
        scatter.mask_to_rows(flat, row_map, count, m, counts=counts)
        scatter.row_copy(dst, src, row_map, count, COPY, cfg, after_scan=after_scan)

    return two_launch, lambda: floor.copy_(src)


def measure(case: Case, scan_cfg: KernelConfig, lookback: int) -> dict:
    """Every call of one case, in interleaved rounds."""
    dst, mask, src = make_inputs(case, DEV)
    flat = scatter.mask_bytes(mask)
    check_scan(dst, mask, src, scan_cfg, lookback)
    fused_cfg = default_of_kind(HIDDEN, fused=True)
    two_launch, copy = two_launch_and_copy(dst, flat, src, default_of_kind(HIDDEN, fused=False))
    calls = {
        FLOOR: copy,
        "scan": lambda: scan_copy.mask_scan_copy(dst, src, flat, COPY, scan_cfg, lookback),
        "two_launch": two_launch,
        "fused": lambda: scatter.mask_row_copy(dst, src, flat, COPY, fused_cfg),
        "api": lambda: masked_row_scatter_(dst, mask, src, path="triton"),
    }
    results = median_device_us(calls)
    copy_us = results[FLOOR]["device_us"]
    return {"case": case.as_dict(), "label": case.label(), "moved_bytes": case.moved_bytes, "results": results,
            "ratio": {name: r["device_us"] / copy_us for name, r in results.items() if name != FLOOR}}


def print_table(records: list[dict]) -> None:
    names = [name for name in records[0]["ratio"]]
    print(f"\n{'N':>7s} {'density':>7s} {'pattern':>9s} {'MB':>7s} {'copy µs':>8s}"
          + "".join(f"{name + ' x':>13s}" for name in names) + "  goal")
    for r in records:
        c = r["case"]
        goal = "" if r["moved_bytes"] < GOAL_FROM_BYTES else ("met" if r["ratio"]["scan"] <= GOAL_RATIO else "MISSED")
        print(f"{c['n']:7d} {c['density']:7.2f} {c['pattern']:>9s} {r['moved_bytes'] / MB:7.1f} "
              f"{r['results'][FLOOR]['device_us']:8.1f}" + "".join(f"{r['ratio'][name]:13.3f}" for name in names)
              + f"  {goal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for scan_copy_<device>.json")
    parser.add_argument("--quick", action="store_true",
                        help="a small sweep, and N from 32768 at densities 0.05 and 0.5 (about a minute)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("scan_copy_bench.py times device kernels: it needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sweep_records, (cfg, lookback) = sweep(args.quick)
    print(f"sweep: best {config_name(cfg, lookback)} ({time.perf_counter() - start:.0f} s)")
    records = []
    ns, densities = ((32768, 65536, 131072, 262144), (0.05, 0.5)) if args.quick else (NS, DENSITIES)
    path = args.out / f"scan_copy_{device_name(DEV)}.json"
    for n, density, pattern in itertools.product(ns, densities, PATTERNS):
        records.append(measure(Case(n, HIDDEN, density, pattern, mask="gpu"), cfg, lookback))
        torch.cuda.empty_cache()
        write(path, cfg, lookback, sweep_records, records, args.quick)  # what is done survives a cut-off run
    print_table(records)
    goal = [r for r in records if r["moved_bytes"] >= GOAL_FROM_BYTES]
    met = sum(r["ratio"]["scan"] <= GOAL_RATIO for r in goal)
    print(f"\ngoal (scan <= {GOAL_RATIO}x the copy from {GOAL_FROM_BYTES / MB:.0f} MB moved): met at {met} of "
          f"{len(goal)} cases; scan {min(r['ratio']['scan'] for r in goal):.3f}-"
          f"{max(r['ratio']['scan'] for r in goal):.3f}x there ({time.perf_counter() - start:.0f} s in all)")
    print(f"wrote {path}")


def write(path: Path, cfg: KernelConfig, lookback: int, sweep_records: list, records: list, quick: bool) -> None:
    path.write_text(json.dumps({"environment": environment(DEV), "hidden": HIDDEN, "quick": quick,
                                "goal": {"ratio": GOAL_RATIO, "from_bytes": GOAL_FROM_BYTES},
                                "scan_config": {**cfg._asdict(), "lookback": lookback},
                                "sweep": sweep_records, "cases": records}, indent=1))


if __name__ == "__main__":
    main()
