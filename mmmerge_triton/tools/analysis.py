"""What the figures of a run say, each a ratio within that run: a figure of one path, the spread of its rounds, the
points below a copy of the same bytes, the targets, and auto against the other paths at held-out points.
report.py prints them; bench.py, heldout.py, plots.py and the bench scripts read them."""
from __future__ import annotations

import statistics

MB = 1e6
BIG_BYTES = 64 * MB  # the device-time targets apply to cases that move at least this much
SMALL_BYTES = 8 * MB  # the host-overhead target applies to cases that move at most this much


def is_cpu_run(env: dict | None) -> bool:
    """Whether a file's figures are CPU wall times. Files from before ``device_type`` was recorded name a CPU
    device ``cpu_<processor>`` (bench.device_name)."""
    env = env or {}
    if "device_type" in env:
        return env["device_type"] != "cuda"
    return str(env.get("device", "")).startswith("cpu")


def figure_of(record: dict, path: str, key: str):
    """A figure of one path in one record, or None where the run did not measure it."""
    return (record["results"].get(path) or {}).get(key)


def ratio_of(a, b):
    """a / b, or None where either is missing (or b is zero)."""
    return None if a is None or b is None or b == 0 else a / b


def spread(figures: dict | None, key: str = "device_us") -> float | None:
    """(max - min) / median of a figure's rounds (timing.measure), or None for a file without rounds."""
    rounds = (figures or {}).get(f"{key}_rounds") or []
    return (max(rounds) - min(rounds)) / statistics.median(rounds) if len(rounds) > 1 and min(rounds) > 0 else None


BELOW_COPY = 0.98
"""A merge moves the bytes a copy of them moves: a path's device time below this fraction of the copy's says
the copy (or the path) was timed in an unusual moment, not that the path beats a copy. Such points are flagged."""


def below_copy(record: dict, paths: list[str] | None = None) -> list[tuple[str, float]]:
    """(path, device time / the copy's) for each path of ``paths`` (default: all) below BELOW_COPY x the copy."""
    copy = figure_of(record, "copy", "device_us")
    names = [p for p in (paths or record["results"]) if p != "copy"]
    return [(name, ratio) for name in names
            if (ratio := ratio_of(figure_of(record, name, "device_us"), copy)) is not None and ratio < BELOW_COPY]


def check_targets(records: list[dict], path: str = "triton") -> dict:
    """The targets, each a ratio within this run: at cases moving >= 64 MB, device time <= 1.05x the copy,
    >= 3x faster than index_put and >= 8x than masked_scatter; at cases moving <= 8 MB, loop time no more
    than index_put's (per mask device); peak extra memory <= 8*N bytes + 1 MiB everywhere. A check skips the
    cases where a figure it needs was not measured (null)."""
    big = [r for r in records if r["moved_bytes"] >= BIG_BYTES]
    small = [r for r in records if r["moved_bytes"] <= SMALL_BYTES]

    def of(r, a, b, key="device_us"):
        return ratio_of(figure_of(r, a, key), figure_of(r, b, key))

    def peak_over(r):
        peak = figure_of(r, path, "peak_extra_bytes")
        return None if peak is None else peak - (8 * r["case"]["n"] + 2**20)

    checks = {
        "copy_ratio": (big, lambda r: of(r, path, "copy"), lambda v: v <= 1.05, "max"),
        "x_index_put": (big, lambda r: of(r, "index_put", path), lambda v: v >= 3, "min"),
        "x_masked_scatter": (big, lambda r: of(r, "masked_scatter", path), lambda v: v >= 8, "min"),
        "loop_vs_index_put": (small, lambda r: of(r, path, "index_put", "loop_us"), lambda v: v <= 1.0, "max"),
        "peak_bytes_over_limit": (records, peak_over, lambda v: v <= 0, "max"),
    }
    summary = {"lines": [], "checks": {}}
    for name, (subset, value, ok, worst) in checks.items():
        values = [(v, r["label"]) for r in subset if (v := value(r)) is not None]
        if not values:
            continue
        failed = [(v, label) for v, label in values if not ok(v)]
        worst_value, worst_label = (max if worst == "max" else min)(values)
        summary["checks"][name] = {"cases": len(values), "failed": len(failed), "worst": worst_value,
                                   "worst_case": worst_label, "failures": failed}
        summary["lines"].append(f"{name}: {len(values) - len(failed)}/{len(values)} pass; worst {worst_value:.3f} "
                                f"at {worst_label}")
    return summary


def serving_slice(records: list[dict]) -> list[dict]:
    """The serving slice: half the rows multimodal in image blocks, bf16, a CPU mask (what vLLM passes)."""
    return [r for r in records if (r["case"]["density"], r["case"]["pattern"], r["case"]["src"], r["case"]["dst"],
                                   r["case"]["mask"]) == (0.5, "blocks", "bf16", "bf16", "cpu")]


def auto_against_others(times: dict, auto_path: str) -> tuple[str, float]:
    """At one held-out point, from each path's time (``auto`` and every path by name): the best path other than
    auto, and auto's time over it (below 1 where auto is faster). Neither auto nor the path it chose, called by
    name (the very same call), is a rival: counting them, the ratio could never exceed 1 and would measure the
    host's noise, not the choice. mmmerge-tune --evaluate, bench/host_path.py and this report all use it."""
    best = min((p for p in times if p not in ("auto", auto_path)), key=times.get)
    return best, times["auto"] / times[best]


def ratio_summary(ratios: list[float]) -> dict:
    """Of auto's ratios over held-out points: the share within 5% (<= 1.05), the worst (largest), the median."""
    return {"within_5pct": sum(r <= 1.05 for r in ratios) / len(ratios), "worst": max(ratios),
            "median": statistics.median(ratios)}
