"""Data-dependent rotation of keys and queries with the official pairing (docs/math.md §2).

SISO rotates adjacent pairs (2j, 2j + 1); MIMO rotates half-split pairs (j, n/2 + j); in both, pairs
j < S turn by θ_j and the remaining entries pass unchanged. Each pair (a, b) becomes
(a·cos θ − b·sin θ, a·sin θ + b·cos θ).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotate(u: Tensor, theta: Tensor, half_split: bool) -> Tensor:
    """Rotate (..., n) vectors `u` by (..., S) angles `theta` (broadcast); `half_split` for MIMO."""
    S, n = theta.shape[-1], u.shape[-1]
    cos, sin = torch.cos(theta), torch.sin(theta)
    if half_split:
        first, second = u[..., :S], u[..., n // 2 : n // 2 + S]
        return torch.cat(
            (
                first * cos - second * sin,
                u[..., S : n // 2],
                first * sin + second * cos,
                u[..., n // 2 + S :],
            ),
            dim=-1,
        )
    even, odd = u[..., 0 : 2 * S : 2], u[..., 1 : 2 * S : 2]
    pairs = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return torch.cat((pairs.flatten(-2), u[..., 2 * S :]), dim=-1)
