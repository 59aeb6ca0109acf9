"""Context parallelism for the Mamba-3 scan: ranks exchange fixed-size states, not activations.

Layout (Megatron's, as attention's load balancing leaves it): the sequence of length L is cut into
2·cp pieces of `L / (2·cp)` tokens and CP rank r holds pieces r and 2·cp − 1 − r, in that order.

Scheme, per layer:
1. Each rank scans each of its two pieces from a zero state (pieces as separate rows) and keeps the
   *summary*: the final state (h⁰, k⁰, v, θ⁰) and the scalars that say how an incoming state passes
   through the piece (total log-decay Σ AΔ, the first token's weight (1 − λ₀)Δ₀ on the incoming
   k_prev v_prevᵀ, whether a document starts inside the piece, and the segment ids at its ends).
2. One all-gather of the summaries (`SummaryGather`, its adjoint an all-reduce of the summaries'
   gradients), then every rank composes the true incoming state of every piece in sequence order
   (`compose`): a rotation by the incoming θ carries the zero-start terms into the true frame,
   because rotations by θ_in and by the piece's own angle sum compose.
3. Each rank scans its pieces again, from their composed incoming states; those outputs are exact.

Traffic per layer: each rank contributes 2 of the 2·cp gathered summaries of b·H·(p·n + R·n + p +
S + 2) numbers, independent of the sequence length (`benchmarks/cp_bytes.py` counts the bytes).
Cost: the local tokens are scanned twice (forward and backward). A cheaper exact correction exists
when the output norm is off (the incoming state adds decay_t · q⁰_t · rot(h̃_in, θ_in) to the
pre-gate output, and the gate is linear in it), but it needs the scan's queries and pre-gate
output, which the backends do not return; the second scan needs nothing new.

Packed documents: per-token segment ids whose values agree across ranks (for example those of the
global cu_seqlens, see `local_segment_ids`); a document may cross piece and rank boundaries.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_mamba3.ops.interface import (
    TWO_PI,
    Mamba3Inputs,
    Mamba3State,
    Mamba3Weights,
    check_prep,
    check_state,
    scan_dims,
)
from megatron_mamba3.ops.scan import mamba3_scan
from megatron_mamba3.ops.segments import document_starts, segment_ids_from_cu_seqlens
from megatron_mamba3.ops.toolkit.heads import state_with_incoming
from megatron_mamba3.ops.toolkit.prep import apply_prep
from megatron_mamba3.ops.toolkit.rotary import rotate


def piece_order(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two sequence pieces (of 2·cp) that CP rank `cp_rank` holds, in its local order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def local_part(full: Tensor, cp_size: int, cp_rank: int, dim: int) -> Tensor:
    """This rank's part of a whole sequence: pieces r and 2·cp − 1 − r of `full` along `dim`."""
    if full.shape[dim] % (2 * cp_size):
        raise ValueError(f"sequence length {full.shape[dim]} must be a multiple of 2 * context parallel size {cp_size}")
    pieces = full.chunk(2 * cp_size, dim=dim)
    return torch.cat([pieces[j] for j in piece_order(cp_size, cp_rank)], dim=dim)


def whole_sequence(parts: list[Tensor], dim: int) -> Tensor:
    """The inverse of `local_part`: every CP rank's part (in rank order) -> the whole sequence."""
    cp_size = len(parts)
    pieces = [None] * (2 * cp_size)
    for rank, part in enumerate(parts):
        first, second = piece_order(cp_size, rank)
        pieces[first], pieces[second] = part.chunk(2, dim=dim)
    return torch.cat(pieces, dim=dim)


def local_segment_ids(cu_seqlens: Tensor, local_length: int, group: dist.ProcessGroup) -> Tensor:
    """Global THD offsets `cu_seqlens` (N + 1,) of a row of cp · `local_length` tokens -> this rank's
    (1, local_length) int32 segment ids, numbered over the whole row."""
    cp_size = group.size()
    full = segment_ids_from_cu_seqlens(cu_seqlens, local_length * cp_size)
    return local_part(full, cp_size, group.rank(), dim=1)


class SummaryGather(torch.autograd.Function):
    """(m,) tensor on each rank -> (cp, m) stacked in rank order. Every rank uses the whole result,
    so the adjoint sums the gradients of all ranks (an all-reduce) and keeps this rank's row."""

    @staticmethod
    def forward(ctx, local: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        gathered = [torch.empty_like(local) for _ in range(group.size())]
        dist.all_gather(gathered, local.contiguous(), group=group)
        return torch.stack(gathered)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.group.rank()], None


def _pack(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


def _unpack(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    widths = [t[0].numel() for t in like]
    return [part.reshape(-1, *t.shape[1:]) for part, t in zip(flat.split(widths, dim=-1), like)]


def transfer(state: Mamba3State, summary: Mamba3State, log_decay: Tensor, w0: Tensor, mimo_x: Tensor | None) -> Mamba3State:
    """The state after a piece without document starts, entered with `state`.

    `summary` is the piece's final state from a zero start; `log_decay` (b, H) its Σ AΔ; `w0` (b, H)
    its first token's (1 − λ₀)Δ₀. The incoming angle θ rotates the piece's keys, hence the n axis
    of its zero-start h and its last key; the incoming h (with k_prev v_prevᵀ) decays by exp(Σ AΔ).
    """
    half_split = summary.k_prev.shape[1] > 1
    theta = state.theta
    h = torch.exp(log_decay)[..., None, None] * state_with_incoming(state.h, state.k_prev, state.v_prev, mimo_x, w0)
    h = h + rotate(summary.h, theta.unsqueeze(-2), half_split)
    k_prev = rotate(summary.k_prev, theta.unsqueeze(-3), half_split)
    return Mamba3State(h, k_prev, summary.v_prev, torch.remainder(theta + summary.theta, TWO_PI))


def compose(
    initial: Mamba3State, summaries: Mamba3State, log_decay: Tensor, w0: Tensor, resets: Tensor, fresh: Tensor,
    mimo_x: Tensor | None,
) -> tuple[list[Mamba3State], Mamba3State]:
    """States entering each of P pieces in sequence order, and the state after the last one.

    initial: the state (b, ...) before piece 0. summaries, log_decay, w0: per piece, (P, b, ...).
    resets (P, b) bool: a document starts inside the piece (after its first token), so its final
    state is its zero-start one. fresh (P, b) bool: the piece's first token starts a document, so it
    enters from zero.
    """
    state, incoming = initial, []
    for j in range(log_decay.shape[0]):
        keep = ~fresh[j]
        state = Mamba3State(*(field * keep.view(-1, *[1] * (field.dim() - 1)) for field in state))
        incoming.append(state)
        summary = Mamba3State(*(field[j] for field in summaries))
        passed = transfer(state, summary, log_decay[j], w0[j], mimo_x)
        reset = resets[j]
        state = Mamba3State(
            *(torch.where(reset.view(-1, *[1] * (a.dim() - 1)), s, a) for a, s in zip(passed, summary))
        )
    return incoming, state


def _summaries(inputs: Mamba3Inputs, final: Mamba3State) -> list[Tensor]:
    """Per row (one piece each): the zero-start final state, Σ AΔ (rows, H) and (1 − λ₀)Δ₀ (rows, H)."""
    dtype = final.h.dtype
    dt, A = inputs.dt.to(dtype), inputs.A.to(dtype)
    w0 = (1 - torch.sigmoid(inputs.trap[:, 0].to(dtype))) * dt[:, 0]
    return [*final, (A * dt).sum(dim=1), w0]


def _global_order(gathered: Tensor, cp_size: int, batch: int) -> Tensor:
    """(cp · b · 2, ...) gathered per rank, row and local piece -> (2·cp, b, ...) in sequence order."""
    per_piece = gathered.reshape(cp_size, batch, 2, *gathered.shape[1:])
    owner = [min(j, 2 * cp_size - 1 - j) for j in range(2 * cp_size)]
    return torch.stack([per_piece[rank, :, int(j >= cp_size)] for j, rank in enumerate(owner)])


def context_parallel_scan(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    group: dist.ProcessGroup,
    *,
    segment_ids: Tensor | None = None,
    initial_state: Mamba3State | None = None,
    **scan,
) -> tuple[Tensor, Mamba3State]:
    """`mamba3_scan` over a sequence split across the CP `group` -> (out (b, l, H, p), final state).

    inputs: this rank's (b, l, ...) tokens, l = 2 · (sequence length) / (2·cp): pieces r and
    2·cp − 1 − r (see `local_part`). segment_ids: this rank's (b, l) part of segment ids numbered
    over the whole sequence (or None). initial_state: the state before the sequence, the same on
    every rank. Returns this rank's outputs and the state after the whole sequence (the same on
    every rank; give its gradient on one rank only, as the total loss is the sum over ranks).
    Gradients are exact: the summaries' all-gather has the adjoint of `SummaryGather`.
    scan: `mamba3_scan`'s other arguments (prep, chunk_size, backend, variant, layer): the prep is applied
    once in PyTorch (`apply_prep`), the others are passed to both of its scans; a `cu_seqlens` other than
    None raises `ValueError` (documents come as segment_ids).
    """
    prep = scan.pop("prep", None)
    if scan.pop("cu_seqlens", None) is not None:
        raise ValueError(
            "context_parallel_scan takes packed documents as segment_ids numbered over the whole sequence "
            "(see local_segment_ids), not cu_seqlens"
        )
    dims = scan_dims(inputs, weights)
    if prep is not None:  # the summaries below read the prepped Δ and A: prep once, here
        check_prep(prep, dims)
        inputs = apply_prep(inputs, prep)
    if dims.l % 2:
        raise ValueError(f"context parallel scan needs an even local length (two pieces), got l={dims.l}")
    b, piece = dims.b, dims.l // 2
    rows = Mamba3Inputs(*(t.reshape(2 * b, piece, *t.shape[2:]) for t in inputs))
    row_ids = None if segment_ids is None else segment_ids.reshape(2 * b, piece)
    scan = dict(scan, segment_ids=row_ids)

    _, zero_start = mamba3_scan(rows, weights, **scan)
    local = _summaries(rows, zero_start)
    flat = SummaryGather.apply(_pack(local).flatten(), group)
    fields = [_global_order(t, group.size(), b) for t in _unpack(flat.reshape(group.size() * 2 * b, -1), local)]
    summaries, (log_decay, w0) = Mamba3State(*fields[:4]), fields[4:]

    pieces = log_decay.shape[0]
    resets = fresh = torch.zeros(pieces, b, dtype=torch.bool, device=log_decay.device)
    if row_ids is not None:
        ends = torch.stack((row_ids[:, 0], row_ids[:, -1], document_starts(row_ids).any(dim=1)), dim=1).long()
        gathered = [torch.empty_like(ends) for _ in range(group.size())]
        dist.all_gather(gathered, ends, group=group)
        first, last, resets = _global_order(torch.cat(gathered), group.size(), b).unbind(-1)
        resets = resets.bool()
        fresh = torch.cat((torch.zeros_like(resets[:1]), first[1:] != last[:-1]))

    initial_state = Mamba3State.given_or_zeros(initial_state, b, dims, inputs.x)
    check_state(initial_state, b, dims)
    incoming, final = compose(initial_state, summaries, log_decay, w0, resets, fresh, weights.mimo_x)
    mine = piece_order(group.size(), group.rank())
    entering = Mamba3State(
        *(torch.stack([incoming[j][i] for j in mine], dim=1).flatten(0, 1) for i in range(len(Mamba3State._fields)))
    )
    out, _ = mamba3_scan(rows, weights, initial_state=entering, **scan)
    return out.reshape(b, dims.l, *out.shape[2:]), final


def sequence_scan(group: dist.ProcessGroup, inputs: Mamba3Inputs, weights: Mamba3Weights, **scan) -> tuple[Tensor, Mamba3State]:
    """`mamba3_scan` when the CP `group` has one rank, else `context_parallel_scan` (same arguments)."""
    if group.size() == 1:
        return mamba3_scan(inputs, weights, **scan)
    return context_parallel_scan(inputs, weights, group, **scan)
