"""`mamba3_scan` and `mamba3_decode`: one entry point per step kind for every backend; each checks the
arguments (once, for every backend), selects, runs and writes the receipt (docs/backends.md)."""

from __future__ import annotations

from torch import Tensor

from megatron_mamba3.ops.interface import (
    Mamba3Inputs,
    Mamba3Prep,
    Mamba3State,
    Mamba3Weights,
    check_chunk_size,
    check_prep,
    check_state,
    scan_dims,
)
from megatron_mamba3.ops.registry import select_decoder, select_variant
from megatron_mamba3.ops.segments import check_cu_seqlens
from megatron_mamba3.ops.toolkit.prep import apply_prep
from megatron_mamba3.receipt_log import Receipt, record


def _shapes(inputs: Mamba3Inputs) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((name, tuple(t.shape)) for name, t in zip(inputs._fields, inputs))


def mamba3_scan(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    *,
    prep: Mamba3Prep | None = None,
    segment_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Mamba3State | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
    variant: str | None = None,
    layer: str | None = None,
) -> tuple[Tensor, Mamba3State]:
    """Run the Mamba-3 scan: (b, l, ...) inputs -> (gated output (b, l, H, p), final state).

    See `Mamba3Inputs` / `Mamba3Weights` / `Mamba3State` for shapes. Packing: `segment_ids` (b, l)
    with per-row states (the initial state continues each row's first document; the final state is
    the state after its last token), or `cu_seqlens` (N + 1,) with b = 1 and per-document states
    (N, ...). Without either, each row is one sequence.
    `prep` (a `Mamba3Prep`): the inputs' dt, A, B and C are raw in_proj pieces, to be prepped (softplus,
    decay rate, RMSNorm) inside the kernels of a backend that fuses it, else by `apply_prep` first.
    `chunk_size` (an int in [1, 1024]) is the chunk length of the reference and XLA scans; it never
    changes the result beyond rounding.
    `backend`/`variant` pick the implementation (default: `MEGATRON_MAMBA3_BACKEND` or "auto", see
    `registry`); `layer` names the caller in the receipt. Bad arguments raise before any backend runs.
    """
    # What every backend relies on, checked once here; a backend checks only what is its own.
    check_chunk_size(chunk_size)
    if segment_ids is not None and cu_seqlens is not None:
        raise ValueError("pass either segment_ids or cu_seqlens, not both")
    dims = scan_dims(inputs, weights)
    states = dims.b
    if segment_ids is not None and tuple(segment_ids.shape) != (dims.b, dims.l):
        raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected (b, l) = {(dims.b, dims.l)}")
    if cu_seqlens is not None:
        if dims.b != 1:
            raise ValueError(f"cu_seqlens packs documents into one row; got batch b={dims.b}, expected 1")
        check_cu_seqlens(cu_seqlens, dims.l)
        states = cu_seqlens.numel() - 1
    if initial_state is not None:
        check_state(initial_state, states, dims)
    if prep is not None:
        check_prep(prep, dims)
    chosen, implementation = select_variant(backend, variant, inputs)
    fused = {}  # the prep, for a backend that runs it in its kernels
    if prep is not None:
        if chosen.fuses_prep:
            fused["prep"] = prep
        else:
            inputs = apply_prep(inputs, prep)
    out, state = implementation.fn(
        inputs, weights,
        segment_ids=segment_ids, cu_seqlens=cu_seqlens, initial_state=initial_state, chunk_size=chunk_size, **fused,
    )
    dtype = str(inputs.x.dtype).removeprefix("torch.")
    record(Receipt(
        layer, "forward", chosen.name, implementation.name, dtype, _shapes(inputs), chosen.compile_count(), bool(fused),
        chosen.path(inputs),
    ))
    return out, state


def mamba3_decode(
    inputs: Mamba3Inputs, weights: Mamba3Weights, state: Mamba3State, *, layer: str | None = None
) -> tuple[Tensor, Mamba3State]:
    """One decode step: per-token inputs without `l` (x: (b, H, p), ...) and the running state ->
    (gated output (b, H, p), new state). Runs the step of the backend `registry.select_decoder`
    names (today the reference's, on the inputs' device) and records a "decode" receipt saying so."""
    dims = scan_dims(inputs, weights, per_token=True)
    check_state(state, dims.b, dims, name="state")
    chosen = select_decoder(inputs)
    out, state = chosen.decode(inputs, weights, state)
    dtype = str(inputs.x.dtype).removeprefix("torch.")
    record(Receipt(layer, "decode", chosen.name, "step", dtype, _shapes(inputs)))
    return out, state
