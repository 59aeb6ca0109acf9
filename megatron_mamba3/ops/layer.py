"""The whole layer math from the in_proj output to the gated output (docs/math.md §1–2), backend-agnostic.

`params` maps the official parameter names (as in `mamba_ssm` Mamba3 state dicts, without the
"in_proj"/"out_proj" linears) to tensors; `init_layer_params` makes a fresh set.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mamba3.config import Mamba3Config
from megatron_mamba3.in_proj import InProjLayout
from megatron_mamba3.ops.interface import Mamba3Inputs, Mamba3State, Mamba3Weights, check_floating, compute_dtype
from megatron_mamba3.ops.scan import mamba3_scan
from megatron_mamba3.ops.toolkit.gate import rms_norm

Mamba3Params = Mapping[str, Tensor]
REQUIRED_PARAMS = frozenset({"dt_bias", "B_norm", "C_norm", "B_bias", "C_bias", "D"})


def decay_rate(dd_A: Tensor, A_floor: float) -> Tensor:
    """A = min(−f(dd_A), −A_floor) with f(u) = 1 + u for u ≥ 0 and 1 / (1 − u) for u < 0."""
    f = torch.where(dd_A >= 0, 1 + dd_A.clamp(min=0), 1 / (1 - dd_A.clamp(max=0)))
    return torch.clamp(-f, max=-A_floor)


def mamba3_layer(
    projected: Tensor,
    params: Mamba3Params,
    config: Mamba3Config,
    *,
    layout: InProjLayout | None = None,
    scan: Callable[..., tuple[Tensor, Mamba3State]] = mamba3_scan,
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

    layout: the `InProjLayout` of one tensor-parallel rank of `config`, whose `layout.width`
    columns `projected` holds (default: the whole in_proj); the output then has that rank's
    d_inner / tp columns. scan: `mamba3_scan` (default) or a function taking its arguments, such as
    the context-parallel `context_parallel.sequence_scan` bound to its group.
    """
    layout = InProjLayout(config) if layout is None else layout
    if layout.config != config:
        raise ValueError(f"layout is that of {layout.config}, not of the layer's {config}")
    check_floating("projected", projected)
    out, state = scan(
        scan_inputs(projected, params, layout),
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


def scan_inputs(projected: Tensor, params: Mamba3Params, layout: InProjLayout) -> Mamba3Inputs:
    """(..., layout.width) in_proj output, with or without the `l` dimension -> scan inputs (split by
    `layout.split`): Δ = softplus(dd_dt + dt_bias), A = `decay_rate(dd_A)`, B and C RMSNormed
    (eps 1e-5) by the shared B_norm / C_norm weights, in the compute dtype."""
    check_params(params)
    pieces = layout.split(projected)
    for name, expected in (("dt_bias", pieces.dd_dt.shape[-1:]), ("B_norm", pieces.B.shape[-1:]), ("C_norm", pieces.C.shape[-1:])):
        if params[name].shape != expected:
            raise ValueError(f"params[{name!r}] has shape {tuple(params[name].shape)}, expected {tuple(expected)}")
    dtype = compute_dtype(projected.dtype)
    dt = F.softplus(pieces.dd_dt.to(dtype) + params["dt_bias"].to(dtype))
    A = decay_rate(pieces.dd_A.to(dtype), layout.config.A_floor)
    B = rms_norm(pieces.B.to(dtype), params["B_norm"].to(dtype))
    C = rms_norm(pieces.C.to(dtype), params["C_norm"].to(dtype))
    return Mamba3Inputs(pieces.x, pieces.z, B, C, dt, A, pieces.trap, pieces.angles)


def scan_weights(params: Mamba3Params) -> Mamba3Weights:
    """The per-head weights the scan consumes, picked from `params` by their official names."""
    check_params(params)
    return Mamba3Weights(*(params.get(name) for name in Mamba3Weights._fields))


def check_params(params: Mamba3Params) -> None:
    missing = sorted(REQUIRED_PARAMS - params.keys())
    if missing:
        raise ValueError(f"params lacks {missing}; it needs {sorted(REQUIRED_PARAMS)} and the MIMO / norm ones in use")
