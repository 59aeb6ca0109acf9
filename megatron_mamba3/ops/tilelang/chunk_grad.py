"""The backward of the chunk-parallel decomposition, split the way the backward kernels split it.

Given the output gradient dout and the final state's gradient, per head (notation of `chunk_math`):

    gate backward  dy_{i,r} from dout, y (recomputed) and z; dz, dmimo_z, dmimo_o, dnorm
    state pass     dH_nc = ∂h_final;  dS_c = dH_{c+1},  dmult_c = ⟨dH_{c+1}, h̃_c⟩,
                   dH_c = G_c + mult_c dH_{c+1},  G_c = Σ_{i,r} inter_i dy_{i,r} q_{i,r}ᵀ;  dh̃_0 = dH_0
    chunk          with scores_{ir,js} = q_{i,r}·k_{j,s} and dP_{ir,js} = dy_{i,r}·v_{j,s}:
                   dv_{j,s} = Σ_{i,r} scores L_ij dy_{i,r} + w_j dS_cᵀ k_{j,s} + D dy_{j,s}
                   dq_{i,r} = Σ_{j,s} dP L_ij k_{j,s} + inter_i h̃_cᵀ dy_{i,r}
                   dk_{j,s} = Σ_{i,r} dP L_ij q_{i,r} + w_j dS_c v_{j,s}
    scalars        dL, dw, dinter -> ∂cs, ∂wd, ∂wo per token; dk, dq -> dθ per token and the
                   unrotated gradients of B + B_bias and C + C_bias
    pieces         ∂cs and ∂θ summed over each token's piece (its document within the chunk) from the
                   token on; ∂θ's sums contracted with tanh(angles) and with Δ (`piece_grads`)
    terms          those sums, ∂wd, ∂wo, dh̃_0 and the final state's (k, v, θ) gradients flow to Δ, A,
                   trap, angles and the initial state through `chunk_terms` (`terms_backward`:
                   closed-form gradients, no autograd; its initial-state and per-token parts are
                   `initial_state_grads` and `token_grads`)

`chunked_backward` runs all of it in PyTorch (the kernels' math, tested against autograd of
`chunked_parallel` and the fp64 oracle); the TileLang backward kernels compute the same per-chunk
quantities (the pieces inside `chunk_dqkv`) and share `terms_backward`, with its two parts in their own
kernels (`TermParts`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mamba3.ops.interface import Mamba3Inputs, Mamba3State, Mamba3Weights, compute_dtype
from megatron_mamba3.ops.tilelang.chunk_layout import last_token_rows
from megatron_mamba3.ops.tilelang.chunk_math import (
    ChunkTerms,
    as_dtype,
    chunk_outputs,
    chunk_states,
    chunk_terms,
    chunk_view,
    last_document,
    to_chunks,
)
from megatron_mamba3.ops.toolkit.gate import gate_output
from megatron_mamba3.ops.toolkit.heads import head_inputs, rank_values
from megatron_mamba3.ops.toolkit.rotary import rotate


GATE_WEIGHTS = ("mimo_z", "mimo_o", "norm")


class TermGrads(NamedTuple):
    """Gradients (in the compute dtype) with respect to the decomposition's scalars and boundary states.

    cs, wd, wo:  (b, l_pad, H)     per token;  mult: (b, nc, H) per chunk
    theta:       (b, l_pad, H, S)  per token θ (before any reduction modulo 2π)
    h_in:        (b, H, p, n)      h̃_0
    final:       Mamba3State       the caller's gradient of the final state (h is used by the state pass,
                                   k_prev / v_prev / theta here; None where it has none)
    """

    cs: Tensor
    wd: Tensor
    wo: Tensor
    mult: Tensor
    theta: Tensor
    h_in: Tensor
    final: Mamba3State


class PieceGrads(NamedTuple):
    """`TermGrads` as `terms_backward` takes them, with the sums along each chunk's document pieces taken
    (what `chunk_dqkv` writes). With φ_j = Σ ∂θ_i over the tokens i ≥ j of j's piece (its document
    within the chunk), in the compute dtype:

    log_alpha:    (b, l_pad, H)     ∂(AΔ)_j = Σ ∂cs_i over the same tokens, plus ∂mult_c·mult_c in the
                                    chunk's last piece
    wd, wo:       (b, l_pad, H)     as in `TermGrads`
    theta_turn:   (b, l_pad, H)     Σ_s φ_{j,s} tanh(angles_{j,s})
    theta_dt:     (b, l_pad, S)     Σ_h φ_{j,h} Δ_{j,h} (float64 where chunk_dqkv sums it over the heads)
    theta_first:  (b, nc, H, S)     φ at each chunk's first token (its first piece's sum of ∂θ)
    h_in, final:  as in `TermGrads`
    """

    log_alpha: Tensor
    wd: Tensor
    wo: Tensor
    theta_turn: Tensor
    theta_dt: Tensor
    theta_first: Tensor
    h_in: Tensor
    final: Mamba3State


class BoundaryStates(NamedTuple):
    """The forward's states that ∂θ_0 reads (compute dtype): h̃_0 and h after the last token, (b, H, p, n);
    h_final may be None where the final h has no gradient."""

    h_in: Tensor
    h_final: Tensor | None


def piece_grads(inputs: Mamba3Inputs, terms: ChunkTerms, grads: TermGrads) -> PieceGrads:
    """The sums of `PieceGrads` from per-token `grads`, in PyTorch (`chunk_dqkv` forms them in its chunk):
    running sums P over each chunk's Q tokens, read as P_{e_j} − P_{j−1} with e_j the last token of j's
    piece. `terms`: seg (b, l_pad) int32 and mult (b, nc, H) of `chunk_terms` (or the kernels' launch)."""
    b, l_pad, H = grads.cs.shape
    nc, S = terms.mult.shape[1], grads.theta.shape[-1]
    Q = l_pad // nc
    dtype = grads.theta.dtype
    seg_chunks = terms.seg.view(b, nc, Q)
    piece_last = (torch.searchsorted(seg_chunks, seg_chunks, right=True) - 1).view(b, nc, Q, 1, 1)  # e_j
    running = torch.cat((grads.cs[..., None], grads.theta), dim=-1).view(b, nc, Q, H, 1 + S).cumsum(dim=2)
    sums = running.take_along_dim(piece_last, dim=2)
    sums[:, :, 1:].sub_(running[:, :, :-1])
    last_piece = last_document(seg_chunks)[..., None]  # (b, nc, Q, 1)
    log_alpha = sums[..., 0] + torch.where(last_piece, (grads.mult * terms.mult)[:, :, None], 0)
    phi = sums[..., 1:]  # (b, nc, Q, H, S)
    turn = to_chunks(torch.tanh(inputs.angles.double()), nc, Q, dtype)  # (b, nc, Q, S)
    return PieceGrads(
        log_alpha.flatten(1, 2), grads.wd, grads.wo,
        torch.einsum("bcqhs,bcqs->bcqh", phi, turn).flatten(1, 2),
        torch.einsum("bcqhs,bcqh->bcqs", phi, to_chunks(inputs.dt, nc, Q, dtype)).flatten(1, 2),
        phi[:, :, 0], grads.h_in, grads.final,
    )


class InputGrads(NamedTuple):
    """What `terms_backward` returns: gradients of Δ, A, trap (b, l, H), angles (b, l, S), the initial
    state, and of the last token's B (b, R, G, n) and x (b, H, p), B_bias and mimo_x (None for SISO); those
    of the last token and B_bias are None where the final state has no k_prev / v_prev gradient."""

    dt: Tensor
    A: Tensor
    trap: Tensor
    angles: Tensor
    state: Mamba3State
    B_last: Tensor
    x_last: Tensor
    B_bias: Tensor
    mimo_x: Tensor | None


class TermParts(NamedTuple):
    """The parts of `terms_backward` a backend may run in its own kernels, with the signatures of
    `initial_state_grads` and `token_grads`."""

    initial_state: Callable[..., tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]]
    per_token: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]


def terms_backward(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    starts: Tensor | None,
    state: Mamba3State,
    terms: ChunkTerms,
    grads: PieceGrads,
    boundary: BoundaryStates,
    parts: TermParts | None = None,
    last_tokens: Tensor | None = None,
) -> InputGrads:
    """Push `grads` through `chunk_terms`, the per-token θ and the final state's k/v/θ, in closed form.

    inputs (b, l, ...), starts (b, l) bool (never at t = 0; None: each row one document, or `last_tokens`'
    documents), the initial state (k_prev and v_prev are read)
    and the forward's `terms`: seg (b, l_pad) int32, mult (b, nc, H) and θ_final (b, H, S), as `chunk_terms`
    gives them (or the kernels' launch), and its `boundary` states -> `InputGrads` (compute dtype; ∂Δ, ∂A,
    ∂trap and ∂angles in the dtype `parts.per_token` gives). `grads` must be the gradients of one loss (∂θ_0
    uses the rotation invariance that makes them consistent, below). `parts` runs the initial state's and
    the per-token parts (None: `initial_state_grads` and `token_grads`, in PyTorch). With `last_tokens` (N,),
    the kernels' `cu_seqlens` layout (`chunk_layout`, b = 1): N documents that each start at a chunk boundary
    from their own initial state and end at their last token with their own final state; `terms.seg` holds
    each chunk's document, and the state gradients, B_last and x_last are per document.
    With j a token, c its chunk and incr_j = π·tanh(angles_j)·Δ_j (b, l, H, S):

        cs_j = Σ_{m ≤ j in c and j's document} A_m Δ_m,  mult_c = exp(cs_last) [no start in c]:
        ∂(AΔ)_j = Σ_{i ≥ j in c and j's document} ∂cs_i + ∂mult_c mult_c
        wd_j = λ_j Δ_j,  wo_j = λ_j Δ_j + ε_j,  ε_j = (1 − λ_{j+1}) Δ_{j+1} [j + 1 starts no document]
        h̃_0 = h + w0 Σ_r v_prev,r k_prev,rᵀ,  w0 = (1 − λ_0) Δ_0
        θ_i = [i in the first document] θ_0 + Σ_{j ≤ i, same document} incr_j, θ_final likewise after the
              last token (the reductions modulo 2π have no derivative): ∂incr_j sums ∂θ_i over the tokens
              i ≥ j of j's document, plus ∂θ_final in the last one: a segmented reverse cumsum in two
              levels, φ_j within each chunk's pieces (`PieceGrads`, compute dtype; the whole ∂incr_j for a
              token whose document ends in its chunk) and, for the chunk's last document piece, what that
              document gathers in later chunks (float64 sums of their first pieces), so that no rounding
              grows with a running sum over the whole sequence
        final state: k_prev = rot(θ_final, B_last + B_bias per head), v_prev = x_last
    """
    b, _, H = inputs.dt.shape
    R, G = inputs.B.shape[2:4]
    S = inputs.angles.shape[-1]
    nc = terms.mult.shape[1]
    Q = terms.seg.shape[1] // nc
    half_split = R > 1
    dtype = grads.theta_turn.dtype  # the compute dtype
    packed = last_tokens is not None
    one_document = starts is None and not packed  # each row one document

    # The final key's gradients: ∂u = rot(−θ_final) ∂k for the unrotated u, and ∂θ from each pair of u
    # (rotations keep the pairs' cross products).
    final, dkey = grads.final, None
    dtheta_final = final.theta
    if final.k_prev is not None:
        last_B = last_token_rows(inputs.B, last_tokens)  # (states, R, G, n)
        key = head_inputs(as_dtype(last_B, dtype), as_dtype(weights.B_bias, dtype))  # (states, R, H, n)
        dkey = rotate(final.k_prev, -as_dtype(terms.theta_final[:, None], dtype), half_split)
        cross = pair_cross(dkey, key, S, half_split).sum(dim=1)
        dtheta_final = cross if dtheta_final is None else dtheta_final + cross

    # ∂θ's carry_c is what the document of chunk c's last piece gathers after c, the first pieces of the
    # later chunks it reaches (∂θ_final past the last chunk): a float64 difference of running sums over
    # (b, nc + 1, H, S) slots, exactly 0 where that document ends in c. ∂incr_j = φ_j + carry_c in c's last
    # piece, contracted with tanh(angles) and Δ as `grads` holds φ's (`token_grads`). Packed, every chunk's
    # document reaches its own end: ∂θ_final of that document joins every carry of it instead.
    first = grads.theta_first
    if dtheta_final is None or packed:
        reaches = F.pad(first.double(), (0, 0, 0, 0, 1, 1))
    else:
        reaches = F.pad(torch.cat((first, dtheta_final[:, None]), dim=1).double(), (0, 0, 0, 0, 1, 0))
    reaches = reaches.cumsum_(dim=1)  # Σ over the slots before k, (b, nc + 2, H, S)
    seg_chunks = terms.seg.view(b, nc, Q)
    if one_document:  # every chunk's reaches past the last slot
        carry = (reaches[:, -1:] - reaches[:, 1:-1]).to(dtype)
    else:
        keys = torch.cat((seg_chunks[:, :, 0], terms.seg[:, -1:]), dim=1)  # each slot's document, (b, nc + 1)
        past = torch.searchsorted(keys, seg_chunks[:, :, -1].contiguous(), right=True)  # after the last slot reached
        carry = (reaches.take_along_dim(past.view(b, nc, 1, 1), dim=1) - reaches[:, 1:-1]).to(dtype)  # (b, nc, H, S)
    if packed and dtheta_final is not None:
        carry = carry + dtheta_final[seg_chunks[:, :, 0].long()]

    # θ_0 by rotation invariance: turning θ_0 and h̃_0 together by ε (per pair) leaves every output as it is
    # and turns the final h, key and θ by ε where the first document reaches the end, so
    # ∂θ_0 = [it reaches] (∂θ_final + ⟨∂k, J k⟩ + ⟨∂h, J h⟩) − ⟨∂h̃_0, J h̃_0⟩ (J: a quarter turn of each pair,
    # `pair_cross`), with no sum of ∂θ over the first document's tokens, whose terms cancel down to it.
    ends = dtheta_final
    if final.h is not None:
        turn_h = pair_cross(final.h, boundary.h_final, S, half_split).sum(dim=2)
        ends = turn_h if ends is None else ends + turn_h
    parts = parts or TermParts(initial_state_grads, token_grads)
    dk_prev, dv_prev, dmimo_x, dw0, dtheta_0 = parts.initial_state(inputs, weights, state, grads.h_in, boundary.h_in)
    if ends is not None:  # packed, every document reaches its end; one document a row reaches the row's
        reached = ends if packed or one_document else torch.where((terms.seg[:, -1] == 0)[:, None, None], ends, 0)
        dtheta_0 = dtheta_0 + reached

    ddt, dA, dtrap, dangles = parts.per_token(inputs, starts, terms.seg, grads, carry, dw0)
    no_key = dkey is None
    return InputGrads(
        ddt, dA, dtrap, dangles, Mamba3State(grads.h_in, dk_prev, dv_prev, dtheta_0),
        None if no_key else dkey.unflatten(2, (G, H // G)).sum(dim=3), final.v_prev,
        None if no_key else dkey.sum(dim=0).transpose(0, 1), dmimo_x,
    )


def initial_state_grads(
    inputs: Mamba3Inputs, weights: Mamba3Weights, state: Mamba3State, dh_in: Tensor, h_in: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """The initial state's part of `terms_backward` in PyTorch (the TileLang backend runs it in its
    `initial_grad` kernel): (∂k_prev (b, R, H, n), ∂v_prev (b, H, p), ∂mimo_x (H, R, p) or None for SISO,
    ∂w0 (b, H), h̃_0's term of ∂θ_0 (b, H, S)) in the dtype of dh_in, from ∂h̃_0 = dh_in and h̃_0 = h_in
    (b, H, p, n). With w0 = (1 − λ_0)Δ_0 and v_r = v_prev ⊙ mimo_x_r:

        ∂(w0 v_r) = ∂h̃_0 k_prev,r,  ∂k_prev,r = w0 ∂h̃_0ᵀ v_r,  ∂w0 = Σ_r ⟨v_r, ∂h̃_0 k_prev,r⟩,
        h̃_0's term of ∂θ_0 = −⟨∂h̃_0, J h̃_0⟩ (`pair_cross`; `terms_backward` adds the final state's)
    """
    b, _, H = inputs.dt.shape
    R, S = inputs.B.shape[2], inputs.angles.shape[-1]
    dtype = dh_in.dtype
    dtheta_0 = -pair_cross(dh_in, h_in, S, R > 1).sum(dim=2)
    k_prev, v_prev = as_dtype(state.k_prev, dtype), as_dtype(state.v_prev, dtype)
    mimo_x = None if weights.mimo_x is None else as_dtype(weights.mimo_x, dtype)
    values = rank_values(v_prev, mimo_x)  # (b, R, H, p)
    dt_0 = as_dtype(inputs.dt[:, 0], dtype)
    w0 = torch.addcmul(dt_0, torch.sigmoid(as_dtype(inputs.trap[:, 0], dtype)), dt_0, value=-1).view(b, 1, H, 1)
    dweighted = torch.einsum("bhpn,brhn->brhp", dh_in, k_prev)
    dw0 = (dweighted * values).sum(dim=(1, 3))  # (b, H)
    dvalues = dweighted * w0
    dk_prev = torch.einsum("bhpn,brhp->brhn", dh_in, values * w0)
    if mimo_x is None:
        return dk_prev, dvalues[:, 0], None, dw0, dtheta_0
    dv_prev = (dvalues * mimo_x.transpose(0, 1)).sum(dim=1)
    return dk_prev, dv_prev, torch.einsum("brhp,bhp->hrp", dvalues, v_prev), dw0, dtheta_0


def token_grads(
    inputs: Mamba3Inputs, starts: Tensor, seg: Tensor, grads: PieceGrads, carry: Tensor, dw0: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The per-token chains of `terms_backward` in PyTorch (the TileLang backend runs them in its `terms_grad`
    kernel): (∂Δ, ∂A, ∂trap (b, l, H), ∂angles (b, l, S)) in the compute dtype.

    inputs (b, l, ...), starts (b, l) bool, seg (b, l_pad) int32, the piece sums `grads`, carry (b, nc, H, S):
    what the document of each chunk's last piece gathers of ∂θ after the chunk, and ∂w0 (b, H). With
    λ = sigmoid(trap):

        ∂incr_j = φ_j + [j in its chunk's last piece] carry_c     (contracted with tanh(angles) and with Δ)
        ∂β_j = ∂wo_{j−1} (∂w0 at j = 0), 0 where j starts a document; ∂γ_j = ∂wd_j + ∂wo_j − ∂β_j
        ∂Δ = ∂β + λ ∂γ + A ∂(AΔ) + π Σ_s ∂incr tanh,  ∂A = ∂(AΔ) Δ,  ∂trap = Δ ∂γ λ(1 − λ),
        ∂angles = π Σ_h ∂incr Δ (1 − tanh²)
    """
    b, length, H = inputs.dt.shape
    nc = carry.shape[1]
    Q = seg.shape[1] // nc
    dtype = grads.theta_turn.dtype  # the compute dtype
    dt, A, trap = (as_dtype(t, dtype) for t in (inputs.dt, inputs.A, inputs.trap))
    lam = torch.sigmoid(trap)
    tokens = lambda t: t if t.shape[1] == length else t[:, :length]  # noqa: E731  (b, l_pad, ...) -> (b, l, ...)
    last_piece = last_document(seg.view(b, nc, Q))[..., None]  # (b, nc, Q, 1)
    turn = to_chunks(torch.tanh(inputs.angles.double()), nc, Q, dtype)  # (b, nc, Q, S)
    carried = lambda t: torch.where(last_piece, t, 0).flatten(1, 2)  # noqa: E731
    dincr_turn = grads.theta_turn + carried(torch.einsum("bchs,bcqs->bcqh", carry, turn))  # Σ_s ∂incr tanh
    dincr_dt = grads.theta_dt + carried(torch.einsum("bchs,bcqh->bcqs", carry, to_chunks(dt, nc, Q, dtype)))
    dlog_alpha = tokens(grads.log_alpha)  # ∂(AΔ) (b, l, H)
    dangles = torch.ops.aten.tanh_backward(math.pi * tokens(dincr_dt), tokens(turn.flatten(1, 2)))

    # λ, Δ: ∂((1 − λ_j)Δ_j) is ∂wo_{j−1} (∂w0 at j = 0), none where j starts a document.
    dwd, dwo = tokens(grads.wd), tokens(grads.wo)
    dbeta = torch.cat((dw0[:, None], dwo[:, :-1]), dim=1).masked_fill_(starts[..., None], 0)
    dgamma = dwd + dwo - dbeta  # ∂(λΔ), net of the −λΔ inside (1 − λ)Δ
    dtrap = torch.ops.aten.sigmoid_backward(dt * dgamma, lam)
    ddt = torch.addcmul(dbeta, lam, dgamma).addcmul_(A, dlog_alpha)
    ddt = ddt.add_(tokens(dincr_turn), alpha=math.pi)
    return ddt, dlog_alpha * dt, dtrap, dangles


def pair_cross(grad: Tensor, value: Tensor, S: int, half_split: bool) -> Tensor:
    """∂loss/∂θ of rotated vectors: Σ over each rotated pair (a, b) of grad_b·value_a − grad_a·value_b.

    grad and value (..., n) hold the gradient and the value of the rotated vector -> (..., S)."""
    n = value.shape[-1]
    first, second = (slice(0, S), slice(n // 2, n // 2 + S)) if half_split else (slice(0, 2 * S, 2), slice(1, 2 * S, 2))
    return grad[..., second] * value[..., first] - grad[..., first] * value[..., second]


def chunked_backward(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    starts: Tensor,
    state: Mamba3State,
    chunk_size: int,
    grad_out: Tensor,
    grad_final: Mamba3State,
) -> tuple[Mamba3Inputs, Mamba3Weights, Mamba3State]:
    """Gradients of `chunked_parallel`'s (out, final state) for every input, weight and the initial state,
    computed the way the backward kernels split the work. grad_out (b, l, H, p); grad_final like the
    state. Weights absent from `weights` get None."""
    b, length, H, p = inputs.x.shape
    R, G, n = inputs.B.shape[2:]
    S = inputs.angles.shape[-1]
    Q = chunk_size
    dtype = compute_dtype(inputs.x.dtype)
    w = weights.to(dtype)
    terms = chunk_terms(inputs, weights, starts, state, Q)
    nc = terms.mult.shape[1]
    view = chunk_view(inputs, weights, terms, Q)
    q, k, v = view.q, view.k, view.v

    states = chunk_states(view)
    h_tilde = [terms.h_in]
    for c in range(nc):
        h_tilde.append(terms.mult[:, c, :, None, None] * h_tilde[-1] + states[:, c])
    h_tilde = torch.stack(h_tilde, dim=1)  # (b, nc + 1, H, p, n)
    y = chunk_outputs(view, h_tilde, w.D)

    # Gate backward (elementwise and per-row norm; the kernels write it out by hand).
    dout = to_chunks(grad_out, nc, Q, dtype)
    with torch.enable_grad():
        y_leaf, z_leaf = y.detach().requires_grad_(), view.z.detach().requires_grad_()
        present = [f for f in GATE_WEIGHTS if getattr(w, f) is not None]
        gate = w._replace(**{f: getattr(w, f).detach().requires_grad_() for f in present})
        leaves = [y_leaf, z_leaf, *(getattr(gate, f) for f in present)]
        dy, dz, *found = torch.autograd.grad(gate_output(y_leaf, z_leaf, gate), leaves, dout)
    gate_grads = dict(zip(present, found))

    # Reverse state pass.
    G_chunks = torch.einsum("bcih,bcirhn,bcirhp->bchpn", view.inter, q, dy)
    dH = grad_final.h.to(dtype)
    dS, dmult = [None] * nc, [None] * nc
    for c in reversed(range(nc)):
        dS[c] = dH
        dmult[c] = (dH * h_tilde[:, c]).sum(dim=(-1, -2))
        dH = G_chunks[:, c] + terms.mult[:, c, :, None, None] * dH
    dS, dmult = torch.stack(dS, dim=1), torch.stack(dmult, dim=1)  # (b, nc, H, p, n), (b, nc, H)

    # Chunk backward.
    scores = torch.einsum("bcirhn,bcjshn->bchirjs", q, k)
    dP = torch.einsum("bcirhp,bcjshp->bchirjs", dy, v)
    mix = view.mix.permute(0, 1, 4, 2, 3)[:, :, :, :, None, :, None]  # (b, c, h, i, 1, j, 1)
    kdS = torch.einsum("bcjshn,bchpn->bcjshp", k, dS)
    U = torch.einsum("bcirhp,bchpn->bcirhn", dy, h_tilde[:, :nc])
    to_end, inter = view.to_end[:, :, :, None, :, None], view.inter[:, :, :, None, :, None]
    dv = torch.einsum("bchirjs,bcirhp->bcjshp", scores * mix, dy) + to_end * kdS + w.D[:, None] * dy
    dq = torch.einsum("bchirjs,bcjshn->bcirhn", dP * mix, k) + inter * U
    dk = torch.einsum("bchirjs,bcirhn->bcjshn", dP * mix, q) + to_end * torch.einsum("bcjshp,bchpn->bcjshn", v, dS)

    # Per-token scalars: dL_ij = Σ_{r,s} dP ⊙ scores, dw_j = Σ_s k_{j,s}·(dS v_{j,s}), dinter_i = Σ_r q_{i,r}·(h̃ᵀ dy_{i,r}).
    dL = torch.einsum("bchirjs->bcijh", dP * scores)
    dw = (kdS * v).sum(dim=(-1, 3))  # (b, c, j, h)
    dinter = (U * q).sum(dim=(-1, 3))  # (b, c, i, h)
    below = torch.ones(Q, Q, dtype=torch.bool, device=q.device).tril(-1)[None, None, :, :, None]
    spread = torch.where(below, dL * view.decay, 0)  # dL_ij exp(cs_i − cs_j), i > j
    wo = terms.wo.view(b, nc, Q, H)
    flow = spread * wo[:, :, None]  # ∂/∂cs_i of L_ij, i > j
    end_flow = dw * view.to_end  # ∂/∂cs_last of w_j
    cs_grad = flow.sum(dim=3) - flow.sum(dim=2) + dinter * view.inter - end_flow
    cs_grad[:, :, -1] += end_flow.sum(dim=2)
    cs, last_doc = terms.cs.view(b, nc, Q, H), last_document(terms.seg.view(b, nc, Q))
    end_gap = torch.exp((cs[:, :, -1:] - cs).masked_fill(~last_doc[..., None], float("-inf")))  # exp(cs_last − cs_j)
    wo_grad = spread.sum(dim=2) + dw * end_gap
    wd_grad = torch.diagonal(dL, dim1=2, dim2=3).movedim(-1, 2)  # (b, c, Q, H)

    # Rotation: dθ from both rotated vectors, then the unrotated gradients of B/C (+ bias).
    half_split = R > 1
    theta = view.theta[:, :, :, None]  # (b, c, Q, 1, H, S)
    theta_grad = (pair_cross(dk, k, S, half_split) + pair_cross(dq, q, S, half_split)).sum(dim=3)
    duB, duC = rotate(dk, -theta, half_split), rotate(dq, -theta, half_split)  # (b, c, Q, R, H, n)
    group = lambda t: t.view(b, nc * Q, R, G, H // G, n).sum(dim=4)[:, :length]  # noqa: E731
    bias = lambda t: t.sum(dim=(0, 1, 2)).transpose(0, 1)  # noqa: E731
    x_grad = dv[:, :, :, 0] if w.mimo_x is None else (dv * w.mimo_x.transpose(0, 1)).sum(dim=3)
    flat = lambda t: t.reshape(b, nc * Q, *t.shape[3:])[:, :length]  # noqa: E731
    D_grad = (dy * v).sum(dim=(0, 1, 2, 3, 5))

    # Scalars and boundary states through chunk_terms.
    term_grads = TermGrads(
        cs_grad.reshape(b, nc * Q, H), wd_grad.reshape(b, nc * Q, H), wo_grad.reshape(b, nc * Q, H), dmult,
        theta_grad.reshape(b, nc * Q, H, S), dH, grad_final.to(dtype),
    )
    boundary = BoundaryStates(terms.h_in, h_tilde[:, nc])
    rest = terms_backward(inputs, weights, starts, state, terms, piece_grads(inputs, terms, term_grads), boundary)
    dx = flat(x_grad).clone()
    dx[:, -1] += rest.x_last
    dB = group(duB).clone()
    dB[:, -1] += rest.B_last
    mimo_x_grad = None
    if w.mimo_x is not None:
        mimo_x_grad = torch.einsum("bcjshp,bcjhp->hsp", dv, to_chunks(inputs.x, nc, Q, dtype)) + rest.mimo_x
    grads_inputs = Mamba3Inputs(dx, flat(dz), dB, group(duC), rest.dt, rest.A, rest.trap, rest.angles)
    grads_weights = Mamba3Weights(
        bias(duB) + rest.B_bias, bias(duC), D_grad, mimo_x_grad,
        *(gate_grads.get(f) for f in GATE_WEIGHTS),
    )
    return grads_inputs, grads_weights, rest.state
