"""The row copy alone against a copy of the same bytes, where a device mask's merge stays above 1.03x a copy
(5% of the rows): is it the scattered destination rows, or the kernel's configuration?

    python bench/row_copy_floor.py --out DIR      # a CUDA GPU; prints a table, writes DIR/row_copy_floor_<device>.json

Per case (H = 4096, bf16, N in NS, DENSITIES): the row map of the mask built once (its true rows as int32, as
the scan writes it), then scatter.row_copy through it with each configuration of CONFIGS (the default first),
for the rows as the mask scatters them (``scattered``) and for the same number of rows at the top of dst
(``contiguous``: the same kernel and map size, the destination written in order, as a copy writes). Device time
with the GPU kept busy and L2 flushed (timing.device_time_us), the calls interleaved in rounds
(timing.interleaved), the median of the rounds, each divided by the copy of the same bytes in the same rounds.
Every configuration's result is checked against PyTorch's ``dst[mask] = src`` once.

Then the merge itself at MERGE_NS (the device mask's two launches as the executor makes them: the row-map scan,
then the row copy overlapped with it, scan_copy_bench.two_launch_and_copy) with each configuration, block and
scattered masks: a row copy of more rows per program reads more source rows before it waits for the scan.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from mmmerge_triton import scatter
from mmmerge_triton.kernel_config import KernelConfig, default_of_kind
from mmmerge_triton.tools import timing
from mmmerge_triton.tools.bench import device_name, environment
from mmmerge_triton.tools.cases import Case, make_inputs
from scan_copy_bench import two_launch_and_copy  # bench/ is the script's folder

DEV = torch.device("cuda", 0)
HIDDEN = 4096
NS = (131072, 262144)
MERGE_NS = (32768, 65536)
DENSITIES = (0.05, 0.5)
ROUNDS = 5
CONFIGS = [default_of_kind(HIDDEN, fused=False)] + [
    KernelConfig(rows, block_h, warps, stages, False)
    for rows, block_h, warps, stages in ((2, 4096, 8, 1), (4, 4096, 8, 1), (1, 2048, 4, 1), (1, 4096, 4, 1),
                                         (1, 4096, 8, 2), (2, 2048, 8, 1), (4, 1024, 4, 1))]


def name(cfg: KernelConfig) -> str:
    return f"r{cfg.rows}_b{cfg.block_h}_w{cfg.num_warps}_s{cfg.num_stages}"


def case(n: int, density: float, layout: str) -> dict:
    dst, mask, src = make_inputs(Case(n, HIDDEN, density, "scattered", mask="gpu"), DEV)
    m = src.shape[0]
    if layout == "contiguous":
        mask = torch.zeros_like(mask)
        mask[:m] = True
    rows = torch.nonzero(mask).flatten().to(torch.int32)
    count = torch.tensor([m], dtype=torch.int32, device=DEV)
    expected = dst.clone()
    expected[mask] = src
    floor = torch.empty_like(src)
    calls = {"copy": lambda: floor.copy_(src)}
    for cfg in CONFIGS:
        got = dst.clone()
        scatter.row_copy(got, src, rows, count, scatter.COPY, cfg)
        if not torch.equal(got.view(torch.int16), expected.view(torch.int16)):
            raise SystemExit(f"row_copy {name(cfg)} differs from dst[mask] = src at N={n} {density:.0%} {layout}")
        calls[name(cfg)] = lambda cfg=cfg: scatter.row_copy(dst, src, rows, count, scatter.COPY, cfg)
    us, ratios = timed(calls, f"N={n} {density:.0%} {layout:10} (M={m})")
    return {"n": n, "density": density, "layout": layout, "m": m, "device_us": us, "ratio_to_copy": ratios}


def timed(calls: dict, label: str) -> tuple[dict, dict]:
    """Median device µs of each call over interleaved rounds, and each configuration's ratio to the copy's;
    printed as one line."""
    taken = timing.interleaved(calls, {"device_us": lambda fn: timing.device_time_us(fn, DEV)}, ROUNDS)
    us = {k: statistics.median(v["device_us"]) for k, v in taken.items()}
    ratios = {k: t / us["copy"] for k, t in us.items() if k != "copy"}
    default, best = name(CONFIGS[0]), min(ratios, key=ratios.get)
    print(f"{label}: copy {us['copy']:.1f} µs | default {default} {ratios[default]:.3f}x | best {best} "
          f"{ratios[best]:.3f}x | " + ", ".join(f"{k} {r:.3f}" for k, r in ratios.items() if k != default), flush=True)
    return us, ratios


def merge_case(n: int, density: float, pattern: str) -> dict:
    dst, mask, src = make_inputs(Case(n, HIDDEN, density, pattern, mask="gpu"), DEV)
    flat = scatter.mask_bytes(mask)
    expected = dst.clone()
    expected[mask] = src
    calls = {}
    for cfg in CONFIGS:
        merge, copy = two_launch_and_copy(dst, flat, src, cfg)
        got = dst.clone()
        two_launch_and_copy(got, flat, src, cfg)[0]()
        if not torch.equal(got.view(torch.int16), expected.view(torch.int16)):
            raise SystemExit(f"the merge with {name(cfg)} differs from dst[mask] = src at N={n} {density:.0%} {pattern}")
        calls.setdefault("copy", copy)
        calls[name(cfg)] = merge
    us, ratios = timed(calls, f"merge N={n} {density:.0%} {pattern:9} (M={src.shape[0]})")
    return {"n": n, "density": density, "pattern": pattern, "m": src.shape[0], "device_us": us,
            "ratio_to_copy": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cases = [case(n, d, layout) for n in NS for d in DENSITIES for layout in ("scattered", "contiguous")]
    merges = [merge_case(n, d, p) for n in MERGE_NS for d in DENSITIES for p in ("blocks", "scattered")]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"row_copy_floor_{device_name(DEV)}.json"
    path.write_text(json.dumps({"environment": environment(DEV), "hidden": HIDDEN, "rounds": ROUNDS,
                                "cases": cases, "merges": merges}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
