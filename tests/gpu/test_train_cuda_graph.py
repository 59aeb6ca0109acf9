"""launch/train.py --cuda-graph on the GPU machine (skipped elsewhere): Megatron-Core's local CUDA graphs of
whole layers, captured after their warm-up steps and replayed, train exactly as eager layers do.

Oracle: the same run without --cuda-graph. Both run under PyTorch's deterministic algorithms (the
TileLang backward then sums dB and dC exactly), so every step's loss and gradient norm is equal bit for bit:
a replay launches the captured kernels on the same values, and the captured backward adds each weight
gradient into `param.main_grad` (launch/main_grads.py) where eager autograd's hook adds the same gradient.
Steps 1-3 are Megatron's eager warm-up; steps 4-8 replay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import TILELANG_GPU

pytestmark = TILELANG_GPU

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
# The layers' sizes as the timed runs' (benchmarks/README.md), whose kernels are compiled; short rows.
MODEL = ["--hybrid-layer-pattern", "M*M-", "--hidden-size", "2048", "--num-attention-heads", "16",
         "--mamba-head-dim", "64", "--mamba-state-dim", "128", "--mamba-num-groups", "8", "--mimo-rank", "4",
         "--vocab-size", "1024", "--seq-length", "512", "--micro-batch-size", "2", "--lr", "3e-4"]
DETERMINISTIC = ("import os, runpy, sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                 "sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
                 "runpy.run_path(sys.argv[0], run_name='__main__')")


def _metrics(tmp_path: Path, name: str, *extra: str) -> list[dict]:
    metrics = tmp_path / f"{name}.jsonl"
    run = subprocess.run(
        [sys.executable, "-c", DETERMINISTIC, str(ROOT / "launch" / "train.py"), "--device", "cuda", "--bf16",
         *MODEL, "--train-iters", str(STEPS), "--metrics-file", str(metrics), *extra],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_replayed_layers_train_as_eager_ones(tmp_path):
    eager = _metrics(tmp_path, "eager")
    graphed = _metrics(tmp_path, "graphed", "--cuda-graph")
    assert [m["step"] for m in graphed] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in graphed] == [m[key] for m in eager], key
