"""Runs tests/multigpu/tp_parity.py under torchrun on every GPU of this machine and
tests/multigpu/cp_parity.py (parity mode) on two (NCCL)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
GPUS = torch.cuda.device_count()


@pytest.mark.skipif(GPUS < 2, reason=f"tensor-parallel parity over NCCL needs >= 2 GPUs; this machine has {GPUS}")
def test_tp_parity_over_nccl():
    script = Path(__file__).with_name("tp_parity.py")
    sizes = [str(tp) for tp in (1, 2, 4, 8) if GPUS % tp == 0]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={GPUS}", str(script), "--tp", *sizes]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    print(finished.stdout)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]


@pytest.mark.skipif(GPUS < 2, reason=f"context-parallel parity over NCCL needs 2 GPUs; this machine has {GPUS}")
def test_cp_parity_over_nccl():
    script = Path(__file__).with_name("cp_parity.py")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", str(script), "parity"]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    print(finished.stdout)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
