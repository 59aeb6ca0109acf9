"""The whole layer math from the in_proj output to the gated output (docs/math.md §1–2), backend-agnostic.

`params` maps the official parameter names (as in `mamba_ssm` Mamba3 state dicts, without the
"in_proj"/"out_proj" linears) to tensors; `init_layer_params` makes a fresh set.
"""

from __future__ import annotations

from typing import Callable, Mapping

from torch import Tensor

from megatron_mamba3.config import Mamba3Config
from megatron_mamba3.in_proj import InProjLayout
from megatron_mamba3.ops.interface import Mamba3Inputs, Mamba3Prep, Mamba3State, Mamba3Weights, check_floating
from megatron_mamba3.ops.scan import mamba3_scan
from megatron_mamba3.ops.toolkit.prep import apply_prep

Mamba3Params = Mapping[str, Tensor]
REQUIRED_PARAMS = frozenset({"dt_bias", "B_norm", "C_norm", "B_bias", "C_bias", "D"})


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
    shared B_norm / C_norm weights (the scan's `prep`, inside the kernels of a backend that fuses it);
    the scan adds the per-head biases, rotates, runs the recurrence,
    adds D·v and gates (with the optional per-head RMSNorm `norm` and the MIMO projections).

    layout: the `InProjLayout` of one tensor-parallel rank of `config`, whose `layout.width`
    columns `projected` holds (default: the whole in_proj); the output then has that rank's
    d_inner / tp columns. scan: `mamba3_scan` (default) or a function taking its arguments, such as
    the context-parallel `context_parallel.sequence_scan` bound to its group (it gets the raw pieces and
    `prep=`, a `Mamba3Prep`).
    """
    layout = InProjLayout(config) if layout is None else layout
    if layout.config != config:
        raise ValueError(f"layout is that of {layout.config}, not of the layer's {config}")
    check_floating("projected", projected)
    out, state = scan(
        raw_inputs(projected, params, layout),
        scan_weights(params),
        prep=scan_prep(params, layout.config),
        segment_ids=segment_ids,
        cu_seqlens=cu_seqlens,
        initial_state=initial_state,
        chunk_size=config.scan_chunk_size,
        backend=backend,
        variant=variant,
        layer=layer,
    )
    return out.flatten(-2), state


def raw_inputs(projected: Tensor, params: Mamba3Params, layout: InProjLayout) -> Mamba3Inputs:
    """(..., layout.width) in_proj output, with or without the `l` dimension -> the scan's inputs before the
    prep (views of `projected` split by `layout.split`: dt is dd_dt, A is dd_A, B and C not yet normed)."""
    check_params(params)
    pieces = layout.split(projected)
    for name, expected in (("dt_bias", pieces.dd_dt.shape[-1:]), ("B_norm", pieces.B.shape[-1:]), ("C_norm", pieces.C.shape[-1:])):
        if params[name].shape != expected:
            raise ValueError(f"params[{name!r}] has shape {tuple(params[name].shape)}, expected {tuple(expected)}")
    return Mamba3Inputs(pieces.x, pieces.z, pieces.B, pieces.C, pieces.dd_dt, pieces.dd_A, pieces.trap, pieces.angles)


def scan_prep(params: Mamba3Params, config: Mamba3Config) -> Mamba3Prep:
    """The layer's `Mamba3Prep`: dt_bias, B_norm and C_norm from `params`, A_floor from `config`."""
    return Mamba3Prep(params["dt_bias"], params["B_norm"], params["C_norm"], config.A_floor)


def scan_inputs(projected: Tensor, params: Mamba3Params, layout: InProjLayout) -> Mamba3Inputs:
    """`raw_inputs` with the prep applied in PyTorch (`apply_prep`): Δ = softplus(dd_dt + dt_bias),
    A = `decay_rate(dd_A)`, B and C RMSNormed (eps 1e-5) by the shared B_norm / C_norm weights, in the
    compute dtype. For the decode step and the context-parallel summaries."""
    return apply_prep(raw_inputs(projected, params, layout), scan_prep(params, layout.config))


def scan_weights(params: Mamba3Params) -> Mamba3Weights:
    """The per-head weights the scan consumes, picked from `params` by their official names."""
    check_params(params)
    return Mamba3Weights(*(params.get(name) for name in Mamba3Weights._fields))


def check_params(params: Mamba3Params) -> None:
    missing = sorted(REQUIRED_PARAMS - params.keys())
    if missing:
        raise ValueError(f"params lacks {missing}; it needs {sorted(REQUIRED_PARAMS)} and the MIMO / norm ones in use")
