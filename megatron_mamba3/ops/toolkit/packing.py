"""Runs a row scan over a batch, over `segment_ids`-packed rows, or over `cu_seqlens` documents.

A row scan maps (inputs (b, l, ...), weights, starts (b, l) bool, state) to (out (b, l, H, p), state):
it resets the state to zero wherever `starts` is set. With `cu_seqlens` (THD layout, b = 1) every
document runs alone from its own initial state, and states are per document: (N, ...). Arguments
as `mamba3_scan` checks them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from megatron_mamba3.ops.interface import (
    Mamba3Inputs,
    Mamba3State,
    Mamba3Weights,
    ScanDims,
)
from megatron_mamba3.ops.segments import document_bounds, document_starts

RowScan = Callable[[Mamba3Inputs, Mamba3Weights, Tensor, Mamba3State], tuple[Tensor, Mamba3State]]


def row_starts_and_state(
    inputs: Mamba3Inputs, dims: ScanDims, segment_ids: Tensor | None, initial_state: Mamba3State | None
) -> tuple[Tensor, Mamba3State]:
    """Rows packed by `segment_ids` (or unpacked when None) -> (document starts (b, l) bool, the
    initial state or zeros in the compute dtype), on the inputs' device."""
    device = inputs.x.device
    if segment_ids is None:
        starts = torch.zeros(dims.b, dims.l, dtype=torch.bool, device=device)
    else:
        starts = document_starts(segment_ids.to(device))
    return starts, Mamba3State.given_or_zeros(initial_state, dims.b, dims, inputs.x)


def run_packed(
    row_scan: RowScan,
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    dims: ScanDims,
    *,
    segment_ids: Tensor | None,
    cu_seqlens: Tensor | None,
    initial_state: Mamba3State | None,
) -> tuple[Tensor, Mamba3State]:
    """Apply `row_scan` under the packing given; returns (out (b, l, H, p), final state)."""

    def document_state(index: int) -> Mamba3State:
        given = None if initial_state is None else initial_state.rows(index)
        return Mamba3State.given_or_zeros(given, 1, dims, inputs.x)

    def scan_rows(rows: Mamba3Inputs, starts: Tensor, state: Mamba3State) -> tuple[Tensor, Mamba3State]:
        if rows.x.shape[1] == 0:
            return rows.x, state
        return row_scan(rows, weights, starts, state)

    if cu_seqlens is None:
        return scan_rows(inputs, *row_starts_and_state(inputs, dims, segment_ids, initial_state))

    bounds = document_bounds(cu_seqlens, dims.l)
    outs, finals = [], []
    for index, (begin, end) in enumerate(bounds):
        no_starts = torch.zeros(1, end - begin, dtype=torch.bool, device=inputs.x.device)
        out, final = scan_rows(inputs.tokens(slice(begin, end)), no_starts, document_state(index))
        outs.append(out)
        finals.append(final)
    return torch.cat(outs, dim=1), Mamba3State(*(torch.cat(field, dim=0) for field in zip(*finals)))
