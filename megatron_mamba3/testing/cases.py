"""Random scan inputs, weights and states with realistic value ranges (float64 draws from a seeded
generator, cast to the dtype asked for)."""

from __future__ import annotations

import math

import torch

from megatron_mamba3.ops import Mamba3Inputs, Mamba3State, Mamba3Weights
from megatron_mamba3.ops.toolkit.gate import rms_norm
from megatron_mamba3.ops.toolkit.prep import decay_rate


def make_case(
    b: int = 2,
    l: int = 37,  # noqa: E741
    H: int = 4,
    p: int = 8,
    R: int = 1,
    G: int = 2,
    n: int = 16,
    S: int | None = None,
    norm: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[Mamba3Inputs, Mamba3Weights]:
    """Scan inputs and weights; S defaults to n/4 (rope_fraction 0.5)."""
    S = n // 4 if S is None else S
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = Mamba3Inputs(
        x=randn(b, l, H, p),
        z=randn(b, l, H, p),
        B=rms_norm(randn(b, l, R, G, n), None),
        C=rms_norm(randn(b, l, R, G, n), None),
        dt=torch.nn.functional.softplus(randn(b, l, H) - 2.0),
        A=decay_rate(randn(b, l, H), 1e-4),
        trap=randn(b, l, H),
        angles=2 * randn(b, l, S),
    )
    mimo = R > 1
    weights = Mamba3Weights(
        B_bias=1 + 0.3 * randn(H, R, n),
        C_bias=1 + 0.3 * randn(H, R, n),
        D=1 + 0.3 * randn(H),
        mimo_x=(1 + 0.3 * randn(H, R, p)) / R if mimo else None,
        mimo_z=1 + 0.3 * randn(H, R, p) if mimo else None,
        mimo_o=(1 + 0.3 * randn(H, R, p)) / R if mimo else None,
        norm=1 + 0.3 * randn(H * p) if norm else None,
    )
    return inputs.to(dtype), weights.to(dtype)


def make_state(batch: int, H: int, p: int, R: int, n: int, S: int, seed: int = 1) -> Mamba3State:
    """A random float64 state, as a previous run could have left it."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    theta = torch.rand(batch, H, S, generator=g, dtype=torch.float64) * 2 * math.pi
    return Mamba3State(0.3 * randn(batch, H, p, n), randn(batch, R, H, n), randn(batch, H, p), theta)


def rel_err(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max |actual − expected| / max |scale|, in float64; `scale` defaults to `expected`."""
    actual, expected = actual.double(), expected.double()
    scale = expected if scale is None else scale.double()
    return ((actual - expected).abs().max() / scale.abs().max()).item()
