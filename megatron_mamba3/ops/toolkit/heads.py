"""Per-head keys, queries and values built from the inputs that heads share (docs/math.md §2).

k_{t,r} = rot(θ_t, B_{t,r} + B_bias[h, r]), q likewise from C, and v_{t,r} = x_t ⊙ mimo_x[h, r].
`state_with_incoming` adds the incoming state's previous (k, v) to its h, as chunked forms start from.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_mamba3.ops.toolkit.rotary import rotate


def head_inputs(shared: Tensor, bias: Tensor) -> Tensor:
    """The unrotated keys or queries: normalized B or C (..., R, G, n) read per head (head h reads group
    h // (H / G)) plus bias (H, R, n) -> (..., R, H, n)."""
    H, G = bias.shape[0], shared.shape[-2]
    if G == 1:  # (..., R, 1, n) broadcasts over the heads
        return shared + bias.transpose(0, 1)
    return (shared.unsqueeze(-2) + bias.transpose(0, 1).unflatten(-2, (G, H // G))).flatten(-3, -2)


def head_keys(shared: Tensor, bias: Tensor, theta: Tensor) -> Tensor:
    """Normalized B or C (..., R, G, n), bias (H, R, n), angles (..., H, S) -> (..., R, H, n): `head_inputs`
    rotated by θ; rank > 1 (MIMO) selects the half-split rotary pairing."""
    return rotate(head_inputs(shared, bias), theta.unsqueeze(-3), half_split=shared.shape[-3] > 1)


def rank_values(x: Tensor, mimo_x: Tensor | None) -> Tensor:
    """x (..., H, p) -> per-rank values (..., R, H, p); SISO (no mimo_x) gives R = 1."""
    v = x.unsqueeze(-3)
    return v if mimo_x is None else v * mimo_x.transpose(0, 1)


def state_with_incoming(h: Tensor, k_prev: Tensor, v_prev: Tensor, mimo_x: Tensor | None, weight: Tensor) -> Tensor:
    """h̃ = h + weight · Σ_r v_prev,r k_prev,rᵀ: h (b, H, p, n), k_prev (b, R, H, n), raw v_prev
    (b, H, p), weight (b, H) = (1 − λ)Δ of the first token -> (b, H, p, n)."""
    incoming = torch.einsum("brhp,brhn->hbpn", rank_values(v_prev, mimo_x), k_prev).transpose(0, 1)  # head-major fold
    return h + weight.reshape(*weight.shape, 1, 1) * incoming
