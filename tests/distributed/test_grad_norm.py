"""The gradient norm Megatron clips by does not depend on the TP size (gloo, CPU, fp32).

The same step (full weights, input and output gradient; SISO and MIMO, B/C replicated at g = 1 and
split or replicated at g = 2, with and without sequence parallelism) at TP = 1, 2 and 4, through
Megatron's own `FP32Optimizer.get_grad_norm` (its duplicate filter and its reduction over the
model-parallel group; on the CPU through the `cpu_optimizer` patch). The oracle is the TP = 1 norm,
itself checked against the plain 2-norm of every gradient. Weights held on every TP rank (in_proj's
replicated rows, B_norm, C_norm) must count once: counted once per rank they made the norm grow with
TP (0.82904 / 0.82964 / 0.83085 at TP 1 / 2 / 4 in a training step before the fix).
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer import FP32Optimizer

from tests.distributed.harness import run_ranks
from tests.distributed.mixers import MixerCase, build_mixer, forward_backward, full_weights, load_full

pytestmark = pytest.mark.distributed

FP32_TOL = 1e-5
CASES = [MixerCase(1, 1), MixerCase(4, 1), MixerCase(4, 2)]


def _norms(_rank: int, tp: int) -> dict:
    norms = {}
    for case in CASES:
        for sequence_parallel in (False, True) if tp > 1 else (False,):
            mixer = build_mixer(case.config, tp, sequence_parallel)
            load_full(mixer, full_weights(mixer.mamba3))
            forward_backward(mixer, case, sequence_parallel)
            optimizer = FP32Optimizer(torch.optim.SGD(mixer.parameters(), lr=0.0), OptimizerConfig(), init_state_fn=None)
            norms[case, sequence_parallel] = {
                "megatron": float(optimizer.get_grad_norm()),
                "plain": float(torch.cat([p.grad.flatten() for p in mixer.parameters()]).norm()),
            }
    return norms


@pytest.fixture(scope="module")
def norms() -> dict[int, dict]:
    """Rank 0's norms by TP size."""
    return {tp: run_ranks(_norms, tp, tp)[0] for tp in (1, 2, 4)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"R{c.mimo_rank}-g{c.ngroups}")
def test_tp1_norm_is_the_plain_norm(norms, case):
    result = norms[1][case, False]
    assert abs(result["megatron"] - result["plain"]) <= FP32_TOL * result["plain"]


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"R{c.mimo_rank}-g{c.ngroups}")
@pytest.mark.parametrize("tp", [2, 4])
def test_grad_norm_does_not_depend_on_tp(norms, tp, case, sequence_parallel):
    expected = norms[1][case, False]["megatron"]
    assert abs(norms[tp][case, sequence_parallel]["megatron"] - expected) <= FP32_TOL * expected
