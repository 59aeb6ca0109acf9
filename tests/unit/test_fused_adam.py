"""launch/fused_adam.py: Megatron's torch Adam fallback switched to torch's fused kernel.

Oracle: torch's single-tensor AdamW (`foreach=False, fused=False`, the for-loop implementation) on a copy
of the same parameters and gradients. The switched optimizer runs `torch._fused_adamw_` (counted through a
wrapper) and its parameters stay within fp32 rounding of the oracle's (relative 1e-6, the update's own
rounding differs: the oracle computes the bias corrections in Python floats); switched after two foreach
steps on the CPU, it continues the oracle's trajectory; an optimizer that is no torch Adam is left alone.
A resumed run keeps the setting (its checkpoint's parameter groups hold it): tests/distributed/test_train.py's
resumed losses equal the uninterrupted run's bit for bit, which foreach steps after the resume would break.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers import launch_module

fused_adam = launch_module("fused_adam")

SETTINGS = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
STEPS = 5


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((64, 32), (32,), (7,))]


def _gradients(step: int, params) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=generator) for p in params]


def _run(optimizer, params, steps) -> None:
    for step in steps:
        for param, grad in zip(params, _gradients(step, params)):
            param.grad = grad
        optimizer.step()


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    kernel = torch._fused_adamw_

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counted)
    return calls


@pytest.mark.parametrize("foreach_steps", [0, 2], ids=["from-the-start", "after-two-foreach-steps"])
def test_switched_adam_runs_fused_and_follows_the_oracle(fused_calls, foreach_steps):
    params, oracle_params = _params(), _params()
    inner = torch.optim.AdamW(params, **SETTINGS)  # as megatron-core builds it: neither fused nor foreach given
    oracle = torch.optim.AdamW(oracle_params, foreach=False, fused=False, **SETTINGS)
    _run(inner, params, range(foreach_steps))
    assert not fused_calls
    chained = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=inner)])
    assert fused_adam.use_fused_adam(chained) == 1
    _run(inner, params, range(foreach_steps, STEPS))
    _run(oracle, oracle_params, range(STEPS))
    assert fused_calls == [len(params)] * (STEPS - foreach_steps)
    for param, reference in zip(params, oracle_params):
        torch.testing.assert_close(param.detach(), reference.detach(), rtol=1e-6, atol=0)


def test_other_optimizers_are_left_alone():
    sgd = torch.optim.SGD(_params(), lr=0.1)
    assert fused_adam.use_fused_adam(SimpleNamespace(optimizer=sgd)) == 0
    assert "fused" not in sgd.param_groups[0] or not sgd.param_groups[0]["fused"]
