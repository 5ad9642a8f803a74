"""A 2-rank tensor-parallel prefill merge under torchrun with NCCL (tp_merge_worker.py). Skips below 2 GPUs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 GPUs of one host", allow_module_level=True)


def test_two_ranks_merge_the_all_gathered_features_like_one_gpu():
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    worker = Path(__file__).with_name("tp_merge_worker.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(worker)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
