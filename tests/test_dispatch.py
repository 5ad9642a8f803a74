"""The dispatcher and its tuned tables (mmmerge_triton/dispatch.py, tools/tune.py), on the CPU: loading, the
nearest-key choice, the fallback on a missing, corrupt or foreign table, explain(), the selection rule, and
that every path a shipped table can choose gives the reference result."""
import json
import warnings

import pytest
import torch

import mmmerge_triton as mm
from mmmerge_triton import dispatch, executor
from mmmerge_triton.kernel_config import KernelConfig, default_config, default_of_kind
from mmmerge_triton.tools import tune

from .conftest import assert_merged, make_mask

SHIPPED = dispatch.table_dir() / "NVIDIA_H100_80GB_HBM3.json"  # the table the rule tests read
TABLES = sorted(dispatch.table_dir().glob("*.json"))  # every shipped table


def entry(mask="cpu", src="bf16", dst="bf16", n=2048, hidden=4096, rows=1024, path="triton", fused=False):
    config = KernelConfig(4, 512, 8, 1, fused)
    return {"key": {"mask": mask, "src": src, "dst": dst, "n": n, "hidden": hidden, "rows": rows},
            "best": {"path": path, "config": config._asdict() if path == "triton" else None,
                     "unfused_config": KernelConfig(16, 512)._asdict() if path == "triton" else None,
                     "fused_config": KernelConfig(8, 1024, 8, 1, True)._asdict() if path == "triton" else None},
            "loop_us": {path: 10.0, "index_put": 20.0}}


def table(*entries, device="Fake_GPU"):
    return {"version": dispatch.TABLE_VERSION, "device": device, "entries": list(entries)}


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    """An empty table folder in MMMERGE_CONFIG_DIR, caches cleared before and after."""
    monkeypatch.setenv("MMMERGE_CONFIG_DIR", str(tmp_path))
    dispatch.clear_cache()
    yield tmp_path
    dispatch.clear_cache()


def test_loads_a_table_named_after_the_device(table_dir):
    (table_dir / "Fake_GPU.json").write_text(json.dumps(table(entry())))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = dispatch.load_table("Fake_GPU")
    assert loaded["entries"][0]["key"]["n"] == 2048
    assert dispatch.table_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"


@pytest.mark.parametrize("content, why", [
    (None, "no tuned table"),
    ("{not json", "ignoring"),
    (json.dumps(table(entry(), device="Other_GPU")), "written for 'Other_GPU'"),
    (json.dumps({**table(entry()), "version": 99}), "table version 99"),
    (json.dumps(table()), "no entries"),
    (json.dumps(table(entry(path="warp_drive"))), "unknown path"),
    (json.dumps(table({**entry(), "key": {"n": 1}})), "bad key"),
])
def test_a_missing_corrupt_or_foreign_table_warns_once_and_falls_back(table_dir, content, why):
    if content is not None:
        (table_dir / "Fake_GPU.json").write_text(content)
    with pytest.warns(UserWarning, match=why):
        assert dispatch.load_table("Fake_GPU") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached: no second warning
        assert dispatch.load_table("Fake_GPU") is None


def test_nearest_key_prefers_mask_device_then_dtypes_then_log_distance():
    t = table(entry(n=2048, rows=1024), entry(n=65536, rows=32768), entry(mask="gpu", n=4096, rows=2048),
              entry(src="fp32", n=4096, rows=2048))
    pick = lambda **q: dispatch.nearest_entry(t, **{"mask": "cpu", "src": "bf16", "dst": "bf16", **q})["key"]  # noqa: E731
    assert pick(n=3000, hidden=4096, m=1500)["n"] == 2048
    assert pick(n=50000, hidden=4096, m=25000)["n"] == 65536
    assert pick(mask="gpu", n=65536, hidden=4096, m=32768)["mask"] == "gpu"
    assert pick(src="fp32", n=65536, hidden=4096, m=32768)["src"] == "fp32"
    assert pick(src="fp16", dst="fp16", n=2048, hidden=4096, m=1024)["src"] == "bf16"  # same element sizes


def test_a_fused_winner_is_not_carried_far_past_its_measured_n():
    t = table(entry(mask="gpu", n=16384, rows=8192, fused=True))
    near = dispatch.decide_from_table(t, "gpu", "bf16", "bf16", 16384, 4096, 8192)
    far = dispatch.decide_from_table(t, "gpu", "bf16", "bf16", 131072, 4096, 65536)
    assert near.config.fused and not far.config.fused
    assert "two-launch" in far.reason and "nearest key" in near.reason


def test_a_fused_winner_past_the_untuned_reach_gives_way_to_two_launches():
    """An entry's one-launch winner measured at N = 65536 serves neither N = 70000 nor 65536 itself: past
    FUSED_REACH x FUSED_BELOW a device mask takes the two-launch default, as the untuned rule does, not the
    entry's runner-up of that kind (16 rows per program over 512-wide steps here), whatever M."""
    t = table(entry(mask="gpu", n=65536, rows=6554, fused=True))
    reach = int(dispatch.FUSED_REACH * dispatch.FUSED_BELOW)
    for n, m in ((65536, 3500), (70000, 3500), (reach + 1, 3500), (70000, 5000)):
        far = dispatch.decide_from_table(t, "gpu", "bf16", "bf16", n, 2048, m)
        assert far.config == default_of_kind(2048, fused=False, m=m) and "two-launch default" in far.reason, n
    assert default_of_kind(2048, fused=False, m=5000).rows == 4  # kept, though M is under the entry's 6554
    assert dispatch.decide_from_table(t, "gpu", "bf16", "bf16", reach, 2048, 3500).config.fused


def test_a_one_launch_tile_serves_only_the_row_length_it_was_measured_at():
    """An entry's one-launch winner (32 rows per program at H = 1024 in the H100 table) is taken at its own H; at
    another H a device mask takes the one-launch default of that H (at H = 1152 the table's winners ran 1.2-1.6x
    the default's device time)."""
    t = table(entry(mask="gpu", n=4096, hidden=1024, rows=2048, fused=True))
    t["entries"][0]["best"]["fused_config"] = KernelConfig(32, 1024, 4, 1, True)._asdict()
    same = dispatch.decide_from_table(t, "gpu", "bf16", "bf16", 9000, 1024, 450)
    other = dispatch.decide_from_table(t, "gpu", "bf16", "bf16", 9000, 1152, 450)
    assert same.config == KernelConfig(32, 1024, 4, 1, True)
    assert other.config == default_of_kind(1152, fused=True) == KernelConfig(8, 2048, 8, 1, True)
    assert "one-launch default" in other.reason
    cpu = dispatch.decide_from_table(table(entry(n=4096, hidden=1024, rows=2048)), "cpu", "bf16", "bf16", 9000, 1152,
                                     2048)
    assert cpu.config == KernelConfig(4, 512, 8, 1, False)  # a two-launch tile is carried


def test_a_device_mask_under_fused_below_takes_the_entrys_one_launch_configuration():
    t = table(entry(mask="gpu", n=16384, rows=8192, fused=False))
    below = dispatch.decide_from_table(t, "gpu", "bf16", "bf16", 12000, 4096, 6000)
    at = dispatch.decide_from_table(t, "gpu", "bf16", "bf16", 16384, 4096, 8192)
    assert below.config == KernelConfig(8, 1024, 8, 1, True) and "one-launch" in below.reason
    assert at.config == KernelConfig(4, 512, 8, 1, False)
    cpu = dispatch.decide_from_table(table(entry(n=16384, rows=8192)), "cpu", "bf16", "bf16", 12000, 4096, 6000)
    assert not cpu.config.fused


@pytest.mark.parametrize("mask", ["cpu", "gpu"])
def test_a_pytorch_paths_win_is_carried_only_to_inputs_that_cast_as_its_entry_did(mask):
    """index_put measured without a cast (bf16 -> bf16) is not carried to an input with one (bf16 -> fp16), nor one
    measured with a cast (fp32 -> bf16) to an input without: there the Triton path's untuned configuration."""
    for key_src, key_dst, same, other in (("bf16", "bf16", ("fp16", "fp16"), ("bf16", "fp16")),
                                          ("fp32", "bf16", ("fp16", "fp32"), ("fp32", "fp32"))):
        t = table(entry(mask=mask, src=key_src, dst=key_dst, n=256, hidden=2048, rows=26, path="index_put"))
        kept = dispatch.decide_from_table(t, mask, *same, 700, 2048, 35)
        assert (kept.path, kept.config) == ("index_put", None)
        moved = dispatch.decide_from_table(t, mask, *other, 700, 2048, 35)
        assert moved.path == "triton" and moved.config == default_config(2048, 35, 700, mask == "gpu")
        assert f"index_put was measured {'with' if key_src != key_dst else 'without'} a cast" in moved.reason


def test_the_h200_tables_index_put_wins_are_not_carried_to_a_cast():
    """At the held-out points where the H200 table's index_put entries (N = 256, bf16 -> bf16) met a cast, auto
    ran 2.2-2.3x the Triton path's loop time (bench/results/h200/2026-12-06-s13/untuned_49c88af.log)."""
    h200 = json.loads((dispatch.table_dir() / "NVIDIA_H200.json").read_text())
    assert dispatch.decide_from_table(h200, "cpu", "bf16", "bf16", 256, 4096, 230).path == "index_put"
    for src, dst, hidden, m in (("bf16", "fp16", 3584, 210), ("fp16", "fp32", 2048, 35)):
        assert dispatch.decide_from_table(h200, "cpu", src, dst, 700, hidden, m).path == "triton"


def test_a_two_launch_configuration_carried_to_fewer_rows_keeps_its_number_of_programs():
    t = table(entry(n=4096, rows=3686))  # r4_b512: 922 programs at the entry
    assert dispatch.decide_from_table(t, "cpu", "bf16", "bf16", 4096, 4096, 3686).config.rows == 4
    fewer = dispatch.decide_from_table(t, "cpu", "bf16", "bf16", 3000, 4096, 1500)
    assert fewer.config == KernelConfig(1, 512, 8, 1, False) and "rows per program" in fewer.reason
    assert dispatch.decide_from_table(t, "cpu", "bf16", "bf16", 65536, 4096, 60000).config.rows == 4


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5, 17])
def test_every_shipped_entry_gives_a_valid_configuration_for_few_rows(rows):
    """Tiny M (one image token, or none) through the row scaling above: rows per program a power of two >= 1.
    (A shift by -1 here failed 12 GPU tests at N=1, M=1 before this test existed.)"""
    shipped = json.loads(SHIPPED.read_text())
    for e in shipped["entries"]:
        k = e["key"]
        for n in (max(rows, 1), 3000):
            config = dispatch.decide_from_table(shipped, k["mask"], k["src"], k["dst"], n, k["hidden"], rows).config
            assert config.rows >= 1 and config.rows & (config.rows - 1) == 0, (k, n, config)


def _measured(mask, n, **times):
    return {"key": entry(mask=mask, n=n)["key"], "loop_us": {"index_put": 50.0}, "triton_configs": times}


def test_select_keeps_the_default_configuration_unless_beaten_by_the_margin():
    # A CPU mask, H=4096: the default is r1_b4096_w8_s1.
    near = tune.select(_measured("cpu", 2048, r1_b4096_w8_s1=10.0, r4_b512_w8_s1=9.8))["best"]
    assert KernelConfig(**near["config"]) == KernelConfig(1, 4096, 8, 1, False)
    clear = tune.select(_measured("cpu", 2048, r1_b4096_w8_s1=10.0, r4_b512_w8_s1=9.0))["best"]
    assert KernelConfig(**clear["config"]) == KernelConfig(4, 512, 8, 1, False) and clear["fused_config"] is None
    # A device mask at N >= FUSED_BELOW: two-launch by default, one-launch only with the margin.
    big = dict(r1_b4096_w8_s1=10.0, r8_b4096_w8_s1_fused=9.8, r32_b512_w8_s1_fused=9.7)
    chosen = tune.select(_measured("gpu", 65536, **big))["best"]
    assert not chosen["config"]["fused"] and KernelConfig(**chosen["fused_config"]) == KernelConfig(8, 4096, 8, 1, True)
    big["r32_b512_w8_s1_fused"] = 9.0
    chosen = tune.select(_measured("gpu", 65536, **big))["best"]
    assert KernelConfig(**chosen["config"]) == KernelConfig(32, 512, 8, 1, True)
    # Under FUSED_BELOW the one-launch default stands unless a two-launch one beats it by the margin.
    small = dict(r1_b4096_w8_s1=9.8, r8_b4096_w8_s1_fused=10.0)
    assert tune.select(_measured("gpu", 2048, **small))["best"]["config"]["fused"]
    small["r1_b4096_w8_s1"] = 9.0
    chosen = tune.select(_measured("gpu", 2048, **small))["best"]
    assert chosen["path"] == "triton" and not chosen["config"]["fused"]
    assert tune.parse_config_name(tune.config_name(KernelConfig(16, 1024, 4, 3, True))) == KernelConfig(16, 1024, 4, 3, True)


def test_a_device_masks_entry_is_selected_by_its_device_times_where_recorded():
    """Loop time favours the one-launch kernel, device time the two-launch one: the device time decides, and the
    table's loop time for the Triton path is the chosen configuration's (what the path comparison reads)."""
    measured = _measured("gpu", 16384, r1_b4096_w8_s1=12.0, r8_b4096_w8_s1_fused=10.0)
    assert tune.select(json.loads(json.dumps(measured)))["best"]["config"]["fused"]
    measured["device_us"] = {"r1_b4096_w8_s1": 11.0, "r8_b4096_w8_s1_fused": 20.0}
    chosen = tune.select(measured)
    assert KernelConfig(**chosen["best"]["config"]) == KernelConfig(1, 4096, 8, 1, False)
    assert KernelConfig(**chosen["best"]["fused_config"]) == KernelConfig(8, 4096, 8, 1, True)
    assert chosen["loop_us"]["triton"] == 12.0
    # Within the margin in device time the kind N takes by default stands (one-launch under FUSED_BELOW).
    measured["device_us"] = {"r1_b4096_w8_s1": 9.8, "r8_b4096_w8_s1_fused": 10.0}
    assert tune.select(_measured("gpu", 2048, **measured["triton_configs"]) | {"device_us": measured["device_us"]}
                       )["best"]["config"]["fused"]


def test_device_candidates_are_each_kinds_defaults_and_fastest_as_loop_timed():
    times = dict(r1_b4096_w8_s1=12.0, r4_b4096_w8_s1=9.0, r16_b4096_w8_s1=9.5, r1_b512_w8_s1=11.0,
                 r8_b4096_w8_s1_fused=10.0, r32_b512_w8_s1_fused=8.0, r8_b512_w8_s1_fused=30.0)
    names = [tune.config_name(c) for c in tune.device_candidates(_measured("gpu", 16384, **times))]
    assert names == ["r1_b4096_w8_s1", "r4_b4096_w8_s1", "r16_b4096_w8_s1", "r8_b4096_w8_s1_fused",
                     "r32_b512_w8_s1_fused"]


@pytest.mark.parametrize("table", TABLES, ids=lambda p: p.stem)
def test_the_shipped_table_is_valid_and_its_selection_reproducible(table):
    shipped = json.loads(table.read_text())
    dispatch._check_table(shipped, table.stem)
    for recorded in shipped["entries"]:
        assert tune.select(json.loads(json.dumps(recorded)))["best"] == recorded["best"]


def test_decisions_are_cached_per_bucket(monkeypatch):
    dispatch.clear_cache()
    calls = []
    real = dispatch._table_decision
    monkeypatch.setattr(dispatch, "_table_decision", lambda *a: calls.append(a) or real(*a))
    dst, mask = torch.zeros(300, 16), make_mask("random50", (300,))
    for rows in (160, 170, 191):  # one quarter-octave bucket of M: [160, 192)
        dispatch.choose(dst, mask, torch.float32, rows)
    dispatch.choose(dst, mask, torch.float32, 20)
    assert len(calls) == 2
    assert [a[3:] for a in calls] == [(256, 160), (256, 20)], "the rules read the bucket values"


def test_buckets_are_quarter_octaves_aligned_with_the_rules():
    assert [dispatch.bucket(x) for x in (0, 1, 7, 8, 9, 15, 16, 23, 24)] == [0, 1, 7, 8, 8, 14, 16, 20, 24]
    assert dispatch.bucket(dispatch.FUSED_BELOW) == dispatch.FUSED_BELOW  # the threshold starts a bucket
    assert dispatch.bucket(dispatch.FUSED_BELOW - 1) < dispatch.FUSED_BELOW


def test_a_decision_does_not_depend_on_which_call_came_first(monkeypatch):
    """Over many inputs in two orders, each input gets one decision. The rules read exact N and M where the
    cache was keyed by their octave, so whichever input came first in a bucket set the one-launch/two-launch
    choice for the rest. Here the shipped H100 table decides (device masks, bf16) through choose()'s cache."""
    table = json.loads(SHIPPED.read_text())
    monkeypatch.setattr(dispatch, "_table_decision", lambda dst, on_device, src_dtype, n, rows:
                        dispatch.decide_from_table(table, "gpu", "bf16", "bf16", n, dst.shape[-1], rows))
    sizes = [(n, m) for n in (900, 1000, 12000, 15000, 16383, 16384, 17000, 23000, 24000, 100000)
             for m in (1, 7, 100, 3000, 4000, 8000) if m <= n]

    def decisions(order):
        dispatch.clear_cache()
        return {(n, m): dispatch.choose(torch.empty(0, 4096), torch.empty(n, dtype=torch.bool), torch.bfloat16, m)
                for n, m in order}

    first, second = decisions(sizes), decisions(sizes[::-1])
    assert first == second
    assert {d.config.fused for d in first.values()} == {True, False}, "both kernel kinds are exercised"


def test_explain_names_the_rule_and_writes_nothing():
    dst, mask = torch.randn(40, 16), make_mask("random50", (40,))
    before = dst.clone()
    decision = mm.explain(dst, [torch.randn(int(mask.sum()), 16)], mask)
    assert isinstance(decision, mm.Decision) and decision.path == "index_put" and "CPU" in decision.reason
    assert torch.equal(dst, before)


@pytest.mark.parametrize("path", sorted({e["best"]["path"] for t in TABLES for e in json.loads(t.read_text())["entries"]}))
def test_every_path_the_shipped_tables_choose_gives_the_reference(path):
    """Each chosen path with each shipped configuration (scaled to CPU sizes), against the plain reference."""
    configs = {json.dumps(e["best"]["config"]) for t in TABLES for e in json.loads(t.read_text())["entries"]
               if e["best"]["path"] == path}
    for config in sorted(configs):
        cfg = KernelConfig(**json.loads(config)) if config != "null" else None
        mask = make_mask("random50", (67,))
        dst, src = torch.randn(67, 40), torch.randn(int(mask.sum()), 40)
        out = dst.clone()
        if path == "triton":
            executor.merge_triton(out, mask, src, False, config=cfg)
        else:
            mm.paths.RUNNERS[path](out, mask, src, False)
        assert_merged(out, dst, mask, src, accumulate=False, path=path)


def test_explain_returns_what_the_call_executes_on_every_branch(monkeypatch):
    """For inputs that reach each branch of dispatch.decide (the table's rules through the shipped H100 table,
    the heuristic, every refusal), the path and configuration the call runs are the ones explain() returns."""
    from mmmerge_triton import core

    table = json.loads(SHIPPED.read_text())
    ran = []
    real_run = core.run
    monkeypatch.setattr(core, "run", lambda prepared, *a, **k: ran.append(
        (prepared.decision.path, prepared.decision.config)) or real_run(prepared, *a, **k))  # the one executor

    def check(dst, src, mask, label):
        ran.clear()
        decision = mm.explain(dst, src, mask)
        mm.merge_multimodal_embeddings(dst, src, mask)
        assert ran == [(decision.path, decision.config)], f"{label}: ran {ran}, explain said {decision[:2]}"
        return decision

    def inputs(n, m, hidden=64, dtype=torch.float32, src_dtype=torch.float32):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=torch.Generator().manual_seed(n))[:m]] = True
        return torch.randn(n, hidden, dtype=dtype), torch.randn(m, hidden, dtype=src_dtype), mask

    seen = set()
    for mask_kind in ("cpu", "gpu"):  # the table's CPU-mask and device-mask rules (masks stay on the CPU here)
        monkeypatch.setattr(dispatch, "_table_decision", lambda dst, on_device, src_dtype, n, rows, _k=mask_kind:
                            dispatch.decide_from_table(table, _k, "bf16", "bf16", n, dst.shape[-1], rows))
        dispatch.clear_cache()
        for n, m in [(600, 300), (3000, 40), (9000, 4500), (20000, 100), (20000, 19000), (100000, 5000), (250000, 2000)]:
            decision = check(*inputs(n, m, hidden=16), f"table {mask_kind} N={n} M={m}")
            seen.add((mask_kind, decision.config.fused, "one-launch" in decision.reason))
    assert {("cpu", False, False), ("gpu", True, True), ("gpu", False, False)} <= seen, f"branches reached: {seen}"
    monkeypatch.undo()
    dispatch.clear_cache()
    for label, (dst, src, mask) in {
        "float64 (refused: dtype)": inputs(50, 20, dtype=torch.float64, src_dtype=torch.float64),
        "CPU tensors (heuristic or refusal)": inputs(50, 20),
    }.items():
        ran.clear()
        decision = mm.explain(dst, src, mask)
        assert decision.path == "index_put", label
