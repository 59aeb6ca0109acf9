"""Gradients kept in persistent `param.main_grad` buffers, as Megatron-Core's DistributedDataParallel keeps
them: the layout its local CUDA graphs need (`cuda_graph_impl="local"`), whose captured backward adds each
weight gradient into `param.main_grad` and hands autograd none.

Megatron's mixed-precision optimizer reads `main_grad` when a parameter has one, so the step is the same as
with gradients in `param.grad`: a buffer in the parameter's dtype, zeroed before each step, receives the
one gradient of that step.
"""

from __future__ import annotations

import torch


def attach_main_grads(module: torch.nn.Module) -> list[torch.Tensor]:
    """Give every trainable parameter of `module` a zeroed `main_grad` (its shape and dtype) and a hook that
    moves each gradient autograd accumulates into it (leaving `param.grad` None) -> the buffers, to zero
    with `torch._foreach_zero_` before each step."""
    buffers = []
    for param in module.parameters():
        if param.requires_grad:
            param.main_grad = torch.zeros_like(param)
            param.register_post_accumulate_grad_hook(_move_into_main_grad)
            buffers.append(param.main_grad)
    return buffers


def _move_into_main_grad(param: torch.Tensor) -> None:
    if param.grad is not None:  # None after a replayed graph's backward: it added its gradient itself
        param.main_grad.add_(param.grad)
        param.grad = None
