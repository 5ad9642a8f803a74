"""path="auto" on a GPU without a tuned table (issue 23 item 5), against every path and the tuned decision.

    python bench/untuned.py --out DIR [--candidate] [--extra]   # a CUDA GPU; writes DIR/untuned_<device>.json

At the 48 held-out shapes of bench/host_path.py (``heldout_cases``: no point of the tuned table), interleaved
rounds time loop and device time (timing.loop_time_us, device_time_us, as host_path.heldout) of every path by
name and of path="auto" in each state of the dispatcher:
- ``auto``: the shipped table (``triton`` by name runs the table's configuration too);
- ``auto_untuned``: the table hidden (MMMERGE_CONFIG_DIR at an empty folder): the untuned rule,
  dispatch._heuristic with kernel_config.default_config;
- ``auto_candidate`` (--candidate): the table hidden and ``candidate_config`` in kernel_config.default_config's
  place, so a proposed rule is measured in the same rounds as the shipped one.
A switch of state clears dispatch's caches (dispatch.clear_cache: tables, decisions and the prepared calls built
from them), and every point checks through explain() that each state decides as it should. Per point and
summed up (analysis.ratio_summary, plus the share within 10%), each auto against:
- ``vs_best_path``: the fastest path called by name (triton with the table's configuration, index_put,
  masked_scatter, index_copy): the issue's "within 10% of the best path";
- ``vs_others``: analysis.auto_against_others (the path auto chose, called by name, is no rival: the metric of
  mmmerge-tune --evaluate and host_path.py): is the choice of path right;
- ``vs_tuned``: the tuned auto: how far the untuned decision falls from the tuned one.
``same_call``: the tuned auto against its own path called by name (the very same work), the rounds' noise.
--extra adds shapes off the grid where the untuned rule's tile matters (many short rows, fp32->fp32, H of
64-256), summed up apart.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

import mmmerge_triton as mm
from mmmerge_triton import dispatch, kernel_config
from mmmerge_triton.kernel_config import KernelConfig
from mmmerge_triton.tools import timing
from mmmerge_triton.tools.bench import device_name, environment
from mmmerge_triton.tools.cases import DTYPES, Case, make_inputs
from mmmerge_triton.tools.analysis import auto_against_others, ratio_summary
from mmmerge_triton.tools.tune import config_name

DEV = torch.device("cuda", 0)
AUTOS = {"auto": "tuned", "auto_untuned": "untuned", "auto_candidate": "candidate"}  # call name -> state
WITHIN = 1.10  # the bar: within 10% of the best path
EXTRA = [  # (N, H, density, pattern, src, dst, mask): short rows and many of them, where the tile matters
    (65536, 1024, 0.9, "blocks", "bf16", "bf16", "cpu"),
    (131072, 1536, 0.5, "blocks", "fp32", "fp32", "cpu"),
    (65536, 2048, 0.9, "scattered", "fp16", "fp16", "cpu"),
    (131072, 1152, 0.5, "blocks", "bf16", "bf16", "gpu"),
    (65536, 256, 0.5, "blocks", "fp32", "fp32", "cpu"),
    (131072, 64, 0.5, "scattered", "bf16", "bf16", "gpu"),
    (32768, 128, 0.9, "blocks", "fp32", "fp32", "cpu"),
    (65536, 4096, 0.5, "blocks", "bf16", "bf16", "cpu"),  # a control: rows of 4096, no rule touches it
]


def heldout_cases(count: int = 48) -> list[Case]:
    """bench/host_path.py's held-out grid, the same seeded draw (a copy while host_path.py is being reworked; the
    one owner should be mmmerge_triton/tools/cases.py, imported by both)."""
    axes = dict(n=(700, 2500, 9000, 20000, 70000), hidden=(1152, 2048, 3584, 5120), density=(0.05, 0.3, 0.7),
                pattern=("blocks", "scattered"), pair=list(itertools.product(DTYPES, DTYPES)), mask=("cpu", "gpu"))
    everything = list(itertools.product(*axes.values()))
    random.Random(0).shuffle(everything)
    return [Case(n, h, d, p, s, t, m) for n, h, d, p, (s, t), m in everything[:count]]


def candidate_config(hidden: int, n_rows: int, n_mask: int, mask_on_device: bool) -> KernelConfig:
    """The untuned rule proposed in issue 23 item 5: kernel_config.default_config, with 4 rows per program in
    the two-launch kernel where rows are short (H < 3072) and many (M >= 4096). Delete it, and --candidate,
    once kernel_config.default_config is this rule."""
    config = kernel_config.default_config(hidden, n_rows, n_mask, mask_on_device)
    return config._replace(rows=4) if not config.fused and hidden < 3072 and n_rows >= 4096 else config


class Dispatcher:
    """Which rule path="auto" follows: the shipped table ("tuned"), none ("untuned"), or none with
    candidate_config as the untuned rule ("candidate"). ``set`` switches and clears dispatch's caches."""

    def __init__(self, empty_dir: str):
        self.empty_dir, self.state = empty_dir, "tuned"
        self.table_dir = os.environ.get("MMMERGE_CONFIG_DIR")
        self.shipped_rule = dispatch.default_config

    def rule(self, state: str) -> Callable[[int, int, int, bool], KernelConfig]:
        return candidate_config if state == "candidate" else self.shipped_rule

    def set(self, state: str) -> None:
        if state == self.state:
            return
        if state != "tuned":
            os.environ["MMMERGE_CONFIG_DIR"] = self.empty_dir
        elif self.table_dir is None:
            del os.environ["MMMERGE_CONFIG_DIR"]
        else:
            os.environ["MMMERGE_CONFIG_DIR"] = self.table_dir
        dispatch.default_config = self.rule(state)  # the name dispatch's untuned rule reads
        dispatch.clear_cache()
        self.state = state


def decisions(switch: Dispatcher, states: list[str], dst, mask, src) -> dict:
    """Each state's decision (explain()), checked: the tuned one names the table, the others are their rule's."""
    found = {}
    n, m = dispatch.bucket(mask.numel()), dispatch.bucket(src.shape[0])
    for state in states:
        switch.set(state)
        d = mm.explain(dst, src, mask)
        expected = switch.rule(state)(dst.shape[-1], m, n, mask.is_cuda)
        if (state == "tuned") != ("tuned table" in d.reason) or (state != "tuned" and d.config != expected):
            raise RuntimeError(f"the {state} state decided {d} (expected {expected}): the switch did not take")
        found[state] = {"path": d.path, "kind": d.kind, "config": config_name(d.config) if d.config else None,
                        "reason": d.reason}
    return found


def measure(switch: Dispatcher, calls: dict[str, tuple[str, Callable[[], object]]], rounds: int) -> dict:
    """{figure: {call: median of the rounds}} for loop_us and device_us, each call taken in its state."""
    state_of = {fn: state for state, fn in calls.values()}

    def in_state(take):
        return lambda fn: (switch.set(state_of[fn]), take(fn))[1]

    figures = {"loop_us": in_state(lambda fn: timing.loop_time_us(fn, DEV, budget_s=0.01, min_calls=20)),
               "device_us": in_state(lambda fn: timing.device_time_us(fn, DEV, reps=5))}
    taken = timing.interleaved({name: fn for name, (_, fn) in calls.items()}, figures, rounds)
    return {figure: {name: statistics.median(v[figure]) for name, v in taken.items()} for figure in figures}


def ratios(times: dict, decided: dict, autos: list[str]) -> dict:
    """One figure's ratios at one point (see the module doc)."""
    paths = {p: times[p] for p in mm.PATHS}
    best = min(paths, key=paths.get)
    out = {"best_path": best, "same_call": times["auto"] / times[decided["tuned"]["path"]]}
    for name in autos:
        out[name] = {"vs_best_path": times[name] / paths[best],
                     "vs_others": auto_against_others({"auto": times[name], **paths}, decided[AUTOS[name]]["path"])[1]}
        if name != "auto":
            out[name]["vs_tuned"] = times[name] / times["auto"]
    return out


def timed(switch: Dispatcher, case: Case, autos: list[str], rounds: int) -> tuple[dict, dict]:
    """(decisions, figures) at one point: every path by name in the tuned state, each auto in its own."""
    dst, mask, src = make_inputs(case, DEV)
    decided = decisions(switch, [AUTOS[a] for a in autos], dst, mask, src)
    calls = {p: ("tuned", lambda p=p: mm.masked_row_scatter_(dst, mask, src, path=p)) for p in mm.PATHS}
    calls |= {a: (AUTOS[a], lambda: mm.masked_row_scatter_(dst, mask, src)) for a in autos}
    return decided, measure(switch, calls, rounds)


def point(switch: Dispatcher, case: Case, autos: list[str], rounds: int) -> dict:
    decided, figures = timed(switch, case, autos, rounds)
    torch.cuda.empty_cache()  # the inputs went with timed()'s frame
    return {"case": case.as_dict(), "decisions": decided, **figures,
            "ratios": {f.removesuffix("_us"): ratios(times, decided, autos) for f, times in figures.items()}}


def summary(points: list[dict], autos: list[str]) -> dict:
    """Per figure and auto: analysis.ratio_summary of each ratio, the share within WITHIN, and the worst point."""
    out = {}
    for figure in ("loop", "device"):
        out[figure] = {"same_call": ratio_summary([p["ratios"][figure]["same_call"] for p in points])}
        for name in autos:
            for metric in points[0]["ratios"][figure][name]:
                values = [p["ratios"][figure][name][metric] for p in points]
                worst = max(range(len(points)), key=values.__getitem__)
                out[figure][f"{name} {metric}"] = ratio_summary(values) | {
                    "within_10pct": sum(v <= WITHIN for v in values) / len(values),
                    "worst_case": Case(**points[worst]["case"]).label(),
                    "over_10pct": {Case(**p["case"]).label(): v for p, v in zip(points, values) if v > WITHIN}}
    return out


def print_point(p: dict, autos: list[str], elapsed: float) -> None:
    d, loop, dev = p["decisions"], p["ratios"]["loop"], p["ratios"]["device"]
    chosen = " | ".join(f"{s} {d[s]['path'] if d[s]['path'] != 'triton' else d[s]['config']}" for s in d)
    figures = " | ".join(f"{a} loop x{loop[a]['vs_best_path']:.2f} dev x{dev[a]['vs_best_path']:.2f}" for a in autos)
    print(f"[{elapsed:5.0f} s] {Case(**p['case']).label()}: {chosen} || vs best path ({loop['best_path']} in loop "
          f"{p['loop_us'][loop['best_path']]:.1f} µs): {figures}", flush=True)


def print_summary(title: str, summed: dict) -> None:
    print(f"\n{title}")
    for figure, rows in summed.items():
        for name, s in rows.items():
            within = f"within 10% {s['within_10pct']:.0%}, " if "within_10pct" in s else ""
            worst = f" ({s['worst_case']})" if "worst_case" in s else ""
            print(f"  {figure:6s} {name:30s} {within}within 5% {s['within_5pct']:.0%}, median {s['median']:.3f}, "
                  f"worst {s['worst']:.3f}{worst}")
            if s.get("over_10pct") and name.startswith("auto_"):
                print("      over 10%: " + "; ".join(f"{label} x{v:.2f}" for label, v in s["over_10pct"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("mmmerge-results"))
    parser.add_argument("--candidate", action="store_true", help="also time candidate_config as the untuned rule")
    parser.add_argument("--extra", action="store_true", help="also time the EXTRA shapes off the held-out grid")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="only the first LIMIT held-out shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("it times the GPU paths: a CUDA device is needed")
    if dispatch.load_table(device_name(DEV)) is None:
        parser.error(f"no tuned table for {device_name(DEV)} in {dispatch.table_dir()}: nothing to compare with")
    warnings.filterwarnings("ignore", message="mmmerge_triton: no tuned table")  # the point of the untuned states
    autos = ["auto", "auto_untuned"] + (["auto_candidate"] if args.candidate else [])
    sets = {"heldout": heldout_cases()[:args.limit], "extra": [Case(*shape) for shape in EXTRA] if args.extra else []}
    sets = {name: cases for name, cases in sets.items() if cases}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"untuned_{device_name(DEV)}.json"
    table = dispatch.table_dir() / dispatch.table_file_name(device_name(DEV))
    result = {"environment": environment(DEV), "table": str(table), "rounds": args.rounds, "within": WITHIN,
              "candidate": candidate_config.__doc__ if args.candidate else None, "sets": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as empty:
        switch = Dispatcher(empty)
        try:
            for name, cases in sets.items():
                result["sets"][name] = {"points": (points := [])}
                for case in cases:
                    points.append(point(switch, case, autos, args.rounds))
                    print_point(points[-1], autos, time.perf_counter() - start)
                    path.write_text(json.dumps(result, indent=1))  # what is done survives a cut-off run
                result["sets"][name]["summary"] = summary(points, autos)
                path.write_text(json.dumps(result, indent=1))
        finally:
            switch.set("tuned")
    for name, s in result["sets"].items():
        print_summary(f"{name} ({len(s['points'])} points): ratios of each auto's time", s["summary"])
    print(f"\n{time.perf_counter() - start:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
