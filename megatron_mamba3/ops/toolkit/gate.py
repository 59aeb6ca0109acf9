"""The output gate (docs/math.md §2, Output): optional per-head RMSNorm, SiLU gate and the MIMO down-projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mamba3.ops.interface import Mamba3Weights

NORM_EPS = 1e-5


def rms_norm(u: Tensor, weight: Tensor | None, eps: float = NORM_EPS) -> Tensor:
    """RMSNorm over the last dimension of `u`, scaled by `weight` (broadcast) when given."""
    normed = u * torch.rsqrt(u.square().mean(dim=-1, keepdim=True) + eps)
    return normed if weight is None else normed * weight


def gate_output(y: Tensor, z: Tensor, weights: Mamba3Weights) -> Tensor:
    """Per-rank outputs (..., R, H, p) and gate z (..., H, p) -> gated output (..., H, p).

    SISO: o = norm(y) ⊙ silu(z). MIMO: o = Σ_r mimo_o[r] ⊙ norm(y_r) ⊙ silu(z ⊙ mimo_z[r]),
    where norm is the per-head RMSNorm of `weights.norm` when given, else the identity.
    """
    H, p = y.shape[-2:]
    if weights.norm is not None:
        y = rms_norm(y, weights.norm.view(H, p))
    z = z.unsqueeze(-3)
    if weights.mimo_z is None:
        return (y * F.silu(z)).squeeze(-3)
    gated = y * F.silu(z * weights.mimo_z.transpose(0, 1))
    return (gated * weights.mimo_o.transpose(0, 1)).sum(dim=-3)
