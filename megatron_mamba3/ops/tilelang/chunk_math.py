"""The chunk-parallel decomposition the TileLang kernels compute, in PyTorch.

Sequence padded to nc chunks of Q tokens. Per token (fp32): cs = Σ_{m ≤ i in its chunk and document} A_m Δ_m,
wd = γ = λΔ (diagonal weight), wo = γ + ε with ε_j = (1 − λ_{j+1}) Δ_{j+1} (0 when j + 1 starts a
document or is past the end) and seg, the running document index (segment_ids -> starts -> cumsum).

Writing h̃ for "h plus ε·k vᵀ of the token just before" (the state a chunk starts from), the scan is
    chunk state  S_c  = Σ_{j in c's last document} exp(cs_last − cs_j) wo_j Σ_r k_{j,r} v_{j,r}ᵀ
    state pass   h̃_{c+1} = mult_c h̃_c + S_c,  mult_c = exp(cs_last) (0 when c holds a document start)
    output       y_{i,r} = [i carried] exp(cs_i) q_{i,r}·h̃_c + Σ_{j ≤ i, same doc, s} L_ij (q_{i,r}·k_{j,s}) v_{j,s}
                           + D v_{i,r},  L_ii = wd_i,  L_ij = exp(cs_i − cs_j) wo_j (j < i)
where "carried" rows are those before the chunk's first document start and h̃_0 = h0 + (1 − λ_0)Δ_0
Σ_r v_prev,r k_prev,rᵀ. θ restarts at document starts; θ at chunk starts comes from a chunk-level
scan of the per-chunk angle totals (a segmented cumsum in float64, reduced modulo 2π).

`chunk_terms` is shared by the kernels (as their per-token inputs) and by `chunked_parallel`, the
differentiable PyTorch form of the same math; its seg and mult also serve the closed-form
backward of these scalars (`chunk_grad.terms_backward`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mamba3.ops.interface import TWO_PI, Mamba3Inputs, Mamba3State, Mamba3Weights, compute_dtype
from megatron_mamba3.ops.toolkit.gate import gate_output
from megatron_mamba3.ops.toolkit.heads import head_keys, rank_values, state_with_incoming


class ChunkTerms(NamedTuple):
    """Per-token and per-chunk scalars (fp32; fp64 for fp64 inputs) for nc chunks of Q tokens, l_pad = nc·Q.

    cs, wd, wo:   (b, l_pad, H)  cumulative A·Δ within the chunk and document, diagonal and off-diagonal weights
    seg:          (b, l_pad)     int32 running document index (padding continues the last document)
    reset:        (b, nc)        bool, the chunk holds a document start
    mult:         (b, nc, H)     state-pass multiplier of each chunk
    theta_start:  (b, nc, H, S)  θ carried into each chunk, in [0, 2π)
    theta_final:  (b, H, S)      θ after the last token, in [0, 2π)
    h_in:         (b, H, p, n)   h̃_0, the initial state with the incoming (k_prev, v_prev) term
    """

    cs: Tensor
    wd: Tensor
    wo: Tensor
    seg: Tensor
    reset: Tensor
    mult: Tensor
    theta_start: Tensor
    theta_final: Tensor
    h_in: Tensor


def chunk_count(length: int, chunk_size: int) -> int:
    return -(-length // chunk_size)


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t.to(dtype)` without the (host-side) op where `t` already has that dtype."""
    return t if t.dtype == dtype else t.to(dtype)


class TokenScalars(NamedTuple):
    """The per-token scalars of `chunk_terms` (compute dtype), padded with zero
    tokens (Δ = A = trap = 0) to l_pad + 1 = nc·Q + 1, so that every token has a successor.

    dt, A, lam:  (b, l_pad + 1, H)  Δ, A and λ = sigmoid(trap)
    starts:      (b, l_pad + 1)     bool document starts (never at t = 0)
    seg, reset, cs, mult as in `ChunkTerms` (cs as (b, nc, Q, H))
    """

    dt: Tensor
    A: Tensor
    lam: Tensor
    starts: Tensor
    seg: Tensor
    reset: Tensor
    cs: Tensor
    mult: Tensor


def token_scalars(inputs: Mamba3Inputs, starts: Tensor, chunk_size: int) -> TokenScalars:
    """Inputs (b, l, ...) and starts (b, l) bool -> `TokenScalars` for chunks of `chunk_size` tokens."""
    b, length, H = inputs.dt.shape
    Q = chunk_size
    nc = chunk_count(length, Q)
    padded = inputs.dt.new_zeros((3, b, nc * Q + 1, H), dtype=compute_dtype(inputs.x.dtype))
    padded[:, :, :length] = torch.stack((inputs.dt, inputs.A, inputs.trap))
    dt, A, trap = padded.unbind(0)
    starts = F.pad(starts, (0, nc * Q + 1 - length))
    seg = starts[:, :-1].cumsum(dim=1, dtype=torch.int32)
    # cs restarts at document starts, so nothing of one document's decay enters another's gradients.
    cs = _segmented_cumsum(((A * dt)[:, :-1].reshape(b * nc, Q, H),), seg.view(b * nc, Q)).view(b, nc, Q, H)
    reset = starts[:, :-1].view(b, nc, Q).any(dim=2)
    mult = torch.exp(cs[:, :, -1]).masked_fill(reset[..., None], 0.0)  # exactly 0 at a reset, even past exp's range
    return TokenScalars(dt, A, torch.sigmoid(trap), starts, seg, reset, cs, mult)


def chunk_terms(
    inputs: Mamba3Inputs, weights: Mamba3Weights, starts: Tensor, state: Mamba3State, chunk_size: int
) -> ChunkTerms:
    """Scalars of the decomposition from inputs (b, l, ...), starts (b, l) bool (never at t = 0) and the
    initial state."""
    b, length, H = inputs.dt.shape
    S = inputs.angles.shape[-1]
    Q = chunk_size
    nc = chunk_count(length, Q)
    dtype = compute_dtype(inputs.x.dtype)
    scalars = token_scalars(inputs, starts, Q)
    gamma = scalars.lam * scalars.dt
    beta = (scalars.dt - gamma).masked_fill_(scalars.starts[..., None], 0)  # (1 − λ)Δ, 0 at document starts
    wd = gamma[:, :-1]
    wo = wd + beta[:, 1:]  # γ_j + ε_j

    # θ: per-chunk totals of the chunk's last document (float64), then the chunk-level scan.
    angles = inputs.angles.new_zeros((b, nc * Q, S), dtype=torch.float64)
    angles[:, :length] = inputs.angles
    seg_chunks = scalars.seg.view(b, nc, Q)
    dt_last = (scalars.dt[:, :-1].view(b, nc, Q, H) * last_document(seg_chunks)[..., None]).double()
    totals = torch.einsum("bcjh,bcjs->bchs", dt_last, torch.tanh(angles).view(b, nc, Q, S))
    theta = chunk_angles(totals, scalars.seg, state.theta, dtype)

    h_in = incoming_state(inputs, weights, state, dtype)
    cs = scalars.cs.view(b, nc * Q, H)
    return ChunkTerms(cs, wd, wo, scalars.seg, scalars.reset, scalars.mult, theta[:, :nc], theta[:, nc], h_in)


def chunk_angles(totals: Tensor, seg: Tensor, theta_0: Tensor, dtype: torch.dtype) -> Tensor:
    """θ carried into each chunk and after the last one, (b, nc + 1, H, S) in [0, 2π), from the per-chunk
    totals Σ_j Δ_j·tanh(angles_j) over each chunk's last document (b, nc, H, S), the running document index
    seg (b, nc·Q) (0 at t = 0, where no document starts) and the initial θ (b, H, S): a scan over nc + 1
    slots in float64 (slot 0: θ_0, slot c + 1: π times chunk c's total) restarting where a chunk's last
    document starts."""
    b, nc = totals.shape[:2]
    documents = F.pad(seg.view(b, nc, -1)[:, :, -1], (1, 0))  # (b, nc + 1): where slots end (slot 0: seg 0)
    theta = _segmented_cumsum((as_dtype(theta_0, torch.float64)[:, None], math.pi * as_dtype(totals, torch.float64)), documents)
    return as_dtype(torch.remainder(theta, TWO_PI), dtype)


def incoming_state(inputs: Mamba3Inputs, weights: Mamba3Weights, state: Mamba3State, dtype: torch.dtype) -> Tensor:
    """h̃_0 = h + (1 − λ_0)Δ_0 Σ_r v_prev,r k_prev,rᵀ (b, H, p, n) in `dtype`, from the first token's Δ and trap."""
    dt_0 = as_dtype(inputs.dt[:, 0], dtype)
    weight = dt_0 - torch.sigmoid(as_dtype(inputs.trap[:, 0], dtype)) * dt_0  # (1 − λ_0)Δ_0, (b, H)
    h, k_prev, v_prev = (as_dtype(t, dtype) for t in (state.h, state.k_prev, state.v_prev))
    mimo_x = None if weights.mimo_x is None else as_dtype(weights.mimo_x, dtype)
    return state_with_incoming(h, k_prev, v_prev, mimo_x, weight)


def _segmented_cumsum(pieces: tuple[Tensor, ...], keys: Tensor) -> Tensor:
    """Inclusive cumsum along m of values (b, m, ...), given as pieces to concatenate along m, restarting
    wherever keys (b, m), sorted along m, change: out_k = Σ_{k' ≤ k, keys_k' = keys_k} values_k', the
    difference of two running sums (in the pieces' dtype)."""
    start = pieces[-1].new_zeros((keys.shape[0], 1, *pieces[-1].shape[2:]))
    prefix = torch.cat((start, *pieces), dim=1).cumsum(dim=1)  # Σ_{k' < k}, (b, m + 1, ...)
    first = torch.searchsorted(keys, keys)  # first slot of each key
    return prefix[:, 1:] - prefix.take_along_dim(first.view(*first.shape, *(1,) * (prefix.dim() - 2)), dim=1)


def final_state(inputs: Mamba3Inputs, weights: Mamba3Weights, theta_final: Tensor, h_final: Tensor) -> Mamba3State:
    """The state (docs/packing_and_state.md) after the last token, given θ there (b, H, S) and h̃
    after the last chunk, h_final (b, H, p, n) (equal to h there: the last token has no successor, so its ε is 0)."""
    dtype = h_final.dtype
    k_last = head_keys(as_dtype(inputs.B[:, -1], dtype), as_dtype(weights.B_bias, dtype), theta_final)
    return Mamba3State(h_final, k_last, as_dtype(inputs.x[:, -1], dtype), theta_final)


class ChunkView(NamedTuple):
    """The per-chunk tensors of the decomposition (compute dtype), nc chunks of Q tokens, padded with zeros.

    q, k:     (b, nc, Q, R, H, n)  rotated queries and keys (bias added)
    v:        (b, nc, Q, R, H, p)  rank values x ⊙ mimo_x
    z:        (b, nc, Q, H, p)     gate input
    theta:    (b, nc, Q, H, S)     θ of each token (not reduced modulo 2π inside the chunk)
    decay:    (b, nc, i, j, H)     exp(cs_i − cs_j) for j ≤ i in the same document, else 0
    mix:      (b, nc, i, j, H)     L_ij: decay times wd_j on the diagonal, wo_j below it
    inter:    (b, nc, Q, H)        exp(cs_i) for rows carried from the previous chunk, else 0
    to_end:   (b, nc, Q, H)        w_j = exp(cs_last − cs_j) wo_j for the chunk's last document, else 0
    """

    q: Tensor
    k: Tensor
    v: Tensor
    z: Tensor
    theta: Tensor
    decay: Tensor
    mix: Tensor
    inter: Tensor
    to_end: Tensor


def to_chunks(t: Tensor, nc: int, chunk_size: int, dtype: torch.dtype) -> Tensor:
    """(b, l, ...) -> (b, nc, Q, ...) in `dtype`, zero-padded to nc·Q tokens."""
    pad = nc * chunk_size - t.shape[1]
    return F.pad(t.to(dtype), (0,) * (2 * (t.dim() - 2)) + (0, pad)).view(t.shape[0], nc, chunk_size, *t.shape[2:])


def last_document(seg: Tensor) -> Tensor:
    """seg (b, nc, Q) -> (b, nc, Q) bool: the tokens of each chunk's last document (its last piece)."""
    return seg == seg[:, :, -1:]


def _document_masks(seg: Tensor) -> tuple[Tensor, Tensor]:
    """seg (b, nc, Q) -> same_doc (b, nc, i, j) (j ≤ i in one document) and carried (b, nc, Q)
    (rows in the document the chunk's incoming state belongs to)."""
    Q = seg.shape[-1]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=seg.device).tril()
    same_doc = (seg[:, :, :, None] == seg[:, :, None, :]) & causal
    seg_before = torch.cat((seg[:, :1, 0], seg[:, :-1, -1]), dim=1)
    return same_doc, seg == seg_before[..., None]


def token_theta(inputs: Mamba3Inputs, terms: ChunkTerms, chunk_size: int) -> Tensor:
    """θ of every token (b, nc, Q, H, S), from the chunk's θ_start and the angle increments
    π·tanh(angles)·Δ of its document so far (not reduced modulo 2π); differentiable."""
    nc = terms.mult.shape[1]
    dtype = compute_dtype(inputs.x.dtype)
    dt, angles = (to_chunks(t, nc, chunk_size, dtype) for t in (inputs.dt, inputs.angles))
    same_doc, carried = _document_masks(terms.seg.view(*dt.shape[:3]))
    increments = math.pi * torch.tanh(angles)[:, :, :, None, :] * dt[..., None]  # (b, nc, Q, H, S)
    theta = torch.einsum("bcij,bcjhs->bcihs", same_doc.to(dtype), increments)
    return theta + carried[..., None, None] * terms.theta_start[:, :, None]


def chunk_view(inputs: Mamba3Inputs, weights: Mamba3Weights, terms: ChunkTerms, chunk_size: int) -> ChunkView:
    """Inputs (b, l, ...) and their `chunk_terms` -> the `ChunkView`; differentiable in both."""
    b, _, H, _ = inputs.x.shape
    Q = chunk_size
    nc = terms.mult.shape[1]
    dtype = compute_dtype(inputs.x.dtype)
    w = weights.to(dtype)
    x, z, B, C = (to_chunks(t, nc, Q, dtype) for t in (inputs.x, inputs.z, inputs.B, inputs.C))
    cs, wd, wo = (t.view(b, nc, Q, H) for t in (terms.cs, terms.wd, terms.wo))
    seg = terms.seg.view(b, nc, Q)
    same_doc, carried = _document_masks(seg)
    theta = token_theta(inputs, terms, Q)

    gap = cs[:, :, :, None, :] - cs[:, :, None, :, :]  # (b, nc, i, j, H)
    decay = torch.exp(gap.masked_fill(~same_doc[..., None], -math.inf))
    diagonal = torch.eye(Q, dtype=torch.bool, device=x.device)[None, None, :, :, None]
    mix = decay * torch.where(diagonal, wd[:, :, None], wo[:, :, None])
    to_end = torch.exp((cs[:, :, -1:] - cs).masked_fill(~last_document(seg)[..., None], -math.inf)) * wo  # (b, nc, Q, H)
    inter = carried[..., None] * torch.exp(cs)
    return ChunkView(
        head_keys(C, w.C_bias, theta), head_keys(B, w.B_bias, theta), rank_values(x, w.mimo_x), z,
        theta, decay, mix, inter, to_end,
    )


def chunk_outputs(view: ChunkView, h_tilde: Tensor, D: Tensor) -> Tensor:
    """Per-rank outputs y (b, nc, Q, R, H, p) of every chunk from the states h̃_c (b, ≥nc, H, p, n)
    the chunks start from and the skip weight D (H,)."""
    nc = view.q.shape[1]
    scores = torch.einsum("bcirhn,bcjshn,bcijh->bchirjs", view.q, view.k, view.mix)
    y = torch.einsum("bchirjs,bcjshp->bcirhp", scores, view.v)
    y = y + torch.einsum("bcirhn,bchpn,bcih->bcirhp", view.q, h_tilde[:, :nc], view.inter)
    return y + D[:, None] * view.v


def chunk_states(view: ChunkView) -> Tensor:
    """S_c = Σ_j w_j Σ_r v_{j,r} k_{j,r}ᵀ of every chunk: (b, nc, H, p, n)."""
    return torch.einsum("bcjh,bcjrhp,bcjrhn->bchpn", view.to_end, view.v, view.k)


def chunked_parallel(
    inputs: Mamba3Inputs, weights: Mamba3Weights, starts: Tensor, state: Mamba3State, chunk_size: int
) -> tuple[Tensor, Mamba3State]:
    """Differentiable PyTorch form (fp32; fp64 for fp64 inputs) of the kernels' math, all chunks at once.

    inputs (b, l, ...) with starts (b, l) bool and an initial state -> (out (b, l, H, p) in x's
    dtype, final fp32 state). Memory grows as b·nc·H·(QR)² for the chunk scores.
    """
    b, length, H, p = inputs.x.shape
    terms = chunk_terms(inputs, weights, starts, state, chunk_size)
    nc = terms.mult.shape[1]
    w = weights.to(compute_dtype(inputs.x.dtype))
    view = chunk_view(inputs, weights, terms, chunk_size)
    cs_last = terms.cs.view(b, nc, chunk_size, H)[:, :, -1]
    # State pass as one matrix over chunks: h̃_c = Σ_{d<c} Π_{d<m<c} mult_m S_d + Π_{m<c} mult_m h̃_0.
    prefix = F.pad(cs_last.cumsum(dim=1), (0, 0, 1, 0))  # (b, nc + 1, H): Σ_{m<c} log mult_m
    blocked = F.pad(terms.reset.int().cumsum(dim=1), (1, 0))[..., None]  # (b, nc + 1, 1): resets among m < c
    chunk_idx = torch.arange(nc + 1, device=inputs.x.device)
    later = chunk_idx[:, None] > chunk_idx[None, :nc]  # (c, d): d < c
    open_path = later[None, :, :, None] & (blocked[:, :, None] == blocked[:, None, 1:])
    gaps = prefix[:, :, None] - prefix[:, None, 1:]  # Σ_{d<m<c} log mult_m
    carry = torch.exp(torch.where(open_path, gaps, -math.inf))  # (b, nc + 1, nc, H)
    from_start = torch.exp(torch.where(blocked == 0, prefix, -math.inf))  # (b, nc + 1, H)
    h_tilde = torch.einsum("bcdh,bdhpn->bchpn", carry, chunk_states(view))
    h_tilde = h_tilde + from_start[..., None, None] * terms.h_in[:, None]

    y = chunk_outputs(view, h_tilde, w.D)
    out = gate_output(y, view.z, w).reshape(b, nc * chunk_size, H, p)[:, :length].to(inputs.x.dtype)
    return out, final_state(inputs, weights, terms.theta_final, h_tilde[:, nc])
