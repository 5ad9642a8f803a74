"""The untuned rule (kernel_config.default_config: what path="auto" runs on a GPU without a tuned table), on the
CPU: the decision a CUDA merge gets with the table hidden, and the rule's two-launch tile against the H100 data
in bench/results/h100 (the tuned table's sweep, and the held-out runs of mmmerge-tune --evaluate)."""
import json
import statistics
from pathlib import Path

import pytest
import torch

from mmmerge_triton import dispatch
from mmmerge_triton.kernel_config import KernelConfig, default_config, default_of_kind
from mmmerge_triton.tools.tune import config_name

RESULTS = Path(__file__).parents[1] / "bench/results/h100"
SHIPPED = Path(dispatch.__file__).parent / "configs/NVIDIA_H100_80GB_HBM3.json"
WITHIN = 1.10  # issue 23 item 5: the untuned rule within 10% of the best
DEVICE_BOUND_US = 100.0
"""Loop µs above which the sweeps' figures were device time: their calls' host cost was 40-60 µs (the tuned
table's smallest points, e.g. N=1024; host_path_*.json, "general path (the lean call off)": 56-94 µs). Below
it every tile measures alike and the fastest one is the host's noise."""


class CudaDestination:
    """What dispatch's table decision reads of a destination, as a CUDA tensor would answer, on a machine
    without one."""

    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, hidden: int, dtype: torch.dtype):
        self.shape, self.dtype = (1, hidden), dtype


@pytest.fixture
def h100(monkeypatch):
    """The process believes it runs on the H100 (the shipped table's device); caches cleared around."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def table_decision(hidden: int, n: int, m: int, on_device: bool, dst=torch.bfloat16, src=torch.bfloat16):
    """dispatch's decision for a CUDA merge of M rows of H into N at a CPU or device mask (bucketed, as choose())."""
    return dispatch._table_decision(CudaDestination(hidden, dst), on_device, src, dispatch.bucket(n),
                                    dispatch.bucket(m))


@pytest.mark.parametrize("hidden, n, m, on_device, dst, src", [
    (1152, 70000, 49000, True, torch.bfloat16, torch.bfloat16),
    (2048, 9000, 2700, False, torch.bfloat16, torch.float32),
    (1536, 131072, 65536, False, torch.float32, torch.float32),
    (5120, 2500, 125, True, torch.float16, torch.float32),
    (64, 131072, 65536, True, torch.bfloat16, torch.bfloat16),
])
def test_with_the_table_hidden_a_cuda_merge_takes_the_untuned_rule(h100, monkeypatch, tmp_path, hidden, n, m,
                                                                    on_device, dst, src):
    """What bench/untuned.py switches: the shipped table decides, an empty MMMERGE_CONFIG_DIR (and the caches
    cleared) hands the decision to the untuned rule (after one warning), and restoring the folder brings the
    table back."""
    assert "tuned table" in table_decision(hidden, n, m, on_device, dst, src).reason
    monkeypatch.setenv("MMMERGE_CONFIG_DIR", str(tmp_path))
    dispatch.clear_cache()
    with pytest.warns(UserWarning, match="no tuned table"):
        untuned = table_decision(hidden, n, m, on_device, dst, src)
    rule = default_config(hidden, dispatch.bucket(m), dispatch.bucket(n), on_device)
    assert (untuned.path, untuned.config) == ("triton", rule) and "tuned table" not in untuned.reason
    monkeypatch.delenv("MMMERGE_CONFIG_DIR")
    dispatch.clear_cache()
    assert "tuned table" in table_decision(hidden, n, m, on_device, dst, src).reason


def tiles(times: dict) -> dict:
    """The two-launch tiles of the rule's family (8 warps, 1 stage): what default_config chooses among; warps
    and stages are the tuner's refinements."""
    return {name: t for name, t in times.items() if name.endswith("_w8_s1")}


def test_the_two_launch_tile_is_within_10pct_of_the_best_where_the_table_was_device_bound():
    """Every entry of the shipped H100 table where the untuned rule takes the two-launch kernel and the tiles
    took over DEVICE_BOUND_US: the rule's tile within WITHIN of the best. (One row per program ran 1.11-1.79x
    the best at M = 58982-117965 rows of 1024 or 2048: e.g. a CPU mask, fp32->bf16, N=131072, H=1024: r1 443.6
    µs, r16 247.5 µs.)"""
    checked = 0
    for entry in json.loads(SHIPPED.read_text())["entries"]:
        key, measured = entry["key"], tiles(entry["triton_configs"])
        n, m = dispatch.bucket(key["n"]), dispatch.bucket(key["rows"])  # an entry key's "rows" is M
        rule = default_config(key["hidden"], m, n, key["mask"] == "gpu")
        if rule.fused or min(measured.values()) < DEVICE_BOUND_US:
            continue
        checked += 1
        best = min(measured, key=measured.get)
        assert measured[config_name(rule)] <= WITHIN * measured[best], (key, config_name(rule), best)
    assert checked >= 40


def test_the_two_launch_tile_is_within_10pct_of_the_best_on_the_held_out_runs():
    """The four held-out runs of mmmerge-tune --evaluate (regret_*.json: H of 1536-7168, none in the table),
    each tile's median over the runs: where the rule takes the two-launch kernel and the device dominates,
    its tile within WITHIN of the best. (One row per program of 1536 ran 1.43x the best: a CPU mask, bf16,
    N=100000.)"""
    runs = [json.loads(path.read_text())["points"] for path in
            [RESULTS / "regret_NVIDIA_H100_80GB_HBM3.json", *sorted((RESULTS / "regret_history").glob("*.json"))]]
    assert len(runs) == 4
    checked = 0
    for points in zip(*runs):
        case = points[0]["case"]
        assert all(p["case"] == case for p in points)
        screened = [tiles(p.get("screened_loop_us") or p["direct_loop_us"]) for p in points]
        in_all = set.intersection(*(set(s) for s in screened))  # a run also screened its table's picks
        measured = {name: statistics.median(s[name] for s in screened) for name in in_all}
        n, m = case["n"], round(case["n"] * case["density"])
        rule = default_config(case["hidden"], dispatch.bucket(m), dispatch.bucket(n), case["mask"] == "gpu")
        if rule.fused or min(measured.values()) < DEVICE_BOUND_US:
            continue
        checked += 1
        best = min(measured, key=measured.get)
        assert measured[config_name(rule)] <= WITHIN * measured[best], (case, config_name(rule), best)
    assert checked >= 30


@pytest.mark.parametrize("hidden", [1, 33, 64, 1152, 3071, 3072, 4096, 5120, 12288])
@pytest.mark.parametrize("m", [0, 1, 4095, 4096, 100000])
@pytest.mark.parametrize("on_device", [False, True])
def test_the_untuned_rule_gives_a_valid_configuration(hidden, m, on_device):
    """Any H and M, empty included: rows per program a power of two, one column step as wide as H up to 4096."""
    for n in (max(m, 1), 4 * max(m, 1) + 20000):
        config = default_config(hidden, dispatch.bucket(m), dispatch.bucket(n), on_device)
        assert isinstance(config, KernelConfig)
        assert config.rows >= 1 and config.rows & (config.rows - 1) == 0
        assert config.block_h == min(1 << (hidden - 1).bit_length(), 4096)


DEVICE_SLACK_US = 3.0
"""Device µs by which the untuned rule's kind for a device mask may trail the other kind's where that is more than
10%: at the sweep's smallest merges (under 20 µs of GPU time) the one-launch kind trailed by up to 2.5 µs, and
saved its caller 3-36 µs of loop time below 16384 rows (one launch fewer; the sweep's loop_us, 0.43-0.96x the
two-launch default's)."""


def test_the_rules_kind_for_a_device_mask_is_within_10pct_of_the_other_wherever_the_sweep_measured_both():
    """The one-launch or the two-launch default, as the untuned rule picks for a device mask (FUSED_BELOW,
    FUSED_REACH, FUSED_SHORT_ROW), against the other kind's default in every device-mask entry of the shipped
    table's sweep (device µs, GPU kept busy, the slower of image blocks and scattered rows: tune.DEVICE_LAYOUTS):
    never more than 10% slower, or DEVICE_SLACK_US. (Keeping the one-launch kind to 1.5 x 16384 rows where under a
    quarter of the rows were placeholders ran it 1.16-1.74x the two-launch one at N = 16384, H = 4096 and 8192,
    10% of the rows.)"""
    checked = 0
    for entry in json.loads(SHIPPED.read_text())["entries"]:
        key = entry["key"]
        if key["mask"] != "gpu":
            continue
        times = entry["device_us"]
        rule = default_config(key["hidden"], key["rows"], key["n"], True)
        other = default_of_kind(key["hidden"], not rule.fused, key["rows"])
        ours, theirs = times[config_name(rule)], times[config_name(other)]
        checked += 1
        assert ours <= max(WITHIN * theirs, theirs + DEVICE_SLACK_US), (key, config_name(rule), ours, theirs)
    assert checked == 96


def test_the_held_out_point_the_two_launch_form_lost_takes_one_launch():
    """N = 20000, H = 2048, 30% of the rows on a device mask: the untuned rule's two-launch form ran 1.19x the
    table's one-launch choice in device time (bench/results/h100/2026-12-06-s3/untuned.log); past the short-row
    reach, and for long rows however few the placeholders, the two-launch form stays."""
    assert default_config(2048, 6000, 20000, True).fused
    assert not default_config(5120, 1000, 20000, True).fused  # few placeholders, long rows: device time
    assert not default_config(3584, 6000, 20000, True).fused  # the table's two-launch choice there
    assert not default_config(2048, 3500, 70000, True).fused  # past the reach: a held-out point it ran 2.0x at
    assert not default_config(2048, 6000, 20000, False).fused  # a CPU mask has no one-launch kernel
