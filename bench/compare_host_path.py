"""Loop time and idle-GPU time of this checkout against an earlier copy of the package, on one warm GPU.

    python bench/compare_host_path.py --before DIR --out OUT [--rounds 2]

DIR holds an earlier package's ``mmmerge_triton/`` and ``kernels/`` (e.g. ``git archive <commit> mmmerge_triton
kernels | tar -x -C DIR``). Each round runs bench/host_path.py's loop and idle parts twice, once with DIR first on
PYTHONPATH (before) and once on the installed checkout (after), alternating, so that both meet the same machine
state. The run-to-run spread is the spread of one version across rounds; the change is after / before per figure
(medians over rounds), printed and written to OUT/compare_host_path.json with every round's host_path JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(version: str, before: Path, out: Path) -> dict:
    env = dict(os.environ)
    if version == "before":
        env["PYTHONPATH"] = f"{before}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(HERE / "host_path.py"), "--parts", "loop,idle", "--out", str(out)], env=env,
                   check=True)
    (found,) = out.glob("host_path_*.json")
    return json.loads(found.read_text())


def figures(result: dict) -> dict[str, float]:
    """{label: µs}: loop time per call and path, idle- and busy-GPU event time per path."""
    flat = {}
    for row in result["loop"]:
        for call, us in row["loop_us"].items():
            flat[f"loop N={row['n']} H={row['hidden']} {call}"] = us
    for row in result["idle"]:
        for call, times in row.items():
            if isinstance(times, dict):
                for figure in ("idle_us", "busy_us"):
                    flat[f"{figure.split('_')[0]} N={row['n']} H={row['hidden']} {call}"] = times[figure]
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    taken = {"before": [], "after": []}
    for r in range(args.rounds):
        for version in ("before", "after"):
            taken[version].append(figures(run(version, args.before.resolve(), args.out / f"{version}_{r + 1}")))
    rows = {}
    for label in taken["after"][0]:
        before = [t[label] for t in taken["before"]]
        after = [t[label] for t in taken["after"]]
        spread = max(max(v) / min(v) - 1 for v in (before, after))  # the same code across rounds
        rows[label] = {"before_us": statistics.median(before), "after_us": statistics.median(after),
                       "after_vs_before": statistics.median(after) / statistics.median(before), "spread": spread,
                       "rounds": {"before": before, "after": after}}
        print(f"{label:60s} before {rows[label]['before_us']:9.1f}  after {rows[label]['after_us']:9.1f}  "
              f"x{rows[label]['after_vs_before']:.3f}  spread {spread:.1%}", flush=True)
    (args.out / "compare_host_path.json").write_text(json.dumps(
        {"before": str(args.before), "commit": os.environ.get("MMMERGE_COMMIT"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
