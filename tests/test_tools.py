"""The tools a newcomer runs first (mmmerge_triton/tools/), on the CPU: the benchmark's device check, default
output folder and honest CPU table; the report on every JSON the package writes (CPU and GPU runs, nulls
included), its --help and its errors; tune's CUDA requirement; the CPU timing's warm-up."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmmerge_triton.tools import bench, report, timing, tune
from mmmerge_triton.tools.cases import Case

ROOT = Path(__file__).resolve().parents[1]
H100 = ROOT / "bench" / "results" / "h100"
COMMITTED = sorted(H100.rglob("*.json"))
SHIPPED_TABLE = ROOT / "mmmerge_triton" / "configs" / "NVIDIA_H100_80GB_HBM3.json"
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


@pytest.mark.parametrize("file", COMMITTED + [SHIPPED_TABLE], ids=lambda p: p.name)
def test_report_reads_every_committed_json(file):
    out = _captured(lambda: report.main([str(file)]))
    assert out.rc == 0, out.err
    assert out.out.startswith(f"# {file.name}: ")
    if file.name.startswith("bench_"):
        assert "wall" not in out.out and "smoke test" not in out.out  # a GPU run is never labelled wall time
        assert "Targets for path='auto'" in out.out and "copy µs" in out.out


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
