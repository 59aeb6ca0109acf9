"""The chunk-parallel decomposition the TileLang kernels compute, in PyTorch.

Sequence padded to nc chunks of Q tokens. Per token (fp32): cs = Σ_{m ≤ i in its chunk} A_m Δ_m,
wd = γ = λΔ (diagonal weight), wo = γ + ε with ε_j = (1 − λ_{j+1}) Δ_{j+1} (0 when j + 1 starts a
document or is past the end) and seg, the running document index (segment_ids -> starts -> cumsum).

Writing h̃ for "h plus ε·k vᵀ of the token just before" (the state a chunk starts from), the scan is
    chunk state  S_c  = Σ_{j in c's last document} exp(cs_last − cs_j) wo_j Σ_r k_{j,r} v_{j,r}ᵀ
    state pass   h̃_{c+1} = mult_c h̃_c + S_c,  mult_c = exp(cs_last) (0 when c holds a document start)
    output       y_{i,r} = [i carried] exp(cs_i) q_{i,r}·h̃_c + Σ_{j ≤ i, same doc, s} L_ij (q_{i,r}·k_{j,s}) v_{j,s}
                           + D v_{i,r},  L_ii = wd_i,  L_ij = exp(cs_i − cs_j) wo_j (j < i)
where "carried" rows are those before the chunk's first document start and h̃_0 = h0 + (1 − λ_0)Δ_0
Σ_r v_prev,r k_prev,rᵀ. θ restarts at document starts; θ at chunk starts comes from a chunk-level
scan of the per-chunk angle totals (float64, reduced modulo 2π).

`chunk_terms` is shared by the kernels (as their per-token inputs) and by `chunked_parallel`, the
differentiable PyTorch form of the same math that the backward recomputes through autograd.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mamba3.ops.interface import TWO_PI, Mamba3Inputs, Mamba3State, Mamba3Weights, compute_dtype
from megatron_mamba3.ops.reference.gate import gate_output
from megatron_mamba3.ops.reference.heads import head_keys, rank_values, state_with_incoming


class ChunkTerms(NamedTuple):
    """Per-token and per-chunk scalars (fp32; fp64 for fp64 inputs) for nc chunks of Q tokens, l_pad = nc·Q.

    cs, wd, wo:   (b, l_pad, H)  chunk-local cumulative A·Δ, diagonal and off-diagonal weights
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


def chunk_terms(
    inputs: Mamba3Inputs, weights: Mamba3Weights, starts: Tensor, state: Mamba3State, chunk_size: int
) -> ChunkTerms:
    """Scalars of the decomposition from inputs (b, l, ...), starts (b, l) bool and the initial state."""
    b, length, H = inputs.dt.shape
    Q = chunk_size
    nc = chunk_count(length, Q)
    pad = nc * Q - length
    dtype = compute_dtype(inputs.x.dtype)
    dt, A, trap = (t.to(dtype) for t in (inputs.dt, inputs.A, inputs.trap))
    lam = torch.sigmoid(trap)
    gamma = lam * dt
    next_beta = ((1 - lam) * dt * (~starts)[..., None])[:, 1:]  # ε_j, j < l − 1
    eps = F.pad(next_beta, (0, 0, 0, 1))
    pad_tokens = lambda t: F.pad(t, (0, 0, 0, pad))  # noqa: E731
    log_alpha = pad_tokens(A * dt).view(b, nc, Q, H)
    cs = log_alpha.cumsum(dim=2)
    wd, wo = pad_tokens(gamma), pad_tokens(gamma + eps)

    seg = starts.to(torch.int32).cumsum(dim=1, dtype=torch.int32)
    seg = torch.cat((seg, seg[:, -1:].expand(b, pad)), dim=1)
    seg_chunks = seg.view(b, nc, Q)
    seg_before = torch.cat((seg_chunks[:, :1, 0], seg_chunks[:, :-1, -1]), dim=1)  # (b, nc)
    reset = seg_chunks[:, :, -1] != seg_before
    mult = torch.exp(cs[:, :, -1]) * (~reset)[..., None]

    # θ: per-chunk totals of the chunk's last document, then a chunk-level scan with resets.
    last_doc = (seg_chunks == seg_chunks[:, :, -1:]).to(torch.float64)  # (b, nc, Q)
    turn = torch.tanh(F.pad(inputs.angles.double(), (0, 0, 0, pad))).view(b, nc, Q, -1)
    dt_chunks = pad_tokens(dt).double().view(b, nc, Q, H)
    totals = math.pi * torch.einsum("bcj,bcjh,bcjs->bchs", last_doc, dt_chunks, turn)
    resets_so_far = reset.cumsum(dim=1)  # inclusive
    chunk_idx = torch.arange(nc, device=dt.device)
    reaches = (chunk_idx[None, :, None] >= chunk_idx[None, None, :]) & (
        resets_so_far[:, :, None] == resets_so_far[:, None, :]
    )  # (b, c, c'): total of c' is part of θ after chunk c
    theta_after = torch.einsum("bcd,bdhs->bchs", reaches.double(), totals)
    theta_after = theta_after + (resets_so_far == 0)[..., None, None] * state.theta.double()[:, None]
    theta_start = torch.cat((state.theta.double()[:, None], theta_after[:, :-1]), dim=1)
    theta_start = torch.remainder(theta_start, TWO_PI).to(dtype)
    theta_final = torch.remainder(theta_after[:, -1], TWO_PI).to(dtype)

    h, k_prev, v_prev = (t.to(dtype) for t in (state.h, state.k_prev, state.v_prev))
    mimo_x = None if weights.mimo_x is None else weights.mimo_x.to(dtype)
    h_in = state_with_incoming(h, k_prev, v_prev, mimo_x, (1 - lam[:, 0]) * dt[:, 0])
    return ChunkTerms(cs.view(b, nc * Q, H), wd, wo, seg, reset, mult, theta_start, theta_final, h_in)


def final_state(inputs: Mamba3Inputs, weights: Mamba3Weights, theta_final: Tensor, h_final: Tensor) -> Mamba3State:
    """The SPEC 4 state after the last token, given θ there (b, H, S) and h̃ after the last chunk,
    h_final (b, H, p, n) (equal to h there: the last token has no successor, so its ε is 0)."""
    dtype = h_final.dtype
    k_last = head_keys(inputs.B[:, -1].to(dtype), weights.B_bias.to(dtype), theta_final)
    return Mamba3State(h_final, k_last, inputs.x[:, -1].to(dtype), theta_final)


def chunked_parallel(
    inputs: Mamba3Inputs, weights: Mamba3Weights, starts: Tensor, state: Mamba3State, chunk_size: int
) -> tuple[Tensor, Mamba3State]:
    """Differentiable PyTorch form (fp32; fp64 for fp64 inputs) of the kernels' math, all chunks at once.

    inputs (b, l, ...) with starts (b, l) bool and an initial state -> (out (b, l, H, p) in x's
    dtype, final fp32 state). Memory grows as b·nc·H·(QR)² for the chunk scores.
    """
    b, length, H, p = inputs.x.shape
    R = inputs.B.shape[2]
    Q = chunk_size
    terms = chunk_terms(inputs, weights, starts, state, Q)
    nc = terms.mult.shape[1]
    pad = nc * Q - length
    dtype = compute_dtype(inputs.x.dtype)
    w = weights.to(dtype)
    chunks = lambda t: F.pad(t.to(dtype), (0,) * (2 * (t.dim() - 2)) + (0, pad)).view(b, nc, Q, *t.shape[2:])  # noqa: E731
    x, z, B, C, dt, angles = (chunks(t) for t in (inputs.x, inputs.z, inputs.B, inputs.C, inputs.dt, inputs.angles))
    cs, wd, wo = (t.view(b, nc, Q, H) for t in (terms.cs, terms.wd, terms.wo))
    seg = terms.seg.view(b, nc, Q)

    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    same_doc = (seg[:, :, :, None] == seg[:, :, None, :]) & causal  # (b, nc, i, j)
    seg_before = torch.cat((seg[:, :1, 0], seg[:, :-1, -1]), dim=1)
    carried = seg == seg_before[..., None]  # (b, nc, Q)

    increments = math.pi * torch.tanh(angles)[:, :, :, None, :] * dt[..., None]  # (b, nc, Q, H, S)
    theta = torch.einsum("bcij,bcjhs->bcihs", same_doc.to(dtype), increments)
    theta = theta + carried[..., None, None] * terms.theta_start[:, :, None]
    k = head_keys(B, w.B_bias, theta)  # (b, nc, Q, R, H, n)
    q = head_keys(C, w.C_bias, theta)
    v = rank_values(x, w.mimo_x)  # (b, nc, Q, R, H, p)

    gap = cs[:, :, :, None, :] - cs[:, :, None, :, :]  # (b, nc, i, j, H)
    decay = torch.exp(gap.masked_fill(~same_doc[..., None], -math.inf))
    diagonal = torch.eye(Q, dtype=torch.bool, device=x.device)[None, None, :, :, None]
    mix = decay * torch.where(diagonal, wd[:, :, None], wo[:, :, None])
    scores = torch.einsum("bcirhn,bcjshn,bcijh->bchirjs", q, k, mix)
    y = torch.einsum("bchirjs,bcjshp->bcirhp", scores, v)

    last_doc = seg == seg[:, :, -1:]
    to_end = torch.exp((cs[:, :, -1:] - cs).masked_fill(~last_doc[..., None], -math.inf)) * wo  # (b, nc, Q, H)
    chunk_states = torch.einsum("bcjh,bcjrhp,bcjrhn->bchpn", to_end, v, k)
    # State pass as one matrix over chunks: h̃_c = Σ_{d<c} Π_{d<m<c} mult_m S_d + Π_{m<c} mult_m h̃_0.
    prefix = F.pad(cs[:, :, -1].cumsum(dim=1), (0, 0, 1, 0))  # (b, nc + 1, H): Σ_{m<c} log mult_m
    blocked = F.pad(terms.reset.int().cumsum(dim=1), (1, 0))[..., None]  # (b, nc + 1, 1): resets among m < c
    chunk_idx = torch.arange(nc + 1, device=x.device)
    later = chunk_idx[:, None] > chunk_idx[None, :nc]  # (c, d): d < c
    open_path = later[None, :, :, None] & (blocked[:, :, None] == blocked[:, None, 1:])
    gaps = prefix[:, :, None] - prefix[:, None, 1:]  # Σ_{d<m<c} log mult_m
    carry = torch.exp(torch.where(open_path, gaps, -math.inf))  # (b, nc + 1, nc, H)
    from_start = torch.exp(torch.where(blocked == 0, prefix, -math.inf))  # (b, nc + 1, H)
    h_tilde = torch.einsum("bcdh,bdhpn->bchpn", carry, chunk_states)
    h_tilde = h_tilde + from_start[..., None, None] * terms.h_in[:, None]

    inter = carried[..., None] * torch.exp(cs)  # (b, nc, Q, H)
    y = y + torch.einsum("bcirhn,bchpn,bcih->bcirhp", q, h_tilde[:, :nc], inter)
    y = y + w.D[:, None] * v
    out = gate_output(y, z, w).reshape(b, nc * Q, H, p)[:, :length].to(inputs.x.dtype)
    return out, final_state(inputs, weights, terms.theta_final, h_tilde[:, nc])
