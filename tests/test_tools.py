"""The tools a newcomer runs first (mmmerge_triton/tools/), on the CPU: the benchmark's device check, default
output folder and honest CPU table; the report on every JSON the package writes (CPU and GPU runs, nulls
included), its --help and its errors; tune's CUDA requirement; the CPU timing's warm-up."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmmerge_triton import PATHS, launch
from mmmerge_triton.tools import analysis, bench, heldout, report, timing, tune
from mmmerge_triton.tools.cases import Case

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"  # a folder per device
H100 = RESULTS / "h100"
# The JSONs of bench/'s own scripts (compare_host_path.py, positions_bench.py, scan_copy_bench.py, untuned.py) are
# read by those scripts, whose printed tables are committed beside them as logs; mmmerge-report reads the rest.
SCRIPT_RESULTS = {"compare_host_path": "compare_host_path.log", "positions_": "positions.log",
                  "prefix_count_": "prefix_count.log", "scan_copy_quick_": "scan_copy_quick.log",
                  "untuned_": "untuned.log", "chained_merges_": "chained_merges.log",
                  "device_mask_profile_": "device_mask_profile.log",
                  "device_mask_overlap_": "device_mask_overlap.log", "counted_scan_": "counted_scan.log",
                  "row_copy_floor_": "row_copy_floor.log", "select_copy_": "select_copy.log"}
COMMITTED = sorted(p for p in RESULTS.rglob("*.json") if not p.name.startswith(tuple(SCRIPT_RESULTS)))
SHIPPED_TABLES = sorted((ROOT / "mmmerge_triton" / "configs").glob("*.json"))
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a torch without CUDA")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """``mmmerge-bench --quick`` on the CPU with no --out, in an empty current directory, on two tiny cases
    (the grid is patched: the tooling is under test, not the timings). Returns (folder, stdout, JSON file)."""
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setattr(bench, "grid", lambda name, device: [Case(64, 32, 0.5), Case(128, 64, 0.5)])
        mp.setattr(timing, "CPU_WARMUP_S", 0.002)
        out = _captured(lambda: bench.main(["--quick", "--device", "cpu"]))
    assert out.rc == 0, out.err
    files = sorted((cwd / bench.DEFAULT_OUT).glob("bench_quick_cpu_*.json"))
    assert len(files) == 1
    return cwd, out.out, files[0]


class Captured:
    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err


def _captured(call) -> Captured:
    """rc, stdout and stderr of a CLI's main(), SystemExit included (argparse's --help and usage errors)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = call()
        except SystemExit as exit_:
            rc = exit_.code
    return Captured(rc, out.getvalue(), err.getvalue())


def test_bench_writes_to_a_folder_in_the_current_directory_and_says_where(cpu_run):
    cwd, out, file = cpu_run
    assert file.parent == cwd / "mmmerge-results" and file.with_suffix(".png").exists()
    assert f"results go to {cwd / 'mmmerge-results'}" in out
    assert "mmmerge-results/" in (ROOT / ".gitignore").read_text().split()  # where a checkout runs it


def test_the_cpu_table_says_wall_time_and_has_no_bandwidth(cpu_run):
    _, out, file = cpu_run
    assert out.count("smoke test of the tooling, not a speed claim") == 1
    assert "wall µs" in out and "device µs" not in out
    assert "copy BW" not in out and not [line for line in out.splitlines() if line.startswith("  ") and "%" in line]
    run = json.loads(file.read_text())
    assert run["environment"]["device_type"] == "cpu" and run["clock"].startswith("wall")
    for record in run["records"]:
        assert record["auto_path"] == "index_put"
        for figures in record["results"].values():
            assert figures["peak_extra_bytes"] is None and figures["host_us"] is None
            assert figures["device_us"] > 0 and figures["loop_us"] > 0


def test_report_reads_the_cpu_json_the_bench_just_wrote_and_draws_it(cpu_run, tmp_path):
    _, _, file = cpu_run
    out = _captured(lambda: report.main([str(file), "--png", "--out", str(tmp_path), "--cases"]))
    assert out.rc == 0, out.err
    assert "wall µs" in out.out and "not a speed claim" in out.out
    rows = [line for line in out.out.splitlines() if line.startswith(("  ", "| "))]  # the tables' rows
    assert rows and not [row for row in rows if "%" in row]  # no bandwidth percentage
    assert "peak" not in out.out and "Targets" not in out.out  # device-only figures
    assert (tmp_path / f"{file.stem}.png").stat().st_size > 10_000
    missing = _captured(lambda: report.main([str(file), "--path", "triton"]))
    assert missing.rc == 2 and "'triton' is not in this run" in missing.err and "Traceback" not in missing.err


@pytest.mark.parametrize("file", COMMITTED + SHIPPED_TABLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_report_reads_every_committed_json(file):
    out = _captured(lambda: report.main([str(file)]))
    assert out.rc == 0, out.err
    assert out.out.startswith(f"# {file.name}: ")
    if file.name.startswith("bench_"):
        assert "wall" not in out.out and "smoke test" not in out.out  # a GPU run is never labelled wall time
        assert "Targets for path='auto'" in out.out and "copy µs" in out.out


def test_every_script_result_has_its_printed_tables_beside_it():
    found = [p for p in RESULTS.rglob("*.json") if p.name.startswith(tuple(SCRIPT_RESULTS))]
    assert found, "the script results this test exempts exist"
    for path in found:
        log = next(log for prefix, log in SCRIPT_RESULTS.items() if path.name.startswith(prefix))
        printed = [p for p in (path.with_suffix(".log"), path.parent / log) if p.exists()]  # its own, or the run's
        assert printed and printed[0].stat().st_size > 1000, f"{path}: its run's printed tables ({log}) are committed"


def test_report_draws_a_gpu_run(tmp_path):
    file = H100 / "bench_full_NVIDIA_H100_80GB_HBM3.json"
    out = _captured(lambda: report.main([str(file), "--png", "--out", str(tmp_path), "--path", "triton"]))
    assert out.rc == 0, out.err
    assert "Targets for path='triton'" in out.out and (tmp_path / f"{file.stem}.png").exists()


def test_report_survives_nulls_in_a_gpu_run(tmp_path):
    """peak_extra_bytes and host_us null (as on a CPU) in a GPU-labelled run: '-' in the table, the memory
    target skipped, no crash."""
    run = json.loads((H100 / "bench_full_NVIDIA_H100_80GB_HBM3.json").read_text())
    for record in run["records"]:
        for figures in record["results"].values():
            figures["peak_extra_bytes"] = figures["host_us"] = None
    file = tmp_path / "bench_nulls.json"
    file.write_text(json.dumps(run))
    out = _captured(lambda: report.main([str(file), "--cases"]))
    assert out.rc == 0, out.err
    assert "| - / - |" in out.out and "peak_bytes_over_limit" not in out.out and "copy_ratio" in out.out


def test_report_help_and_errors_are_one_line():
    helped = _captured(lambda: report.main(["--help"]))
    assert helped.rc == 0 and "usage: mmmerge-report" in helped.out and "--png" in helped.out
    empty = _captured(lambda: report.main([]))
    assert empty.rc == 2 and "required" in empty.err
    missing = _captured(lambda: report.main(["/nonexistent/bench.json"]))
    assert missing.rc == 2 and missing.err.count("\n") == 1 and "cannot read" in missing.err


def test_report_rejects_other_json_in_one_line(tmp_path):
    for name, text in (("garbage.json", "{not json"), ("other.json", json.dumps({"some": ["thing"]}))):
        (tmp_path / name).write_text(text)
        out = _captured(lambda: report.main([str(tmp_path / name)]))
        assert out.rc == 2 and out.err.count("\n") == 1 and name in out.err and "Traceback" not in out.err


def test_report_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "mmmerge_triton.tools.report", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "FILE.json" in done.stdout


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "gpu", "cuda:1"])
def test_bench_names_the_available_devices_in_one_line(device):
    out = _captured(lambda: bench.main(["--device", device]))
    assert out.rc == 2 and out.err.count("\n") == 1, out.err
    assert f"--device '{device}' is not available" in out.err and "available: cpu" in out.err
    assert "Traceback" not in out.err and out.out == ""


def test_tune_help_says_the_sweep_needs_cuda():
    out = _captured(lambda: tune.main(["--help"]))
    assert out.rc == 0 and "need a CUDA GPU" in " ".join(out.out.split())


@no_cuda
def test_tune_without_cuda_is_one_line():
    out = _captured(lambda: tune.main(["--quick"]))
    assert out.rc == 1 and out.err.count("\n") == 1 and "need a CUDA GPU" in out.err


def test_cpu_timing_warms_up_before_it_times():
    """A call whose first three runs are cold (page faults, lazy init) must not land in any CPU figure."""
    for measure in (timing.device_time_us, timing.loop_time_us, timing.host_time_us):
        calls = []

        def call():
            calls.append(None)
            if len(calls) <= 3:
                time.sleep(0.03)

        assert measure(call, torch.device("cpu")) < 5_000, measure.__name__


def test_cpu_suite_table_says_wall_time(capsys):
    from mmmerge_triton.tools.suites import print_suite

    record = {"n": 8, "hidden": 4, "results": {"a": {"device_us": 1.0, "loop_us": 2.0, "host_us": None,
                                                      "peak_extra_bytes": None}}}
    print_suite("plan", [record], cpu=True)
    out = capsys.readouterr().out
    assert "wall µs" in out and "device µs" not in out and "peak" not in out
    table = report.suite_markdown([record], cpu=True)
    assert "| 1 / 2 |" in table


# Issue 20: the copy baseline timed as robustly as the paths, the commit of the code measured, auto's regret
# against the other paths, and one-line errors for the tools' bad inputs.

def test_cpu_run_records_the_rounds_of_every_path_and_of_the_copy(cpu_run):
    run = json.loads(cpu_run[2].read_text())
    for record in run["records"]:
        for figures in record["results"].values():
            for key in ("device_us", "loop_us"):
                assert len(figures[f"{key}_rounds"]) == timing.ROUNDS
                assert figures[key] == statistics.median(figures[f"{key}_rounds"])


def test_bench_times_the_copy_in_rounds_interleaved_with_the_paths(monkeypatch):
    """Every device-time measurement of one case, in order: the copy is measured in every round, among the
    paths, and not always first (the old benchmark timed it once, before the paths)."""
    taken = []
    real_path_calls = bench.path_calls

    def named_calls(case, dst, mask, src):
        calls = real_path_calls(case, dst, mask, src)
        return {name: (lambda name=name, call=call: (taken.append(name), call())) for name, call in calls.items()}

    monkeypatch.setattr(bench, "path_calls", named_calls)
    monkeypatch.setattr(timing, "device_time_us", lambda fn, device, reps=15, flush=True: (fn(), 1.0)[1])
    monkeypatch.setattr(timing, "loop_time_us", lambda fn, device, budget_s=0.03, min_calls=10: 2.0)
    record = bench.measure(Case(64, 32, 0.5), torch.device("cpu"))
    names = list(record["results"])
    assert "copy" in names and len(taken) == timing.ROUNDS * len(names)
    rounds = [taken[r * len(names):(r + 1) * len(names)] for r in range(timing.ROUNDS)]
    assert all(sorted(r) == sorted(names) for r in rounds)  # each round times every path and the copy once
    assert len({r.index("copy") for r in rounds}) > 1  # the copy's place in the round moves
    assert record["results"]["copy"]["device_us_rounds"] == [1.0] * timing.ROUNDS


def test_interleaved_rotates_the_order_from_round_to_round():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    taken = timing.interleaved(calls, {"x": lambda fn: (fn(), 1.0)[1]}, rounds=4)
    assert order == list("abc" "bca" "cab" "abc")
    assert taken == {name: {"x": [1.0] * 4} for name in "abc"}


def _gpu_bench_run(copy_rounds: list[float], auto_us: float) -> dict:
    """A one-case GPU benchmark file of the serving slice (268 MB moved), the copy with the given rounds."""
    case = Case(131072, 1024, 0.5)

    def figures(us, rounds=None):
        return {"device_us": us, "loop_us": us, "host_us": 10.0, "peak_extra_bytes": 0,
                "device_us_rounds": rounds or [us] * 5, "loop_us_rounds": [us] * 5}

    results = {"copy": figures(statistics.median(copy_rounds), copy_rounds), "triton": figures(auto_us),
               "auto": figures(auto_us), "index_put": figures(342.0), "masked_scatter": figures(1514.0),
               "index_copy": figures(330.0)}
    env = {"device": "NVIDIA_H100_80GB_HBM3", "device_type": "cuda", "commit": "abc1234"}
    return {"environment": env, "grid": "full", "targets": None, "records": [
        {"case": case.as_dict(), "label": case.label(), "moved_bytes": case.moved_bytes, "results": results}]}


def test_report_flags_a_path_below_a_copy_and_shows_the_copys_spread(tmp_path):
    file = tmp_path / "bench_full_x.json"
    file.write_text(json.dumps(_gpu_bench_run([108.8, 100.0, 101.0, 100.0, 99.0], 95.7)))
    out = _captured(lambda: report.main([str(file), "--cases"]))
    assert out.rc == 0, out.err
    assert "mmmerge_triton abc1234" in out.out.splitlines()[0]  # the commit measured, in the title
    notes = [line for line in out.out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "auto 95.7 µs is 0.957x the copy's 100.0 µs" in notes[0]
    assert "| 100.0 (10%) |" in out.out and "spread of its rounds" in out.out  # (108.8 - 99) / 100
    assert "spread" in out.out.split("N=131072")[1].splitlines()[1]  # the case table has a spread column
    steady = tmp_path / "bench_full_steady.json"
    steady.write_text(json.dumps(_gpu_bench_run([100.0] * 5, 98.5)))  # 0.985x: within the margin
    out = _captured(lambda: report.main([str(steady)]))
    assert out.rc == 0 and "note: " not in out.out


def _regret_point(n: int, loop_us: dict, auto_path: str = "triton") -> dict:
    case = {"n": n, "hidden": 1536, "density": 0.5, "pattern": "blocks", "src": "bf16", "dst": "bf16", "mask": "cpu"}
    return {"case": case, "loop_us": loop_us, "auto_path": auto_path, "auto_choice": "r1_b2048_w8_s1",
            "best_path": "auto", "ratio": 1.0, "oracle_choice": "r1_b2048_w8_s1", "oracle_ratio": 1.0}


def test_report_compares_auto_with_the_best_other_path(tmp_path):
    """A regret file as the old --evaluate wrote it (auto counted among its own rivals: ratio 1.0, best path
    auto, worst 1.000x): the report computes auto against the best path other than auto and the path it chose
    (called by name, the very same call), with the function --evaluate uses."""
    run = {"points": [_regret_point(512, {"auto": 10.0, "triton": 9.0, "index_put": 20.0, "masked_scatter": 40.0,
                                          "index_copy": 25.0}),
                      _regret_point(1024, {"auto": 30.0, "triton": 29.0, "index_put": 24.0, "masked_scatter": 90.0,
                                           "index_copy": 60.0})],
           "within_5pct": 1.0, "worst_ratio": 1.0, "median_ratio": 1.0, "oracle_within_5pct": 1.0,
           "oracle_worst_ratio": 1.0, "dispatch_us": 1.5, "environment": {"device": "x", "device_type": "cuda"}}
    file = tmp_path / "regret_x.json"
    file.write_text(json.dumps(run))
    out = _captured(lambda: report.main([str(file)]))
    assert out.rc == 0, out.err
    assert "within 5% of the best other path at 50% of 2 points, worst 1.250x, median 0.875x" in out.out
    assert "| triton (r1_b2048_w8_s1) | index_put | 0.50 |" in out.out  # not auto, not triton (auto's own call)
    assert "| triton (r1_b2048_w8_s1) | index_put | 1.25 |" in out.out
    assert "reads worst 1.000x" in out.out  # the file's own summary, and why it differs
    assert heldout.auto_against_others is report.auto_against_others is analysis.auto_against_others  # one metric


def test_report_rejects_a_json_of_numbers_that_no_tool_wrote(tmp_path):
    """{"a": 1} is not a probe's file; a probe's flat record is (with its environment, or named probe_*)."""
    for name, run, ours in (("a.json", {"a": 1}, False), ("probe_old.json", {"a": 1.5}, True),
                            ("probe_new.json", {"environment": {"commit": "abc1234"}, "a": 1.5}, True)):
        (tmp_path / name).write_text(json.dumps(run))
        out = _captured(lambda: report.main([str(tmp_path / name)]))
        if ours:
            assert out.rc == 0 and "| a | 1.5 |" in out.out and "environment" not in out.out.split("\n", 1)[1]
        else:
            assert out.rc == 2 and out.out == "" and out.err.count("\n") == 1
            assert "not one of this package's result files" in out.err and name in out.err


@pytest.mark.parametrize("content", [None, "{not json", b"\xff\xfe\x00", json.dumps({"a": 1}),
                                     json.dumps({"version": 1, "entries": [{"key": {}}]})],
                         ids=["missing", "not-json", "binary", "not-a-table", "garbled-entry"])
def test_tune_reselect_of_a_bad_file_is_one_error_line(tmp_path, content):
    file = tmp_path / "table.json"
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content is not None:
        file.write_text(content)
    out = _captured(lambda: tune.main(["--reselect", str(file)]))
    assert out.rc == 2 and "Traceback" not in out.err and out.out == ""
    last = out.err.strip().splitlines()[-1]
    assert last.startswith(f"mmmerge-tune: error: --reselect {file}: ") and len(last) > len(str(file)) + 35
    if content is not None:
        assert (file.read_bytes() if isinstance(content, bytes) else file.read_text()) == content  # untouched


@pytest.mark.parametrize("table", SHIPPED_TABLES, ids=lambda p: p.stem)
def test_every_shipped_entrys_key_gives_back_its_sweep_case(table):
    """--device-times rebuilds each entry's inputs from its key: the case it makes has that very key (N, H, M,
    dtypes, mask device), so the device times are of the point the loop times were."""
    for entry in json.loads(table.read_text())["entries"]:
        assert tune._key(tune._case(entry["key"])) == entry["key"]


@pytest.mark.skipif(not launch.INTERPRET, reason="the merges run on the CPU under the interpreter")
def test_tune_device_times_times_each_layout_then_repicks_and_goes_on_where_it_stopped(tmp_path, monkeypatch):
    """add_device_times on a two-entry table (a CPU mask's entry and a device mask's, recorded loop times that
    favour the one-launch kernel): the device mask's candidates timed on both layouts, the slower kept, the winner
    re-picked from those times; the CPU mask's entry untouched. A second run times nothing more."""
    loop = {"r1_b32_w8_s1": 30.0, "r4_b32_w8_s1": 31.0, "r8_b32_w8_s1_fused": 10.0, "r32_b32_w8_s1_fused": 12.0}
    key = {"mask": "gpu", "src": "bf16", "dst": "bf16", "n": 2048, "hidden": 32, "rows": 205}
    entries = [tune.select({"key": dict(key, mask=m), "loop_us": {"index_put": 50.0},
                            "triton_configs": dict(loop) if m == "gpu" else {"r1_b32_w8_s1": 30.0}})
               for m in ("cpu", "gpu")]
    assert entries[1]["best"]["config"]["fused"]
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"version": 1, "entries": entries}))
    costs = []  # the device µs of each merge timed: a one-launch configuration's 5x a two-launch one's
    merge = tune.executor.merge_triton

    def timed_merge(dst, mask, src, accumulate, config):
        costs.append(5.0 if config.fused else 1.0)
        return merge(dst, mask, src, accumulate, config=config)

    monkeypatch.setattr(tune.executor, "merge_triton", timed_merge)
    monkeypatch.setattr(timing, "device_time_us", lambda fn, device, reps=0: (fn(), costs[-1])[1])
    tune.add_device_times(table, torch.device("cpu"))
    written = json.loads(table.read_text())
    cpu_entry, gpu_entry = written["entries"]
    assert "device_us" not in cpu_entry and cpu_entry["best"] == entries[0]["best"]
    assert set(gpu_entry["device_us_layouts"]) == {"blocks", "scattered"}
    assert set(gpu_entry["device_us"]) == set(loop)  # the defaults and the two fastest of each kind
    assert gpu_entry["device_us"]["r8_b32_w8_s1_fused"] == 5.0 and gpu_entry["device_us"]["r1_b32_w8_s1"] == 1.0
    assert not gpu_entry["best"]["config"]["fused"] and gpu_entry["loop_us"]["triton"] == 30.0
    calls = len(costs)
    tune.add_device_times(table, torch.device("cpu"))
    assert len(costs) == calls and json.loads(table.read_text())["entries"] == written["entries"]


@pytest.mark.skipif(not launch.INTERPRET, reason="the merges run on the CPU under the interpreter")
def test_heldout_check_writes_a_regret_table_the_report_reads(tmp_path, monkeypatch):
    """mmmerge-tune --evaluate's body (heldout.write_evaluation) on a two-point grid, each timing one call given
    the next of rising times: auto against every path and the oracle, the summary, a file report prints."""
    monkeypatch.setattr(heldout, "HELD_OUT", dict(n=(64,), hidden=(32,), density=(0.5,),
                                                  dtypes=(("bf16", "bf16"),), mask=("cpu", "gpu")))
    times = iter(range(1, 10_000))  # every timing distinct: a fastest exists at each step
    monkeypatch.setattr(tune, "_time", lambda call, device: (call(), float(next(times)))[1])
    out = tmp_path / "regret_x.json"
    heldout.write_evaluation(torch.device("cpu"), out)
    run = json.loads(out.read_text())
    assert [(p["case"]["n"], p["case"]["mask"]) for p in run["points"]] == [(64, "cpu"), (64, "gpu")]
    for point in run["points"]:
        assert set(point["loop_us"]) == {"auto", *PATHS}
        assert point["auto_choice"] in point["final_loop_us"] and point["oracle_ratio"] >= 1.0
        assert point["oracle_choice"] == min(point["final_loop_us"], key=point["final_loop_us"].get)
    assert 0 < run["dispatch_us"] and run["environment"]["device_type"] == "cpu"
    printed = _captured(lambda: report.main([str(out)]))
    assert printed.rc == 0 and "2 points" in printed.out, printed.err


@pytest.mark.parametrize("threads", ["-3", "0", "two"])
def test_bench_rejects_threads_below_one(threads):
    out = _captured(lambda: bench.main(["--threads", threads, "--device", "cpu"]))
    assert out.rc == 2 and "--threads" in out.err and "Traceback" not in out.err and out.out == ""


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"not a git checkout: {done.stderr.strip()}")
    return done.stdout.strip()


def test_every_result_file_names_the_commit_it_measured(monkeypatch, cpu_run):
    """$MMMERGE_COMMIT where set (bench/run_gpu.sh sets it on a copied tree); else git HEAD, -dirty where
    tracked files differ. The writers (bench, suites, tune, host_path, probe_launch, matters) all record
    bench.environment, whose commit this is."""
    written = json.loads(cpu_run[2].read_text())["environment"]["commit"]
    preset = "MMMERGE_COMMIT" in os.environ
    monkeypatch.setenv("MMMERGE_COMMIT", "abc1234")
    assert bench.environment(torch.device("cpu"))["commit"] == "abc1234"
    monkeypatch.delenv("MMMERGE_COMMIT")
    head = _git("rev-parse", "--short", "HEAD")
    commit = bench.code_commit()
    assert commit in (head, head + "-dirty")
    assert commit.endswith("-dirty") == bool(_git("status", "--porcelain", "--untracked-files=no"))
    if not preset:  # the run's file: a commit of this repository (HEAD may have moved)
        assert _git("cat-file", "-t", written.removesuffix("-dirty")) == "commit"


def test_run_gpu_sets_the_commit_from_a_clean_checkout_else_the_commit_file(tmp_path):
    """bench/run_gpu.sh, no stage: it exports MMMERGE_COMMIT (and writes it to OUT/commit.txt) from HEAD in a
    clean checkout, else from the COMMIT file a copied tree carries."""
    script = ROOT / "bench" / "run_gpu.sh"

    def commit_in(cwd: Path, **env) -> str:
        environ = {k: v for k, v in os.environ.items() if k != "MMMERGE_COMMIT"} | env
        subprocess.run(["bash", str(script), "", "out"], cwd=cwd, env=environ, capture_output=True, check=True)
        return (cwd / "out" / "commit.txt").read_text().strip()

    repo = tmp_path / "checkout"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "f.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "f.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "m"], check=True)
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (repo / "COMMIT").write_text("c0ffee1\n")
    assert commit_in(repo) == f"commit: {head}"  # clean: HEAD, whatever COMMIT says
    (repo / "f.py").write_text("x = 2\n")
    assert commit_in(repo) == "commit: c0ffee1"  # a tree whose HEAD is older than its files: the COMMIT file
    assert commit_in(repo, MMMERGE_COMMIT="1234567") == "commit: 1234567"  # the caller's wins
    copy = tmp_path / "copy"
    copy.mkdir()
    assert commit_in(copy).startswith("commit: not set")
