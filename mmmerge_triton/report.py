"""Reading benchmark records: the per-case table, the issue's targets checked within one run, the plot."""
from __future__ import annotations

from pathlib import Path

MB = 1e6
BIG_BYTES = 64 * MB  # the device-time targets apply to cases that move at least this much
SMALL_BYTES = 8 * MB  # the host-overhead target applies to cases that move at most this much


def _fmt(value, width: int) -> str:
    return ("-" if value is None else f"{value:.1f}").rjust(width)


def print_case(record: dict) -> None:
    res = record["results"]
    floor = res["copy"]["device_us"]
    print(f"\n{record['label']}  (moves {record['moved_bytes'] / MB:.1f} MB)")
    print(f"  {'path':15s}{'device µs':>11s}{'loop µs':>10s}{'host µs':>10s}{'peak MB':>10s}{'copy BW':>9s}"
          f"{'x index_put':>13s}{'x masked_sc':>13s}")
    for name, r in res.items():
        peak = None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / MB
        print(f"  {name:15s}{r['device_us']:11.1f}{r['loop_us']:10.1f}{r['host_us']:10.1f}{_fmt(peak, 10)}"
              f"{100 * floor / r['device_us']:8.0f}%"
              f"{res['index_put']['device_us'] / r['device_us']:12.2f}x"
              f"{res['masked_scatter']['device_us'] / r['device_us']:12.2f}x")


def check_targets(records: list[dict], path: str = "triton") -> dict:
    """The targets, each a ratio within this run: at cases moving >= 64 MB, device time <= 1.05x the copy,
    >= 3x faster than index_put and >= 8x than masked_scatter; at cases moving <= 8 MB, loop time no more
    than index_put's (per mask device); peak extra memory <= 8*N bytes + 1 MiB everywhere."""
    big = [r for r in records if r["moved_bytes"] >= BIG_BYTES]
    small = [r for r in records if r["moved_bytes"] <= SMALL_BYTES]

    def ratio(r, a, b, key="device_us"):
        return r["results"][a][key] / r["results"][b][key]

    checks = {
        "copy_ratio": (big, lambda r: ratio(r, path, "copy"), lambda v: v <= 1.05, "max"),
        "x_index_put": (big, lambda r: ratio(r, "index_put", path), lambda v: v >= 3, "min"),
        "x_masked_scatter": (big, lambda r: ratio(r, "masked_scatter", path), lambda v: v >= 8, "min"),
        "loop_vs_index_put": (small, lambda r: ratio(r, path, "index_put", "loop_us"), lambda v: v <= 1.0, "max"),
        "peak_bytes_over_limit": (records, lambda r: r["results"][path]["peak_extra_bytes"] - (8 * r["case"]["n"] + 2**20),
                                  lambda v: v <= 0, "max"),
    }
    summary = {"lines": [], "checks": {}}
    for name, (subset, value, ok, worst) in checks.items():
        values = [(value(r), r["label"]) for r in subset]
        if not values:
            continue
        failed = [(v, label) for v, label in values if not ok(v)]
        worst_value, worst_label = (max if worst == "max" else min)(values)
        summary["checks"][name] = {"cases": len(values), "failed": len(failed), "worst": worst_value,
                                   "worst_case": worst_label, "failures": failed}
        summary["lines"].append(f"{name}: {len(values) - len(failed)}/{len(values)} pass; worst {worst_value:.3f} "
                                f"at {worst_label}")
    return summary


def _serving(records: list[dict]) -> list[dict]:
    """The serving slice: half the rows multimodal in image blocks, bf16, a CPU mask (what vLLM passes)."""
    return [r for r in records if (r["case"]["density"], r["case"]["pattern"], r["case"]["src"], r["case"]["dst"],
                                   r["case"]["mask"]) == (0.5, "blocks", "bf16", "bf16", "cpu")]


def plot(records: list[dict], env: dict, out: Path) -> bool:
    """Time against N per path, and our speedup, at the serving slice (50% blocks, bf16, CPU mask).
    Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ours = "triton" if any("triton" in r["results"] for r in records) else "auto"
    serving = _serving(records)
    hiddens = sorted({r["case"]["hidden"] for r in serving})
    if not serving:
        return False
    shown_h = 4096 if 4096 in hiddens else hiddens[-1]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, key, title in ((axes[0], "device_us", "device time"), (axes[1], "loop_us", "loop time (per call)")):
        rows = sorted((r for r in serving if r["case"]["hidden"] == shown_h), key=lambda r: r["case"]["n"])
        for name in rows[0]["results"]:
            ax.plot([r["case"]["n"] for r in rows], [r["results"][name][key] for r in rows], marker="o",
                    label=name, linestyle="--" if name == "copy" else "-")
        ax.set(xscale="log", yscale="log", xlabel="N (rows)", ylabel="µs", title=f"{title}, H={shown_h}")
        ax.legend()
    for h in hiddens:
        rows = sorted((r for r in serving if r["case"]["hidden"] == h), key=lambda r: r["case"]["n"])
        n = [r["case"]["n"] for r in rows]
        line = axes[2].plot(n, [r["results"]["index_put"]["device_us"] / r["results"][ours]["device_us"] for r in rows],
                            marker="o", label=f"H={h} vs index_put")
        axes[2].plot(n, [r["results"]["masked_scatter"]["device_us"] / r["results"][ours]["device_us"] for r in rows],
                     marker="x", linestyle=":", color=line[0].get_color(), label=f"H={h} vs masked_scatter")
    axes[2].set(xscale="log", yscale="log", xlabel="N (rows)", ylabel="speedup (device time)",
                title=f"{ours}: speedup")
    axes[2].legend(fontsize=7, ncol=2)
    fig.suptitle(f"mmmerge_triton, {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date'][:10]}"
                 " — 50% of rows multimodal in image blocks, bf16, CPU mask")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def markdown(records: list[dict], path: str = "auto") -> str:
    """README tables from a benchmark run: the serving slice (bf16, 50% of rows in image blocks, CPU mask) by
    N and H, as device µs of ``path`` with its ratio to the copy and its speedups; then the targets."""
    serving = _serving(records)
    lines = ["| N | H | MB moved | copy µs | ours µs (x copy) | index_put µs (ours x faster) | masked_scatter µs "
             "(ours x faster) | loop µs ours / index_put | peak MB ours / masked_scatter |", "|" + "---|" * 9]
    for r in sorted(serving, key=lambda r: (r["case"]["n"], r["case"]["hidden"])):
        res = r["results"]
        ours, copy, ip, ms = (res[p] for p in (path, "copy", "index_put", "masked_scatter"))
        lines.append(
            f"| {r['case']['n']} | {r['case']['hidden']} | {r['moved_bytes'] / MB:.0f} | {copy['device_us']:.1f} | "
            f"{ours['device_us']:.1f} ({ours['device_us'] / copy['device_us']:.2f}) | {ip['device_us']:.1f} "
            f"({ip['device_us'] / ours['device_us']:.1f}) | {ms['device_us']:.1f} ({ms['device_us'] / ours['device_us']:.1f}) | "
            f"{ours['loop_us']:.0f} / {ip['loop_us']:.0f} | {ours['peak_extra_bytes'] / MB:.1f} / "
            f"{ms['peak_extra_bytes'] / MB:.0f} |")
    lines += ["", f"Targets for path={path!r} over all {len(records)} cases of the run:", ""]
    lines += ["- " + line for line in check_targets(records, path)["lines"]]
    return "\n".join(lines)


def suite_markdown(records: list[dict]) -> str:
    """README table of a suite run (suites.py): a row per record, its shape fields, then per variant
    "device µs / loop µs / peak MB"."""
    fields = [k for k in records[0] if k not in ("results", "moved_bytes")]
    variants = list(records[0]["results"])
    lines = ["| " + " | ".join(fields + variants) + " |", "|" + "---|" * (len(fields) + len(variants))]
    for r in records:
        cells = [str(r[k]) for k in fields]
        for v in variants:
            res = r["results"][v]
            peak = "-" if res["peak_extra_bytes"] is None else f"{res['peak_extra_bytes'] / MB:.1f}"
            cells.append(f"{res['device_us']:.0f} / {res['loop_us']:.0f} / {peak}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    with open(sys.argv[1]) as f:
        run = json.load(f)
    if "suite" in run:  # python -m mmmerge_triton.report suite_<name>_<device>.json
        print(suite_markdown(run["records"]))
    else:  # python -m mmmerge_triton.report bench_<grid>_<device>.json [path ...]
        for name in sys.argv[2:] or ["auto"]:
            print(markdown(run["records"], name) + "\n")
