"""The benchmark: every merge path against a device-to-device copy of the same bytes, on the device at hand.

    python -m mmmerge_triton.tools.bench [--quick] [--suite NAME] [--out DIR]   (installed as ``mmmerge-bench``)

On a GPU it prints, per case, device µs (and the spread of its rounds), loop µs, host µs, peak extra MB, % of
copy bandwidth and the speedup over index_put and masked_scatter (device time), checks the targets, and notes
every point where a path's device time is below analysis.BELOW_COPY x the copy's. The paths of a case and the copy
are timed together, in interleaved rounds (timing.measure), so the copy every ratio divides by is measured as
robustly as what it is compared with. On a CPU the PyTorch paths run, the Triton path is skipped (the Triton
interpreter is a test vehicle, not a speed path), and the table has wall µs of one call and loop µs only (no
device clock, no memory statistic): a smoke test of the tooling. Either way the results go as JSON (its
``environment.commit`` names the code measured: code_commit) and a PNG plot into --out (default
./mmmerge-results/ in the current directory). See timing.py for how each figure is measured.

Runtime internals used (no public function does the same): ``paths.RUNNERS``, the bare PyTorch baselines
(index_put, masked_scatter, index_copy) as callers run them today, without the API's checks.
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

from .. import explain, masked_row_scatter_, paths
from . import timing
from .analysis import check_targets
from .cases import Case, grid, make_inputs
from .plots import plot
from .report import DEFAULT_OUT, below_copy_notes, copy_spread_line, print_case
from .suites import SUITES, print_suite

FLOOR = "copy"
CPU_THREADS = 1
"""Torch threads for a CPU run. With two threads on a 2-core host running other jobs, half the calls waited
for the intra-op pool's second thread: medians of 8 ms for a 2 MB copy that takes 16 µs on one thread. One
thread keeps the smoke test stable; ``--threads`` overrides it."""
BASELINES = ("index_put", "masked_scatter", "index_copy")


def path_calls(case: Case, dst, mask, src) -> dict:
    """The calls to time, by name. Ours through the public API (its checks included); the PyTorch paths
    as the bare code that callers run today (paths.py, the package's one copy of each); the floor a copy
    of the same bytes, cast included."""
    floor_dst = torch.empty(src.shape, dtype=dst.dtype, device=dst.device)
    calls = {FLOOR: lambda: floor_dst.copy_(src)}
    if dst.is_cuda:
        calls["triton"] = lambda: masked_row_scatter_(dst, mask, src, path="triton")
    calls["auto"] = lambda: masked_row_scatter_(dst, mask, src)
    for name in BASELINES:
        runner = paths.RUNNERS[name]
        calls[name] = lambda runner=runner: runner(dst, mask, src, False)
    return calls


def measure(case: Case, device: torch.device) -> dict:
    """Every path of one case and the copy it is divided by, timed together in interleaved rounds
    (timing.measure): the copy baseline is taken as robustly as the paths, in the same moments."""
    dst, mask, src = make_inputs(case, device)
    results = timing.measure(path_calls(case, dst, mask, src), device)
    record = {"case": case.as_dict(), "label": case.label(), "moved_bytes": case.moved_bytes, "results": results}
    if device.type != "cuda":  # what "auto" ran, for a CPU table whose auto and index_put columns should agree
        record["auto_path"] = explain(dst, src, mask).path
    del dst, mask, src
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def device_name(device: torch.device) -> str:
    """The device as vLLM names its tuned configs: torch's name with spaces made underscores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return "cpu_" + (platform.processor() or platform.machine()).replace(" ", "_")


COMMIT_VARIABLE = "MMMERGE_COMMIT"


def code_commit() -> str | None:
    """The commit of the code being measured, which every result file records (``environment.commit``):
    $MMMERGE_COMMIT where set (bench/run_gpu.sh sets it for a copied tree, whose git HEAD, if any, is older
    than its files), else this checkout's ``git rev-parse --short HEAD``, with "-dirty" where tracked files
    differ from it (as ``git describe --dirty``); None outside a git checkout of this package (a wheel)."""
    given = os.environ.get(COMMIT_VARIABLE, "").strip()
    if given:
        return given
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True,
                              text=True, timeout=5)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != root:  # an enclosing repository that is not this package's
            return None
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + "-dirty" if dirty else head) or None


def environment(device: torch.device) -> dict:
    """Where and with what a result file was measured: device, versions, date and the code's commit."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),  # what a CPU run's wall times were taken with
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": code_commit(),
    }


def _clock(env: dict) -> dict:
    """A CPU run's JSON says what its figures are (GPU runs: the keys mean what timing.py says)."""
    return {"clock": timing.CPU_CLOCK} if env["device_type"] != "cuda" else {}


def _write(stem: Path, env: dict, grid_name: str, records: list, summary: dict | None) -> None:
    with open(stem.with_suffix(".json"), "w") as f:
        json.dump({"environment": env, "grid": grid_name, **_clock(env), "records": records, "targets": summary},
                  f, indent=1)


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


def pick_device(requested: str | None) -> tuple[torch.device | None, str]:
    """The device to run on, or None and a one-line error that says what this torch can run on."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available = ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(count)] if count else [])
    if requested is None:
        device = torch.device("cuda" if count else "cpu")
    else:
        try:
            device = torch.device(requested)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda") or (device.type == "cuda" and (
                not count or (device.index or 0) >= count)):
            why = "" if count or not requested.startswith("cuda") else (
                f" (this torch {torch.__version__} has no CUDA device)")
            return None, f"--device {requested!r} is not available{why}; available: {', '.join(available)}"
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device, ""


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmmerge-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few cases (under a minute on a 2-core CPU)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for the JSON and PNG (default: ./{DEFAULT_OUT}/ in the current directory)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--suite", choices=sorted(SUITES) + ["all"], default=None,
                        help="run a suite instead of the path grid: many items, plan reuse, deepstack")
    parser.add_argument("--threads", type=_positive_int, default=CPU_THREADS,
                        help=f"CPU runs: torch threads while timing (default {CPU_THREADS}; see CPU_THREADS)")
    args = parser.parse_args(argv)

    device, error = pick_device(args.device)
    if device is None:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if device.type != "cuda":
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the tests)


def _run(args: argparse.Namespace, device: torch.device) -> int:
    """The grid (or the suites) on ``device``: print the tables, write JSON and PNG into ``args.out``."""
    grid_name = "quick" if args.quick else "full"
    env = environment(device)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"mmmerge-bench: results go to {args.out.resolve()}")
    if device.type != "cuda":
        print(timing.CPU_NOTICE)
    if args.suite:
        for name in sorted(SUITES) if args.suite == "all" else [args.suite]:
            records = SUITES[name](device, args.quick)
            print_suite(name, records, cpu=device.type != "cuda")
            out = args.out / f"suite_{name}{'_quick' if args.quick else ''}_{env['device']}.json"
            out.write_text(json.dumps({"environment": env, "suite": name, **_clock(env), "records": records},
                                      indent=1))
            print(f"wrote {out}")
        return 0
    cases = grid(grid_name, device)
    print(f"mmmerge-bench: {len(cases)} cases on {env['device']} (torch {env['torch']}, triton {env['triton']})")
    if device.type != "cuda":
        print("The Triton path is skipped on a CPU (the interpreter is not a speed path).")

    stem = args.out / f"bench_{grid_name}_{env['device']}"
    records = []
    for case in _progress(cases, "cases"):
        records.append(measure(case, device))
        _write(stem, env, grid_name, records, None)  # after every case: an interrupted run keeps what it measured
    for record in records:
        print_case(record, cpu=device.type != "cuda")
    if device.type != "cuda":
        ran = sorted({r["auto_path"] for r in records})
        print(f"\nauto ran {ran[0]} at every case (explain())" if len(ran) == 1 else
              f"\nauto ran {', '.join(ran)}, by case (explain(); auto_path in the JSON)")
    summary = check_targets(records) if device.type == "cuda" else None
    if summary:
        print("\nTargets (issue 4), each a ratio within this run:")
        for line in summary["lines"]:
            print("  " + line)
    if device.type == "cuda":  # how steady the copy was, and every point a path measured below it
        print()
        for line in [copy_spread_line(records) or "copy baseline: no rounds recorded"] + below_copy_notes(records):
            print(line)
    _write(stem, env, grid_name, records, summary)
    written = [stem.with_suffix(".json")]
    if plot(records, env, stem.with_suffix(".png")):
        written.append(stem.with_suffix(".png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
