"""The oracle: the Mamba-3 recurrence run token by token (`mamba3_step` in a loop). Use it in float64."""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_mamba3.ops.interface import Mamba3Inputs, Mamba3State, Mamba3Weights, read_dims
from megatron_mamba3.ops.oracle.step import mamba3_step
from megatron_mamba3.ops.toolkit.packing import run_packed


def mamba3_recurrent(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    *,
    segment_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Mamba3State | None = None,
) -> tuple[Tensor, Mamba3State]:
    """Sequential scan over (b, l, ...) inputs -> (gated output (b, l, H, p), final state).

    segment_ids: (b, l) packed documents per row; states are per row.
    cu_seqlens:  (N + 1,) THD documents in one row (b = 1); states are per document, (N, ...).
    Arguments as `mamba3_scan` checks them.
    """
    return run_packed(
        _recurrent_rows, inputs, weights, read_dims(inputs),
        segment_ids=segment_ids, cu_seqlens=cu_seqlens, initial_state=initial_state,
    )


def _recurrent_rows(
    inputs: Mamba3Inputs, weights: Mamba3Weights, starts: Tensor, state: Mamba3State
) -> tuple[Tensor, Mamba3State]:
    outs = []
    for t in range(inputs.x.shape[1]):
        start = starts[:, t]
        state = Mamba3State(*(field.masked_fill(start.view(-1, *[1] * (field.dim() - 1)), 0) for field in state))
        out, state = mamba3_step(inputs.tokens(t), weights, state)
        outs.append(out)
    return torch.stack(outs, dim=1), state
