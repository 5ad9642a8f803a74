"""How a program should count the true mask bytes before its block (kernels.row_tiles.count_true_before), on a
GPU: the row-map scan of a device mask (scatter.mask_to_rows) and the one-launch kind (scatter.mask_row_copy)
with the count read in other ways, against the shipped kernels.

    python bench/prefix_count_bench.py --out DIR      # about a minute on an H100; DIR/prefix_count_<device>.json

Before e00cb59 the count read CHUNK bytes per step, one step after another: the scan's last program, at
N = 262144, spent 8 dependent steps of 32 KB on its prefix (15 µs of kernel time; 2026-12-06 profile). The variants
(count_true_before's parameters; "shipped" is what scatter passes now):
- bytes_C_xU: C bytes per load, U loads issued before they are summed (U independent loads in flight).
- words_C_xU: the same read as 4-byte words, each word's nonzero bytes counted with shifts (a byte holding
  any nonzero value counts once), 4x fewer lanes and registers for the same bytes.
Each variant's row map (or merge) is checked against PyTorch's once per case. Figures: CUDA kernel time from the
profiler, median of REPS calls, L2 flushed before each; for the one-launch kind also CUDA-event device time
(timing.device_time_us) and a copy of the same bytes in the same run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import triton
import triton.language as tl

from mmmerge_triton import scatter
from mmmerge_triton.kernel_config import default_of_kind
from mmmerge_triton.kernels.row_tiles import count_true_before, move_rows
from mmmerge_triton.tools import timing
from mmmerge_triton.tools.bench import device_name, environment
from mmmerge_triton.tools.cases import Case, make_inputs
from device_mask_profile import kernel_us as profile_kernel_us  # bench/ is the script's folder
from scan_copy_bench import one_launch_scan

DEV = torch.device("cuda", 0)
REPS = 7
SCAN_NS = (32768, 65536, 131072, 262144, 1048576)
# (name, bytes per load, loads per step, words)
SCAN_VARIANTS = (("bytes_32768_x1", 32768, 1, False), ("bytes_16384_x2", 16384, 2, False),
                 ("bytes_8192_x4", 8192, 4, False), ("bytes_16384_x4", 16384, 4, False),
                 ("words_32768_x1", 32768, 1, True), ("words_32768_x2", 32768, 2, True),
                 ("words_32768_x4", 32768, 4, True), ("words_65536_x1", 65536, 1, True),
                 ("words_65536_x2", 65536, 2, True), ("words_131072_x1", 131072, 1, True))
# (N, H, share of rows, layout); the last: bench/compare_host_path.py's N = 8192 point, which ran 1.02x slower in
# loop time with the words count (2026-12-06-s6/compare_host_path.log)
FUSED_CASES = ((4096, 4096, 0.05, "scattered"), (4096, 4096, 0.5, "scattered"), (12000, 4096, 0.05, "scattered"),
               (12000, 4096, 0.5, "scattered"), (16384, 4096, 0.05, "scattered"), (24576, 4096, 0.05, "scattered"),
               (8192, 3584, 0.5, "blocks"))
FUSED_VARIANTS = (("bytes_4096_x1", 4096, 1, False), ("bytes_4096_x4", 4096, 4, False),
                  ("words_4096_x1", 4096, 1, True), ("words_16384_x1", 16384, 1, True),
                  ("words_8192_x2", 8192, 2, True))


@triton.jit(do_not_specialize=["n", "n_rows"])
def fused_variant_kernel(dense_ptr, compact_ptr, mask_ptr, n, n_rows, H, stride_dense_row, stride_compact_row,
                         ROWS: tl.constexpr, BLOCK_H: tl.constexpr, CHUNK: tl.constexpr, UNROLL: tl.constexpr,
                         WORDS: tl.constexpr):
    """kernels.mask_row_copy.mask_row_copy_kernel (COPY) with the prefix count's chunk, loads and words chosen
    here."""
    start = tl.program_id(0) * ROWS
    prefix = count_true_before(mask_ptr, start, CHUNK, UNROLL, WORDS)
    i = start + tl.arange(0, ROWS)
    is_true = (tl.load(mask_ptr + i, mask=i < n, other=0) != 0).to(tl.int32)
    offsets = prefix + tl.cumsum(is_true, axis=0) - is_true
    row_ok = (is_true != 0) & (offsets < n_rows)
    dense_rows = dense_ptr + i.to(tl.int64)[:, None] * stride_dense_row
    compact_rows = compact_ptr + offsets.to(tl.int64)[:, None] * stride_compact_row
    move_rows(dense_rows, compact_rows, row_ok, H, 0, BLOCK_H)


def kernel_us(fn, flush: torch.Tensor) -> float:
    """Median CUDA kernel µs of one call of ``fn`` (device_mask_profile.kernel_us, its kernels summed)."""
    return sum(profile_kernel_us(fn, flush).values())


def scan_cases(flush: torch.Tensor) -> list[dict]:
    results = []
    for n in SCAN_NS:
        _, mask, src = make_inputs(Case(n, 64, 0.05, "scattered", mask="gpu"), DEV)
        flat, m, block = scatter.mask_bytes(mask), src.shape[0], scatter.one_launch_block(n)
        expected = torch.nonzero(mask).flatten().to(torch.int32)
        row_map = torch.empty(max(m, 1), dtype=torch.int32, device=DEV)
        count = torch.empty(1, dtype=torch.int32, device=DEV)
        calls = {"shipped": lambda: scatter.mask_to_rows(flat, row_map, count, m)}
        for name, chunk, unroll, words in SCAN_VARIANTS:
            calls[name] = lambda c=chunk, u=unroll, w=words: one_launch_scan(flat, row_map, count, m, block, c, u, w)
        times = {}
        for name, call in calls.items():
            row_map.fill_(-1)
            call()
            if not torch.equal(row_map[:m], expected) or int(count) != m:
                raise SystemExit(f"{name}: wrong row map at N={n}")
            times[name] = kernel_us(call, flush)
        results.append({"n": n, "block": block, "kernel_us": times})
        print(f"scan N={n} (block {block}): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()), flush=True)
    return results


def fused_cases(flush: torch.Tensor) -> list[dict]:
    results = []
    for n, hidden, density, layout in FUSED_CASES:
        cfg = default_of_kind(hidden, fused=True)
        dst, mask, src = make_inputs(Case(n, hidden, density, layout, mask="gpu"), DEV)
        flat, m = scatter.mask_bytes(mask), src.shape[0]
        expected = dst.clone()
        expected[mask] = src.to(dst.dtype)
        floor = torch.empty(src.shape, dtype=dst.dtype, device=DEV)
        calls = {"copy": lambda: floor.copy_(src),
                 "shipped": lambda: scatter.mask_row_copy(dst, src, flat, scatter.COPY, cfg)}
        for name, chunk, unroll, words in FUSED_VARIANTS:
            calls[name] = lambda c=chunk, u=unroll, w=words: fused_variant_kernel[(triton.cdiv(n, cfg.rows),)](
                dst, src, flat, n, m, hidden, dst.stride(0), src.stride(0), ROWS=cfg.rows, BLOCK_H=cfg.block_h,
                CHUNK=c, UNROLL=u, WORDS=w, num_warps=cfg.num_warps, num_stages=1)
        kernel, event = {}, {}
        for name, call in calls.items():
            if name != "copy":
                dst.zero_()
                dst.copy_(expected.masked_fill(mask[:, None], 0))
                call()
                if not torch.equal(dst.view(torch.uint8), expected.view(torch.uint8)):
                    raise SystemExit(f"{name}: wrong merge at N={n} H={hidden} {density:.0%} {layout}")
            kernel[name] = kernel_us(call, flush)
            event[name] = timing.device_time_us(call, DEV, reps=REPS)
        results.append({"n": n, "hidden": hidden, "density": density, "layout": layout, "m": m, "kernel_us": kernel,
                        "event_us": event})
        print(f"one launch N={n} H={hidden} {density:.0%} {layout} (M={m}), kernel µs (x copy): " + ", ".join(
            f"{k} {v:.1f} ({v / kernel['copy']:.3f}x)" for k, v in kernel.items()), flush=True)
        print("    event µs: " + ", ".join(f"{k} {v:.1f} ({v / event['copy']:.3f}x)" for k, v in event.items()),
              flush=True)
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    flush = torch.empty(64 * 2**20, dtype=torch.uint8, device=DEV)  # 64 MB: past the H100's 50 MB L2
    scans = scan_cases(flush)
    fused = fused_cases(flush)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefix_count_{device_name(DEV)}.json"
    path.write_text(json.dumps({"environment": environment(DEV), "scan": scans, "one_launch": fused}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
