"""The tools' plots (matplotlib, the 'bench' extra): a benchmark run, a suite, a held-out evaluation."""
from __future__ import annotations

import math
from pathlib import Path

from .analysis import figure_of, is_cpu_run, ratio_of, serving_slice
from .report import run_title, suite_title

def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None where matplotlib (the "bench" extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


_CPU_NOTICE = "\nCPU wall time: a smoke test of the tooling, not a speed claim"


def _save(plt, fig, out: Path, suptitle: str, cpu: bool = False, rect=None) -> bool:
    """Title the figure (with the CPU notice for a CPU run), lay it out inside ``rect``, write ``out``, close."""
    fig.suptitle(suptitle + (_CPU_NOTICE if cpu else ""))
    fig.tight_layout(rect=rect)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _nan(value) -> float:
    return math.nan if value is None else value  # matplotlib leaves a gap at a figure the run did not measure


def _auto_ran(records: list[dict]) -> str:
    """A CPU run records which path auto ran at each case (explain()): where one path ran throughout, say so."""
    ran = {r.get("auto_path") for r in records}
    return f": auto ran {ran.pop()}" if len(ran) == 1 and None not in ran else ""


def plot(records: list[dict], env: dict, out: Path) -> bool:
    """Time against N per path, and our speedup, at the serving slice (50% blocks, bf16, CPU mask).
    Returns False when matplotlib is missing or the run has no serving-slice case."""
    plt = _pyplot()
    serving = serving_slice(records)
    if plt is None or not serving:
        return False
    cpu = is_cpu_run(env)
    ours = "triton" if any("triton" in r["results"] for r in records) else "auto"
    hiddens = sorted({r["case"]["hidden"] for r in serving})
    shown_h = 4096 if 4096 in hiddens else hiddens[-1]
    if cpu:
        panels = (("device_us", "wall time of one call (median, CPU)"),
                  ("loop_us", "wall time per call, back to back (CPU)"))
        basis = "wall time"
    else:
        panels = (("device_us", "device time of one call (GPU, L2 flushed)"),
                  ("loop_us", "loop time per call, back to back (host + GPU)"))
        basis = "device time"
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.6))
    rows = sorted((r for r in serving if r["case"]["hidden"] == shown_h), key=lambda r: r["case"]["n"])
    names = list(dict.fromkeys(name for r in rows for name in r["results"]))
    for ax, (key, title) in zip(axes[:2], panels):
        for name in names:
            ax.plot([r["case"]["n"] for r in rows], [_nan(figure_of(r, name, key)) for r in rows], marker="o",
                    label=name + (" (floor)" if name == "copy" else ""), linestyle="--" if name == "copy" else "-")
        ax.set(xscale="log", yscale="log", xlabel="N (rows)", ylabel="µs per call", title=f"{title}, H={shown_h}")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=9, loc="upper left", title="path")
    speed = axes[2]
    for h in hiddens:
        rows_h = sorted((r for r in serving if r["case"]["hidden"] == h), key=lambda r: r["case"]["n"])
        n = [r["case"]["n"] for r in rows_h]
        line = speed.plot(n, [_nan(ratio_of(figure_of(r, "index_put", "device_us"), figure_of(r, ours, "device_us")))
                              for r in rows_h], marker="o", label=f"H={h}")
        speed.plot(n, [_nan(ratio_of(figure_of(r, "masked_scatter", "device_us"), figure_of(r, ours, "device_us")))
                       for r in rows_h], marker="x", linestyle=":", color=line[0].get_color())
    speed.axhline(1.0, color="black", linewidth=1, linestyle="--")
    # Colour says H, the line style says the baseline: two short legends instead of one entry per pair.
    handles = [plt.Line2D([], [], color="gray", marker="o", label=f"over index_put ({ours} x faster)"),
               plt.Line2D([], [], color="gray", marker="x", linestyle=":", label="over masked_scatter"),
               plt.Line2D([], [], color="black", linestyle="--", label="1x: as fast")]
    first = speed.legend(fontsize=8, loc="upper left", title="hidden size", ncol=2)
    speed.add_artist(first)
    speed.legend(handles=handles, fontsize=8, loc="lower right")
    speed.set(xscale="log", yscale="log", xlabel="N (rows)", ylabel=f"speedup (x, {basis})",
              title=f"speedup of {ours} ({basis})" + _auto_ran(records))
    shown = [y for line in speed.get_lines() for y in line.get_ydata() if y > 0 and math.isfinite(y)]
    speed.set_ylim(min(shown, default=1) / 1.6, max(shown, default=1) * 1.6)  # the 1x line inside, not on an edge
    speed.grid(True, which="major", alpha=0.3)
    return _save(plt, fig, out, run_title(env) + " — 50% of rows multimodal in image blocks, bf16, CPU mask", cpu)


def plot_suite(run: dict, out: Path) -> bool:
    """A suite's variants side by side per record: one-call time and loop time, horizontal bars."""
    plt = _pyplot()
    records = run["records"]
    if plt is None or not records:
        return False
    cpu = is_cpu_run(run.get("environment"))
    variants = list(dict.fromkeys(v for r in records for v in r["results"]))
    panels = (("device_us", "wall time of one call (median, CPU)" if cpu else "device time (GPU, L2 flushed)"),
              ("loop_us", "wall time per call, back to back" + (" (CPU)" if cpu else " (host + GPU)")))
    height = 0.8 / len(variants)
    fig, axes = plt.subplots(1, 2, figsize=(16, 2 + 0.45 * len(records) * len(variants) ** 0.5), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        values = [[figure_of(r, v, key) for r in records] for v in variants]
        for i, v in enumerate(variants):
            ax.barh([j + i * height for j in range(len(records))], [_nan(x) for x in values[i]], height=height,
                    label=v)
        shown = [x for row in values for x in row if x]
        # Log scale (figures span 10-1000x): bars start well left of the smallest, so each has a visible length.
        ax.set(xscale="log", xlabel="µs per call (log scale)", title=title)
        if shown:
            ax.set_xlim(min(shown) / 3, max(shown) * 1.5)
        ax.grid(True, axis="x", which="major", alpha=0.3)
    axes[0].set_yticks([j + 0.4 - height / 2 for j in range(len(records))])
    axes[0].set_yticklabels([suite_title(r) for r in records], fontsize=8)
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(variants)), fontsize=9, title="variant")
    legend_rows = -(-len(variants) // 4)
    return _save(plt, fig, out, f"{run_title(run.get('environment'))} — suite {run.get('suite', '?')}", cpu,
                 rect=(0, (0.25 + 0.25 * legend_rows) / fig.get_figheight(), 1, 1))


def plot_regret(run: dict, out: Path) -> bool:
    """The held-out ratios against N, per mask device, with the 1x and 1.05x lines."""
    plt = _pyplot()
    points = run["points"]
    if plt is None or not points:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    panels = (("ratio", "auto / the best other path, loop time through the API"),
              ("oracle_ratio", "auto's choice / the best path or configuration (oracle), loop time"))
    for ax, (key, title) in zip(axes, panels):
        for mask in sorted({p["case"].get("mask") for p in points}, key=str):
            chosen = [p for p in points if p["case"].get("mask") == mask]
            ax.scatter([p["case"]["n"] for p in chosen], [_nan(p.get(key)) for p in chosen], label=f"{mask} mask",
                       alpha=0.7)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="1x: as fast")
        ax.axhline(1.05, color="gray", linewidth=1, linestyle=":", label="1.05x")
        ax.set(xscale="log", xlabel="N (rows)", ylabel="ratio (x, lower is better)", title=title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(plt, fig, out, f"{run_title(run.get('environment'))} — held-out check of path='auto'")
