"""The reference chunked form (docs/math.md §3), the default backend's scan: `chunk_scan` over
fixed-size chunks, a short last chunk padded with identity steps."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mamba3.ops.interface import Mamba3Inputs, Mamba3State, Mamba3Weights, compute_dtype, read_dims
from megatron_mamba3.ops.toolkit.chunk import chunk_scan, pad_with_identity_steps
from megatron_mamba3.ops.toolkit.packing import run_packed


def mamba3_chunked(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    *,
    segment_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Mamba3State | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Mamba3State]:
    """Chunked scan over (b, l, ...) inputs -> (gated output (b, l, H, p), final state).

    Same contract as `mamba3_recurrent`; `chunk_size` never changes the result beyond rounding.
    Computes in fp32 for fp32/bf16 inputs (fp64 for fp64) and is differentiable. Arguments as
    `mamba3_scan` checks them.
    """
    return run_packed(
        partial(_chunked_rows, chunk_size=chunk_size), inputs, weights, read_dims(inputs),
        segment_ids=segment_ids, cu_seqlens=cu_seqlens, initial_state=initial_state,
    )


def _chunked_rows(
    inputs: Mamba3Inputs, weights: Mamba3Weights, starts: Tensor, state: Mamba3State, chunk_size: int
) -> tuple[Tensor, Mamba3State]:
    out_dtype, length = inputs.x.dtype, inputs.x.shape[1]
    dtype = compute_dtype(out_dtype)
    inputs, weights, state = inputs.to(dtype), weights.to(dtype), state.to(dtype)
    chunk_size = min(chunk_size, length)  # a short input is one chunk of its own length, unpadded
    pad = -length % chunk_size
    if pad:
        inputs = pad_with_identity_steps(inputs, pad)
        starts = F.pad(starts, (0, pad))
    outs = []
    for begin in range(0, length + pad, chunk_size):
        window = slice(begin, begin + chunk_size)
        out, state = chunk_scan(inputs.tokens(window), weights, starts[:, window], state)
        outs.append(out)
    return torch.cat(outs, dim=1)[:, :length].to(out_dtype), state
