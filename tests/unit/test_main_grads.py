"""launch/main_grads.py: gradients in persistent `param.main_grad` buffers (train.py --cuda-graph).

Oracle: plain autograd's `param.grad` on an identical copy of the model, same inputs.
- After one backward, and after a second one accumulating, each buffer equals the oracle's gradient
  bit for bit and `param.grad` is left None; a frozen parameter gets no buffer.
- A layer that adds its weight gradient into `main_grad` itself and hands autograd none (what a replayed
  Megatron CUDA graph's backward does, so autograd runs the hook with `param.grad` None) leaves the
  buffer as that layer wrote it.
"""

from __future__ import annotations

import copy

import torch

from tests.helpers import launch_module

main_grads = launch_module("main_grads")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model[2].bias.requires_grad_(False)
    return model


def test_buffers_hold_what_autograd_would_accumulate():
    model, oracle = _model(), _model()
    buffers = main_grads.attach_main_grads(model)
    assert len(buffers) == 3 and not hasattr(model[2].bias, "main_grad")
    inputs = [torch.randn(4, 5, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    for x in inputs:
        model(x).square().sum().backward()
        oracle(x).square().sum().backward()
        for param, reference in zip(model.parameters(), oracle.parameters()):
            if param.requires_grad:
                assert param.grad is None
                assert torch.equal(param.main_grad, reference.grad)
    torch._foreach_zero_(buffers)
    assert all(not b.any() for b in buffers)


class _AddsItsOwnWeightGradient(torch.autograd.Function):
    """y = x @ w.T, whose backward adds dw into w.main_grad and returns no gradient for w."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ weight.T

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        weight.main_grad.add_(grad.T @ x)
        return grad @ weight, None


def test_a_layer_that_adds_its_own_gradient_is_left_alone():
    model = torch.nn.Linear(5, 3, bias=False)
    oracle = copy.deepcopy(model)
    main_grads.attach_main_grads(model)
    x = torch.randn(4, 5, requires_grad=True)
    _AddsItsOwnWeightGradient.apply(x, model.weight).square().sum().backward()
    oracle(x).square().sum().backward()
    assert model.weight.grad is None
    assert torch.equal(model.weight.main_grad, oracle.weight.grad)
