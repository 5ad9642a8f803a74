"""A device mask's row-map scan in two levels (scatter.counted) against the one-launch scan, alone and in the
merge it feeds, on a GPU (about 2 minutes on an H100).

    python bench/counted_scan.py --out DIR

Scans (a mask of N rows, 5% true, scattered; each map and count checked against torch.nonzero's):
- one_launch: mask_to_rows_kernel alone, each program counting the mask bytes before its block (the scan below
  scatter.COUNTED_FROM rows, and at every N before the counted scan)
- counted: scatter.mask_to_rows as shipped from COUNTED_FROM (mask_block_counts_kernel, then mask_to_rows_kernel
  summing the counts before its block; the second a programmatic dependent of the first where the device allows),
  here at every N; counted_b<B>: B mask bytes per program; counted_plain: the two launched one after the other
Merges (H = 4096, bf16, scattered rows, 5% and half the rows; each result checked byte for byte against the
first call's): the DEVICE_ROWS kind's launches (bench/scan_copy_bench.two_launch_and_copy: the scan, then the row
copy overlapping it where the device allows) with the counted scan and with the one-launch scan; the same
kind through the executor's hot path with its kernels bound (``bound_counted``, ``bound_one_launch``: what a memo
hit of the API launches, so their idle times compare the host cost of the scan's extra launch); and
masked_row_scatter_ (path="auto": the tuned table's choice), against a copy of the same bytes (``copy``).
Figures, in interleaved rounds (timing.interleaved): CUDA-event time with the GPU kept busy and L2 flushed
(timing.device_time_us), and with nothing queued before the call (timing.idle_time_us). Every call of a case
sets scatter.COUNTED_FROM (and for counted_plain scatter.dependent_launch) the same way, so they pay the same
host work. Printed and written to DIR/counted_scan_<device>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

import torch

from mmmerge_triton import executor, masked_row_scatter_, scatter
from mmmerge_triton.kernel_config import DEVICE_ROWS, Decision, cdiv, default_of_kind
from mmmerge_triton.tools import timing
from mmmerge_triton.tools.bench import device_name, environment
from mmmerge_triton.tools.cases import Case, make_inputs
from scan_copy_bench import one_launch_scan, two_launch_and_copy  # bench/ is the script's folder

DEV = torch.device("cuda", 0)
SCAN_NS = (8192, 16384, 32768, 65536, 131072, 262144, 1048576, 4194304)
SCAN_BLOCKS = (2048, 4096)
HIDDEN = 4096
MERGE_NS = (16384, 32768, 65536, 131072, 262144)
DENSITIES = (0.05, 0.5)


@contextlib.contextmanager
def scanned(counted: bool, overlap: bool = True):
    """scatter.mask_to_rows counting in two levels at any N (counted) or never; ``overlap`` False: its launches
    one after the other."""
    saved = scatter.COUNTED_FROM, scatter.dependent_launch
    scatter.COUNTED_FROM = 1 if counted else 2**31
    if not overlap:
        scatter.dependent_launch = lambda device_index: False
    try:
        yield
    finally:
        scatter.COUNTED_FROM, scatter.dependent_launch = saved


def figures(calls: dict) -> dict[str, dict]:
    taken = timing.interleaved(calls, {
        "device_us": lambda fn: timing.device_time_us(fn, DEV, reps=timing.ROUND_REPS),
        "idle_us": lambda fn: timing.idle_time_us(fn, DEV, reps=timing.ROUND_REPS)})
    return {name: {fig: statistics.median(v) for fig, v in figs.items()} | {"rounds": figs}
            for name, figs in taken.items()}


def check_against(calls: dict, reference: str, dst: torch.Tensor, what: str) -> None:
    """Run calls[reference] on dst as it is, then every other call but the copy on the same starting dst: each
    must leave dst's bytes as the reference did (SystemExit: "<call> differs from <what>")."""
    base = dst.clone()
    calls[reference]()
    expected = dst.clone()
    for name in [name for name in calls if name not in ("copy", reference)]:
        dst.copy_(base)
        calls[name]()
        if not torch.equal(dst.view(torch.uint8), expected.view(torch.uint8)):
            raise SystemExit(f"{name} differs from {what}")


def against_copy(taken: dict[str, dict]) -> str:
    """The copy's busy and idle µs, and every other call's as ratios to them (figures' output)."""
    c = taken["copy"]
    return f"copy {c['device_us']:.1f} µs busy, {c['idle_us']:.1f} idle | " + ", ".join(
        f"{name} {x['device_us'] / c['device_us']:.3f}x/{x['idle_us'] / c['idle_us']:.3f}x"
        for name, x in taken.items() if name != "copy")


def scan_case(n: int) -> dict:
    _, mask, src = make_inputs(Case(n, 8, 0.05, "scattered", mask="gpu"), DEV)
    flat, m = scatter.mask_bytes(mask), src.shape[0]
    expected = torch.nonzero(mask).flatten().to(torch.int32)
    row_map = torch.empty(max(m, 1), dtype=torch.int32, device=DEV)
    count = torch.empty(1, dtype=torch.int32, device=DEV)
    counts = torch.empty(cdiv(n, 1024), dtype=torch.int32, device=DEV)

    def counted(block=None, overlap=True):
        def call():
            with scanned(True, overlap):
                scatter.mask_to_rows(flat, row_map, count, m, block=block, counts=counts)
        return call

    def one_launch():
        with scanned(False):
            one_launch_scan(flat, row_map, count, m, scatter.one_launch_block(n))

    calls = {"one_launch": one_launch, "counted": counted(), "counted_plain": counted(overlap=False)}
    calls |= {f"counted_b{b}": counted(b) for b in SCAN_BLOCKS}
    for name, call in calls.items():
        row_map.fill_(-1)
        call()
        if not torch.equal(row_map[:m], expected) or int(count) != m:
            raise SystemExit(f"{name}: wrong row map at N={n}")
    with scanned(True):
        blocks = {"one_launch": scatter.one_launch_block(n), "counted": scatter.scan_block(n)}
    row = {"n": n, "m": m, "blocks": blocks, "calls": figures(calls)}
    base = row["calls"]["one_launch"]
    print(f"scan N={n}: one_launch {base['device_us']:.1f} µs busy, {base['idle_us']:.1f} idle | " + ", ".join(
        f"{name} {c['device_us']:.1f}/{c['idle_us']:.1f}" for name, c in row["calls"].items() if name != "one_launch"),
        flush=True)
    return row


def bound_merge(dst, mask, src, counted: bool):
    """The DEVICE_ROWS kind (the two-launch default) through the executor's hot path, as a memo hit of the API
    runs it: prepared once, its kernels bound on a first run with the scan counted or not, then launched bound
    (three launches or two, addresses as ints) whatever scatter.COUNTED_FROM says."""
    m = src.shape[0]
    decision = Decision("triton", DEVICE_ROWS, default_of_kind(HIDDEN, fused=False, m=m), False, "counted_scan.py")
    prepared = executor.prepare(decision, mask.numel(), dst, mask, src)
    with scanned(counted):
        executor.run(prepared, dst, mask, src, False)
    assert (prepared.launch.bound_rows is None  # the interpreter binds nothing
            or (prepared.launch.bound_rows[0] is not None) == counted)
    return lambda: executor.run(prepared, dst, mask, src, False)


def merge_case(n: int, density: float) -> dict:
    dst, mask, src = make_inputs(Case(n, HIDDEN, density, "scattered", mask="gpu"), DEV)
    flat, m = scatter.mask_bytes(mask), src.shape[0]
    shipped, copy = two_launch_and_copy(dst, flat, src, default_of_kind(HIDDEN, fused=False, m=m))

    def with_scan(counted: bool, fn):
        def call():
            with scanned(counted):
                fn()
        return call

    calls = {"copy": with_scan(True, copy), "counted": with_scan(True, shipped),
             "one_launch": with_scan(False, shipped),
             "auto": with_scan(scatter.counted(n), lambda: masked_row_scatter_(dst, mask, src))}
    if dst.is_cuda:  # the executor's DEVICE_ROWS kind launches with addresses on a CUDA device only
        calls |= {"bound_counted": bound_merge(dst, mask, src, True),
                  "bound_one_launch": bound_merge(dst, mask, src, False)}
    check_against(calls, "counted", dst, f"the counted scan's merge at N={n} {density:.0%}")
    row = {"n": n, "density": density, "m": m, "mb_moved": 2 * src.numel() * dst.element_size() / 1e6,
           "calls": figures(calls)}
    print(f"merge N={n} {density:.0%} (M={m}, {row['mb_moved']:.0f} MB): {against_copy(row['calls'])}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    scans = [scan_case(n) for n in SCAN_NS]
    merges = []
    for n in MERGE_NS:
        for density in DENSITIES:
            merges.append(merge_case(n, density))
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"counted_scan_{device_name(DEV)}.json"
    path.write_text(json.dumps({"environment": environment(DEV), "hidden": HIDDEN,
                                "figures": "device_us: busy GPU; idle_us: nothing queued; merges as ratios to copy",
                                "scans": scans, "merges": merges}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
