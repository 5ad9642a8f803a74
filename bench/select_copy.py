"""A device mask's merge with no row map (scatter.mask_select_copy) against the same kind through its row map, and
against a copy of the same bytes, on a GPU (about 20 s on an H100).

    python bench/select_copy.py --out DIR      # (bash bench/run_gpu.sh select DIR) prints the table, writes
                                               # DIR/select_copy_<device>.json
    python bench/select_copy.py --out DIR --configs r1_b4096_w4_s1 r2_b4096_w4_s1   # select in other tiles too
    python bench/select_copy.py --out DIR --sums 512   # select summing 512 block counts at once too
    python bench/select_copy.py --out DIR --parts      # and select's parts: where its time above a copy goes

Calls, on a device mask, H = 4096, bf16 -> bf16, the two-launch default configuration:
- copy: src into a buffer of its size, the bytes a merge must move (every ratio divides by it)
- map: the row map (scatter.mask_to_rows: one launch under COUNTED_FROM rows, two from there), then the row copy
  waiting for it (bench/scan_copy_bench.two_launch_and_copy): the kind's launches past scatter.SELECT_BELOW rows
- select: the block counts, then the row copy that finds its own rows from them (scatter.mask_select_copy): the
  kind's launches under SELECT_BELOW rows
- bound_map, bound_select: the same through the executor's hot path with its kernels bound (what a memo hit of
  the API launches: their idle times compare the host cost of the launches)
- auto: masked_row_scatter_ as shipped (the tuned table's choice)
- plan: masked_row_scatter_ with a MergePlan of the mask built beforehand (PLAN_ROWS: the row copy through the
  plan's map, no scan at the merge)
- select1: select in one launch, its programs counting the blocks and publishing the counts to one another
  (scatter.mask_select_copy without counts), a persistent grid of scatter.SELECT_PER_SM programs per SM;
  select1_counting: the same with no read of the counts repeated, every program counting the blocks it finds
  missing at once; select1_sm<K>: select1 with K programs per SM
- select_<config>, select1_<config> (--configs, tools/tune.py's configuration names): select and select1 with
  another tile in the same rounds
- select_sums<W> (--sums): select with its programs summing W block counts at once (scatter.select_sums's place)
- --parts: floor, the row copy through the mask's row map built beforehand (scatter.row_copy, the kernel a CPU
  mask's merge runs: no scan on the way); select_ready, select's copy alone, its block counts written beforehand
  and launched as no dependent (what select costs past the counts' launch); counts, the block counts' launch alone
Figures (counted_scan.figures), in interleaved rounds (timing.interleaved): CUDA-event time with the GPU kept busy
and L2 flushed (timing.device_time_us), and with nothing queued before the call (timing.idle_time_us). Each result
checked byte for byte against the map's.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mmmerge_triton import MergePlan, executor, masked_row_scatter_, scatter
from mmmerge_triton.kernel_config import DEVICE_ROWS, Decision, KernelConfig, cdiv, default_of_kind
from mmmerge_triton.tools.bench import device_name, environment
from mmmerge_triton.tools.cases import Case, make_inputs
from mmmerge_triton.tools.tune import config_name, parse_config_name
from counted_scan import against_copy, check_against, figures  # bench/ is the script's folder
from scan_copy_bench import two_launch_and_copy

DEV = torch.device("cuda", 0)
HIDDEN = 4096
NS = (16384, 32768, 65536, 131072, 262144)
DENSITIES = (0.05, 0.5)
PATTERNS = ("blocks", "scattered")
GOAL_RATIO, GOAL_FROM_MB = 1.03, 64  # at most 1.03x a copy from 64 MB moved (read and written)


def bound_merge(dst, mask, src, select: bool):
    """The DEVICE_ROWS kind through the executor's hot path, as a memo hit of the API runs it: prepared with no row
    map or through one (scatter.SELECT_BELOW as the Launch is made), its kernels bound on a first run."""
    m = src.shape[0]
    decision = Decision("triton", DEVICE_ROWS, default_of_kind(HIDDEN, fused=False, m=m), False, "select_copy.py")
    saved = scatter.SELECT_BELOW
    scatter.SELECT_BELOW = saved if select else 0
    try:
        prepared = executor.prepare(decision, mask.numel(), dst, mask, src)
    finally:
        scatter.SELECT_BELOW = saved
    assert prepared.launch.select == select
    executor.run(prepared, dst, mask, src, False)
    return lambda: executor.run(prepared, dst, mask, src, False)


def with_per_sm(per_sm: int, call):
    """``call`` with scatter.SELECT_PER_SM at ``per_sm`` (the persistent grid of one launch)."""
    def run():
        saved = scatter.SELECT_PER_SM
        scatter.SELECT_PER_SM = per_sm
        try:
            call()
        finally:
            scatter.SELECT_PER_SM = saved
    return run


def with_sums(width: int, call):
    """``call`` with scatter.select_sums at ``width`` (the copy's launch key holds it: its own binary)."""
    def run():
        saved = scatter.select_sums
        scatter.select_sums = lambda n: width
        try:
            call()
        finally:
            scatter.select_sums = saved
    return run


class _NoLaunch:
    """Stands in for scatter._mask_block_counts: launches nothing."""

    @staticmethod
    def launch(*args):
        return None


def select_parts(dst, mask, src, flat, counts, cfg: KernelConfig) -> dict:
    """--parts' calls (the module docstring): floor, select_ready (both write dst as select does) and counts."""
    n, m = dst.shape[0], src.shape[0]
    rowmap = scatter.device_rows(mask, m)
    bound_counts, _ = scatter.mask_select_copy(dst, src, flat, counts, scatter.COPY, cfg)  # the counts written
    saved = scatter.dependent_launch, scatter._mask_block_counts
    scatter.dependent_launch, scatter._mask_block_counts = (lambda device: False), _NoLaunch()
    try:
        _, bound_copy = scatter.mask_select_copy(dst, src, flat, counts, scatter.COPY, cfg)
    finally:
        scatter.dependent_launch, scatter._mask_block_counts = saved
    programs, stream = cdiv(n, scatter.SELECT_BLOCK), torch.cuda.current_stream(DEV).cuda_stream
    return {"floor": lambda: scatter.row_copy(dst, src, rowmap.rows, rowmap.count, scatter.COPY, cfg),
            "select_ready": lambda: bound_copy(scatter.select_grid(n, m, cfg.rows), stream, dst, src, flat, counts,
                                               counts, n, programs, m, HIDDEN, dst.stride(0), src.stride(0)),
            "counts": lambda: bound_counts(programs, stream, flat, counts, n)}


def case(n: int, density: float, pattern: str, configs: tuple[KernelConfig, ...] = (),
         sums: tuple[int, ...] = (), parts: bool = False) -> dict:
    dst, mask, src = make_inputs(Case(n, HIDDEN, density, pattern, mask="gpu"), DEV)
    flat, m = scatter.mask_bytes(mask), src.shape[0]
    cfg = default_of_kind(HIDDEN, fused=False, m=m)
    through_map, copy = two_launch_and_copy(dst, flat, src, cfg)
    counts = torch.empty(cdiv(n, scatter.SELECT_BLOCK), dtype=torch.int32, device=DEV)
    plan = MergePlan(mask)
    calls = {"copy": copy, "map": through_map,
             "select": lambda: scatter.mask_select_copy(dst, src, flat, counts, scatter.COPY, cfg),
             "select1": lambda: scatter.mask_select_copy(dst, src, flat, None, scatter.COPY, cfg),
             "select1_counting": lambda: scatter.mask_select_copy(dst, src, flat, None, scatter.COPY, cfg, spins=0),
             **{f"select1_sm{k}": with_per_sm(k, lambda: scatter.mask_select_copy(dst, src, flat, None, scatter.COPY,
                                                                                  cfg)) for k in (1, 2, 8, 64)},
             "bound_map": bound_merge(dst, mask, src, False), "bound_select": bound_merge(dst, mask, src, True),
             "auto": lambda: masked_row_scatter_(dst, mask, src),
             "plan": lambda: masked_row_scatter_(dst, src=src, plan=plan)}
    for other in configs:
        calls[f"select_{config_name(other)}"] = (
            lambda c=other: scatter.mask_select_copy(dst, src, flat, counts, scatter.COPY, c))
        calls[f"select1_{config_name(other)}"] = (
            lambda c=other: scatter.mask_select_copy(dst, src, flat, None, scatter.COPY, c))
    for width in sums:
        calls[f"select_sums{width}"] = with_sums(width, calls["select"])
    more = select_parts(dst, mask, src, flat, counts, cfg) if parts else {}
    calls |= {name: call for name, call in more.items() if name != "counts"}
    check_against(calls, "map", dst, f"the map's merge at N={n} {density:.0%} {pattern}")
    if parts:
        calls["counts"] = more["counts"]  # writes no row
    row = {"n": n, "density": density, "pattern": pattern, "m": m,
           "mb_moved": 2 * src.numel() * dst.element_size() / 1e6, "calls": figures(calls)}
    print(f"N={n} {density:.0%} {pattern} (M={m}, {row['mb_moved']:.0f} MB): {against_copy(row['calls'])}",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", nargs="*", default=[], metavar="NAME",
                        help="also time select in these configurations (tools/tune.py's names: r1_b4096_w4_s1)")
    parser.add_argument("--sums", nargs="*", type=int, default=[], metavar="W",
                        help="also time select with its programs summing W block counts at once (a power of two)")
    parser.add_argument("--parts", action="store_true",
                        help="also time select's parts: floor, select_ready, counts (the module docstring)")
    args = parser.parse_args()
    if any(w < 1 or w & (w - 1) for w in args.sums):
        parser.error("--sums: powers of two")
    configs = tuple(parse_config_name(name) for name in args.configs)
    if any(c.fused for c in configs):
        parser.error("--configs: the select copy is a two-launch kind (no _fused names)")
    rows = []
    for n in NS:
        for density in DENSITIES:
            for pattern in PATTERNS:
                rows.append(case(n, density, pattern, configs, tuple(args.sums), args.parts))
                torch.cuda.empty_cache()
    goal = [r for r in rows if r["mb_moved"] >= GOAL_FROM_MB]
    for name in ("map", "select", "select1", "select1_counting", *(f"select1_sm{k}" for k in (1, 2, 8, 64)), "auto",
                 "plan",
                 *(f"select{one}_{config_name(c)}" for c in configs for one in ("", "1")),
                 *(f"select_sums{w}" for w in args.sums), *(("floor", "select_ready") if args.parts else ())):
        met = sum(r["calls"][name]["device_us"] <= GOAL_RATIO * r["calls"]["copy"]["device_us"] for r in goal)
        print(f"{name}: at most {GOAL_RATIO}x a copy (busy) at {met} of {len(goal)} points from {GOAL_FROM_MB} MB moved")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"select_copy_{device_name(DEV)}.json"
    path.write_text(json.dumps({"environment": environment(DEV), "hidden": HIDDEN,
                                "figures": "device_us: busy GPU; idle_us: nothing queued", "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
