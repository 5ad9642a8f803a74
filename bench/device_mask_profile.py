"""Where a device mask's merge spends its GPU time: the two-launch kind (scatter.mask_to_rows, then
scatter.row_copy) split into its kernels by the profiler, against a copy of the same bytes.

    python bench/device_mask_profile.py --out DIR

Per case (H = 4096, bf16, a GPU mask, N in NS, DENSITIES, scattered rows): CUDA kernel time of the row-map scan
and of the row copy, their sum, the CUDA-event time of the two launches back to back with the GPU kept busy
(timing.device_time_us: the sum plus the gap between the launches), and the copy's kernel and event times; each
the median over REPS profiled calls, L2 flushed before each. Then the row-map scan alone at each N with
PREFIX_CHUNKS mask bytes per step of its prefix count (scatter.SCAN_PREFIX_CHUNK is the shipped one): the prefix loop
of the last program grows with N (the one-launch scan; from scatter.COUNTED_FROM rows the package scans in two
levels, which bench/counted_scan.py measures against it). Last, the row copy alone on a
built row map against a prototype that keeps PERSISTENT programs per SM, each looping over rows with the grid's
stride (the shipped kernel gives each row its own program, M programs in waves of the resident ones: at a few
thousand rows the last wave runs part-empty), kernel time, checked against the shipped copy's result. Printed and
written to DIR/device_mask_profile_*.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import triton
import triton.language as tl

from mmmerge_triton import scatter
from mmmerge_triton.kernels.row_tiles import move_rows
from mmmerge_triton.kernel_config import default_of_kind
from mmmerge_triton.tools import timing
from mmmerge_triton.tools.bench import device_name, environment
from mmmerge_triton.tools.cases import Case, make_inputs
from scan_copy_bench import one_launch_scan, two_launch_and_copy  # bench/ is the script's folder

DEV = torch.device("cuda", 0)
HIDDEN = 4096
NS = (32768, 131072, 262144)
DENSITIES = (0.05, 0.5)
REPS = 7
PREFIX_CHUNKS = (4096, 8192, 16384, 32768)
PERSISTENT = (4, 8, 16)  # programs per SM of the persistent row-copy prototype


@triton.jit
def persistent_row_copy_kernel(dst_ptr, src_ptr, rows_ptr, count_ptr, n_rows, H, stride_dst, stride_src,
                               BLOCK_H: tl.constexpr):
    """row_copy_kernel's COPY of one row at a time (move_rows), program p taking rows j = p, p + grid, ... below
    min(count, n_rows)."""
    limit = tl.minimum(tl.load(count_ptr), n_rows)
    for j in range(tl.program_id(0), limit, tl.num_programs(0)):
        row = j + tl.arange(0, 1)  # a one-row tile
        dst_rows = dst_ptr + tl.load(rows_ptr + row).to(tl.int64)[:, None] * stride_dst
        move_rows(dst_rows, src_ptr + row.to(tl.int64)[:, None] * stride_src, row < limit, H, 0, BLOCK_H)


def persistent_row_copy(dst: torch.Tensor, src: torch.Tensor, row_map: torch.Tensor, count: torch.Tensor,
                        programs: int) -> None:
    """The prototype: ``programs`` programs over src's M rows (dst [N, H], src [M, H], unit column strides)."""
    m, h = src.shape
    persistent_row_copy_kernel[(max(min(programs, m), 1),)](dst, src, row_map, count, m, h, dst.stride(0),
                                                           src.stride(0), BLOCK_H=min(triton.next_power_of_2(h), 4096),
                                                           num_warps=8)


def kernel_us(fn, flush: torch.Tensor) -> dict[str, float]:
    """{kernel name: median µs per call} over REPS profiled calls of ``fn`` (the flush's own kernel left out)."""
    per_call: dict[str, list[float]] = {}
    for _ in range(REPS):
        flush.zero_()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA and "fill" not in event.name.lower():
                per_call.setdefault(event.name, []).append(event.device_time)
    return {name: statistics.median(times) for name, times in per_call.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    flush = torch.empty(64 * 2**20, dtype=torch.uint8, device=DEV)  # 64 MB: past the H100's 50 MB L2
    cfg = default_of_kind(HIDDEN, fused=False)
    rows = []
    for n in NS:
        for density in DENSITIES:
            dst, mask, src = make_inputs(Case(n, HIDDEN, density, "scattered", mask="gpu"), DEV)
            m = src.shape[0]
            two_launch, copy = two_launch_and_copy(dst, scatter.mask_bytes(mask), src, cfg)
            two_launch()
            kernels = kernel_us(two_launch, flush)
            copy_kernels = kernel_us(copy, flush)
            event = {name: timing.device_time_us(fn, DEV, reps=REPS)
                     for name, fn in (("two_launch", two_launch), ("copy", copy))}
            copy_kernel = sum(copy_kernels.values())
            row = {"n": n, "density": density, "m": m, "kernels_us": kernels, "copy_kernels_us": copy_kernels,
                   "event_us": event, "kernel_sum_us": sum(kernels.values()), "copy_kernel_us": copy_kernel}
            rows.append(row)
            print(f"N={n} {density:.0%}: " + ", ".join(f"{k.split('(')[0][:28]} {v:.1f}" for k, v in kernels.items())
                  + f" | sum {row['kernel_sum_us']:.1f} ({row['kernel_sum_us'] / copy_kernel:.3f}x the copy's "
                  f"{copy_kernel:.1f}) | events: two launches {event['two_launch']:.1f}, copy {event['copy']:.1f} "
                  f"({event['two_launch'] / event['copy']:.3f}x)", flush=True)
            torch.cuda.empty_cache()
    chunks = []
    for n in NS:
        dst, mask, src = make_inputs(Case(n, HIDDEN, 0.05, "scattered", mask="gpu"), DEV)
        flat, m = scatter.mask_bytes(mask), src.shape[0]
        row_map = torch.empty(max(m, 1), dtype=torch.int32, device=DEV)
        count = torch.empty(1, dtype=torch.int32, device=DEV)
        block = scatter.one_launch_block(n)
        times = {}
        for chunk in PREFIX_CHUNKS:
            def scan(chunk=chunk):
                one_launch_scan(flat, row_map, count, m, block, chunk, 1, False)
            scan()
            expected = torch.nonzero(mask).flatten().to(torch.int32)
            if not torch.equal(row_map[:m], expected) or int(count) != m:
                raise SystemExit(f"the scan's row map is wrong at N={n}, chunk {chunk}")
            times[chunk] = sum(kernel_us(scan, flush).values())
        chunks.append({"n": n, "block": block, "scan_us": times})
        print(f"scan alone N={n} (block {block}): " + ", ".join(f"chunk {c} {t:.1f} µs" for c, t in times.items()),
              flush=True)
    persistent_rows = []
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    for n in NS:
        for density in DENSITIES:
            dst, mask, src = make_inputs(Case(n, HIDDEN, density, "scattered", mask="gpu"), DEV)
            m = src.shape[0]
            row_map = torch.empty(max(m, 1), dtype=torch.int32, device=DEV)
            count = torch.empty(1, dtype=torch.int32, device=DEV)
            scatter.mask_to_rows(scatter.mask_bytes(mask), row_map, count, m)
            floor = torch.empty(src.shape, dtype=dst.dtype, device=DEV)
            expected = dst.clone()
            scatter.row_copy(expected, src, row_map, count, scatter.COPY, cfg)
            calls = {"copy": lambda: floor.copy_(src),
                     "row_copy": lambda: scatter.row_copy(dst, src, row_map, count, scatter.COPY, cfg)}
            for per_sm in PERSISTENT:
                calls[f"persistent_{per_sm}"] = lambda per_sm=per_sm: persistent_row_copy(dst, src, row_map, count,
                                                                                          per_sm * sms)
                got = dst.clone()
                persistent_row_copy(got, src, row_map, count, per_sm * sms)
                if not torch.equal(got.view(torch.uint8), expected.view(torch.uint8)):
                    raise SystemExit(f"the persistent row copy differs at N={n} {density:.0%}, {per_sm} per SM")
            times = {name: sum(kernel_us(fn, flush).values()) for name, fn in calls.items()}
            persistent_rows.append({"n": n, "density": density, "m": m, "kernel_us": times})
            print(f"row copy N={n} {density:.0%} (M={m}): " + ", ".join(
                f"{name} {t:.1f} µs ({t / times['copy']:.3f}x)" for name, t in times.items()), flush=True)
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"device_mask_profile_{device_name(DEV)}.json"
    path.write_text(json.dumps({"environment": environment(DEV), "hidden": HIDDEN, "config": str(cfg),
                                "cases": rows, "prefix_chunks": chunks,
                                "persistent_row_copy": persistent_rows,
                                "sms": sms}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
