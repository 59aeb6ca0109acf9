"""Non-finite inputs in the chunked form: they reach what the recurrence makes them reach, and no more.

A chunk mixes its tokens through matmuls, where a masked pair still multiplies: 0 · NaN = NaN would
carry a bad token backwards in time and into the other documents of the chunk, in the outputs and in
every gradient. So the chunked form runs on finite copies of its inputs and state (each non-finite
entry replaced by 0, every finite one kept bit for bit) and then marks non-finite exactly what the
recurrence makes non-finite from the bad entries:

- a bad x (per head and channel p) or a bad B, Δ, A, trap or angle (per head) enters the state and
  reaches that token and every later token of its document; so does a bad incoming state, for the
  tokens that continue its document;
- a bad z (per channel) or C (per head) reaches only its own token's output; the per-head output
  norm spreads a bad channel of y (not of z) to the whole head.

Outputs and state entries reached are NaN; all others come from finite arithmetic, so they equal a
run without the bad entries bit for bit, and gradients stay finite (and exactly zero for the
tokens and documents an output does not depend on). Overflow of finite inputs is not covered.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from megatron_mamba3.ops.interface import Mamba3Inputs, Mamba3State


class Reached(NamedTuple):
    """Where the non-finite inputs of a chunk of c tokens reach (all bool).

    state:      (b, c, H, p) the state after token i is non-finite in this head and channel
    state_head: (b, c, H)    ... in this whole head (the keys and angles too)
    out:        (b, c, H, p) the output of token i
    """

    state: Tensor
    state_head: Tensor
    out: Tensor


def finite_copy(t: Tensor) -> Tensor:
    """`t` with each non-finite entry replaced by 0 and every finite one kept bit for bit; differentiable,
    with an exactly 0 gradient at the replaced entries."""
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def finite_values(t: Tensor) -> Tensor:
    """`finite_copy` in one kernel, for tensors outside autograd (its gradient would pass a NaN through)."""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def _bad(t: Tensor, keep: int) -> Tensor:
    """True where any entry of `t` is non-finite, reduced over all but the first `keep` dimensions."""
    bad = ~torch.isfinite(t)
    return bad.flatten(keep).any(dim=-1) if bad.dim() > keep else bad


def finite_parts(
    chunk: Mamba3Inputs, state: Mamba3State, visible: Tensor, carried: Tensor, per_head_norm: bool
) -> tuple[Mamba3Inputs, Mamba3State, Reached]:
    """(finite inputs, finite state, where the bad entries reach) for a chunk (b, c, ...), with
    `visible` (b, i, j) bool: token j precedes or is token i in i's document, and `carried` (b, c):
    token i continues the document of the incoming state."""
    x, z, B, C, dt, A, trap, angles = chunk
    H, p = x.shape[-2:]
    per_group = H // B.shape[-2]
    group_bad = lambda t: _bad(t.transpose(2, 3), 3).repeat_interleave(per_group, dim=-1)  # noqa: E731  (b, c, H)
    head_bad = _bad(dt, 3) | _bad(A, 3) | _bad(trap, 3) | _bad(angles, 2)[..., None] | group_bad(B)
    enters_head = visible.to(x.dtype) @ head_bad.to(x.dtype) > 0  # (b, i, H)
    enters = (visible.to(x.dtype) @ _bad(x, 4).flatten(2).to(x.dtype) > 0).unflatten(2, (H, p))  # (b, i, H, p)

    incoming_head = _bad(state.k_prev.transpose(1, 2), 2) | _bad(state.theta, 2)  # (b, H)
    incoming = _bad(state.h, 3) | _bad(state.v_prev, 3) | incoming_head[..., None]  # (b, H, p)
    state_head = enters_head | (carried[..., None] & incoming_head[:, None])
    state_bad = enters | state_head[..., None] | (carried[..., None, None] & incoming[:, None])
    y_bad = state_bad | group_bad(C)[..., None]
    if per_head_norm:  # normalizes y over the head's channels (z enters after it, channel by channel)
        y_bad = y_bad.any(dim=-1, keepdim=True).expand(-1, -1, -1, p)
    out_bad = y_bad | _bad(z, 4)

    clean_chunk = Mamba3Inputs(*(finite_copy(t) for t in chunk))
    clean_state = Mamba3State(*(finite_copy(t) for t in state))
    return clean_chunk, clean_state, Reached(state_bad, state_head, out_bad)


def mark_reached(out: Tensor, state: Mamba3State, reached: Reached, x_last: Tensor) -> tuple[Tensor, Mamba3State]:
    """NaN into the chunk's output (b, c, H, p) and final state where `reached` says; v_prev is the
    last token's own x, `x_last` (b, H, p)."""
    nan = torch.full((), math.nan, dtype=out.dtype, device=out.device)
    head = reached.state_head[:, -1]  # (b, H)
    return torch.where(reached.out, nan, out), Mamba3State(
        torch.where(reached.state[:, -1, ..., None], nan.to(state.h.dtype), state.h),
        torch.where(head[:, None, :, None], nan.to(state.k_prev.dtype), state.k_prev),
        x_last.to(state.v_prev.dtype),
        torch.where(head[..., None], nan.to(state.theta.dtype), state.theta),
    )
