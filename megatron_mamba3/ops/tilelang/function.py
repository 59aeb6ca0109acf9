"""`tilelang_scan`: the TileLang kernels behind an autograd Function, one call for any packing: rows with
`segment_ids` (`run_packed` turns them into document starts), or `cu_seqlens` documents laid out by
`chunk_layout` with one initial and final state each.

Forward: the `chunk_prep` kernel and a few small PyTorch ops for the per-token and per-chunk terms of
`chunk_terms` (with a `Mamba3Prep`, also the prep: Δ = softplus, A's decay rate, B/C RMSNorm), then the
three chunk-parallel kernels of the scan, or `chunk_walk` in their place where there are enough (row, head)
pairs (`walks`).
Backward: the three backward kernels for the per-chunk work, on the forward's chunk starts h̃_c (saved,
bf16), and `terms_backward` for the scalar chains (math: `chunk_grad`) with its initial-state and per-token
parts in the `initial_grad` and `terms_grad` kernels (which also runs the prep's Δ and A chains; `norm_grad`
runs B/C's RMSNorm); gradients of every input, weight, the prep's weights and the initial state.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from megatron_mamba3.ops.interface import (
    Mamba3Inputs,
    Mamba3Prep,
    Mamba3State,
    Mamba3Weights,
    read_dims,
)
from megatron_mamba3.ops.tilelang.chunk_grad import BoundaryStates, PieceGrads, TermParts, terms_backward
from megatron_mamba3.ops.tilelang.chunk_layout import ChunkLayout, last_token_rows, packed_layout, unpacked_layout
from megatron_mamba3.ops.tilelang.chunk_math import as_dtype
from megatron_mamba3.ops.toolkit.finite import finite_values
from megatron_mamba3.ops.toolkit.packing import run_packed

SUPPORTED_N = (64, 128)
SUPPORTED_P = (64, 128)
SUPPORTED_R = (1, 2, 4)
TILE_ROWS = 64  # Q·R: tokens per chunk times rank
# (row, head) pairs per SM from which the forward walks the chunks (`walks`). Measured on an H100 (132 SMs,
# benchmarks/README.md): chunk_walk's one block per pair takes about as long for 1..132 pairs, and 1.26 times
# that for 133..264 (two blocks per SM); against the chunk-parallel kernels it was 1.11 / 1.01 times slower at
# 128 pairs (SISO / MIMO R4), 0.98 / 0.93 at 192 and 0.76 / 0.69 at 256.
WALK_ROWS_PER_SM = 1.5


def unsupported(n: int, p: int, R: int) -> str | None:
    """Why the kernels cannot run state size n, head dim p and MIMO rank R, or None."""
    if n not in SUPPORTED_N:
        return f"n={n} is not supported {SUPPORTED_N}"
    if p not in SUPPORTED_P:
        return f"p={p} is not supported {SUPPORTED_P}"
    if R not in SUPPORTED_R:
        return f"R={R} is not supported {SUPPORTED_R}"
    return None


class _Launch(NamedTuple):
    """What every kernel launch of one call shares: the kernels' config, the chunk layout, the inputs
    contiguous in their dtype, `kernel_terms` (cs, wd and wo are views of `scalars`; theta_start and theta_final
    are filled by `state_pass`), the weights as fp32 (ones where absent) and the prep's dt_bias, B_norm, C_norm
    fp32 (stand-ins of their shapes without the prep, never read). States (h_in, theta_0, theta_final) are per
    row, or per document with `cu_seqlens`."""

    config: object
    layout: ChunkLayout
    x: Tensor
    z: Tensor
    B: Tensor
    C: Tensor
    dt: Tensor
    angles: Tensor
    seg: Tensor
    mult: Tensor
    totals: Tensor
    theta_0: Tensor
    theta_start: Tensor
    theta_final: Tensor
    scalars: Tensor
    cs: Tensor
    wd: Tensor
    wo: Tensor
    h_in: Tensor
    B_bias: Tensor
    C_bias: Tensor
    D: Tensor
    mimo_x: Tensor
    mimo_z: Tensor
    mimo_o: Tensor
    norm: Tensor
    dt_bias: Tensor
    B_norm: Tensor
    C_norm: Tensor


_INPUT_FIELDS = ("x", "z", "B", "C", "dt", "angles")  # the launch's inputs


def _prepare(
    inputs: Mamba3Inputs, weights: Mamba3Weights, starts: Tensor | None, cu_seqlens: Tensor | None,
    state: Mamba3State, prep: Mamba3Prep | None,
) -> _Launch:
    """The launch of one call: rows with document `starts` (b, l) bool (None: one document a row), or
    `cu_seqlens` documents (with one state each); with `prep` (raw dt, A, B, C in), its Δ, B and C are
    chunk_prep's outputs."""
    from megatron_mamba3.ops.tilelang.kernels import KernelConfig

    b, length, H, p = inputs.x.shape
    R, G, n = inputs.B.shape[2:]
    S = inputs.angles.shape[-1]
    Q = TILE_ROWS // R
    packed = cu_seqlens is not None
    layout = packed_layout(cu_seqlens, length, Q) if packed else unpacked_layout(starts, b, length, Q, inputs.x.device)
    config = KernelConfig(
        H, p, n, R, G, S, Q, weights.norm is not None, None if prep is None else float(prep.A_floor), packed,
        torch.are_deterministic_algorithms_enabled(),
    )

    def f32(t, shape):
        return _ones(shape, inputs.x.device) if t is None else as_dtype(t, torch.float32).contiguous()

    inputs = Mamba3Inputs(*(t.contiguous() for t in inputs))
    mimo = [f32(t, (H, R, p)) for t in (weights.mimo_x, weights.mimo_z, weights.mimo_o)]
    norm = f32(None if weights.norm is None else weights.norm.view(H, p), (H, p))
    B_bias, C_bias, D = f32(weights.B_bias, None), f32(weights.C_bias, None), f32(weights.D, None)
    # Without the prep, chunk_prep and terms_grad take tensors of its weights' shapes that they never read.
    prep_weights = (D, *(f32(None, (n,)),) * 2) if prep is None else tuple(f32(t, None) for t in prep[:3])
    terms, inputs = kernel_terms(config, inputs, mimo[0], layout, state, prep_weights)
    x, z, B, C, dt, angles = (getattr(inputs, field) for field in _INPUT_FIELDS)
    return _Launch(config, layout, x, z, B, C, dt, angles, *terms, B_bias, C_bias, D, *mimo, norm, *prep_weights)


@functools.cache
def _cached_ones(shape: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.ones(shape, device=device)


def _ones(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """A read-only fp32 tensor of ones of `shape` on `device`, the kernels' stand-in for an absent weight: made
    once per shape and device (one op fewer per call), except while a CUDA graph is captured, whose memory pool
    a cached tensor would outlive."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.ones(shape, device=device)
    return _cached_ones(shape, device)


def _empty(device: torch.device, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialised tensor of `shape` on `device`, fp32 unless `dtype`: a kernel's output buffer."""
    return torch.empty(shape, device=device, dtype=dtype)


def _state_buffers(launch: _Launch, saves: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The forward's state outputs, unfilled: h̃_c (b, nc, H, n, p) bf16 (with no rows unless it `saves` them,
    `chunk_walk` only), the final states' h (states, H, p, n) and key (states, R, H, n) fp32."""
    b, nc, H = launch.mult.shape
    c, states = launch.config, launch.h_in.shape[0]
    empty = functools.partial(_empty, launch.x.device)
    starts_h = empty(b if saves else 0, nc, H, c.n, c.p, dtype=torch.bfloat16)
    return starts_h, empty(states, H, c.p, c.n), empty(states, c.R, H, c.n)


def _chunk_starts(launch: _Launch) -> tuple[Tensor, Tensor, Tensor]:
    """The state each chunk starts from, h̃_c (b, nc, H, n, p) bf16, and the final states' h (states, H, p, n)
    and key rot(θ_final, B_last + B_bias) (states, R, H, n), fp32 (h̃ after a row's or document's last chunk is h
    there: its last token has no successor); `state_pass` also fills the launch's theta_start and theta_final."""
    from megatron_mamba3.ops.tilelang.kernels import kernel_set

    kernels = kernel_set(launch.config)
    b, nc, H = launch.mult.shape
    chunk_states = _empty(launch.x.device, b, nc, H, launch.config.n, launch.config.p)
    kernels.chunk_state(
        launch.x, launch.B, launch.angles, launch.dt, launch.seg, launch.layout.span, launch.cs, launch.wd, launch.wo,
        launch.B_bias, launch.mimo_x, chunk_states,
    )
    starts_h, h_final, k_final = _state_buffers(launch)
    kernels.state_pass(
        chunk_states, launch.mult, launch.h_in, launch.seg, launch.layout.span, launch.totals, launch.theta_0, launch.B,
        launch.B_bias, starts_h, h_final, launch.theta_start, launch.theta_final, k_final,
    )
    return starts_h, h_final, k_final


def _chunk_args(launch: _Launch) -> tuple[Tensor, ...]:
    """The per-chunk kernels' leading arguments: x, B, C, angles, Δ, seg, span, cs, wd, wo, θ_start."""
    return (
        launch.x, launch.B, launch.C, launch.angles, launch.dt, launch.seg, launch.layout.span, launch.cs, launch.wd,
        launch.wo, launch.theta_start,
    )


def _add_at_last_tokens(layout: ChunkLayout, t: Tensor, rows: Tensor) -> None:
    """t (b, l, ...) += rows (states, ...) at each state's last token (`last_token_rows`), in t's dtype."""
    if layout.last_tokens is None:
        t.select(1, -1).add_(rows)
    else:
        t[0].index_add_(0, layout.last_tokens, as_dtype(rows, t.dtype))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def walks(p: int, rows: int, device: torch.device) -> bool:
    """Whether the forward at head dim `p` over `rows` (row, head) pairs runs as `chunk_walk` on `device`
    (one block per pair walking its chunks in order, the state on chip): at head dim 64 (where two of its
    blocks fit an SM; at 128 one does, unmeasured) from `WALK_ROWS_PER_SM` pairs per SM on. Otherwise (and
    off CUDA devices, where the kernels never run: meta tensors in tests) the chunk-parallel `chunk_state`,
    `state_pass` and `chunk_output` run, which keep every SM busy with few pairs."""
    if p != 64 or device.type != "cuda":
        return False
    return rows >= WALK_ROWS_PER_SM * _multiprocessors(device)


def _walks_over(x: Tensor) -> bool:
    """`walks` for the launch of x (b, l, H, p): b·H (row, head) pairs at head dim p (`cu_seqlens` documents
    are one row, b = 1, as the kernels lay them out)."""
    b, _, H, p = x.shape
    return walks(p, b * H, x.device)


def forward_path(inputs: Mamba3Inputs) -> str:
    """The receipt's name of the forward these inputs run: "chunk_walk" or "chunk-parallel" (`_walks_over`)."""
    return "chunk_walk" if _walks_over(inputs.x) else "chunk-parallel"


def _walk(launch: _Launch, saves: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward in one kernel, `chunk_walk`: (out, h̃_c, the final states' h and key), as `_chunk_starts`
    and `chunk_output` give them, h̃_c only where it `saves` the chunk starts for a backward (else a tensor with
    no rows: b·nc·H·n·p bf16 neither allocated nor written); it fills the launch's theta_start and theta_final
    as `state_pass` does."""
    from megatron_mamba3.ops.tilelang.kernels import kernel_set

    out = torch.empty_like(launch.x)
    starts_h, h_final, k_final = _state_buffers(launch, saves)
    kernel_set(launch.config).chunk_walk(
        launch.x, launch.z, launch.B, launch.C, launch.angles, launch.dt, launch.seg, launch.layout.span, launch.cs,
        launch.wd, launch.wo, launch.mult, launch.totals, launch.h_in, launch.theta_0, launch.B_bias, launch.C_bias,
        launch.D, launch.mimo_x, launch.mimo_z, launch.mimo_o, launch.norm, out, starts_h, launch.theta_start,
        h_final, launch.theta_final, k_final,
    )
    return out, starts_h, h_final, k_final


def _forward_kernels(launch: _Launch, inputs: Mamba3Inputs, weights: Mamba3Weights, saves: bool):
    """Run the forward kernels: (out (b, l, H, p) bf16, final state fp32, the chunk starts h̃_c (b, nc, H, n, p)
    bf16 for the backward, with no rows where the launch `walks` and a backward will not run: not `saves`)."""
    from megatron_mamba3.ops.tilelang.kernels import kernel_set

    if _walks_over(launch.x):
        out, starts_h, h_final, k_final = _walk(launch, saves)
    else:
        starts_h, h_final, k_final = _chunk_starts(launch)
        out = torch.empty_like(launch.x)
        x, B, C, *rest = _chunk_args(launch)
        kernel_set(launch.config).chunk_output(
            x, launch.z, B, C, *rest, starts_h, launch.B_bias, launch.C_bias, launch.D,
            launch.mimo_x, launch.mimo_z, launch.mimo_o, launch.norm, out,
        )
    v_final = as_dtype(last_token_rows(inputs.x, launch.layout.last_tokens), torch.float32)
    final = Mamba3State(h_final, k_final, v_final, launch.theta_final)
    return out, final, starts_h


def _backward_kernels(
    launch: _Launch, inputs: Mamba3Inputs, weights: Mamba3Weights, starts: Tensor, state: Mamba3State,
    grad_out: Tensor | None, grad_final: Mamba3State, starts_h: Tensor, h_final: Tensor,
) -> tuple[Mamba3Inputs, Mamba3Weights, Mamba3State]:
    """Gradients of every input, weight (None where absent) and the initial state, from the backward kernels
    (per-chunk work) and `terms_backward` (the (b, l, H)-sized scalar chains); `launch` is the forward's,
    h_final its final h (b, H, p, n). grad_out and each field of grad_final may be None (no gradient: zero).

    The backward runs on finite copies of the inputs, the initial state's k_prev and v_prev (the only fields
    it reads) and the per-token terms (as the reference's chunked form does, `toolkit.finite`): a token's
    non-finite value then contributes an exact 0 wherever its output gradient is 0, instead of 0 · NaN, so
    the gradients of other tokens and documents stay finite and equal to a run without it. The kernels set
    the non-finite entries of x and z, the largest inputs, to 0 themselves once loaded
    (`kernels.finite_in_place`), and read the forward's chunk starts `starts_h` (b, nc, H, n, p) bf16 with
    theirs as 0 (`kernels.load_state`; those are non-finite only in the documents a bad value reaches): no
    copies of those. Unlike the reference, the output gradient at the outputs the forward made non-finite is
    not dropped.

    The forward's terms are spent once copied: their buffers (the backward's alone) take the backward's
    outputs of the same shape and dtype (∂(AΔ), ∂wd, ∂wo into `scalars`, dθ's first-piece sums into
    `theta_start`, dh̃_0 into `h_in`)."""
    from megatron_mamba3.ops.tilelang.backward_kernels import backward_set

    spent = launch
    prepped = launch.config.A_floor is not None
    raw = inputs
    # The launch's x and z (contiguous), which the kernels make finite themselves (`kernels.finite_in_place`);
    # with the prep, chunk_prep's Δ, B and C (terms_grad reads the raw A (as u) and dt).
    read_as_finite = ("x", "z")
    inputs = inputs._replace(**{field: getattr(launch, field) for field in read_as_finite})
    if prepped:
        inputs = inputs._replace(dt=launch.dt, B=launch.B, C=launch.C)
    inputs = Mamba3Inputs(*(
        t if field in read_as_finite else finite_values(t) for field, t in zip(Mamba3Inputs._fields, inputs)
    ))
    state = state._replace(k_prev=finite_values(state.k_prev), v_prev=finite_values(state.v_prev))
    scalars = finite_values(launch.scalars)
    launch = launch._replace(
        **{field: getattr(inputs, field).contiguous() for field in _INPUT_FIELDS},
        **dict(zip(("cs", "wd", "wo"), scalars.unbind(0))),
        scalars=scalars,
        mult=finite_values(launch.mult),
        theta_start=finite_values(launch.theta_start),
        h_in=finite_values(launch.h_in),
        # θ_final is read only for the final key's gradient
        theta_final=launch.theta_final if grad_final.k_prev is None else finite_values(launch.theta_final),
    )
    dh_in = spent.h_in
    kernels = backward_set(launch.config)
    c = launch.config
    b, length, H, p = launch.x.shape
    nc = launch.mult.shape[1]
    rows = nc * c.Q  # padded length
    empty = functools.partial(_empty, launch.x.device)
    x, B, C, *scalar_args = _chunk_args(launch)

    dout = torch.zeros_like(x) if grad_out is None else as_dtype(grad_out, x.dtype).contiguous()
    dy, dz = empty(b, H, rows * c.R, p), torch.empty_like(launch.z)
    gate = empty(b, nc, H, 3, c.R, p)  # chunk_dy fills the slots of the gate weights present: mimo_z, mimo_o, norm
    gc = empty(b, nc, H, c.n, p)
    kernels.chunk_dy(
        x, launch.z, B, C, *scalar_args, starts_h, launch.B_bias, launch.C_bias, launch.D, launch.mimo_x,
        launch.mimo_z, launch.mimo_o, launch.norm, dout, dy, dz, gc, gate,
    )
    inputs, launch = inputs._replace(z=None), launch._replace(z=None)  # z had chunk_dy as its one reader
    ds = empty(b * nc, H, 2, c.n, p, dtype=torch.bfloat16)  # dS as bf16 hi and lo halves
    if grad_final.h is None:
        dh_final = torch.zeros_like(dh_in)
    else:
        dh_final = as_dtype(grad_final.h, torch.float32).transpose(-1, -2).contiguous()
    kernels.state_pass_bwd(gc, launch.mult, launch.seg, dh_final, ds.view(b, nc, H, 2, c.n, p), dh_in)
    del gc  # read by state_pass_bwd alone: its b·nc·H·n·p fp32 go back before chunk_dqkv's outputs (peak memory)

    # dB, dC: sums over a group's heads by atomic adds, float64 where deterministic (backward_kernels.head_sum_dtype),
    # zeroed in one op
    head_sum_dtype = torch.float64 if c.deterministic else torch.float32
    dB, dC = torch.zeros(2, b, length, c.R, c.G, c.n, device=x.device, dtype=head_sum_dtype).unbind(0)
    dx = torch.empty_like(x)  # in x's dtype: the kernel rounds it once
    dB_bias, dC_bias, dmimo_x = empty(b, nc, H, c.R, c.n), empty(b, nc, H, c.R, c.n), empty(b, nc, H, c.R, p)
    dD, theta_turn = empty(b, H, rows * c.R), empty(b, H, rows)
    theta_dt = torch.zeros(b, rows, c.S, device=x.device, dtype=torch.float64)  # float64 sums over the heads
    kernels.chunk_dqkv(
        x, B, C, *scalar_args, ds, starts_h, dy, launch.mult, launch.B_bias, launch.C_bias, launch.D,
        launch.mimo_x, dx, dB, dC, dB_bias, dC_bias, dmimo_x, dD, spent.cs, spent.wd, spent.wo, theta_turn,
        theta_dt, spent.theta_start,
    )

    dlog_alpha, dwd, dwo = spent.scalars.transpose(2, 3).unbind(0)  # per token, (b, l_pad, H)
    final = Mamba3State(*(None if g is None else as_dtype(g, torch.float32) for g in grad_final))
    pieces = PieceGrads(
        dlog_alpha, dwd, dwo, theta_turn.transpose(1, 2), theta_dt, spent.theta_start, dh_in.transpose(-1, -2), final
    )
    boundary = BoundaryStates(
        launch.h_in.transpose(-1, -2), None if grad_final.h is None else finite_values(h_final)
    )
    dbias = empty(b, nc, H) if prepped else launch.mult  # terms_grad's per-chunk sums of ∂dt_bias (prep only)
    per_token = _terms_grad_kernel(kernels, launch, raw.dt.contiguous() if prepped else launch.dt, dbias)
    parts = TermParts(_initial_grad_kernel(kernels, launch), per_token)
    last_tokens = launch.layout.last_tokens
    rest = terms_backward(inputs, weights, starts, state, launch, pieces, boundary, parts, last_tokens=last_tokens)
    if rest.x_last is not None:
        _add_at_last_tokens(launch.layout, dx, rest.x_last)
    if rest.B_last is not None:
        _add_at_last_tokens(launch.layout, dB, rest.B_last)
    chunk_sum = lambda t: t.sum(dim=(0, 1))  # noqa: E731  (the per-chunk partial sums (b, nc, ...) of a weight's gradient)
    grads_prep = None
    if prepped:  # through the RMSNorms of B and C to the raw rows and the norm weights
        dB, dB_norm = _norm_grad(kernels, dB, raw.B, launch.layout.span, launch.B_norm, nc)
        dC, dC_norm = _norm_grad(kernels, dC, raw.C, launch.layout.span, launch.C_norm, nc)
        grads_prep = (chunk_sum(dbias), dB_norm, dC_norm)
    else:
        dB, dC = as_dtype(dB, inputs.B.dtype), as_dtype(dC, inputs.C.dtype)  # straight from the head sums
    grads_inputs = Mamba3Inputs(dx, dz, dB, dC, rest.dt, rest.A, rest.trap, rest.angles)
    mimo = weights.mimo_x is not None
    gate_z, gate_o, gate_norm = gate.unbind(3) if mimo or weights.norm is not None else (None,) * 3
    grads_weights = Mamba3Weights(
        chunk_sum(dB_bias) if rest.B_bias is None else chunk_sum(dB_bias) + rest.B_bias,
        chunk_sum(dC_bias), dD.sum(dim=(0, 2)),
        chunk_sum(dmimo_x) + rest.mimo_x if mimo else None,
        chunk_sum(gate_z) if mimo else None,
        chunk_sum(gate_o) if mimo else None,
        chunk_sum(gate_norm).sum(dim=1).reshape(H * p) if weights.norm is not None else None,
    )
    return grads_inputs, grads_weights, rest.state, grads_prep


def _norm_grad(kernels, grad: Tensor, raw: Tensor, span: Tensor, weight: Tensor, nc: int) -> tuple[Tensor, Tensor]:
    """RMSNorm's backward by the `norm_grad` kernel: the head sums of ∂(normed B or C) (b, l, R, G, n) and
    the raw rows (bf16) -> (∂raw rows in their dtype, ∂weight (n,) fp32 from per-chunk partial sums)."""
    draw = torch.empty(grad.shape, device=grad.device, dtype=raw.dtype)
    dweight = torch.empty(grad.shape[0], nc, grad.shape[-1], device=grad.device, dtype=torch.float32)
    kernels.norm_grad(grad, raw.contiguous(), span, weight, draw, dweight)
    return draw, dweight.sum(dim=(0, 1))


def _initial_grad_kernel(kernels, launch: _Launch):
    """`chunk_grad.initial_state_grads` as the `initial_grad` kernel runs it on the backward's finite inputs
    and state, one per row or `cu_seqlens` document; ∂h̃_0 and h̃_0 come as (states, H, p, n) views of the
    kernels' (states, H, n, p) buffers."""

    def initial_state(inputs: Mamba3Inputs, weights: Mamba3Weights, state: Mamba3State, dh_in: Tensor, h_in: Tensor):
        b, H, p, n = dh_in.shape
        R, S = launch.config.R, launch.config.S
        empty = functools.partial(_empty, dh_in.device)
        dk_prev, dv_prev, dmimo_x = empty(b, R, H, n), empty(b, H, p), empty(b, H, R, p)
        dw0, dtheta_0 = empty(b, H), empty(b, H, S)
        k_prev, v_prev = (as_dtype(t, torch.float32).contiguous() for t in (state.k_prev, state.v_prev))
        kernels.initial_grad(
            dh_in.transpose(-1, -2), h_in.transpose(-1, -2), k_prev, v_prev, launch.mimo_x, launch.dt,
            inputs.trap.contiguous(), launch.layout.docs, dk_prev, dv_prev, dmimo_x, dw0, dtheta_0,
        )
        return dk_prev, dv_prev, None if weights.mimo_x is None else dmimo_x.sum(dim=0), dw0, dtheta_0

    return initial_state


def _terms_grad_kernel(kernels, launch: _Launch, dt_raw: Tensor, dbias: Tensor):
    """`chunk_grad.token_grads` as the `terms_grad` kernel runs it on the backward's finite inputs: the
    piece sums as chunk_dqkv wrote them ((b, H, l_pad) fp32 buffers, Σ_h φ Δ float64) -> bf16 gradients.
    With the prep, inputs.A is the raw u of A = decay_rate(u), dt_raw (b, l, H) the raw dt, and the
    gradients are those of the raw dt and u, with dbias (b, nc, H) filled with ∂dt_bias's per-chunk sums
    (without the prep, neither is read)."""

    def per_token(inputs: Mamba3Inputs, starts: Tensor, seg: Tensor, grads: PieceGrads, carry: Tensor, dw0: Tensor):
        del starts  # the kernel reads the document starts from seg
        ddt, dA, dtrap = (torch.empty_like(launch.dt) for _ in range(3))
        dangles = torch.empty_like(launch.angles)
        per_head = (g.transpose(1, 2) for g in (grads.log_alpha, grads.wd, grads.wo, grads.theta_turn))
        kernels.terms_grad(
            launch.dt, inputs.A.contiguous(), inputs.trap.contiguous(), launch.angles, seg, launch.layout.span,
            *per_head,
            grads.theta_dt, carry, dw0, dt_raw, launch.dt_bias, ddt, dA, dtrap, dangles, dbias,
        )
        return ddt, dA, dtrap, dangles

    return per_token


def kernel_terms(
    config, inputs: Mamba3Inputs, mimo_x: Tensor, layout: ChunkLayout, state: Mamba3State,
    prep_weights: tuple[Tensor, ...],
) -> tuple[tuple[Tensor, ...], Mamba3Inputs]:
    """`chunk_terms` in the kernels' layouts by the `chunk_prep` kernel (contiguous inputs, mimo_x (H, R, p)
    fp32, ones for SISO; the initial states, one per row or `cu_seqlens` document; prep_weights: dt_bias (H,),
    B_norm and C_norm (n,) fp32, read with the prep only): (terms, the inputs the other kernels read: with the
    prep, Δ, B and C are chunk_prep's bf16 outputs). The terms: the layout's seg (b, l_pad) int32,
    mult (b, nc, H), each chunk's last document's angle total (b, nc, H, S) and θ_0 (states, H, S) for
    `state_pass`, which fills theta_start (b, nc, H, S) and theta_final (states, H, S) (empty here), scalars
    (3, b, H, l_pad) (cs, wd, wo, also returned as its views) and h̃_0 as (states, H, n, p), all contiguous
    fp32 (seg int32)."""
    from megatron_mamba3.ops.tilelang.kernels import kernel_set

    b, _, H = inputs.dt.shape
    seg = layout.seg
    rows = seg.shape[1]
    nc, states = rows // config.Q, state.h.shape[0]
    empty = functools.partial(_empty, inputs.x.device)
    scalars, mult, totals = empty(3, b, H, rows), empty(b, nc, H), empty(b, nc, H, config.S)
    cs, wd, wo = scalars.unbind(0)
    h, k_prev, v_prev, theta_0 = (as_dtype(t, torch.float32).contiguous() for t in state)
    h_in = empty(states, H, config.n, config.p)
    prepped = inputs  # without the prep, chunk_prep writes none of its outputs Δ, B and C: the inputs stand in
    if config.A_floor is not None:
        prepped = inputs._replace(dt=torch.empty_like(inputs.dt), B=torch.empty_like(inputs.B), C=torch.empty_like(inputs.C))
    kernel_set(config).chunk_prep(
        inputs.dt, inputs.A, inputs.trap, inputs.angles, seg, layout.span, h, k_prev, v_prev, mimo_x,
        prep_weights[0], inputs.B, inputs.C, *prep_weights[1:], cs, wd, wo, mult, totals, h_in, prepped.dt,
        prepped.B, prepped.C,
    )
    theta_start, theta_final = empty(b, nc, H, config.S), empty(states, H, config.S)
    terms = (seg, mult, totals, theta_0, theta_start, theta_final, scalars, cs, wd, wo, h_in)
    return terms, prepped


class _TileLangScan(torch.autograd.Function):
    """Arguments: the prep's A floor (None: no prep), whether a backward may follow (`saves`: the forward then
    keeps what it needs), then the leaves: 8 inputs, 7 weights (None where absent),
    4 state tensors (one per row, or per `cu_seqlens` document), the prep's dt_bias, B_norm, C_norm (None
    without it), then starts (b, l) bool and cu_seqlens (N + 1,) (at most one given; neither: each row one document)."""

    @staticmethod
    def forward(ctx, A_floor, saves, *leaves):
        inputs, weights, state, prep, starts, cu_seqlens = _split(leaves, A_floor)
        ctx.present = tuple(isinstance(t, Tensor) for t in leaves)
        ctx.set_materialize_grads(False)  # an output without a gradient is None, not zeros: its chain is skipped
        ctx.launch = _prepare(inputs, weights, starts, cu_seqlens, state, prep)  # reused by the backward
        out, final, ctx.starts_h = _forward_kernels(ctx.launch, inputs, weights, saves)
        ctx.save_for_backward(*(t for t in leaves if isinstance(t, Tensor)), final.h)
        return (out, *final)

    @staticmethod
    def backward(ctx, grad_out, *grad_final):
        *saved, h_final = ctx.saved_tensors
        saved = iter(saved)
        leaves = [next(saved) if present else None for present in ctx.present]
        inputs, weights, state, _, starts, _ = _split(leaves, None)
        grads = _backward_kernels(
            ctx.launch, inputs, weights, starts, state, grad_out, Mamba3State(*grad_final), ctx.starts_h, h_final
        )
        del ctx.launch, ctx.starts_h
        found = [*grads[0], *grads[1], *grads[2], *(grads[3] or (None,) * 3), None, None]
        return (None, None, *(
            None if leaf is None or not ctx.needs_input_grad[index + 2] else as_dtype(grad, leaf.dtype)
            for index, (leaf, grad) in enumerate(zip(leaves, found))
        ))


def _split(leaves, A_floor):
    """(inputs, weights, state, the prep or None, starts, cu_seqlens) from `_TileLangScan`'s leaves."""
    prep = None if A_floor is None else Mamba3Prep(*leaves[19:22], A_floor)
    inputs, weights, state = Mamba3Inputs(*leaves[:8]), Mamba3Weights(*leaves[8:15]), Mamba3State(*leaves[15:19])
    return inputs, weights, state, prep, leaves[22], leaves[23]


def _rows(
    inputs: Mamba3Inputs, weights: Mamba3Weights, starts: Tensor | None, state: Mamba3State, *,
    prep: Mamba3Prep | None, cu_seqlens: Tensor | None = None,
):
    inputs = Mamba3Inputs(*(as_dtype(t, inputs.x.dtype) for t in inputs))
    prep_leaves, A_floor = (None,) * 3, None
    if prep is not None:
        prep_leaves, A_floor = prep[:3], prep.A_floor
    leaves = (*inputs, *weights, *state, *prep_leaves, starts, cu_seqlens)
    saves = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in leaves)
    out, *final = _TileLangScan.apply(A_floor, saves, *leaves)
    return out, Mamba3State(*final)


def _packed_documents(
    inputs: Mamba3Inputs, weights: Mamba3Weights, cu_seqlens: Tensor, initial_state: Mamba3State | None,
    prep: Mamba3Prep | None,
) -> tuple[Tensor, Mamba3State]:
    """`cu_seqlens` documents (b = 1, l > 0) in one call of the kernels, each from its initial state (zeros
    where None) -> (out, the documents' final states). An empty document's final state is its initial state
    (where the kernels' last token does not exist)."""
    dims = read_dims(inputs)
    state = Mamba3State.given_or_zeros(initial_state, cu_seqlens.numel() - 1, dims, inputs.x)
    cu_seqlens = cu_seqlens.to(inputs.x.device)
    out, final = _rows(inputs, weights, None, state, prep=prep, cu_seqlens=cu_seqlens)
    empty = cu_seqlens[1:] == cu_seqlens[:-1]
    final = Mamba3State(*(
        torch.where(empty.view(-1, *(1,) * (got.dim() - 1)), as_dtype(kept, got.dtype), got)
        for got, kept in zip(final, state)
    ))
    return out, final


def tilelang_scan(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    *,
    segment_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Mamba3State | None = None,
    chunk_size: int = 64,
    prep: Mamba3Prep | None = None,
) -> tuple[Tensor, Mamba3State]:
    """The scan on the TileLang kernels: (b, l, ...) bf16 CUDA inputs -> (out (b, l, H, p), final state).

    Same contract as `mamba3_chunked`, arguments as `mamba3_scan` checks them and the backend's
    `why_not` accepts them. `chunk_size` is accepted for the common signature; the kernels use their
    own tile (64 / R tokens, so Q·R = 64 rows), which never changes the math. `segment_ids` and
    `cu_seqlens` documents run inside the kernels, in one call (`chunk_layout`). With `prep`, dt, A, B
    and C are raw and the kernels run the prep (chunk_prep forward; terms_grad and norm_grad backward).
    """
    del chunk_size
    dims = read_dims(inputs)
    if dims.l > 0 and segment_ids is None:
        if cu_seqlens is not None:
            return _packed_documents(inputs, weights, cu_seqlens, initial_state, prep)
        state = Mamba3State.given_or_zeros(initial_state, dims.b, dims, inputs.x)
        return _rows(inputs, weights, None, state, prep=prep)  # one document a row: no starts to lay out
    return run_packed(
        functools.partial(_rows, prep=prep), inputs, weights, dims,
        segment_ids=segment_ids, cu_seqlens=cu_seqlens, initial_state=initial_state,
    )
