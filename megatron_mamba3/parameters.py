"""Fresh per-layer parameters with the official initialisation (docs/math.md §1), under the official names."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megatron_mamba3.config import Mamba3Config


def init_dt_bias(config: Mamba3Config, nheads: int, generator: torch.Generator | None = None) -> Tensor:
    """(nheads,) inverse-softplus of Δ0, Δ0 log-uniform in [dt_min, dt_max] and clamped >= dt_floor."""
    low, high = math.log(config.dt_min), math.log(config.dt_max)
    dt0 = torch.exp(torch.rand(nheads, generator=generator, dtype=torch.float32) * (high - low) + low)
    dt0 = dt0.clamp(min=config.dt_floor)
    return dt0 + torch.log(-torch.expm1(-dt0))


def init_layer_params(config: Mamba3Config, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Every parameter of one layer except in_proj / out_proj, as fp32 CPU tensors keyed by official name.

    dt_bias (H); B_norm, C_norm (n) = 1; B_bias, C_bias (H, R, n) = 1; D (H) = 1;
    MIMO: mimo_x (H, R, p) = 1/R, mimo_z = 1, mimo_o = 1/R; is_outproj_norm: norm (d_inner) = 1.
    """
    H, R, n, p = config.nheads, config.mimo_rank, config.d_state, config.headdim
    params = {
        "dt_bias": init_dt_bias(config, H, generator),
        "B_norm": torch.ones(n),
        "C_norm": torch.ones(n),
        "B_bias": torch.ones(H, R, n),
        "C_bias": torch.ones(H, R, n),
        "D": torch.ones(H),
    }
    if config.is_mimo:
        params["mimo_x"] = torch.full((H, R, p), 1.0 / R)
        params["mimo_z"] = torch.ones(H, R, p)
        params["mimo_o"] = torch.full((H, R, p), 1.0 / R)
    if config.is_outproj_norm:
        params["norm"] = torch.ones(config.d_inner)
    return params
