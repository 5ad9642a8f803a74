"""Where a merge's host time goes, and what a caller sees, on a GPU (issue 22: a signature's preparation made once).

    python bench/host_path.py --out DIR        # writes DIR/host_path_<device>.json, prints the tables

Public means only: the package's exported functions, torch.ops.mmmerge_triton.*, and mmmerge_triton.tools.
1. stages: host µs of one call (medians over 400 calls, the GPU kept busy by a spin kernel so no launch waits:
   timing.host_time_us), at N = 512, 4096, 65536 (H 4096, bf16, half the rows in image blocks), CPU and GPU
   mask: a memo hit (a plain [N, H] dst) against the same merge prepared on every call (dst as a [1, N, H] view:
   no signature) and against the registered op, next to the floors: mask.numpy() (a CPU mask's row map starts
   there), index_put with a CPU mask (vLLM), a tiny torch op.
2. loop: wall µs per call back to back (medians of 5 rounds, the calls alternating within each round) at
   N <= 16384: ours with a CPU and a GPU mask, index_put with a CPU mask (vLLM), a tiny torch op.
3. idle: CUDA-event µs of one call with nothing queued before it (the host work before the first launch
   shows as GPU time), against a device copy of the same bytes, at >= 64 MB moved; and the same call with
   the GPU kept busy (host work hidden). L2 flushed before each call; the copy and the calls divided by it
   taken in the same interleaved rounds, the median of 5 kept (timing.interleaved, as mmmerge-bench does).
4. heldout: path="auto" against every path through the API on 48 shapes none of the tuned table's points
   hold (N, H, density, block and scattered masks, all nine dtype pairs, both mask devices), in loop time
   and in busy-GPU device time: auto's ratio to the best path at each point.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
from pathlib import Path

import torch

import mmmerge_triton as mm
from mmmerge_triton.tools import timing
from mmmerge_triton.tools.bench import environment
from mmmerge_triton.tools.cases import DTYPES, Case, make_inputs

DEV = torch.device("cuda", 0)


def host_us(fn, calls: int = 400, batch: int = 40) -> float:
    """Median host µs of fn over ``calls`` calls, the GPU kept busy so no call waits for a launch slot: the median
    of the medians of batches of ``batch`` calls, each batch timed by timing.host_time_us behind 20 ms of spin
    (which a batch of calls up to 500 µs stays inside)."""
    return statistics.median(timing.host_time_us(fn, DEV, batch) for _ in range(calls // batch))


def medians(calls: dict, figures: dict, rounds: int) -> dict:
    """{call: {figure: median}}: each figure of each call taken in ``rounds`` interleaved rounds (timing.interleaved,
    as the benchmark times its paths and the copy)."""
    taken = timing.interleaved(calls, figures, rounds)
    return {name: {figure: statistics.median(v) for figure, v in per_call.items()} for name, per_call in taken.items()}


def loop_us(calls: dict, rounds: int = 5, seconds: float = 0.02) -> dict:
    """Wall µs per call back to back (timing.loop_time_us), median of ``rounds`` interleaved rounds."""
    loop = {"loop_us": lambda fn: timing.loop_time_us(fn, DEV, budget_s=seconds, min_calls=20)}
    return {name: f["loop_us"] for name, f in medians(calls, loop, rounds).items()}


def stages(n: int, on_device: bool) -> dict:
    """Host µs of a call, through public means only: the memo hit (a plain [N, H] dst; its entry made by the first
    explain()) against the same merge prepared on every call (into a padded copy of dst seen as [1, N, H], the mask
    as [1, N]: a call without a signature, checked and decided afresh, its launch unbound), the registered op (what a
    compiled graph or a tensor subclass runs: the dispatcher, then a memo hit), and the floors."""
    case = Case(n, 4096, 0.5, mask="gpu" if on_device else "cpu")
    dst, mask, src = make_inputs(case, DEV)
    decision = mm.explain(dst, src, mask)
    # The same merge into a padded copy seen as [1, N, H]: a strided 3-D dst has no [N, H] view, so no signature.
    dst3, mask2 = torch.nn.functional.pad(dst, (0, 8))[:, :dst.shape[1]][None], mask[None]
    if mm.explain(dst3, src, mask2).kind != decision.kind:  # like for like
        raise RuntimeError(f"the [1, N, H] call runs another kind than {decision.kind}")
    out = {"decision": decision.reason, "kind": decision.kind}
    out["api merge_multimodal_embeddings (memo hit)"] = host_us(lambda: mm.merge_multimodal_embeddings(dst, src, mask))
    out["api masked_row_scatter_ (memo hit)"] = host_us(lambda: mm.masked_row_scatter_(dst, mask, src))
    out["prepared every call (a strided dst [1, N, H]: no signature)"] = host_us(
        lambda: mm.merge_multimodal_embeddings(dst3, src, mask2))
    op = torch.ops.mmmerge_triton.masked_row_scatter_
    out["registered op (torch.ops.mmmerge_triton.masked_row_scatter_)"] = host_us(
        lambda: op(dst, mask, src, False, "auto", False))
    if not on_device:
        out["floor: mask.numpy()"] = host_us(lambda: mask.numpy())
    cpu_mask = mask.cpu()
    out["index_put, CPU mask (vLLM)"] = host_us(lambda: dst.index_put_((cpu_mask,), src))
    small = torch.zeros(16, device=DEV)
    out["floor: tiny torch op"] = host_us(lambda: small.add_(1))
    return out


def loop_table() -> list[dict]:
    rows = []
    small = torch.zeros(16, device=DEV)
    for n, h in [(512, 4096), (2048, 4096), (4096, 3584), (8192, 3584), (16384, 4096)]:
        dst, mask, src = make_inputs(Case(n, h, 0.5), DEV)
        gmask = mask.to(DEV)
        calls = {"ours, CPU mask": lambda: mm.merge_multimodal_embeddings(dst, src, mask),
                 "ours, GPU mask": lambda: mm.merge_multimodal_embeddings(dst, src, gmask),
                 "index_put, CPU mask": lambda: dst.index_put_((mask,), src),
                 "tiny torch op": lambda: small.add_(1)}
        times = loop_us(calls)
        rows.append({"n": n, "hidden": h, "loop_us": times,
                     "cpu_mask_vs_index_put": times["ours, CPU mask"] / times["index_put, CPU mask"],
                     "gpu_mask_vs_index_put": times["ours, GPU mask"] / times["index_put, CPU mask"]})
        print(f"loop N={n} H={h}: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()), flush=True)
    return rows


def idle_table() -> list[dict]:
    rows = []
    for n, h, d in [(16384, 4096, 0.5), (65536, 5120, 0.8), (131072, 4096, 0.8)]:
        dst, mask, src = make_inputs(Case(n, h, d), DEV)
        gmask = mask.to(DEV)
        floor_dst = torch.empty_like(src)
        row = {"n": n, "hidden": h, "density": d, "moved_mb": Case(n, h, d).moved_bytes / 1e6}
        calls = {"copy": lambda: floor_dst.copy_(src),
                 "ours, CPU mask": lambda: mm.merge_multimodal_embeddings(dst, src, mask),
                 "ours, GPU mask": lambda: mm.merge_multimodal_embeddings(dst, src, gmask),
                 "index_put, CPU mask": lambda: dst.index_put_((mask,), src)}
        # The copy goes through the same rounds, clock and L2 flush as the calls divided by it.
        row |= medians(calls, {"idle_us": lambda fn: timing.idle_time_us(fn, DEV, reps=5),
                               "busy_us": lambda fn: timing.device_time_us(fn, DEV, reps=5)}, rounds=5)
        for name in ("ours, CPU mask", "ours, GPU mask", "index_put, CPU mask"):
            row[name]["idle_vs_copy"] = row[name]["idle_us"] / row["copy"]["busy_us"]
            row[name]["busy_vs_copy"] = row[name]["busy_us"] / row["copy"]["busy_us"]
        rows.append(row)
        print(f"idle N={n} H={h}: " + ", ".join(f"{k} {v['idle_us']:.1f}/{v['busy_us']:.1f}" for k, v in row.items()
                                                if isinstance(v, dict)), flush=True)
        del dst, mask, src, gmask, floor_dst
        torch.cuda.empty_cache()
    return rows


def heldout_cases(count: int = 48) -> list[Case]:
    """``count`` shapes drawn (seeded) from a grid the tuned table never measured, every value of each axis
    used at least once."""
    axes = dict(n=(700, 2500, 9000, 20000, 70000), hidden=(1152, 2048, 3584, 5120), density=(0.05, 0.3, 0.7),
                pattern=("blocks", "scattered"), pair=list(itertools.product(DTYPES, DTYPES)), mask=("cpu", "gpu"))
    everything = list(itertools.product(*axes.values()))
    random.Random(0).shuffle(everything)
    return [Case(n, h, d, p, s, t, m) for n, h, d, p, (s, t), m in everything[:count]]


def heldout() -> dict:
    # Imported here, not at the top: bench/compare_host_path.py runs the loop and idle parts on an earlier
    # package put first on the path, which may predate mmmerge_triton.tools.analysis.
    from mmmerge_triton.tools.analysis import auto_against_others
    points = []
    for case in heldout_cases():
        dst, mask, src = make_inputs(case, DEV)
        calls = {p: (lambda p=p: mm.masked_row_scatter_(dst, mask, src, path=p)) for p in ("auto",) + mm.PATHS}
        figures = medians(calls, {"loop_us": lambda fn: timing.loop_time_us(fn, DEV, budget_s=0.01, min_calls=20),
                                  "device_us": lambda fn: timing.device_time_us(fn, DEV, reps=5)}, rounds=3)
        loops, device = ({p: f[key] for p, f in figures.items()} for key in ("loop_us", "device_us"))
        chosen = mm.explain(dst, src, mask).path
        points.append({"case": case.as_dict(), "auto_path": chosen, "loop_us": loops, "device_us": device})
        print(f"heldout {case.label()}: auto={chosen} loop x{auto_against_others(loops, chosen)[1]:.2f} "
              f"device x{auto_against_others(device, chosen)[1]:.2f}", flush=True)
        del dst, mask, src
        torch.cuda.empty_cache()

    return summarize(points)


def summarize(points: list[dict]) -> dict:
    """auto against the best of the other paths at each point (``*_ratio``, analysis.auto_against_others: the
    metric of mmmerge-tune --evaluate; below 1 where auto is faster), and the host's noise: auto against the
    very same call made by the chosen path's name (``same_call_*``)."""
    from mmmerge_triton.tools.analysis import auto_against_others, ratio_summary  # see heldout()
    for p in points:
        for key in ("loop", "device"):
            times = p[f"{key}_us"]
            p[f"{key}_ratio"] = auto_against_others(times, p["auto_path"])[1]
            p[f"same_call_{key}"] = times["auto"] / times[p["auto_path"]]

    def summary(key):
        return ratio_summary([p[key] for p in points])

    return {"points": points, "loop": summary("loop_ratio"), "device": summary("device_ratio"),
            "same_call_loop": summary("same_call_loop"), "same_call_device": summary("same_call_device")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("mmmerge-results"))
    parser.add_argument("--parts", default="stages,loop,idle,heldout")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment(DEV)}
    path = args.out / f"host_path_{torch.cuda.get_device_name(DEV).replace(' ', '_')}.json"
    for part in args.parts.split(","):
        if part == "stages":
            result["stages"] = {f"N={n} {'gpu' if d else 'cpu'} mask": stages(n, d)
                                for n in (512, 4096, 65536) for d in (False, True)}
            for name, st in result["stages"].items():
                print(name + ": " + ", ".join(f"{k} {v:.1f}" for k, v in st.items() if k not in ("decision", "kind")),
                      flush=True)
        elif part == "loop":
            result["loop"] = loop_table()
        elif part == "idle":
            result["idle"] = idle_table()
        elif part == "heldout":
            result["heldout"] = heldout()
            print("heldout loop:", result["heldout"]["loop"], "device:", result["heldout"]["device"], flush=True)
        path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
