"""One decode step of the Mamba-3 recurrence, written straight from docs/math.md §2."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megatron_mamba3.ops.interface import (
    TWO_PI,
    Mamba3Inputs,
    Mamba3State,
    Mamba3Weights,
    compute_dtype,
)
from megatron_mamba3.ops.toolkit.gate import gate_output
from megatron_mamba3.ops.toolkit.heads import head_keys, rank_values


def mamba3_step(inputs: Mamba3Inputs, weights: Mamba3Weights, state: Mamba3State) -> tuple[Tensor, Mamba3State]:
    """Advance `state` by one token. `inputs` carry no length dimension (x: (b, H, p), B: (b, R, G, n), ...);
    arguments as `mamba3_decode` checks them.

    Returns the gated output (b, H, p) in x's dtype and the new state (fp32, or fp64 for fp64 inputs):
        Δ, A as given;  α = exp(AΔ);  λ = sigmoid(trap);  β = (1 − λ)Δα;  γ = λΔ
        θ ← θ + π·tanh(angles)·Δ;  k_r, q_r = rot(θ, B_r + B_bias_r), rot(θ, C_r + C_bias_r)
        h ← α h + β Σ_r v_prev,r k_prev,rᵀ + γ Σ_r v_r k_rᵀ;   y_r = h q_r + D v_r
    """
    dtype = compute_dtype(inputs.x.dtype)
    x, z, B, C, dt, A, trap, angles = inputs.to(dtype)
    weights = weights.to(dtype)
    h, k_prev, v_prev, theta = state.to(dtype)

    lam = torch.sigmoid(trap)
    alpha = torch.exp(A * dt)
    beta = ((1 - lam) * dt * alpha)[..., None, None]
    gamma = (lam * dt)[..., None, None]
    theta = theta + math.pi * torch.tanh(angles).unsqueeze(-2) * dt.unsqueeze(-1)
    k = head_keys(B, weights.B_bias, theta)
    q = head_keys(C, weights.C_bias, theta)
    v = rank_values(x, weights.mimo_x)
    prev_kv = torch.einsum("brhp,brhn->bhpn", rank_values(v_prev, weights.mimo_x), k_prev)
    h = alpha[..., None, None] * h + beta * prev_kv + gamma * torch.einsum("brhp,brhn->bhpn", v, k)
    y = torch.einsum("bhpn,brhn->brhp", h, q) + weights.D[:, None] * v
    out = gate_output(y, z, weights)
    return out.to(inputs.x.dtype), Mamba3State(h, k, x, torch.remainder(theta, TWO_PI))
