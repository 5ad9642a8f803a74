"""A device mask's two launches with the row copy's reads issued early: a prototype against the shipped kernels
and a copy of the same bytes, on a Hopper GPU (about 2 minutes on an H100).

    python bench/device_mask_overlap.py --out DIR

Before 588b882 the row copy (scatter.row_copy with a count) waited on three loads in a chain before its first
store: the count, then the row map's entries (masked by the count), then the source rows (masked by both). Its
source rows depend on neither: ``early`` loads them, the map's entries and the count at once, and masks only the
store.
``pdl`` goes further: the scan (mask_to_rows) lets the copy start at once (gdc_launch_dependents), and the copy,
launched as a programmatic dependent (launch_pdl), loads its source rows before it waits for the scan
(gdc_wait), so the first wave's reads overlap the scan. Source rows are never written by the scan, and the
kernels before the scan in the stream have finished before it starts, so these early reads see what a plain
launch would.

``shipped`` is the package's DEVICE_ROWS kind (scatter.row_copy after_scan: its first source columns read
before the map, a dependent launch where the device allows); ``plain`` the same kernels launched one after the
other. Per case (H = 4096, bf16, a GPU mask, N in NS, DENSITIES, scattered rows): CUDA-event time of each call with the
GPU kept busy and L2 flushed (timing.device_time_us), and with nothing queued before it (timing.idle_time_us), in
interleaved rounds (timing.interleaved); each variant's result checked against the shipped one, byte for byte.
Printed and written to DIR/device_mask_overlap_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl

from mmmerge_triton import scatter
from mmmerge_triton.kernel_config import default_of_kind
from mmmerge_triton.tools import timing
from mmmerge_triton.tools.bench import device_name, environment
from mmmerge_triton.tools.cases import Case, make_inputs
from scan_copy_bench import one_launch_scan, two_launch_and_copy  # bench/ is the script's folder

DEV = torch.device("cuda", 0)
HIDDEN = 4096
NS = (32768, 65536, 131072, 262144)
DENSITIES = (0.05, 0.5)
VARIANTS = {  # name: (pdl, rows per program, warps)
    "early_1x8": (False, 1, 8), "early_2x8": (False, 2, 8), "early_1x4": (False, 1, 4),
    "pdl_1x8": (True, 1, 8), "pdl_2x8": (True, 2, 8), "pdl_1x4": (True, 1, 4),
}


@triton.jit(do_not_specialize=["n_rows"])
def early_row_copy_kernel(dense_ptr, compact_ptr, rows_ptr, count_ptr, n_rows, H, stride_dense_row,
                          stride_compact_row, ROWS: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    """row_copy_kernel's COPY with a count, for H <= BLOCK_H: the source tile is loaded before anything the scan
    writes is read (before gdc_wait with PDL); the map's entries and the count are loaded together."""
    j = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_src = j < n_rows
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    compact_rows = compact_ptr + j.to(tl.int64)[:, None] * stride_compact_row
    tile = tl.load(compact_rows + cols[None, :], mask=in_src[:, None] & col_ok[None, :])
    if PDL:
        tl.extra.cuda.gdc_wait()
    dense_row = tl.load(rows_ptr + j, mask=in_src, other=0).to(tl.int64)
    row_ok = j < tl.minimum(tl.load(count_ptr), n_rows)
    dense_rows = dense_ptr + dense_row[:, None] * stride_dense_row
    tl.store(dense_rows + cols[None, :], tile.to(dense_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def variant_call(dst, src, flat, row_map, count, pdl: bool, rows: int, warps: int):
    """The two launches of one variant."""
    n, m = flat.numel(), src.shape[0]
    block = scatter.one_launch_block(n)
    words = scatter.words(flat.data_ptr() % 16)

    def call():
        one_launch_scan(flat, row_map, count, m, block, words=words, trigger=pdl)
        early_row_copy_kernel[(triton.cdiv(m, rows),)](dst, src, row_map, count, m, HIDDEN, dst.stride(0),
                                                       src.stride(0), ROWS=rows, BLOCK_H=HIDDEN, PDL=pdl,
                                                       num_warps=warps, num_stages=1, launch_pdl=pdl)
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = default_of_kind(HIDDEN, fused=False)
    results = []
    for n in NS:
        for density in DENSITIES:
            dst, mask, src = make_inputs(Case(n, HIDDEN, density, "scattered", mask="gpu"), DEV)
            flat, m = scatter.mask_bytes(mask), src.shape[0]
            row_map = torch.empty(max(m, 1), dtype=torch.int32, device=DEV)  # the prototypes' map and count
            count = torch.empty(1, dtype=torch.int32, device=DEV)
            shipped, copy = two_launch_and_copy(dst, flat, src, cfg)
            calls = {"copy": copy, "plain": two_launch_and_copy(dst, flat, src, cfg, after_scan=False)[0],
                     "shipped": shipped}
            base = dst.clone()
            shipped()
            expected = dst.clone()
            for name in list(VARIANTS) + ["plain"]:
                if name in VARIANTS:
                    calls[name] = variant_call(dst, src, flat, row_map, count, *VARIANTS[name])
                dst.copy_(base)
                row_map.fill_(-1)
                calls[name]()
                if not torch.equal(dst.view(torch.uint8), expected.view(torch.uint8)):
                    raise SystemExit(f"{name} differs from the shipped kernels at N={n} {density:.0%}")
            taken = timing.interleaved(calls, {
                "device_us": lambda fn: timing.device_time_us(fn, DEV, reps=timing.ROUND_REPS),
                "idle_us": lambda fn: timing.idle_time_us(fn, DEV, reps=timing.ROUND_REPS)})
            row = {"n": n, "density": density, "m": m, "mb_moved": 2 * src.numel() * dst.element_size() / 1e6,
                   "calls": {name: {fig: statistics.median(v) for fig, v in figs.items()} | {"rounds": figs}
                             for name, figs in taken.items()}}
            results.append(row)
            copy = row["calls"]["copy"]
            print(f"N={n} {density:.0%} (M={m}, {row['mb_moved']:.0f} MB): copy {copy['device_us']:.1f} µs busy, "
                  f"{copy['idle_us']:.1f} idle | " + ", ".join(
                      f"{name} {c['device_us'] / copy['device_us']:.3f}x/{c['idle_us'] / copy['idle_us']:.3f}x"
                      for name, c in row["calls"].items() if name != "copy"), flush=True)
            del dst, mask, src, base, expected, calls, shipped, copy
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"device_mask_overlap_{device_name(DEV)}.json"
    path.write_text(json.dumps({"environment": environment(DEV), "hidden": HIDDEN, "variants": VARIANTS,
                                "figures": "ratio busy/idle to the copy; device_us busy GPU, idle_us nothing queued",
                                "cases": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
