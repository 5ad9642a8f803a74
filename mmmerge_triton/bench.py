"""The benchmark: every merge path against a device-to-device copy of the same bytes, on the device at hand.

    python -m mmmerge_triton.bench [--quick] [--out DIR]      (also installed as ``mmmerge-bench``)

For each case it prints device µs, loop µs, host µs, peak extra MB, % of copy bandwidth and the speedup
over index_put and masked_scatter (device time), and writes the results as JSON and a PNG plot.
On a GPU every path runs; on the CPU the PyTorch paths run and the Triton path is skipped (the Triton
interpreter is a test vehicle, not a speed path). See timing.py for how each figure is measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import triton

from . import api, paths, timing
from .cases import Case, grid, make_inputs
from .report import check_targets, plot, print_case
from .suites import SUITES, print_suite

FLOOR = "copy"
BASELINES = ("index_put", "masked_scatter", "index_copy")


def path_calls(case: Case, dst, mask, src) -> dict:
    """The calls to time, by name. Ours through the public API (its checks included); the PyTorch paths
    as the bare code that callers run today (paths.py, the package's one copy of each); the floor a copy
    of the same bytes, cast included."""
    floor_dst = torch.empty(src.shape, dtype=dst.dtype, device=dst.device)
    calls = {FLOOR: lambda: floor_dst.copy_(src)}
    if dst.is_cuda:
        calls["triton"] = lambda: api.masked_row_scatter_(dst, mask, src, path="triton")
    calls["auto"] = lambda: api.masked_row_scatter_(dst, mask, src)
    for name in BASELINES:
        runner = paths.RUNNERS[name]
        calls[name] = lambda runner=runner: runner(dst, mask, src, False)
    return calls


def measure(case: Case, device: torch.device) -> dict:
    dst, mask, src = make_inputs(case, device)
    results = {}
    for name, call in path_calls(case, dst, mask, src).items():
        results[name] = {
            "device_us": timing.device_time_us(call, device),
            "loop_us": timing.loop_time_us(call, device),
            "host_us": timing.host_time_us(call, device),
            "peak_extra_bytes": timing.peak_extra_bytes(call, device),
        }
    del dst, mask, src
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"case": case.as_dict(), "label": case.label(), "moved_bytes": case.moved_bytes, "results": results}


def device_name(device: torch.device) -> str:
    """The device as vLLM names its tuned configs: torch's name with spaces made underscores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return "cpu_" + (platform.processor() or platform.machine()).replace(" ", "_")


def environment(device: torch.device) -> dict:
    try:
        # "-dirty" when the working tree differs from HEAD: a copied tree (as on the GPU machine) keeps an old HEAD.
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
    }


def _write(stem: Path, env: dict, grid_name: str, records: list, summary: dict | None) -> None:
    with open(stem.with_suffix(".json"), "w") as f:
        json.dump({"environment": env, "grid": grid_name, "records": records, "targets": summary}, f, indent=1)


def _progress(items, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the "bench" extra; without it, a plain counter
        def plain():
            for i, item in enumerate(items):
                print(f"\r{desc}: {i + 1}/{len(items)}", end="", file=sys.stderr, flush=True)
                yield item
            print(file=sys.stderr)
        return plain()
    return tqdm(items, desc=desc, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmmerge-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few cases (under a minute on a 2-core CPU)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON and PNG")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--suite", choices=sorted(SUITES) + ["all"], default=None,
                        help="run a suite instead of the path grid: many items, plan reuse, deepstack")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    grid_name = "quick" if args.quick else "full"
    env = environment(device)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.suite:
        for name in sorted(SUITES) if args.suite == "all" else [args.suite]:
            records = SUITES[name](device, args.quick)
            print_suite(name, records)
            out = args.out / f"suite_{name}{'_quick' if args.quick else ''}_{env['device']}.json"
            out.write_text(json.dumps({"environment": env, "suite": name, "records": records}, indent=1))
            print(f"wrote {out}")
        return 0
    cases = grid(grid_name, device)
    print(f"mmmerge-bench: {len(cases)} cases on {env['device']} (torch {env['torch']}, triton {env['triton']})")
    if device.type != "cuda":
        print("CPU run: the Triton path is skipped (the interpreter is not a speed path).")

    stem = args.out / f"bench_{grid_name}_{env['device']}"
    records = []
    for case in _progress(cases, "cases"):
        records.append(measure(case, device))
        _write(stem, env, grid_name, records, None)  # after every case: an interrupted run keeps what it measured
    for record in records:
        print_case(record)
    summary = check_targets(records) if device.type == "cuda" else None
    if summary:
        print("\nTargets (issue 4), each a ratio within this run:")
        for line in summary["lines"]:
            print("  " + line)
    _write(stem, env, grid_name, records, summary)
    written = [stem.with_suffix(".json")]
    if plot(records, env, stem.with_suffix(".png")):
        written.append(stem.with_suffix(".png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
