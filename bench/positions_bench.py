"""Row positions on a GPU: indexed_row_scatter_ against index_copy_, index_put_ and a copy of the same bytes;
then (--modalities) several modalities in one merge_modalities_ call against one call per modality.

    python bench/positions_bench.py --out DIR [--quick] [--seconds 120] [--no-modalities] [--dry-run]

Figures per call, taken in timing.ROUNDS interleaved rounds with the copy they are divided by (timing.interleaved,
the median of the rounds kept): device µs (CUDA events, GPU kept busy by a spin, L2 flushed: timing.device_time_us),
idle µs (nothing queued before the call, so host work before its first launch shows: timing.idle_time_us) and
loop µs (back to back: timing.loop_time_us). Ratios: device and idle divide by the copy's device µs (the GPU time
the bytes need), loop by the copy's loop µs. The copy writes src's rows into a buffer of src's shape in dst's
dtype (cast included): the bytes a merge must move. Every result is checked against PyTorch's, bit for bit, once
per case before timing; a mismatch aborts. --seconds stops starting new cases once spent (the JSON lists what
was skipped); the positions part gets PART1_SHARE of it when the modalities part follows.
Part 1, positions (int64 on the CPU, int64 and int32 on the GPU, sorted or shuffled, distinct):
- ours: indexed_row_scatter_(dst, positions, src), path "auto"; CPU positions pageable, as a caller has them
  (the package stages them through its own pinned memory); checked to run without a sync (sync debug mode).
- index_copy / index_put: dst.index_copy_(0, p, src.to(dst.dtype)) / dst.index_put_((p,), ...). For CPU positions
  p is a pinned copy made once and sent per call with a non-blocking H2D copy (inside the timed call, as a caller
  must): the baselines' best case.
Part 2, modalities (T masks, disjoint, chunks of CHUNK rows in turn over 6 slots: ~N/6 rows each, bf16): per
modality masked_scatter_ (the mask moved to the GPU per call, as callers write it), dst[mask] = src (index_put_),
masked_row_scatter_; and merge_modalities_ (one call). The copy moves all sources' bytes.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import mmmerge_triton as mm
from mmmerge_triton.tools import timing
from mmmerge_triton.tools.bench import FLOOR, device_name, environment
from mmmerge_triton.tools.cases import DTYPES

DEV = torch.device("cuda", 0)
PAIRS = (("bf16", "bf16"), ("fp32", "bf16"))
HIDDENS = (4096, 1024)  # --quick: the first only
NS = (4096, 32768, 65536)
DIVISORS = (4, 2)  # M = N / divisor
ORDERS = ("sorted", "shuffled")
MOD_NS = (32768, 65536)  # --quick: the last only
MOD_COUNTS = (2, 3)
MOD_HIDDEN, CHUNK, SLOTS = 4096, 64, 6
PART1_SHARE = 0.8  # of --seconds; the modalities part (8 cases, ~10 s on an H100) gets the rest
IDLE_REPS = 5  # each rep synchronizes: fewer than ROUND_REPS keeps the round short
FIGURES = {  # figure -> (how it is taken, the copy figure its ratio divides by)
    "device_us": (lambda fn: timing.device_time_us(fn, DEV, reps=timing.ROUND_REPS), "device_us"),
    "idle_us": (lambda fn: timing.idle_time_us(fn, DEV, reps=IDLE_REPS), "device_us"),
    "loop_us": (lambda fn: timing.loop_time_us(fn, DEV, budget_s=timing.ROUND_LOOP_S), "loop_us"),
}


@dataclass(frozen=True)
class PositionCase:
    n: int
    hidden: int
    rows: int  # M
    order: str  # "sorted" or "shuffled"
    src: str
    dst: str

    def label(self) -> str:
        return f"N={self.n} H={self.hidden} M={self.rows} {self.order} {self.src}->{self.dst}"


@dataclass(frozen=True)
class ModalityCase:
    n: int
    count: int  # T modalities
    masks: str  # "cpu" or "gpu"

    def label(self) -> str:
        return f"N={self.n} H={MOD_HIDDEN} T={self.count} masks={self.masks}"


def position_cases(quick: bool) -> list[PositionCase]:
    hiddens = HIDDENS[:1] if quick else HIDDENS
    return [PositionCase(n, h, n // d, order, s, t)
            for (s, t), h, n, d, order in itertools.product(PAIRS, hiddens, NS, DIVISORS, ORDERS)]


def modality_cases(quick: bool) -> list[ModalityCase]:
    ns = MOD_NS[-1:] if quick else MOD_NS
    return [ModalityCase(n, t, where) for n, t, where in itertools.product(ns, MOD_COUNTS, ("cpu", "gpu"))]


def measure(calls: dict) -> dict:
    """Every figure of every call in interleaved rounds (medians and rounds), and each call's ratios to the copy."""
    taken = timing.interleaved(calls, {name: take for name, (take, _) in FIGURES.items()})
    results = {name: {**{f: statistics.median(v) for f, v in figs.items()},
                      **{f + "_rounds": v for f, v in figs.items()}} for name, figs in taken.items()}
    copy = results[FLOOR]
    ratio = {name: {f: r[f] / copy[by] for f, (_, by) in FIGURES.items()} for name, r in results.items()
             if name != FLOOR}
    return {"results": results, "ratio": ratio}


def no_sync(label: str, calls: dict) -> None:
    """Each call runs without a host sync: PyTorch's sync debug mode raises on any."""
    torch.cuda.synchronize(DEV)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, fn in calls.items():
            try:
                fn()
            except RuntimeError as error:
                raise SystemExit(f"SYNC: {name} synchronized at {label}: {error}") from error
    finally:
        torch.cuda.set_sync_debug_mode(0)


def measure_positions(case: PositionCase) -> dict:
    gen = torch.Generator(device=DEV).manual_seed(0)
    dst = torch.randn(case.n, case.hidden, generator=gen, device=DEV, dtype=DTYPES[case.dst])
    src = torch.randn(case.rows, case.hidden, generator=gen, device=DEV, dtype=DTYPES[case.src])
    cpu = torch.randperm(case.n, generator=torch.Generator().manual_seed(0))[:case.rows]  # distinct rows
    if case.order == "sorted":
        cpu = cpu.sort().values
    pinned, gpu = cpu.pin_memory(), cpu.to(DEV)
    ours = {"ours cpu": cpu, "ours gpu": gpu, "ours gpu i32": gpu.int()}
    expected = dst.clone().index_copy_(0, gpu, src.to(dst.dtype))
    for name, positions in ours.items():
        if not torch.equal(mm.indexed_row_scatter_(dst.clone(), positions, src), expected):
            raise SystemExit(f"MISMATCH: {name} differs from index_copy_ at {case.label()}")
    del expected
    no_sync(case.label(), {name: lambda p=p: mm.indexed_row_scatter_(dst, p, src) for name, p in ours.items()})
    floor = torch.empty(src.shape, dtype=dst.dtype, device=DEV)
    calls = {FLOOR: lambda: floor.copy_(src)}
    calls |= {name: lambda p=p: mm.indexed_row_scatter_(dst, p, src) for name, p in ours.items()}
    calls |= {
        "index_copy cpu": lambda: dst.index_copy_(0, pinned.to(DEV, non_blocking=True), src.to(dst.dtype)),
        "index_copy gpu": lambda: dst.index_copy_(0, gpu, src.to(dst.dtype)),
        "index_put cpu": lambda: dst.index_put_((pinned.to(DEV, non_blocking=True),), src.to(dst.dtype)),
        "index_put gpu": lambda: dst.index_put_((gpu,), src.to(dst.dtype)),
    }
    ran = {name: mm.explain(dst, src, positions=p).path for name, p in ours.items()}  # CPU: the tuned table's pick
    return {"case": asdict(case), "label": case.label(), "auto_path": ran, **measure(calls)}


def modality_masks(case: ModalityCase) -> list[torch.Tensor]:
    """T disjoint CPU bool masks [N]: chunk i of CHUNK rows belongs to modality i % SLOTS (text where >= T)."""
    slot = torch.arange(case.n) // CHUNK % SLOTS
    return [slot == k for k in range(case.count)]


def measure_modalities(case: ModalityCase) -> dict:
    gen = torch.Generator(device=DEV).manual_seed(0)
    dst = torch.randn(case.n, MOD_HIDDEN, generator=gen, device=DEV, dtype=torch.bfloat16)
    masks = modality_masks(case)
    srcs = [torch.randn(int(m.sum()), MOD_HIDDEN, generator=gen, device=DEV, dtype=torch.bfloat16) for m in masks]
    pairs = [(m.to(DEV) if case.masks == "gpu" else m, s) for m, s in zip(masks, srcs)]

    def each(step):  # one call per modality, in order
        return lambda: [step(m, s) for m, s in pairs]

    masked_scatter = each(lambda m, s: dst.masked_scatter_(m[:, None].to(DEV), s))
    expected = dst.clone()
    for m, s in pairs:
        expected.masked_scatter_(m[:, None].to(DEV), s)
    ours = {"masked_row_scatter_ each": lambda out: [mm.masked_row_scatter_(out, m, s) for m, s in pairs],
            "merge_modalities_": lambda out: mm.merge_modalities_(out, pairs)}
    for name, run in ours.items():
        out = dst.clone()
        run(out)
        if not torch.equal(out, expected):
            raise SystemExit(f"MISMATCH: {name} differs from the masked_scatter_ sequence at {case.label()}")
    del expected, out
    everything = torch.cat(srcs)
    floor = torch.empty_like(everything)
    calls = {FLOOR: lambda: floor.copy_(everything), "masked_scatter_ each": masked_scatter,
             "index_put each": each(lambda m, s: dst.index_put_((m,), s))}
    calls |= {name: lambda run=run: run(dst) for name, run in ours.items()}
    return {"case": asdict(case), "label": case.label(), "rows": [s.shape[0] for s in srcs], **measure(calls)}


def print_tables(title: str, records: list[dict]) -> None:
    """One table per figure: the copy's µs (the divisor) and each call's ratio to it."""
    if not records:
        return
    names = list(records[0]["ratio"])
    width = max(len(r["label"]) for r in records)
    for figure, (_, by) in FIGURES.items():
        print(f"\n{title}: {figure} / copy {by}")
        print(f"{'case':<{width}s} {'copy µs':>8s}" + "".join(f"{n:>{len(n) + 2}s}" for n in names))
        for r in records:
            print(f"{r['label']:<{width}s} {r['results'][FLOOR][by]:8.1f}"
                  + "".join(f"{r['ratio'][n][figure]:>{len(n) + 2}.3f}" for n in names))


def run_part(cases: list, measure_one, deadline: float, part: dict, save) -> None:
    """Measure ``cases`` in order until ``deadline`` (perf_counter s) has passed; list the rest as skipped."""
    for case in cases:
        if time.perf_counter() > deadline:
            part["skipped"].append(case.label())
            continue
        start = time.perf_counter()
        part["cases"].append(measure_one(case))
        torch.cuda.empty_cache()
        save()  # after every case: a run cut short keeps what it measured
        print(f"{case.label()}: {time.perf_counter() - start:.1f} s"
              + "".join(f", {k} ran {v}" for k, v in part["cases"][-1].get("auto_path", {}).items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("mmmerge-results"), help="folder for positions_<device>.json")
    parser.add_argument("--quick", action="store_true", help="half the grid: H=4096 only; modalities at N=65536 only")
    parser.add_argument("--seconds", type=float, default=120.0,
                        help="start no new case after this many seconds (default 120; the JSON lists the skipped)")
    parser.add_argument("--modalities", action=argparse.BooleanOptionalAction, default=True,
                        help="also time merge_modalities_ against one call per modality (default on)")
    parser.add_argument("--dry-run", action="store_true", help="print the case grid and exit (no GPU needed)")
    args = parser.parse_args()
    cases = position_cases(args.quick)
    mod_cases = modality_cases(args.quick) if args.modalities else []
    if args.dry_run:
        for case in cases + mod_cases:
            print(case.label())
        print(f"{len(cases)} position cases, {len(mod_cases)} modality cases; budget {args.seconds:.0f} s")
        return
    if not torch.cuda.is_available():
        raise SystemExit("positions_bench.py times device kernels: it needs a CUDA GPU (try --dry-run)")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"positions_{device_name(DEV)}.json"
    result = {"environment": environment(DEV), "quick": args.quick, "budget_s": args.seconds,
              "figures": {f: f"ratio divides by the copy's {by}" for f, (_, by) in FIGURES.items()},
              "positions": {"cases": [], "skipped": []}}

    def save():
        result["elapsed_s"] = time.perf_counter() - start
        path.write_text(json.dumps(result, indent=1))

    share = PART1_SHARE if args.modalities else 1.0
    run_part(cases, measure_positions, start + share * args.seconds, result["positions"], save)
    print_tables("positions", result["positions"]["cases"])
    if args.modalities and not hasattr(mm, "merge_modalities_"):
        print("\nmodalities: skipped: not available")
        result["modalities"] = "skipped: not available"
    elif args.modalities:
        result["modalities"] = {"cases": [], "skipped": []}
        run_part(mod_cases, measure_modalities, start + args.seconds, result["modalities"], save)
        print_tables("modalities", result["modalities"]["cases"])
    save()
    parts = [part for part in (result["positions"], result.get("modalities")) if isinstance(part, dict)]
    skipped = sum(len(part["skipped"]) for part in parts)
    print(f"\n{result['elapsed_s']:.0f} s in all; {skipped} cases skipped by --seconds; wrote {path}")


if __name__ == "__main__":
    main()
