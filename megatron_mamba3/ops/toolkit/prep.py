"""The per-token prep from the raw in_proj pieces to the scan's inputs (docs/math.md §1), in PyTorch: what
every backend that does not fuse it into its kernels (`Backend.fuses_prep`) receives already applied."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mamba3.ops.interface import Mamba3Inputs, Mamba3Prep, compute_dtype
from megatron_mamba3.ops.toolkit.gate import rms_norm


def decay_rate(dd_A: Tensor, A_floor: float) -> Tensor:
    """A = min(−f(dd_A), −A_floor) with f(u) = 1 + u for u ≥ 0 and 1 / (1 − u) for u < 0."""
    f = torch.where(dd_A >= 0, 1 + dd_A.clamp(min=0), 1 / (1 - dd_A.clamp(max=0)))
    return torch.clamp(-f, max=-A_floor)


def apply_prep(raw: Mamba3Inputs, prep: Mamba3Prep) -> Mamba3Inputs:
    """Raw inputs (dt, A, B, C as in_proj gives them) -> the scan's inputs: Δ = softplus(dt + dt_bias),
    A = `decay_rate`, B and C RMSNormed by B_norm / C_norm, all four in the compute dtype (fp32, fp64 for
    fp64 inputs); x, z, trap and angles pass unchanged."""
    dtype = compute_dtype(raw.x.dtype)
    return raw._replace(
        dt=F.softplus(raw.dt.to(dtype) + prep.dt_bias.to(dtype)),
        A=decay_rate(raw.A.to(dtype), prep.A_floor),
        B=rms_norm(raw.B.to(dtype), prep.B_norm.to(dtype)),
        C=rms_norm(raw.C.to(dtype), prep.C_norm.to(dtype)),
    )
