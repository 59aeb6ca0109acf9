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
- Resume schedules (Megatron-LM's convention): the README's extension (4 steps of cosine decay, then
  TRAIN_ITERS=8) decays until step 8, not at lr 0; another --lr is refused naming both values, and
  taken with --override-opt-param-scheduler. Expected lrs: Megatron's cosine formula.
- A damaged checkpoint is refused in one line naming the file and the previous good step; bad flags
  are one line before torchrun starts; launches print no gloo "connected" lines or notes that do not
  apply, and the progress line carries elapsed time and an ETA.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 256  # launch/cpu_tp2.sh's --vocab-size
PROGRESS = re.compile(
    r"^\[train\] step (\d+)/(\d+) \| loss \d+\.\d{6} \| \d+ tokens/s \| step [\d.]+ ms \| "
    r"elapsed (?:\d+m)?\d+s \| ETA (?:\d+m)?\d+s \| lr [\d.e+-]+ \| "
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
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "iter_0000008", "iter_0000016", "latest"]
    for checkpoint in ("iter_0000008", "iter_0000016"):
        state = json.loads((folder / checkpoint / "train_state.json").read_text())
        assert state["iteration"] == int(checkpoint[5:]) and state["scheduler"]["num_steps"] == state["iteration"]
        assert "train_state.json" in json.loads((folder / checkpoint / "manifest.json").read_text())


def test_launch_is_quiet(runs):
    output = runs["oracle"].stdout + runs["oracle"].stderr
    for noise in ("[Gloo]", "No CUDA runtime", "async save is deprecated", "Falling back", "OMP_NUM_THREADS"):
        assert noise not in output, noise
    others = [line for line in output.splitlines() if not PROGRESS.match(line)]
    assert len(others) <= 6, others  # start, model, two saves


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


def train_py(*args: str, world_size: int = 1) -> subprocess.CompletedProcess:
    """launch/train.py --check-only in one process, as the launchers run it before torchrun."""
    env = dict(os.environ, WORLD_SIZE=str(world_size))
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--check-only", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def cosine_lr(step: int, decay: int, peak: float = 3e-3) -> float:
    """The lr Megatron's cosine schedule gives step `step` (1-based: it runs at num_steps = step - 1)."""
    return peak * 0.5 * (math.cos(math.pi * (step - 1) / decay) + 1)


def lrs(metrics: Path) -> dict[int, float]:
    return {row["step"]: row["lr"] for row in map(json.loads, metrics.read_text().splitlines())}


def test_extended_run_stretches_its_decay_and_other_settings_are_refused_or_overridden(tmp_path):
    folder, cosine = tmp_path / "cosine", ("--lr-decay-style", "cosine")
    for iters in (4, 8):  # the README's extension: train, then raise TRAIN_ITERS
        run = cpu_tp2(folder, iters, *cosine, "--metrics-file", str(tmp_path / f"to{iters}.jsonl"))
        assert run.returncode == 0, run.stderr[-3000:]
    expected = {s: cosine_lr(s, 4) for s in range(1, 5)} | {s: cosine_lr(s, 8) for s in range(5, 9)}
    got = lrs(tmp_path / "to4.jsonl") | lrs(tmp_path / "to8.jsonl")
    assert got.keys() == expected.keys() and all(abs(got[s] - expected[s]) <= 1e-12 for s in got), got
    assert "the learning rate now decays until step 8 (the checkpoint's: 4)" in run.stdout

    refused = train_py("--load", str(folder), "--train-iters", "9", *cosine, "--lr", "1e-3")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "--lr 0.001 here, 0.003 in the checkpoint): pass --override-opt-param-scheduler" in refused.stderr

    run = cpu_tp2(folder, 9, *cosine, "--lr", "1e-3", "--override-opt-param-scheduler",
                  "--metrics-file", str(tmp_path / "to9.jsonl"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert abs(lrs(tmp_path / "to9.jsonl")[9] - cosine_lr(9, 9, peak=1e-3)) <= 1e-12


def test_damaged_checkpoint_is_refused_naming_the_file_and_the_previous_good_step(runs, tmp_path):
    folder = tmp_path / "resumed"
    shutil.copytree(runs["tmp"] / "resumed", folder)
    shard = next((folder / "iter_0000016").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    run = cpu_tp2(folder, 24)  # the launcher's check stops it before torchrun
    assert run.returncode == 1 and "ChildFailedError" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert f"[train] error: checkpoint {folder / 'iter_0000016'} is damaged: {shard} has" in run.stderr
    assert run.stderr.endswith("resume from the previous good one with --ckpt-step 8\n")


@pytest.mark.parametrize(
    "args, world_size, message",
    [
        (("--mamba3-backend", "tilelang"), 1, "backend='tilelang' cannot run on cpu float32 tensors: needs CUDA tensors"),
        (("--vocab-size", "255", "--num-attention-heads", "3"), 3, "tensor_parallel_size=3 must divide the number of heads H = 8"),
    ],
)
def test_bad_flags_are_one_line_before_anything_is_built(args, world_size, message):
    run = train_py("--device", "cpu", *args, world_size=world_size)
    assert run.returncode == 1 and run.stderr.startswith("[train] error: ") and run.stderr.count("\n") == 1, run.stderr
    assert message in run.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("--device", "cpu"), "--cuda-graph needs --device cuda"),
        (("--layer-times",), "--cuda-graph cannot be combined with --layer-times"),
        (("--hybrid-layer-pattern", "M-E-", "--num-experts", "4"), "--cuda-graph cannot be combined with MoE layers (E)"),
        (("--hybrid-layer-pattern", "M-M-", "--context-parallel-size", "2", "--tensor-model-parallel-size", "1"),
         "--cuda-graph cannot be combined with --context-parallel-size 2"),
        (("--hybrid-layer-pattern", "M-M-", "--data-path", "tokens.npy", "--doc-ids-path", "docs.npy",
          "--micro-batch-size", "1"), "--cuda-graph cannot be combined with --doc-ids-path"),
    ],
)
def test_cuda_graph_refuses_what_a_replayed_layer_cannot_do(args, message):
    run = train_py("--cuda-graph", *args, world_size=2 if "--context-parallel-size" in args else 1)
    assert run.returncode == 2 and run.stderr == f"[train] error: {message}\n", run.stderr


def test_tp_profile_runs_at_tp2_on_cpu(tmp_path):
    """benchmarks/tp_profile.py takes train.py's flags and, like train.py, the TP size from the process count."""
    output = tmp_path / "split.txt"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "benchmarks" / "tp_profile.py"), "--output", str(output), "--warmup", "1", "--steps", "1",
         "--device", "cpu", "--hybrid-layer-pattern", "M*M-", "--hidden-size", "64", "--num-attention-heads", "2",
         "--mamba-head-dim", "16", "--mamba-state-dim", "16", "--vocab-size", "128", "--seq-length", "32",
         "--micro-batch-size", "1", "--sequence-parallel"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^split: attention\+mlp .* \| mamba3 .* \| rest .*per step$", output.read_text(), re.M), output.read_text()
