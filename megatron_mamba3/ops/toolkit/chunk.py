"""One chunk of the chunked form (docs/math.md §3): masked matmuls inside a chunk, the state passed on.

The reference chunked form loops this step over the chunks (`ops/reference/chunked.py`); the XLA
backend scans it.

Within a chunk, token j's k_j v_jᵀ enters h_i with weight L[i, j]:
    L[i, i] = γ_i,   L[i, j] = exp(Σ_{j<m≤i} A_m Δ_m) · (γ_j + (1 − λ_{j+1}) Δ_{j+1})   for j < i,
zero across a document start. The incoming state enters as h̃ = h + (1 − λ_0) Δ_0 Σ_r v_prev,r k_prev,rᵀ,
decayed by exp(Σ_{m≤i} A_m Δ_m). A short last chunk is padded with copies of the last token and
Δ = 0, which leave h, θ and the previous (k, v) exactly as the last real token left them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mamba3.ops.interface import TWO_PI, Mamba3Inputs, Mamba3State, Mamba3Weights
from megatron_mamba3.ops.toolkit.finite import finite_parts, mark_reached
from megatron_mamba3.ops.toolkit.gate import gate_output
from megatron_mamba3.ops.toolkit.heads import head_keys, rank_values, state_with_incoming


def pad_with_identity_steps(inputs: Mamba3Inputs, pad: int) -> Mamba3Inputs:
    """Append `pad` copies of the last token with Δ = 0: steps that change no part of the state."""
    repeat_last = lambda t: torch.cat((t, t[:, -1:].expand(-1, pad, *t.shape[2:])), dim=1)  # noqa: E731
    padded = Mamba3Inputs(*(repeat_last(t) for t in inputs))
    return padded._replace(dt=F.pad(inputs.dt, (0, 0, 0, pad)))


def chunk_scan(
    chunk: Mamba3Inputs, weights: Mamba3Weights, starts: Tensor, state: Mamba3State
) -> tuple[Tensor, Mamba3State]:
    """One chunk of c tokens (inputs (b, c, ...), starts (b, c) bool) from `state`.

    Shape-stable in c, with document starts as runtime data. Returns (out (b, c, H, p), state after
    the chunk's last token). Inputs, weights and state must share one compute dtype. Non-finite
    inputs reach only what the recurrence makes them reach (see `finite`): every masked term is
    selected away (`torch.where`), never multiplied by zero.
    """
    c = chunk.x.shape[1]
    document = starts.cumsum(dim=1)
    carried = document == 0  # (b, c): rows still in the document the incoming state belongs to
    causal = torch.ones(c, c, dtype=torch.bool, device=starts.device).tril()
    same_document = (document[:, :, None] == document[:, None, :]) & causal  # (b, i, j)
    finite_chunk, finite_state, reached = finite_parts(chunk, state, same_document, carried, weights.norm is not None)
    out, final = _finite_chunk_scan(finite_chunk, weights, same_document, carried, finite_state)
    return mark_reached(out, final, reached, chunk.x[:, -1])


def _finite_chunk_scan(
    chunk: Mamba3Inputs, weights: Mamba3Weights, same_document: Tensor, carried: Tensor, state: Mamba3State
) -> tuple[Tensor, Mamba3State]:
    x, z, B, C, dt, A, trap, angles = chunk
    c = x.shape[1]
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    lam = torch.sigmoid(trap)
    gamma = lam * dt
    # ε_j = (1 − λ_{j+1}) Δ_{j+1}: the extra weight of k_j v_jᵀ once token j + 1 has run.
    eps = F.pad(((1 - lam) * dt)[:, 1:], (0, 0, 0, 1))

    increments = math.pi * torch.tanh(angles).unsqueeze(-2) * dt.unsqueeze(-1)  # (b, c, H, S)
    theta = torch.where(same_document[..., None, None], increments[:, None], zero).sum(dim=2)
    theta = torch.where(carried[:, :, None, None], theta + state.theta[:, None], theta)
    k = head_keys(B, weights.B_bias, theta)  # (b, c, R, H, n)
    q = head_keys(C, weights.C_bias, theta)
    v = rank_values(x, weights.mimo_x)  # (b, c, R, H, p)

    # Σ_{j<m≤i} A_m Δ_m as a cumulative sum over m of the terms with m > j: no differences of
    # running sums, so a document's decays never depend on another document's values.
    log_alpha = A * dt  # (b, c, H)
    below_diagonal = torch.ones(c, c, dtype=torch.bool, device=x.device).tril(-1)[None, :, :, None]
    gap = torch.where(below_diagonal, log_alpha[:, :, None, :], zero).cumsum(dim=1)  # (b, i, j, H)
    mask = same_document[..., None]
    decay = torch.exp(gap.masked_fill(~mask, -math.inf))
    mix = torch.where(mask, decay * (gamma[:, None] + torch.where(below_diagonal, eps[:, None], zero)), zero)

    h_in = state_with_incoming(state.h, state.k_prev, state.v_prev, weights.mimo_x, (1 - lam[:, 0]) * dt[:, 0])
    carry_decay = torch.where(carried[..., None], torch.exp(log_alpha.cumsum(dim=1)), zero)  # (b, c, H)

    # Head-major outputs ("hb..."): the batched matmuls then fold (h, b) with h outermost, so heads
    # sharded across devices (XLA SPMD) stay sharded instead of being gathered to fold (b, h).
    scores = torch.einsum("birhn,bjshn,bijh->hbirjs", q, k, mix)
    y = torch.einsum("hbirjs,bjshp->hbirp", scores, v)
    y = (y + torch.einsum("birhn,bhpn,bih->hbirp", q, h_in, carry_decay)).permute(1, 2, 3, 0, 4)
    y = y + weights.D[:, None] * v
    out = gate_output(y, z, weights)

    kv = torch.einsum("bjh,bjrhp,bjrhn->hbpn", mix[:, -1], v, k).transpose(0, 1)
    h = carry_decay[:, -1, :, None, None] * h_in + kv
    return out, Mamba3State(h, k[:, -1], x[:, -1], torch.remainder(theta[:, -1], TWO_PI))
