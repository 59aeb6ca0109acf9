"""Megatron-LM's own argument parser and hybrid model builder build the Mamba-3 model from `--spec`.

On 2 gloo processes (TP = 2, sequence parallelism), the arguments `launch/megatron_lm.sh` adds
(`--print-args`) plus model flags go through Megatron-LM's `parse_and_validate_args`, and
`hybrid_builders.hybrid_builder` (Megatron-LM's pretrain_hybrid.py model builder) builds the model.
Every M layer must be a `Mamba3Mixer` with the spec's settings and the TP layout, the linears the
local ones, and a forward and backward must run the Mamba-3 layers (receipts) with a finite loss.

Megatron-LM's scripts (branch core_r0.19.0) come from `$MEGATRON_LM`, else from `../shared/megatron-lm`
beside this checkout; the test is skipped, saying so, where neither exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(os.environ.get("MEGATRON_LM", ROOT.parent / "shared" / "megatron-lm"))
PATTERN, SEQ, VOCAB = "M*M-", 32, 256
MODEL_FLAGS = [
    "--hybrid-layer-pattern", PATTERN, "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--mamba-head-dim", "16", "--mamba-state-dim", "32", "--mamba-num-groups", "1",
    "--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", str(SEQ),
    "--max-position-embeddings", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1",
    "--lr", "1e-3", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
    "--hidden-dropout", "0", "--attention-dropout", "0", "--use-cpu-initialization", "--distributed-backend", "gloo",
    "--no-one-logger", "--eval-iters", "0",
]


def _launcher_args(spec: str) -> list[str]:
    printed = subprocess.run(
        ["bash", str(ROOT / "launch" / "megatron_lm.sh"), "--print-args"], env=dict(os.environ, SPEC=spec),
        capture_output=True, text=True, check=True,
    )
    return printed.stdout.splitlines()


def _build_and_run(rank: int, argv: list[str]) -> dict:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    sys.path.insert(0, str(SCRIPTS))
    from hybrid_builders import hybrid_builder  # Megatron-LM's, as pretrain_hybrid.py imports it
    from megatron.training import arguments

    from megatron_mamba3 import Mamba3Mixer, receipts

    # validate_args asks CUDA for the GPU architecture at TP > 1 (its CUDA_DEVICE_MAX_CONNECTIONS rule,
    # which the launcher's environment meets): answer Hopper's 9 in this CPU-only process.
    arguments.get_device_arch_version = lambda: 9
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", CUDA_DEVICE_MAX_CONNECTIONS="1")
    sys.argv = ["pretrain_hybrid.py", *argv]
    args = arguments.parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})  # as pretrain_hybrid.py
    model_parallel_cuda_manual_seed(args.seed)
    model = hybrid_builder(args, pre_process=True, post_process=True)
    mixers = [m for m in model.modules() if isinstance(m, Mamba3Mixer)]
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
    loss = model(tokens[:, :-1], None, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    return {
        "mixers": [(m.mamba3.mimo_rank, m.layout.tp_size, m.config.sequence_parallel) for m in mixers],
        "linears": sorted({type(m.in_proj).__name__ for m in mixers} | {type(m.out_proj).__name__ for m in mixers}),
        "receipts": sorted({(r.layer, r.backend) for r in receipts()}),
        "loss": loss.item(),
        "grads": all(p.grad is not None for m in mixers for p in m.parameters()),
    }


@pytest.mark.skipif(not (SCRIPTS / "hybrid_builders.py").exists(),
                    reason=f"Megatron-LM's scripts are not at {SCRIPTS} (set MEGATRON_LM to a core_r0.19.0 checkout)")
@pytest.mark.parametrize("spec, mimo_rank", [("mamba3_siso_stack_spec", 1), ("mamba3_mimo_stack_spec", 4)])
def test_megatron_lm_builds_the_mamba3_model_from_spec(spec, mimo_rank):
    ranks = run_ranks(_build_and_run, 2, _launcher_args(spec) + MODEL_FLAGS)
    for result in ranks:
        assert result["mixers"] == [(mimo_rank, 2, True)] * PATTERN.count("M")
        assert result["linears"] == ["ColumnParallelLinear", "RowParallelLinear"]
        assert result["receipts"] == [("decoder.layers.0.mixer", "reference"), ("decoder.layers.2.mixer", "reference")]
        assert torch.isfinite(torch.tensor(result["loss"])) and result["grads"]


@pytest.mark.skipif(not (SCRIPTS / "pretrain_hybrid.py").exists(), reason=f"Megatron-LM's scripts are not at {SCRIPTS}")
def test_launcher_stops_before_training_when_the_spec_does_not_import():
    env = dict(os.environ, MEGATRON_LM=str(SCRIPTS), PYTHON=sys.executable, SPEC="mamba3_missing_spec")
    run = subprocess.run(["bash", str(ROOT / "launch" / "megatron_lm.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "megatron_mamba3.layer_specs.mamba3_missing_spec does not import" in run.stderr
    assert "Megatron would silently train its default TE stack" in run.stderr
