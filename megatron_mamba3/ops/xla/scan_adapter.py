"""The Mamba-3 scan on XLA (docs/backends.md, XLA): the toolkit's `chunk_scan` as the body of a
`torch_xla.experimental.scan` over chunks, so the traced graph holds one chunk, not the sequence.
The backward recomputes a chunk from its inputs and entering state (activation checkpointing).

Compile key (static): the shapes (b, l, H, p, R, G, n, S), the dtype, `chunk_size` c, which optional
weights are present, and the packing kind (none, `segment_ids`, or `cu_seqlens` with N documents).
Runtime data (never Python values in the trace): segment ids, `cu_seqlens` offsets, states. So a
new document layout of the same shapes reuses the compiled graphs; a new c or l compiles new ones.

Layout: the inputs are padded to K = ceil(l / c) chunks with Δ = 0 identity steps and split into
(K, b, c, ...). The scan carries (h, k_prev, θ) and the weights: weights ride along unchanged so that
scan's autograd returns their gradient summed over chunks (tensors the body closes over would be
traced as constants and get no gradient). v_prev travels with each chunk as data.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils._pytree import tree_map

from megatron_mamba3.ops.interface import (
    Mamba3Inputs,
    Mamba3State,
    Mamba3Weights,
    ScanDims,
    compute_dtype,
    read_dims,
)
from megatron_mamba3.ops.segments import document_starts, segment_ids_from_cu_seqlens
from megatron_mamba3.ops.toolkit.chunk import chunk_scan, pad_with_identity_steps
from megatron_mamba3.ops.toolkit.packing import row_starts_and_state
from megatron_mamba3.ops.xla.partition import recompute_body

logger = logging.getLogger(__name__)

# How the chunk scan splits forward and backward: recompute each chunk, saving its entering carry
# (SISO H8 p64 n128, c = 64: 0.26 MiB per chunk instead of the default partition's 4.06 MiB).
PARTITION = recompute_body


def mamba3_xla_scan(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    *,
    segment_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Mamba3State | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Mamba3State]:
    """(b, l, ...) inputs on an XLA device -> (gated output (b, l, H, p), final state); the contract
    of `mamba3_scan`, computed in fp32 (fp64 for fp64 inputs) and differentiable.

    `segment_ids` (b, l): per-row states. `cu_seqlens` (N + 1,) with b = 1: run as one row of
    segment ids; final states per document (N, ...); per-document initial states are refused
    (ValueError). Arguments as `mamba3_scan` checks them: offsets on the device only with
    MEGATRON_MAMBA3_DEBUG=1, so wrong ones there give wrong results instead of an error.
    """
    dims = read_dims(inputs)
    if cu_seqlens is not None:
        return _scan_documents(inputs, weights, cu_seqlens, initial_state, chunk_size, dims)
    starts, state = row_starts_and_state(inputs, dims, segment_ids, initial_state)
    if dims.l == 0:
        return inputs.x, state
    return _scan_chunks(inputs, weights, starts, state, chunk_size)


def _scan_documents(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    cu_seqlens: Tensor,
    initial_state: Mamba3State | None,
    chunk_size: int,
    dims: ScanDims,
) -> tuple[Tensor, Mamba3State]:
    """THD packing: one row whose documents start where `cu_seqlens` says; states (N, ...)."""
    if initial_state is not None:
        raise ValueError(
            "backend 'xla' runs cu_seqlens documents as one row of runtime segment ids, where only the "
            "row's first document can start from a given state; per-document initial states are not "
            "supported: pass the documents as rows (b = N) with initial_state, or use backend='reference'"
        )
    device, dtype = inputs.x.device, compute_dtype(inputs.x.dtype)
    if dims.l == 0:
        return inputs.x, Mamba3State.zeros(cu_seqlens.numel() - 1, dims, dtype, device)
    cu_seqlens = cu_seqlens.to(device)
    starts = document_starts(segment_ids_from_cu_seqlens(cu_seqlens, dims.l))
    return _scan_chunks(inputs, weights, starts, Mamba3State.zeros(1, dims, dtype, device), chunk_size, cu_seqlens)


def _scan_chunks(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    starts: Tensor,
    state: Mamba3State,
    chunk_size: int,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Mamba3State]:
    """Run `chunk_scan` over the chunks of (b, l, ...) inputs with document `starts` (b, l) from
    `state` -> (out (b, l, H, p), final state); per document (N, ...) when `cu_seqlens` is given.

    The scan carries (h, k_prev, θ) and the weights. v_prev is data, not carry: the x of the token
    before each chunk (the initial v_prev for the first), passed in with the chunk. Besides being
    exact, this keeps every traced output differentiable in the carry, which torch_xla's scan needs
    (it traces a backward even when no input requires a gradient).
    """
    out_dtype, length = inputs.x.dtype, inputs.x.shape[1]
    dtype = compute_dtype(out_dtype)
    inputs, weights, state = inputs.to(dtype), weights.to(dtype), state.to(dtype)
    chunk_size = min(chunk_size, length)  # a short input is one chunk of its own length, unpadded
    pad = -length % chunk_size
    if pad:
        inputs = pad_with_identity_steps(inputs, pad)
        starts = F.pad(starts, (0, pad))
    split = lambda t: t.unflatten(1, (-1, chunk_size)).movedim(1, 0)  # noqa: E731  (b, K·c, ...) -> (K, b, c, ...)
    chunks = Mamba3Inputs(*(split(t) for t in inputs))
    v_entering = torch.cat((state.v_prev[None], chunks.x[:-1, :, -1]))  # (K, b, H, p)
    xs = (chunks, split(starts), v_entering)
    carry = ((state.h, state.k_prev, state.theta), {k: t for k, t in weights._asdict().items() if t is not None})
    step = _chunk_step(cu_seqlens is not None, tuple(t.requires_grad for t in (*chunks, v_entering)))
    ((h, k_prev, theta), _), out = _loop(step, carry, xs, traced=is_fake(inputs.x))
    if cu_seqlens is None:
        state = Mamba3State(h, k_prev, chunks.x[-1, :, -1], theta)
    else:
        out, (h, k_prev, theta) = out
        entering = Mamba3State(h, k_prev, v_entering, theta)
        state = _document_final_states(cu_seqlens, chunk_size, inputs, starts, weights, entering)
    return out.movedim(0, 1).flatten(1, 2)[:, :length].to(out_dtype), state


def _loop(step: Callable, carry, xs, traced: bool):
    """`torch_xla.experimental.scan(step, carry, xs)`; inside an enclosing trace (the body of a
    `scan_units` stack), where that scan cannot nest, the same steps unrolled in Python.

    The backward recomputes each chunk from its saved inputs (`PARTITION`, see `partition`).
    """
    if not traced:
        from torch_xla.experimental.scan import scan

        return scan(step, carry, xs, partition_fn=PARTITION, is_fn_pure=True)
    _log_unrolled()
    ys = []
    for index in range(xs[1].shape[0]):
        carry, y = step(carry, tree_map(lambda t: t[index], xs))
        ys.append(y)
    return carry, tree_map(lambda *slices: torch.stack(slices), *ys)


@functools.cache
def _log_unrolled() -> None:
    logger.info("mamba3 xla: scan called inside an enclosing trace (a scan_layers body); chunks unrolled")


@functools.cache
def _chunk_step(keep_entering_states: bool, grad_pattern: tuple[bool, ...]) -> Callable:
    """The scan body, one function object per (outputs, which xs need gradients).

    torch_xla caches a traced body by function and input shapes but not by `requires_grad`; a
    distinct function per gradient pattern keeps a no-grad trace from serving a training call.
    """
    del grad_pattern  # only part of the cache key

    def step(carry, chunk):
        (h, k_prev, theta), present = carry
        inputs, starts, v_prev = chunk
        out, new = chunk_scan(inputs, Mamba3Weights(**present), starts, Mamba3State(h, k_prev, v_prev, theta))
        return ((new.h, new.k_prev, new.theta), present), ((out, (h, k_prev, theta)) if keep_entering_states else out)

    return step


def _document_final_states(
    cu_seqlens: Tensor, chunk_size: int, inputs: Mamba3Inputs, starts: Tensor, weights: Mamba3Weights,
    entering: Mamba3State,
) -> Mamba3State:
    """The state after each document's last token, (N, ...), from padded b = 1 inputs (1, K·c, ...),
    starts (1, K·c) and the states entering each chunk (K, 1, ...).

    Document d's last token e sits in chunk e // c; rerunning that chunk from the state entering it,
    with the tokens after e replaced by Δ = 0 copies of e (identity steps, as in the padding), ends
    in the state after e. All N windows run as one batch of fixed shape (N, c, ...); an empty
    document ends in the zero state.
    """
    last = (cu_seqlens[1:] - 1).clamp(min=0)  # (N,)
    chunk, position = last // chunk_size, last % chunk_size
    offsets = torch.arange(chunk_size, device=cu_seqlens.device)
    after = offsets[None, :] > position[:, None]  # (N, c): identity steps
    window = chunk[:, None] * chunk_size + torch.minimum(offsets[None, :], position[:, None])
    gathered = Mamba3Inputs(*(t[0][window] for t in inputs))
    gathered = gathered._replace(dt=gathered.dt.masked_fill(after[..., None], 0))
    entering = Mamba3State(*(t[:, 0][chunk] for t in entering))
    _, final = chunk_scan(gathered, weights, starts[0][window] & ~after, entering)
    empty = cu_seqlens[1:] == cu_seqlens[:-1]
    return Mamba3State(*(t.masked_fill(empty.view(-1, *(1,) * (t.dim() - 1)), 0) for t in final))
