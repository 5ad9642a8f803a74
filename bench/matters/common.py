"""What every script in bench/matters/ shares: its arguments, the environment it ran in, a clean GPU between
cases, progress lines, and one JSON per script (rewritten after every case, so a run cut short keeps what
it measured)."""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import sys
import time
from pathlib import Path

import torch

# The repository, for tests.models.tiny_vlms; mmmerge_triton itself comes from its installation (pip install -e .,
# which maps kernels/ to mmmerge_triton.kernels), so ROOT goes last on the path.
ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT))


def tool(name: str):
    """The package's measurement module ``name`` (timing, cases, bench): mmmerge_triton.tools.<name>, where the
    tools live now, or mmmerge_triton.<name> in a checkout from before they moved."""
    try:
        return importlib.import_module(f"mmmerge_triton.tools.{name}")
    except ModuleNotFoundError as error:
        if error.name not in ("mmmerge_triton.tools", f"mmmerge_triton.tools.{name}"):
            raise
        return importlib.import_module(f"mmmerge_triton.{name}")


timing = tool("timing")  # device_time_us, loop_time_us, peak_extra_bytes: how this package times a merge
make_mask = tool("cases").make_mask  # make_mask(n, rows, "blocks"): a CPU bool mask, rows true in image blocks

_START = time.perf_counter()
GB = 1e9
MB = 1e6


def arguments(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, seconds: proves the script runs")
    parser.add_argument("--out", type=Path, default=Path("bench/results/matters"), help="folder for the JSON")
    return parser.parse_args()


def device_for(args) -> torch.device:
    if args.smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on a CPU")
    return torch.device("cuda", torch.cuda.current_device())


def env(device: torch.device) -> dict:
    try:
        import transformers
        version = transformers.__version__
    except ImportError:
        version = None
    # device name, torch/triton/CUDA versions, date, the code's commit (bench.code_commit: $MMMERGE_COMMIT, which
    # bench/run_gpu.sh sets, else git HEAD with -dirty where tracked files differ)
    return tool("bench").environment(device) | {"transformers": version}


def log(*parts) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s]", *parts, flush=True)


def clean(device: torch.device) -> None:
    """Nothing left over from the case before: freed, the allocator's cache handed back, the peak reset."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Report:
    """The script's JSON: {"environment", "smoke", "settings", "records"}, written after every record."""

    def __init__(self, args, name: str, device: torch.device, settings: dict):
        args.out.mkdir(parents=True, exist_ok=True)
        self.path = args.out / f"{name}.json"
        self.data = {"benchmark": name, "environment": env(device), "smoke": args.smoke, "settings": settings,
                     "records": []}
        self.write()

    def add(self, record: dict) -> None:
        self.data["records"].append(record)
        self.write()

    def note(self, key: str, value) -> None:
        self.data[key] = value
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1))
