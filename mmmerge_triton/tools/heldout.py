"""The held-out check of a tuned table: path="auto" on a grid the sweep never saw, against every path and against
the best Triton configuration at each point, run on a CUDA GPU by

    python -m mmmerge_triton.tools.tune --evaluate [--out FILE]   (``mmmerge-tune --evaluate``)

It writes the regret table (default ./mmmerge-results/regret_<device>.json in the current directory), which
``mmmerge-report`` prints. The candidates are the sweep's (tune.triton_configs), timed as the sweep times them
(tune.interleaved_loop_us).

Runtime internals used (no public function does the same): ``paths.RUNNERS`` (the bare paths),
``executor.merge_triton(config=...)`` (a Triton configuration launched directly), ``kernel_config.default_config``
(the untuned rule's configuration) and ``dispatch.choose`` (the cached decision whose host cost it reports).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import PATHS, dispatch, executor, explain, masked_row_scatter_, paths
from ..kernel_config import default_config
from .analysis import auto_against_others, ratio_summary
from .bench import _progress, environment
from .cases import Case, make_inputs
from .tune import config_name, interleaved_loop_us, sweep_cases, triton_configs

HELD_OUT = dict(n=(512, 3000, 12000, 40000, 100000), hidden=(1536, 2560, 3584, 5120, 7168), density=(0.5,),
                dtypes=(("bf16", "bf16"), ("fp32", "bf16")), mask=("cpu", "gpu"))


def evaluate(device: torch.device, rounds: int = 5, finalists: int = 3) -> dict:
    """path="auto" on the held-out grid, two ways, each within one point's measurements:

    - against every other path through the public API (``ratio``: auto / the best of the other paths,
      analysis.auto_against_others), as a user would call them. The path auto chose, called by name, is the very
      same call (a named "triton" takes the tuned configuration too), so it is timed and recorded but not
      compared: the difference would be the host's noise, not a choice;
    - against an oracle (``oracle_ratio``): the configuration auto chose, launched directly, against the best
      path runner or Triton configuration (every one the sweep tries, and the heuristic's) at this very point:
      what a sweep that had seen the point would have picked. All are screened once; the ``finalists`` fastest
      and auto's choice are then timed afresh, ``rounds`` times, and the ratio taken from those times only (so
      the oracle is not merely the luckiest of twenty noisy samples).
    """
    points = []
    for case in _progress(sweep_cases(HELD_OUT), "held-out points"):
        dst, mask, src = make_inputs(case, device)
        api_calls = {name: (lambda p=name: masked_row_scatter_(dst, mask, src, path=p))
                     for name in ("auto",) + PATHS}
        loop_us = interleaved_loop_us(api_calls, device, rounds)
        decision = explain(dst, src, mask)
        direct = {name: (lambda r=runner: r(dst, mask, src, False))
                  for name, runner in paths.RUNNERS.items()}
        configs = set(triton_configs(case.hidden, case.mask == "gpu"))
        configs.add(default_config(case.hidden, src.shape[0], case.n, case.mask == "gpu"))
        if decision.config is not None:
            configs.add(decision.config)
        for cfg in configs:
            direct[config_name(cfg)] = lambda c=cfg: executor.merge_triton(dst, mask, src, False, config=c)
        chosen = config_name(decision.config) if decision.path == "triton" else decision.path
        screened = interleaved_loop_us(direct, device, 1)
        final_names = set(sorted(screened, key=screened.get)[:finalists]) | {chosen}
        final_us = interleaved_loop_us({name: direct[name] for name in final_names}, device, rounds)
        best, ratio = auto_against_others(loop_us, decision.path)
        oracle = min(final_us, key=final_us.get)
        points.append({"case": case.as_dict(), "loop_us": loop_us, "best_path": best, "auto_path": decision.path,
                       "ratio": ratio, "screened_loop_us": screened,
                       "final_loop_us": final_us, "auto_choice": chosen, "oracle_choice": oracle,
                       "oracle_ratio": final_us[chosen] / final_us[oracle]})
        del dst, mask, src
        torch.cuda.empty_cache()
    ours, oracle = (ratio_summary([p[key] for p in points]) for key in ("ratio", "oracle_ratio"))
    return {
        "points": points,
        "within_5pct": ours["within_5pct"],
        "worst_ratio": ours["worst"],
        "median_ratio": ours["median"],
        "oracle_within_5pct": oracle["within_5pct"],
        "oracle_worst_ratio": oracle["worst"],
        "oracle_median_ratio": oracle["median"],
        "dispatch_us": _dispatch_cost(device),
    }


def _dispatch_cost(device: torch.device, calls: int = 20000) -> float:
    """Host µs that a cached dispatch decision adds to a call (dispatch.choose on a warm cache)."""
    dst, mask, src = make_inputs(Case(2048, 4096, 0.5), device)
    dispatch.choose(dst, mask, src.dtype, src.shape[0])
    start = time.perf_counter()
    for _ in range(calls):
        dispatch.choose(dst, mask, src.dtype, src.shape[0])
    return (time.perf_counter() - start) / calls * 1e6


def write_evaluation(device: torch.device, out: Path) -> None:
    """Run evaluate() on ``device``, write its result with the environment to ``out`` and print its summary."""
    result = evaluate(device)
    result["environment"] = environment(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"held-out points: {len(result['points'])}; auto within 5% of the best path at "
          f"{100 * result['within_5pct']:.1f}%; worst {result['worst_ratio']:.3f}x, median "
          f"{result['median_ratio']:.3f}x; against the per-point oracle within 5% at "
          f"{100 * result['oracle_within_5pct']:.1f}%, worst {result['oracle_worst_ratio']:.3f}x, median "
          f"{result['oracle_median_ratio']:.3f}x; cached dispatch {result['dispatch_us']:.2f} µs per call")
    print(f"wrote {out}")
