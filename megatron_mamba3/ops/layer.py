"""The whole layer math from the in_proj output to the gated output (docs/math.md §1–2), backend-agnostic.

`params` maps the official parameter names (as in `mamba_ssm` Mamba3 state dicts, without the
"in_proj"/"out_proj" linears) to tensors; `init_layer_params` makes a fresh set.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mamba3.config import Mamba3Config
from megatron_mamba3.ops.interface import Mamba3Inputs, Mamba3State, Mamba3Weights, check_floating, compute_dtype
from megatron_mamba3.ops.scan import mamba3_scan
from megatron_mamba3.ops.toolkit.gate import rms_norm

Mamba3Params = Mapping[str, Tensor]
REQUIRED_PARAMS = frozenset({"dt_bias", "B_norm", "C_norm", "B_bias", "C_bias", "D"})


def decay_rate(dd_A: Tensor, A_floor: float) -> Tensor:
    """A = min(−f(dd_A), −A_floor) with f(u) = 1 + u for u ≥ 0 and 1 / (1 − u) for u < 0."""
    f = torch.where(dd_A >= 0, 1 + dd_A.clamp(min=0), 1 / (1 - dd_A.clamp(max=0)))
    return torch.clamp(-f, max=-A_floor)


def split_projection(projected: Tensor, config: Mamba3Config) -> tuple[Tensor, ...]:
    """(b, l, d_in_proj) -> z, x (b, l, H, p); B, C (b, l, R, G, n); dd_dt, dd_A, trap (b, l, H);
    angles (b, l, S). Columns follow the official order [z, x, B, C, dd_dt, dd_A, trap, angles]."""
    check_floating("projected", projected)
    if projected.shape[-1] != config.d_in_proj:
        raise ValueError(f"projected has width {projected.shape[-1]}, expected d_in_proj = {config.d_in_proj}")
    z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(projected, config.in_proj_sizes, dim=-1)
    lead = projected.shape[:-1]
    heads = (*lead, config.nheads, config.headdim)
    groups = (*lead, config.mimo_rank, config.ngroups, config.d_state)
    return z.reshape(heads), x.reshape(heads), B.reshape(groups), C.reshape(groups), dd_dt, dd_A, trap, angles


def mamba3_layer(
    projected: Tensor,
    params: Mamba3Params,
    config: Mamba3Config,
    *,
    segment_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Mamba3State | None = None,
    backend: str | None = None,
    variant: str | None = None,
    layer: str | None = None,
) -> tuple[Tensor, Mamba3State]:
    """in_proj output (b, l, d_in_proj) -> (gated output (b, l, d_inner) before out_proj, final state).

    Δ = softplus(dd_dt + dt_bias), A = `decay_rate(dd_A)`, B and C RMSNormed (eps 1e-5) by the
    shared B_norm / C_norm weights; the scan adds the per-head biases, rotates, runs the recurrence,
    adds D·v and gates (with the optional per-head RMSNorm `norm` and the MIMO projections).
    """
    z, x, B, C, dd_dt, dd_A, trap, angles = split_projection(projected, config)
    out, state = mamba3_scan(
        scan_inputs(z, x, B, C, dd_dt, dd_A, trap, angles, params, config.A_floor),
        scan_weights(params),
        segment_ids=segment_ids,
        cu_seqlens=cu_seqlens,
        initial_state=initial_state,
        chunk_size=config.scan_chunk_size,
        backend=backend,
        variant=variant,
        layer=layer,
    )
    return out.flatten(-2), state


def scan_inputs(
    z: Tensor, x: Tensor, B: Tensor, C: Tensor, dd_dt: Tensor, dd_A: Tensor, trap: Tensor, angles: Tensor,
    params: Mamba3Params, A_floor: float,
) -> Mamba3Inputs:
    """The split projection (shapes as `split_projection` gives, with or without the `l` dimension)
    -> scan inputs: Δ = softplus(dd_dt + dt_bias), A = `decay_rate(dd_A)`, B and C RMSNormed
    (eps 1e-5) by the shared B_norm / C_norm weights, in the compute dtype."""
    check_params(params)
    for name, expected in (("dt_bias", dd_dt.shape[-1:]), ("B_norm", B.shape[-1:]), ("C_norm", C.shape[-1:])):
        if params[name].shape != expected:
            raise ValueError(f"params[{name!r}] has shape {tuple(params[name].shape)}, expected {tuple(expected)}")
    dtype = compute_dtype(x.dtype)
    dt = F.softplus(dd_dt.to(dtype) + params["dt_bias"].to(dtype))
    A = decay_rate(dd_A.to(dtype), A_floor)
    B = rms_norm(B.to(dtype), params["B_norm"].to(dtype))
    C = rms_norm(C.to(dtype), params["C_norm"].to(dtype))
    return Mamba3Inputs(x, z, B, C, dt, A, trap, angles)


def scan_weights(params: Mamba3Params) -> Mamba3Weights:
    """The per-head weights the scan consumes, picked from `params` by their official names."""
    check_params(params)
    return Mamba3Weights(*(params.get(name) for name in Mamba3Weights._fields))


def check_params(params: Mamba3Params) -> None:
    missing = sorted(REQUIRED_PARAMS - params.keys())
    if missing:
        raise ValueError(f"params lacks {missing}; it needs {sorted(REQUIRED_PARAMS)} and the MIMO / norm ones in use")
