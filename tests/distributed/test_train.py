"""launch/cpu_tp2.sh (launch/train.py under torchrun: 2 gloo processes, TP = 2), run as the README says.

- An uninterrupted 16-step run is the oracle. Its loss starts at ln(vocab) (an untrained model's
  uniform guess, within 0.05) and the mean over steps 13-16 is at least 1 nat below the mean over
  steps 1-4 (measured: 5.16 -> 3.54; the synthetic chain's floor is ln 2).
- The documented resume: a run to step 8, then `TRAIN_ITERS=16` again on the same folder, which
  resumes from its latest checkpoint. The two runs' losses equal the oracle's exactly (bitwise): the
  CPU run is deterministic (one thread per process, batches a function of the step) and the
  checkpoint holds the whole training state (model, Adam moments and step, scheduler).
- Checkpoints are finished folders named by `latest`, with no `.partial` folder left behind;
  progress lines carry loss, tokens/s, step time and the Mamba-3 receipt.
- Clear refusals: a pattern with pipeline stages, and resuming with other model settings.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 256  # launch/cpu_tp2.sh's --vocab-size
PROGRESS = re.compile(
    r"^\[train\] step (\d+)/(\d+) \| loss \d+\.\d{6} \| \d+ tokens/s \| step [\d.]+ ms \| lr [\d.e+-]+ \| "
    r"grad norm [\d.]+ \| mamba3 reference/chunked float32 x2 layers$"
)


def cpu_tp2(checkpoints: Path, train_iters: int, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, CKPT_DIR=str(checkpoints), TRAIN_ITERS=str(train_iters), SAVE_INTERVAL="8")
    return subprocess.run(
        ["bash", str(ROOT / "launch" / "cpu_tp2.sh"), *extra], env=env, capture_output=True, text=True, timeout=300
    )


def losses(metrics: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, metrics.read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("train")
    results = {
        "oracle": cpu_tp2(tmp / "oracle", 16, "--metrics-file", str(tmp / "oracle.jsonl")),
        "first": cpu_tp2(tmp / "resumed", 8, "--metrics-file", str(tmp / "first.jsonl")),
        "second": cpu_tp2(tmp / "resumed", 16, "--metrics-file", str(tmp / "second.jsonl")),
    }
    for name, run in results.items():
        assert run.returncode == 0, f"{name} run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return {"tmp": tmp, **results}


def test_loss_goes_down(runs):
    oracle = losses(runs["tmp"] / "oracle.jsonl")
    assert sorted(oracle) == list(range(1, 17))
    assert abs(oracle[1] - math.log(VOCAB)) < 0.05
    first, last = (sum(oracle[s] for s in steps) / 4 for steps in (range(1, 5), range(13, 17)))
    assert last < first - 1.0, (first, last)


def test_resume_repeats_the_loss_curve_exactly(runs):
    oracle = losses(runs["tmp"] / "oracle.jsonl")
    first, second = losses(runs["tmp"] / "first.jsonl"), losses(runs["tmp"] / "second.jsonl")
    assert sorted(first) == list(range(1, 9)) and sorted(second) == list(range(9, 17))
    assert {**first, **second} == oracle
    assert f"[train] resumed from {runs['tmp'] / 'resumed' / 'iter_0000008'} at step 8" in runs["second"].stdout


def test_progress_lines_and_checkpoints(runs):
    lines = [line for line in runs["oracle"].stdout.splitlines() if line.startswith("[train] step")]
    assert [PROGRESS.match(line).groups() for line in lines] == [(str(s), "16") for s in range(1, 17)]
    folder = runs["tmp"] / "resumed"
    assert (folder / "latest").read_text() == "iter_0000016\n"
    assert sorted(p.name for p in folder.iterdir()) == ["iter_0000008", "iter_0000016", "latest"]
    for checkpoint in ("iter_0000008", "iter_0000016"):
        state = json.loads((folder / checkpoint / "train_state.json").read_text())
        assert state["iteration"] == int(checkpoint[5:]) and state["scheduler"]["num_steps"] == state["iteration"]


def test_refuses_pipeline_patterns():
    run = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--hybrid-layer-pattern", "M*|M-"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2 and "no '|' pipeline stages" in run.stderr


def test_refuses_to_resume_other_model_settings(runs):
    folder = str(runs["tmp"] / "resumed")
    run = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--load", folder, "--train-iters", "24", "--hidden-size", "32"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1
    assert "was trained with other model settings (saved, now): {'hidden_size': (64, 32)}" in run.stderr
