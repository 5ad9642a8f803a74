"""The tuning sweep and its selection rule, and the command that runs them and the held-out check (heldout.py).
The sweep, --evaluate and --device-times need a CUDA GPU.

    python -m mmmerge_triton.tools.tune [--quick] [--resume]     (installed as ``mmmerge-tune``)
    python -m mmmerge_triton.tools.tune --evaluate [--out FILE]
    python -m mmmerge_triton.tools.tune --device-times TABLE.json
    python -m mmmerge_triton.tools.tune --reselect TABLE.json     (no GPU needed)

The sweep runs shapes x (src, dst) dtypes x mask device x mask density; at each point it times every path
and a set of Triton configurations by loop time (host and device together: at small cases the host
dominates), at a device mask's points its finalists in device time too (DEVICE_TIMED_FINALISTS), and writes
``configs/<device name>.json`` (see dispatch.py). Finished points are appended to a ``.partial`` file as they
complete, so ``--resume`` picks an interrupted sweep up where it stopped. ``--device-times`` adds those device
times to a table swept without them, entry by entry (rerun it to go on where it stopped), and re-picks its winners.
``--evaluate`` runs the held-out check of what it wrote (heldout.py).

Runtime internals used (no public function does the same): ``paths.RUNNERS`` (the bare paths, as in bench.py),
``executor.merge_triton(config=...)`` (a Triton configuration launched directly), ``kernel_config.default_config`` and
``kernel_config.default_of_kind`` (the defaults a measured configuration must beat), and ``dispatch.TABLE_VERSION``,
``table_dir``, ``table_file_name`` and ``clear_cache`` (the table's format, where it lives, its cached decisions).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import triton

from . import timing
from .. import KernelConfig, dispatch, executor, paths
from ..kernel_config import default_config, default_of_kind
from .bench import DEFAULT_OUT, _progress, device_name, environment
from .cases import Case, make_inputs

SWEEP = {
    "full": dict(n=(256, 1024, 4096, 16384, 65536, 131072), hidden=(1024, 2048, 4096, 8192), density=(0.1, 0.9),
                 dtypes=(("bf16", "bf16"), ("fp32", "bf16")), mask=("cpu", "gpu")),
    "quick": dict(n=(2048, 16384), hidden=(4096,), density=(0.5,), dtypes=(("bf16", "bf16"),), mask=("cpu", "gpu")),
}
BUDGET_S = 0.015  # loop-time budget per measurement
CONFIRM_ROUNDS = 2  # fresh interleaved timings of a point's finalists (see tune_case)


def sweep_cases(spec: dict) -> list[Case]:
    return [Case(n, h, d, "blocks", s, t, m) for n, h, d, (s, t), m in
            itertools.product(spec["n"], spec["hidden"], spec["density"], spec["dtypes"], spec["mask"])]


def triton_configs(hidden: int, mask_on_device: bool) -> list[KernelConfig]:
    """Tiles of rows x block_h (8 warps, 1 stage), then warps and stages varied around the best (see sweep);
    for a device mask the one-launch kernel too."""
    widths = sorted({min(b, triton.next_power_of_2(hidden)) for b in (512, 1024, 4096)})
    configs = [KernelConfig(r, b, 8, 1, False) for r in (1, 4, 16) for b in widths]
    if mask_on_device:
        configs += [KernelConfig(r, b, 8, 1, True) for r in (8, 32) for b in widths]
    return configs


def _time(call, device) -> float:
    return timing.loop_time_us(call, device, budget_s=BUDGET_S, min_calls=5)


def tune_case(case: Case, device: torch.device) -> dict:
    """Loop µs of every path and Triton configuration at one point (device µs of a device mask's finalists,
    DEVICE_TIMED_FINALISTS), and the winner."""
    dst, mask, src = make_inputs(case, device)
    loop_us = {name: _time(lambda r=runner: r(dst, mask, src, False), device)
               for name, runner in paths.RUNNERS.items()}
    configs = {}

    def run_config(cfg: KernelConfig) -> None:
        configs[cfg] = _time(lambda: executor.merge_triton(dst, mask, src, False, config=cfg), device)

    for cfg in triton_configs(case.hidden, case.mask == "gpu"):
        run_config(cfg)
    best = min(configs, key=configs.get)
    for variant in (best._replace(num_warps=4), best._replace(num_stages=2), best._replace(num_stages=3)):
        run_config(variant)
    # Confirm: the fastest two and the defaults of each kind, timed afresh and interleaved, keep their best
    # time; a configuration that won one noisy sample does not displace the default on that alone.
    defaults = {default_of_kind(case.hidden, fused) for fused in ((False, True) if case.mask == "gpu" else (False,))}
    finalists = set(sorted(configs, key=configs.get)[:2]) | defaults
    calls = {c: (lambda c=c: executor.merge_triton(dst, mask, src, False, config=c)) for c in finalists}
    configs.update(interleaved_loop_us(calls, device, CONFIRM_ROUNDS))
    entry = {
        "key": _key(case),
        "loop_us": loop_us,
        "triton_configs": {config_name(c): t for c, t in configs.items()},
    }
    del dst, mask, src
    torch.cuda.empty_cache()
    if case.mask == "gpu":
        add_device_us(entry, case, device)
    return select(entry)


CONFIG_MARGIN = 0.95
"""A configuration replaces the default one (kernel_config.default_config) only where it beats it by 5% in loop time.
Where the host dominates, every configuration measures alike and the fastest one is noise; carried by the
nearest-key lookup to larger inputs, such a pick ran up to 1.4x slower than the default (H100 held-out run,
bench/results/h100/regret_history/1_*.json). The margin keeps the table's departures from the default to those
that were measured."""


DEVICE_TIMED_FINALISTS, DEVICE_ROUNDS, DEVICE_LAYOUTS = 2, 3, ("blocks", "scattered")
"""A device mask's point is decided by device time with the GPU kept busy (timing.device_time_us), among each
kind's default and its DEVICE_TIMED_FINALISTS fastest configurations in loop time, timed in DEVICE_ROUNDS
interleaved rounds (the median kept) on each layout of DEVICE_LAYOUTS, the slower kept. An engine that keeps its
mask on the GPU queues the merge behind the vision encoder, where the host's launch cost is hidden and the GPU's
time is what it pays; and the one-launch kernel's time depends on where the true rows lie. By loop time, in image
blocks, the H100 table had picked the one-launch kernel at N = 16384, H = 4096, 10% of the rows; at 5% scattered it
ran 2.23x a copy's busy time where the two-launch default ran 1.27x
(bench/results/h100/2026-12-06-s9/counted_scan_086222b.log). A CPU mask's points stay decided by loop time."""


def device_candidates(entry: dict) -> list[KernelConfig]:
    """The configurations of a device mask's entry timed in device time: of those it timed in loop time, each
    kind's defaults (the one select keeps unless beaten, and the one for the entry's M) and its
    DEVICE_TIMED_FINALISTS fastest."""
    key = entry["key"]
    times = {parse_config_name(name): t for name, t in entry["triton_configs"].items()}
    chosen = []
    for fused in (False, True):
        defaults = [default_of_kind(key["hidden"], fused), default_of_kind(key["hidden"], fused, key["rows"])]
        fastest = sorted((c for c in times if c.fused == fused), key=times.get)[:DEVICE_TIMED_FINALISTS]
        chosen += [c for c in defaults + fastest if c in times]
    return list(dict.fromkeys(chosen))


def add_device_us(entry: dict, case: Case, device: torch.device) -> None:
    """Record the device µs of device_candidates(entry) at ``case`` on each of DEVICE_LAYOUTS
    (entry["device_us_layouts"]) and each one's slower (entry["device_us"], what select reads)."""
    candidates = device_candidates(entry)
    layouts = {}
    for layout in DEVICE_LAYOUTS:
        dst, mask, src = make_inputs(dataclasses.replace(case, pattern=layout), device)
        calls = {config_name(c): (lambda c=c: executor.merge_triton(dst, mask, src, False, config=c))
                 for c in candidates}
        taken = timing.interleaved(
            calls, {"device_us": lambda fn: timing.device_time_us(fn, device, reps=timing.ROUND_REPS)},
            DEVICE_ROUNDS)
        layouts[layout] = {name: statistics.median(figures["device_us"]) for name, figures in taken.items()}
        del dst, mask, src
        torch.cuda.empty_cache()
    entry["device_us_layouts"] = layouts
    entry["device_us"] = {name: max(times[name] for times in layouts.values())
                          for name in map(config_name, candidates)}


def add_device_times(table_path: Path, device: torch.device) -> None:
    """Time every device-mask entry of a table that lacks them in device time (add_device_us), writing the
    table after each, then re-pick its winners (select). Entries already timed are kept: rerunning goes on."""
    table = json.loads(table_path.read_text())
    todo = [e for e in table["entries"] if e["key"]["mask"] == "gpu" and "device_us" not in e]
    print(f"mmmerge-tune --device-times: {len(todo)} device-mask entries to time on {device_name(device)}")
    for entry in _progress(todo, "entries"):
        add_device_us(entry, _case(entry["key"]), device)
        table_path.write_text(json.dumps(table, indent=1))
    table["environment_device_times"] = environment(device)
    table_path.write_text(json.dumps(table, indent=1))
    reselect(table_path)


def config_name(cfg: KernelConfig) -> str:
    return f"r{cfg.rows}_b{cfg.block_h}_w{cfg.num_warps}_s{cfg.num_stages}" + ("_fused" if cfg.fused else "")


def parse_config_name(name: str) -> KernelConfig:
    parts = name.split("_")
    rows, block_h, warps, stages = (int(p[1:]) for p in parts[:4])
    return KernelConfig(rows, block_h, warps, stages, parts[-1] == "fused")


SELECTION = (f"tune.select: the default configuration unless beaten by {CONFIG_MARGIN}x its loop time (a device "
             "mask's entries: its device time, where recorded)")


def _keep_default(times: dict, default: KernelConfig) -> KernelConfig:
    """The fastest of ``times`` if it beats ``default`` by CONFIG_MARGIN, else ``default``."""
    fastest = min(times, key=times.get)
    return fastest if default not in times or times[fastest] < CONFIG_MARGIN * times[default] else default


def select(entry: dict) -> dict:
    """Fill in an entry's winner from its measured times: the best Triton configuration of each kind
    (two-launch; one-launch for a device mask), each kept at the default unless beaten by CONFIG_MARGIN, the
    kind that kernel_config.default_config takes at this N unless the other beats it by the margin too; then the
    path with the lowest loop time. The configurations are compared by loop time, a device mask's by device time
    where the entry records it (DEVICE_TIMED_FINALISTS)."""
    key = entry["key"]
    times = {parse_config_name(name): t for name, t in (entry.get("device_us") or entry["triton_configs"]).items()}
    on_device = key["mask"] == "gpu"
    default = default_config(key["hidden"], key["rows"], key["n"], on_device)
    kinds = {}
    for fused in (False, True):
        measured = {c: t for c, t in times.items() if c.fused == fused}
        if measured:
            kinds[fused] = _keep_default(measured, default_of_kind(key["hidden"], fused))
    best = _keep_default({c: times[c] for c in kinds.values()}, kinds[default.fused])
    entry["loop_us"]["triton"] = entry["triton_configs"][config_name(best)]
    path = min(entry["loop_us"], key=entry["loop_us"].get)
    triton = path == "triton"
    entry["best"] = {"path": path, "config": best._asdict() if triton else None,
                     "unfused_config": kinds[False]._asdict() if triton else None,
                     "fused_config": kinds[True]._asdict() if triton and True in kinds else None}
    return entry


def reselect(table_path: Path) -> None:
    """Apply select() again to every entry of a table, from the times it recorded (no new measurement).
    Raises OSError or ValueError, the file untouched, where it cannot be read as a tuned table."""
    try:
        table = json.loads(table_path.read_text())
    except UnicodeDecodeError as error:
        raise ValueError(f"not a JSON file ({error.reason})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"not a JSON file ({error})") from None
    if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
        raise ValueError("not a tuned table (mmmerge-tune's JSON, with a list of entries)")
    try:
        entries = [select(entry) for entry in table["entries"]]
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ValueError(f"not a tuned table: an entry lacks or garbles its recorded times ({error!r})") from None
    table["entries"] = entries
    table["selection"] = SELECTION
    table_path.write_text(json.dumps(table, indent=1))
    wins = collections.Counter(config_name(KernelConfig(**e["best"]["config"])) for e in table["entries"]
                               if e["best"]["config"])
    print(f"rewrote {table_path}: winning configurations {dict(wins.most_common(6))}")


def sweep(grid_name: str, device: torch.device, out: Path, resume: bool) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    done = {}
    if resume and partial.exists():
        for line in partial.read_text().splitlines():
            entry = json.loads(line)
            done[json.dumps(entry["key"], sort_keys=True)] = entry
    elif partial.exists():
        partial.unlink()
    cases = sweep_cases(SWEEP[grid_name])
    todo = [c for c in cases if json.dumps(_key(c), sort_keys=True) not in done]
    print(f"mmmerge-tune: {len(cases)} points ({len(cases) - len(todo)} done earlier) on {device_name(device)}")
    with open(partial, "a") as log:
        for case in _progress(todo, "points"):
            entry = tune_case(case, device)
            done[json.dumps(entry["key"], sort_keys=True)] = entry
            log.write(json.dumps(entry) + "\n")
            log.flush()
    entries = [done[k] for k in sorted(done)]
    table = {"version": dispatch.TABLE_VERSION, "device": device_name(device), "grid": grid_name,
             "selection": SELECTION,
             "environment": environment(device), "entries": entries}
    out.write_text(json.dumps(table, indent=1))
    partial.unlink()
    wins = collections.Counter(e["best"]["path"] for e in entries)
    print(f"wrote {out}: {len(entries)} entries; best path counts {dict(wins)}")
    return out


def _key(case: Case) -> dict:
    return {"mask": case.mask, "src": case.src, "dst": case.dst, "n": case.n, "hidden": case.hidden,
            "rows": case.rows}


def _case(key: dict) -> Case:
    """The sweep's case of an entry's key (the inverse of _key)."""
    case = Case(key["n"], key["hidden"], key["rows"] / key["n"], "blocks", key["src"], key["dst"], key["mask"])
    assert _key(case) == key, (key, _key(case))
    return case


def interleaved_loop_us(calls: dict, device: torch.device, rounds: int) -> dict:
    """Loop µs of each call, timed ``rounds`` times in rotating order (no call always runs first) and the
    fastest kept: drift on a shared machine hits all alike, and noise only ever adds time."""
    samples = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(_time(calls[name], device))
    return {name: min(v) for name, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmmerge-tune", description=__doc__.split("\n\n")[0],
        epilog="The sweep, --evaluate and --device-times need a CUDA GPU (they rank the paths on the GPU the merge "
               "runs on); --reselect runs anywhere.")
    parser.add_argument("--quick", action="store_true", help="a small sweep, for trying it out")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument("--evaluate", action="store_true", help="time path='auto' on the held-out grid")
    parser.add_argument("--device-times", type=Path, default=None, metavar="TABLE.json",
                        help="time a table's device-mask entries in device time (where it lacks them) and re-pick "
                             "its winners")
    parser.add_argument("--reselect", type=Path, default=None, metavar="TABLE.json",
                        help="re-pick the winners of an existing table from its recorded times, then exit")
    parser.add_argument("--out", type=Path, default=None,
                        help="table file (default: the package's configs/<device>.json); with --evaluate, the "
                             f"regret JSON (default: ./{DEFAULT_OUT}/regret_<device>.json)")
    args = parser.parse_args(argv)
    if args.reselect:
        try:
            reselect(args.reselect)
        except (OSError, ValueError) as error:
            parser.error(f"--reselect {args.reselect}: {getattr(error, 'strerror', None) or error}")
        return 0
    if not torch.cuda.is_available():
        print(f"{parser.prog}: error: the sweep, --evaluate and --device-times need a CUDA GPU, and this torch "
              f"({torch.__version__}) sees none; only --reselect runs without one", file=sys.stderr)
        return 1
    device = torch.device("cuda", torch.cuda.current_device())
    name = device_name(device)
    if args.device_times:
        add_device_times(args.device_times, device)
        dispatch.clear_cache()
        return 0
    if args.evaluate:
        from .heldout import write_evaluation  # imported here: heldout reads the sweep's grid and configurations

        write_evaluation(device, args.out or DEFAULT_OUT / f"regret_{name}.json")
        return 0
    out = args.out or dispatch.table_dir() / dispatch.table_file_name(name)
    sweep("quick" if args.quick else "full", device, out, args.resume)
    dispatch.clear_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
