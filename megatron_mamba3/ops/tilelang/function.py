"""`tilelang_scan`: the TileLang forward behind an autograd Function, with packing via `run_packed`.

Forward: `chunk_terms` (small PyTorch ops on (b, l, H)-sized scalars), then the three kernels.
Backward: recomputed through `chunked_parallel`, the PyTorch form of the same chunk-parallel math,
with autograd (no backward kernels yet); it yields gradients for every input, weight and the
initial state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_mamba3.ops.interface import Mamba3Inputs, Mamba3State, Mamba3Weights, scan_dims
from megatron_mamba3.ops.reference.packing import run_packed
from megatron_mamba3.ops.tilelang.chunk_math import chunk_terms, chunked_parallel, final_state

SUPPORTED_N = (64, 128)
SUPPORTED_P = (64, 128)
SUPPORTED_R = (1, 2, 4)
TILE_ROWS = 64  # Q·R: tokens per chunk times rank


def unsupported(n: int, p: int, R: int) -> str | None:
    """Why the kernels cannot run state size n, head dim p and MIMO rank R, or None."""
    if n not in SUPPORTED_N:
        return f"n={n} is not supported {SUPPORTED_N}"
    if p not in SUPPORTED_P:
        return f"p={p} is not supported {SUPPORTED_P}"
    if R not in SUPPORTED_R:
        return f"R={R} is not supported {SUPPORTED_R}"
    return None


def _forward_kernels(inputs: Mamba3Inputs, weights: Mamba3Weights, starts: Tensor, state: Mamba3State):
    """Run the kernels: (out (b, l, H, p) bf16, final state fp32)."""
    from megatron_mamba3.ops.tilelang.kernels import KernelConfig, kernel_set

    b, length, H, p = inputs.x.shape
    R, G, n = inputs.B.shape[2:]
    S = inputs.angles.shape[-1]
    Q = TILE_ROWS // R
    kernels = kernel_set(KernelConfig(H, p, n, R, G, S, Q, weights.norm is not None))
    seg, mult, theta_start, theta_final, cs, wd, wo, h_in = kernel_terms(inputs, weights, starts, state, Q)
    nc = mult.shape[1]
    x, z, B, C, dt, _, _, angles = (t.contiguous() for t in inputs)
    f32 = lambda t, shape: (torch.ones(shape, device=x.device) if t is None else t.float()).contiguous()  # noqa: E731
    mimo_x, mimo_z, mimo_o = (f32(t, (H, R, p)) for t in (weights.mimo_x, weights.mimo_z, weights.mimo_o))
    norm = f32(weights.norm, (H * p,)).view(H, p)
    B_bias, C_bias, D = f32(weights.B_bias, None), f32(weights.C_bias, None), f32(weights.D, None)

    chunk_states = torch.empty(b, nc, H, n, p, device=x.device, dtype=torch.float32)
    kernels.chunk_state(x, B, angles, dt, seg, cs, wd, wo, theta_start, B_bias, mimo_x, chunk_states)
    starts_h = torch.empty(b, nc, H, n, p, device=x.device, dtype=torch.bfloat16)
    h_final = torch.empty(b, H, n, p, device=x.device, dtype=torch.float32)
    kernels.state_pass(chunk_states, mult, h_in, starts_h, h_final)
    out = torch.empty_like(x)
    kernels.chunk_output(
        x, z, B, C, angles, dt, seg, cs, wd, wo, theta_start, starts_h,
        B_bias, C_bias, D, mimo_x, mimo_z, mimo_o, norm, out,
    )
    return out, final_state(inputs, weights, theta_final, h_final.transpose(-1, -2).contiguous())


def kernel_terms(inputs: Mamba3Inputs, weights: Mamba3Weights, starts: Tensor, state: Mamba3State, Q: int):
    """`chunk_terms` in the kernels' layouts: seg, mult, theta_start, theta_final as there, cs, wd, wo
    as (b, H, l_pad) and h̃_0 as (b, H, n, p), all contiguous."""
    terms = chunk_terms(inputs, weights, starts, state, Q)
    per_head = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731
    return (
        terms.seg, terms.mult.contiguous(), terms.theta_start.contiguous(), terms.theta_final,
        per_head(terms.cs), per_head(terms.wd), per_head(terms.wo), terms.h_in.transpose(-1, -2).contiguous(),
    )


class _TileLangScan(torch.autograd.Function):
    """Leaves: 8 inputs, 7 weights (None where absent), 4 state tensors, then starts (b, l) bool."""

    @staticmethod
    def forward(ctx, *leaves):
        inputs, weights, state, starts = _split(leaves)
        ctx.save_for_backward(*(t for t in leaves if isinstance(t, Tensor)))
        ctx.present = tuple(isinstance(t, Tensor) for t in leaves)
        out, final = _forward_kernels(inputs, weights, starts, state)
        return (out, *final)

    @staticmethod
    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        leaves = [next(saved) if present else None for present in ctx.present]
        wanted = [i for i, t in enumerate(leaves[:-1]) if t is not None and ctx.needs_input_grad[i]]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(i in wanted) if t is not None else None for i, t in enumerate(leaves)]
            inputs, weights, state, starts = _split(leaves)
            out, final = chunked_parallel(inputs, weights, starts, state, TILE_ROWS // inputs.B.shape[2])
            pairs = [(o, g) for o, g in zip((out, *final), grads) if g is not None and o.requires_grad]
            if not pairs:
                return (None,) * len(leaves)
            outputs, grad_outputs = zip(*pairs)
            found = torch.autograd.grad(outputs, [leaves[i] for i in wanted], grad_outputs, allow_unused=True)
        result = [None] * len(leaves)
        for i, g in zip(wanted, found):
            result[i] = g
        return tuple(result)


def _split(leaves):
    inputs = Mamba3Inputs(*leaves[:8])
    weights = Mamba3Weights(*leaves[8:15])
    return inputs, weights, Mamba3State(*leaves[15:19]), leaves[19]


def _rows(inputs: Mamba3Inputs, weights: Mamba3Weights, starts: Tensor, state: Mamba3State):
    dtype = inputs.x.dtype
    inputs = Mamba3Inputs(*(t.to(dtype) for t in inputs))
    out, *final = _TileLangScan.apply(*inputs, *weights, *state, starts)
    return out, Mamba3State(*final)


def tilelang_scan(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    *,
    segment_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Mamba3State | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Mamba3State]:
    """The scan on the TileLang kernels: (b, l, ...) bf16 CUDA inputs -> (out (b, l, H, p), final state).

    Same contract as `mamba3_chunked`. `chunk_size` is accepted for the common signature; the
    kernels use their own tile (64 / R tokens, so Q·R = 64 rows), which never changes the math.
    `segment_ids` run inside the kernels; `cu_seqlens` documents run one call each.
    """
    del chunk_size
    dims = scan_dims(inputs, weights)
    reason = unsupported(dims.n, dims.p, dims.R)
    if reason is not None:
        raise ValueError(f"tilelang backend: {reason}")
    return run_packed(
        _rows, inputs, weights, dims, segment_ids=segment_ids, cu_seqlens=cu_seqlens, initial_state=initial_state
    )
