"""Print the tables of the JSON files that mmmerge-bench and mmmerge-tune write, and draw their plots.

    python -m mmmerge_triton.tools.report FILE.json [FILE.json ...] [--path auto] [--cases] [--png] [--out DIR]
    (installed as ``mmmerge-report``)

It reads every kind of file the package writes, from a CPU or a GPU run: a benchmark run (``bench_*.json``), a
suite (``suite_*.json``), a held-out regret run (``regret_*.json``, ``mmmerge-tune --evaluate``), a tuned table
(``configs/<device>.json``), and a flat record of timings (``probe_*.json``). Figures a run did not measure
(host time and peak memory on a CPU) are null in the JSON and ``-`` in the tables.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

from .analysis import (BELOW_COPY, MB, auto_against_others, below_copy, check_targets, figure_of, is_cpu_run,
                      ratio_of, ratio_summary, serving_slice, spread)
from .timing import CPU_NOTICE

DEFAULT_OUT = Path("mmmerge-results")  # where the tools write: the current directory, not the source tree


def _fmt(value, width: int = 0, digits: int = 1) -> str:
    return ("-" if value is None else f"{value:.{digits}f}").rjust(width)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def below_copy_notes(records: list[dict], paths: list[str] | None = None) -> list[str]:
    """One line per point where a path's device time is below BELOW_COPY x the copy's (GPU runs)."""
    notes = []
    for record in records:
        copy = record["results"].get("copy")
        steadiness = "" if spread(copy) is None else f", its rounds' spread {_pct(spread(copy))}"
        for name, ratio in below_copy(record, paths):
            us = figure_of(record, name, "device_us")
            notes.append(f"note: {record['label']}: {name} {us:.1f} µs is {ratio:.3f}x "
                         f"the copy's {copy['device_us']:.1f} µs{steadiness}: below {BELOW_COPY}x a copy of the "
                         "same bytes, a measurement artefact unless shown otherwise")
    return notes


def copy_spread_line(records: list[dict]) -> str | None:
    """How steady the copy baseline was: the spread of its device time's rounds over the run (None for a file
    from before the rounds were recorded)."""
    spreads = [(v, r["label"]) for r in records if (v := spread(r["results"].get("copy"))) is not None]
    if not spreads:
        return None
    worst, label = max(spreads)
    return (f"copy baseline (device time, the median of rounds interleaved with the paths): spread of its rounds, "
            f"(max - min) / median, {_pct(statistics.median(v for v, _ in spreads))} at the median case, "
            f"{_pct(worst)} at worst ({label})")


def print_case(record: dict, cpu: bool = False) -> None:
    """One case's table. On a GPU: device µs and the spread of its rounds, loop and host µs, peak MB, % of the
    copy's bandwidth and speedups in device time. On a CPU every figure is wall time, host µs and peak MB were
    not measured, and the bandwidth percentage is dropped (a CPU copy says nothing about a device's bandwidth)."""
    res = record["results"]
    print(f"\n{record['label']}  (moves {record['moved_bytes'] / MB:.1f} MB)")
    if cpu:
        print(f"  {'path':15s}{'wall µs':>10s}{'loop µs':>10s}{'x index_put':>13s}{'x masked_sc':>13s}"
              "   (wall time: median of one call; loop: per call, back to back)")
        for name, r in res.items():
            print(f"  {name:15s}{_fmt(r['device_us'], 10)}{_fmt(r['loop_us'], 10)}"
                  f"{_fmt(ratio_of(figure_of(record, 'index_put', 'device_us'), r['device_us']), 12, 2)}x"
                  f"{_fmt(ratio_of(figure_of(record, 'masked_scatter', 'device_us'), r['device_us']), 12, 2)}x")
        return
    floor = figure_of(record, "copy", "device_us")
    print(f"  {'path':15s}{'device µs':>11s}{'spread':>8s}{'loop µs':>10s}{'host µs':>10s}{'peak MB':>10s}"
          f"{'copy BW':>9s}{'x index_put':>13s}{'x masked_sc':>13s}")
    for name, r in res.items():
        peak = None if r.get("peak_extra_bytes") is None else r["peak_extra_bytes"] / MB
        bandwidth = ratio_of(floor, r["device_us"])
        print(f"  {name:15s}{_fmt(r['device_us'], 11)}{_pct(spread(r)):>8s}{_fmt(r['loop_us'], 10)}"
              f"{_fmt(r.get('host_us'), 10)}"
              f"{_fmt(peak, 10)}{_fmt(None if bandwidth is None else 100 * bandwidth, 8, 0)}%"
              f"{_fmt(ratio_of(figure_of(record, 'index_put', 'device_us'), r['device_us']), 12, 2)}x"
              f"{_fmt(ratio_of(figure_of(record, 'masked_scatter', 'device_us'), r['device_us']), 12, 2)}x")


def run_title(env: dict) -> str:
    env = env or {}
    return (f"mmmerge_triton {env.get('commit') or '(commit not recorded)'}, {env.get('device', '?')}, torch "
            f"{env.get('torch', '?')}, triton {env.get('triton', '?')}, {str(env.get('date', '?'))[:10]}")


def markdown(records: list[dict], path: str = "auto", cpu: bool = False) -> str:
    """README tables from a benchmark run: the serving slice (bf16, 50% of rows in image blocks, CPU mask) by
    N and H, as device µs of ``path`` with its ratio to the copy and its speedups (the copy with the spread of
    its rounds, where recorded); then the targets, how steady the copy was, and a note at every point of the
    run where ``path`` measured below BELOW_COPY x the copy. On a CPU the figures are wall time, and the ratio
    to the copy, its spread and the peak memory (not measured) are left out."""
    serving = serving_slice(records)
    if cpu:
        lines = ["| N | H | MB moved | copy wall µs | ours wall µs | index_put wall µs (ours x faster) | "
                 "masked_scatter wall µs (ours x faster) | loop wall µs ours / index_put |", "|" + "---|" * 8]
    else:
        lines = ["| N | H | MB moved | copy µs (spread) | ours µs (x copy) | index_put µs (ours x faster) | "
                 "masked_scatter µs (ours x faster) | loop µs ours / index_put | peak MB ours / masked_scatter |",
                 "|" + "---|" * 9]
    for r in sorted(serving, key=lambda r: (r["case"]["n"], r["case"]["hidden"])):
        res = r["results"]
        ours, copy, ip, ms = (res.get(p) or {} for p in (path, "copy", "index_put", "masked_scatter"))
        us = ours.get("device_us")
        copy_spread = None if cpu else spread(copy)
        head = (f"| {r['case']['n']} | {r['case']['hidden']} | {r['moved_bytes'] / MB:.0f} | "
                f"{_fmt(copy.get('device_us'))}{'' if copy_spread is None else f' ({_pct(copy_spread)})'} | ")
        speedups = (f"{_fmt(ip.get('device_us'))} ({_fmt(ratio_of(ip.get('device_us'), us))}) | "
                    f"{_fmt(ms.get('device_us'))} ({_fmt(ratio_of(ms.get('device_us'), us))}) | "
                    f"{_fmt(ours.get('loop_us'), digits=0)} / {_fmt(ip.get('loop_us'), digits=0)} |")
        if cpu:
            lines.append(head + f"{_fmt(us)} | " + speedups)
        else:
            peaks = [None if x.get("peak_extra_bytes") is None else x["peak_extra_bytes"] / MB for x in (ours, ms)]
            lines.append(head + f"{_fmt(us)} ({_fmt(ratio_of(us, copy.get('device_us')), digits=2)}) | " + speedups
                         + f" {_fmt(peaks[0])} / {_fmt(peaks[1], digits=0)} |")
    if cpu:  # the targets are device-time ratios: a CPU's wall times say nothing about them
        return "\n".join(lines)
    lines += ["", f"Targets for path={path!r} over all {len(records)} cases of the run:", ""]
    lines += ["- " + line for line in check_targets(records, path)["lines"]]
    steadiness = copy_spread_line(records)
    if steadiness:
        lines += ["", steadiness]
    notes = below_copy_notes(records, [path])
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def suite_title(record: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in record.items() if k not in ("results", "moved_bytes"))


def suite_markdown(records: list[dict], cpu: bool = False) -> str:
    """README table of a suite run (suites.py): a row per record, its shape fields, then per variant
    "device µs / loop µs / peak MB" (on a CPU "wall µs / loop µs": peak memory is not measured there)."""
    fields = list(dict.fromkeys(k for r in records for k in r if k not in ("results", "moved_bytes")))
    variants = list(dict.fromkeys(v for r in records for v in r["results"]))
    lines = ["| " + " | ".join(fields + variants) + " |", "|" + "---|" * (len(fields) + len(variants))]
    for r in records:
        cells = [str(r.get(k, "")) for k in fields]
        for v in variants:
            res = r["results"].get(v) or {}
            peak = None if res.get("peak_extra_bytes") is None else res["peak_extra_bytes"] / MB
            cell = f"{_fmt(res.get('device_us'), digits=0)} / {_fmt(res.get('loop_us'), digits=0)}"
            cells.append(cell if cpu else f"{cell} / {_fmt(peak)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def regret_markdown(run: dict) -> str:
    """A held-out run of ``mmmerge-tune --evaluate``: its summary, then a row per point. Auto's ratio to the
    best other path is computed here from each point's recorded loop times (auto_against_others), whatever
    the file's own ``ratio`` and summary say: files written before that metric counted auto among its rivals."""
    points = []
    for p in run["points"]:
        if isinstance(p.get("loop_us"), dict) and "auto_path" in p:
            best, ratio = auto_against_others(p["loop_us"], p["auto_path"])
            p = p | {"best_path": best, "ratio": ratio}
        points.append(p)
    ratios = [p["ratio"] for p in points if p.get("ratio") is not None]
    summary = ratio_summary(ratios) if ratios else {}
    oracle = {k: run.get(f"oracle_{k}") for k in ("within_5pct", "worst_ratio")}

    def pct(value):
        return _fmt(None if value is None else 100 * value, digits=0)

    lines = [f"auto within 5% of the best other path at {pct(summary.get('within_5pct'))}% of {len(points)} points, "
             f"worst {_fmt(summary.get('worst'), digits=3)}x, median {_fmt(summary.get('median'), digits=3)}x; "
             f"against the per-point oracle within 5% at {pct(oracle['within_5pct'])}%, worst "
             f"{_fmt(oracle['worst_ratio'], digits=3)}x; cached dispatch "
             f"{_fmt(run.get('dispatch_us'), digits=2)} µs per call (loop time throughout)"]
    recorded = run.get("worst_ratio")
    if summary and recorded is not None and abs(recorded - summary["worst"]) > 1e-9:
        lines.append(f"(the file's own summary reads worst {recorded:.3f}x: written before auto and the path it "
                     "chose were left out of its rivals; the figures here are recomputed from its loop times)")
    lines += ["", "| N | H | dtypes | mask | auto's path (choice) | best other path | auto / best | oracle "
              "| auto / oracle |", "|" + "---|" * 9]
    for p in points:
        c = p.get("case", {})
        lines.append(f"| {c.get('n')} | {c.get('hidden')} | {c.get('src')}->{c.get('dst')} | {c.get('mask')} | "
                     f"{p.get('auto_path')} ({p.get('auto_choice')}) | {p.get('best_path')} | "
                     f"{_fmt(p.get('ratio'), digits=2)} | {p.get('oracle_choice')} | "
                     f"{_fmt(p.get('oracle_ratio'), digits=2)} |")
    return "\n".join(lines)


def table_summary(table: dict) -> str:
    """A tuned table (``mmmerge-tune``): its device, size, rule, and which paths and configurations won."""
    entries = table.get("entries") or []
    paths = collections.Counter((e.get("best") or {}).get("path") for e in entries)
    configs = collections.Counter(json.dumps((e.get("best") or {}).get("config"), sort_keys=True) for e in entries
                                  if (e.get("best") or {}).get("config"))
    lines = [f"tuned table for {table.get('device')} (version {table.get('version')}, grid {table.get('grid')}): "
             f"{len(entries)} entries", f"selection: {table.get('selection', '-')}",
             f"best path counts: {dict(paths.most_common())}", "most frequent winning configurations:"]
    lines += [f"  {count:4d}  {config}" for config, count in configs.most_common(6)]
    return "\n".join(lines)


def numbers_markdown(run: dict) -> str:
    """A flat record of named figures (a probe's output, e.g. probe_host_profile.json)."""
    return "\n".join(["| name | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in run.items()
                                                          if k != "environment"])


def _flat(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_flat(v)}" for k, v in value.items() if not isinstance(v, (dict, list)))
    return str(value)


def records_markdown(records: list[dict]) -> str:
    """Any list of flat records (a when-it-matters benchmark's), one row each, nested values spelled inline."""
    keys = list(dict.fromkeys(k for r in records for k, v in r.items() if not isinstance(v, list)))
    rows = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    rows += ["| " + " | ".join(_flat(r.get(k, "-")) for k in keys) + " |" for r in records]
    return "\n".join(rows)


def host_path_markdown(run: dict) -> str:
    """bench/host_path.py's file: per-stage host µs, loop µs, idle/busy event µs, the held-out summary."""
    out = []
    for name, stages in run.get("stages", {}).items():
        out += [f"\nstages, {name} (host µs)", numbers_markdown({k: v for k, v in stages.items() if k != "decision"})]
    if run.get("loop"):
        out += ["\nloop µs per call", records_markdown([{"n": r["n"], "hidden": r["hidden"], **r["loop_us"]}
                                                          for r in run["loop"]])]
    if run.get("idle"):
        out += ["\nevent µs of one call, idle / busy GPU", records_markdown(
            [{"n": r["n"], "hidden": r["hidden"], **{k: f"{v['idle_us']:.1f} / {v['busy_us']:.1f}"
                                                     for k, v in r.items() if isinstance(v, dict)}} for r in run["idle"]])]
    if run.get("heldout"):
        held = run["heldout"]
        out += [f"\nheld-out, {len(held['points'])} points: auto against the best other path"]
        out += [f"  {key}: {_flat(held[key])}" for key in held if key not in ("points", "note")]
    return "\n".join(out)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def kind_of(run, file_name: str = "") -> str | None:
    """Which of the package's files this is, by its keys; None for a file the package does not write. A flat
    record of numbers is a probe's (bench/probe_launch.py) where it records its environment, or, for probes
    from before they did, where the file is named ``probe_*.json``: any other JSON of numbers is not ours."""
    if not isinstance(run, dict):
        return None
    if "suite" in run and isinstance(run.get("records"), list):
        return "suite"
    if "benchmark" in run and isinstance(run.get("records"), list):
        return "matters"
    if any(k in run for k in ("stages", "loop", "idle", "heldout")) and "environment" in run:
        return "host_path"
    if isinstance(run.get("records"), list):
        return "bench"
    if isinstance(run.get("points"), list):
        return "regret"
    if isinstance(run.get("entries"), list) and "version" in run:
        return "table"
    figures = [v for k, v in run.items() if k != "environment"]
    ours = isinstance(run.get("environment"), dict) or file_name.startswith("probe_")
    if ours and figures and all(_is_number(v) for v in figures):
        return "numbers"
    return None


def report(file: Path, paths: list[str], cases: bool, png_dir: Path | None) -> str | None:
    """Print one file's report (and draw its PNG into ``png_dir``); returns a one-line error, or None."""
    from .plots import plot, plot_regret, plot_suite  # plots.py reads this module's helpers
    try:
        run = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{file}: cannot read it as JSON ({error})"
    kind = kind_of(run, file.name)
    if kind is None:
        return (f"{file}: not one of this package's result files (a bench, suite, regret, tuned-table, probe, "
                "host-path or when-it-matters JSON)")
    env = run.get("environment")
    print(f"# {file.name}: {kind}" + (f" — {run_title(env)}" if env else ""))
    cpu = is_cpu_run(env) and kind in ("bench", "suite")
    if cpu:
        print(CPU_NOTICE)
    error = None
    drawn = None
    if kind == "bench":
        records = run["records"]
        if cases:
            for record in records:
                print_case(record, cpu)
        known = list(dict.fromkeys(p for r in records for p in r["results"]))
        for path in paths:
            if path not in known:
                error = f"{file}: path {path!r} is not in this run (it has {', '.join(known)})"
                continue
            print("\n" + markdown(records, path, cpu))
        drawn = lambda out: plot(records, env, out)  # noqa: E731
    elif kind == "suite":
        print(f"\nsuite {run['suite']}; cells: " + ("wall µs of one call / loop µs (CPU wall time)" if cpu else
                                                     "device µs / loop µs / peak extra MB") + "\n")
        print(suite_markdown(run["records"], cpu))
        drawn = lambda out: plot_suite(run, out)  # noqa: E731
    elif kind == "regret":
        print("\n" + regret_markdown(run))
        drawn = lambda out: plot_regret(run, out)  # noqa: E731
    elif kind == "table":
        print(table_summary(run))
    elif kind == "matters":
        print(f"\n{run['benchmark']} (bench/matters; python bench/matters/summary.py renders the README's tables)\n")
        print(records_markdown(run["records"]))
    elif kind == "host_path":
        print(host_path_markdown(run))
    else:
        print(numbers_markdown(run))
    if png_dir is not None:
        out = png_dir / f"{file.stem}.png"
        if drawn is None:
            print(f"(no plot for a {kind} file)")
        elif drawn(out):
            print(f"wrote {out}")
        else:
            print("(no plot: matplotlib is missing, the 'bench' extra, or the file has nothing to draw)")
    print()
    return error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmmerge-report", description=__doc__.split("\n\n")[0],
        epilog="Reads bench_*.json, suite_*.json, regret_*.json (CPU or GPU runs), tuned tables and probe JSONs.")
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE.json", help="JSON files written by the tools")
    parser.add_argument("--path", action="append", default=None, metavar="NAME",
                        help="benchmark files: the path whose table to print (repeatable; default auto)")
    parser.add_argument("--cases", action="store_true", help="benchmark files: every case's table too")
    parser.add_argument("--png", action="store_true", help="draw each file's plot as OUT/<file name>.png")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for --png (default: ./{DEFAULT_OUT}/ in the current directory)")
    args = parser.parse_args(argv)
    if args.png:
        args.out.mkdir(parents=True, exist_ok=True)
    failed = False
    for file in args.files:
        error = report(file, args.path or ["auto"], args.cases, args.out if args.png else None)
        if error:
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
            failed = True
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
