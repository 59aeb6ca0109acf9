"""Megatron's torch Adam fallback switched to torch's fused kernel.

Without Transformer Engine or apex, megatron-core 0.19.2 steps its fp32 main parameters with
`torch.optim.AdamW` (or `Adam`) made without `fused`, which on CUDA runs the foreach implementation: eight
passes over the parameters, moments and gradients per step (`_foreach_mul_` for the weight decay, `_lerp_`,
`_mul_`, `_addcmul_`, `_sqrt`, `_div_`, `_add_`, `_addcdiv_`). The fused implementation does the same update in
one pass, with the same hyperparameters; it rounds differently, so its steps are not bit-equal to foreach's.
Transformer Engine's and apex's `FusedAdam` are left as they are.
"""

from __future__ import annotations

import torch

TORCH_ADAMS = (torch.optim.Adam, torch.optim.AdamW)


def use_fused_adam(optimizer) -> int:
    """Set `fused=True` on every torch Adam/AdamW inside Megatron's `optimizer` (a `ChainedOptimizer`
    or one `MegatronOptimizer`; each wraps a torch optimizer as `.optimizer`) -> how many were switched.

    Call it before the first step: the fused kernel keeps each parameter's step count on the
    parameter's device, which the state of foreach steps does not. A checkpoint saved afterwards holds
    the setting in its parameter groups, and loading it restores it."""
    switched = 0
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = megatron_optimizer.optimizer
        if type(inner) in TORCH_ADAMS:
            for group in inner.param_groups:
                group["foreach"], group["fused"] = False, True
            switched += 1
    return switched
