"""Runs tests/multigpu/tp_parity.py under torchrun: on every GPU of this machine over NCCL (skipped,
saying why, with fewer than 2 GPUs), and at small sizes on 2 gloo CPU processes, which checks the
script itself wherever the tests run; and tests/multigpu/cp_parity.py (parity mode) on two GPUs (NCCL)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("tp_parity.py")
GPUS = torch.cuda.device_count()
NVLS_OFF = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")


def _tp_parity(processes: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", str(SCRIPT), *args]
    finished = subprocess.run(command, env=dict(os.environ, **NVLS_OFF), capture_output=True, text=True, timeout=1800)
    print(finished.stdout)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    assert "tp_parity: all checks passed" in finished.stdout
    return finished


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 2, reason=f"tensor-parallel parity over NCCL needs >= 2 GPUs; this machine has {GPUS}")
def test_tp_parity_over_nccl():
    _tp_parity(GPUS, "--tp", *[str(tp) for tp in (1, 2, 4, 8) if GPUS % tp == 0])


@pytest.mark.distributed
def test_tp_parity_script_on_cpu():
    finished = _tp_parity(2, "--device", "cpu", "--tp", "1", "2")
    assert "| replicas cpu-init | 2 |" in finished.stdout and "| checkpoint | 2->1 |" in finished.stdout


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 2, reason=f"context-parallel parity over NCCL needs 2 GPUs; this machine has {GPUS}")
def test_cp_parity_over_nccl():
    script = Path(__file__).with_name("cp_parity.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), "parity"]
    finished = subprocess.run(command, env=dict(os.environ, **NVLS_OFF), capture_output=True, text=True, timeout=1800)
    print(finished.stdout)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
