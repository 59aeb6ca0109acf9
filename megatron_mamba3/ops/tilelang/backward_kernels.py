"""The TileLang backward kernels of the chunk-parallel scan (math in `chunk_grad`).

    chunk_dy        grid (nc, H, b): recompute y, gate backward -> dy (fp32), dz, G_c = Σ inter q dyᵀ and
                    per-chunk partial sums of the gradients of the gate weights present
    state_pass_bwd  grid (n / 8, H, b): dH_c = G_c + mult_c dH_{c+1} in reverse, from each row's (packed: each
                    document's) ∂h_final at its last chunk; writes dS_c = dH_{c+1} as its bf16 hi and lo halves
                    (the gemms' operands) and dH_0 of each
    chunk_dqkv      grid (nc, H, b): from one build of the chunk's queries, keys, values, scores and dP:
                    dv -> dx, D and mimo_x partials; dk -> dB (atomic over a group's heads), B_bias partials;
                    dw_j = Σ_s k_{j,s}·(dS v_{j,s}); ∂mult_c = ⟨dS_c, h̃_c⟩; dq -> dC, C_bias partials; dθ;
                    the per-token scalar gradients ∂cs, ∂wd, ∂wo from dL = Σ_{r,s} dP ⊙ scores, dw and dinter;
                    ∂cs and dθ summed over the chunk's document pieces (`chunk_grad.PieceGrads`)
    terms_grad      grid (nc, b): the per-token chains to ∂Δ, ∂A, ∂trap and ∂angles (`chunk_grad.token_grads`),
                    from those piece sums, each chunk's ∂θ carry and ∂w0 (bf16 out); with the prep, on through
                    softplus and the decay rate to the raw dt and A, and per-chunk sums of ∂dt_bias
    initial_grad    grid (H, states): the initial state's part (`chunk_grad.initial_state_grads`): ∂k_prev, ∂v_prev,
                    ∂w0, per-row ∂mimo_x and h̃_0's term of ∂θ_0 from ∂h̃_0
    norm_grad       grid (nc, b), with the prep only: RMSNorm's backward from chunk_dqkv's ∂B (or ∂C)
                    sums to the raw rows (bf16) and per-chunk sums of the norm weight's gradient

Queries, keys and values are rebuilt per head in shared memory exactly as in the forward. Sizes that vary
(batch, length, chunks) are runtime sizes: one compiled set per `KernelConfig`.
"""

import functools
import math
from typing import NamedTuple

import tilelang.language as T
from tilelang.layout import make_full_bank_swizzled_layout as bank_swizzled

from megatron_mamba3.ops.tilelang.build import build
from megatron_mamba3.ops.tilelang.kernels import (
    BF16,
    CHUNK_THREADS,
    F32,
    F64,
    NORM_EPS,
    PREP_ROWS,
    SCAN_THREADS,
    STATE_ROWS,
    KernelConfig,
    bf16_rest,
    chunk_prologue,
    chunk_y_macro,
    decay_rate,
    decay_slope,
    decay_table,
    finite_in_place,
    gate_blocks_per_sm,
    gate_macro,
    load_state,
    pair_indices,
    reaches,
    segment_before,
    softplus_slope,
    span_first,
    span_last,
    starts_state,
    state_index,
    states_dim,
    token_row,
)


PIECE_SPAN = 8  # tokens per group in chunk_dqkv's two-level sums along document pieces


def dqkv_threads(R: int) -> int:
    """chunk_dqkv's threads per block: one block per SM either way (its shared memory); SISO's 16 warps hide
    more latency (1.9 against 2.4 ms at b8 l2048 H32 on an H100, 128 registers with 96 bytes spilled), MIMO's
    run slower (6.9 against 5.9 ms), so R > 1 keeps CHUNK_THREADS."""
    return 2 * CHUNK_THREADS if R == 1 else CHUNK_THREADS


class _GateTerms:
    """Expressions of the output gate's backward for row (i, r) = (row // R, row % R) and column pp, from
    the chunk's dout (do_s) and z (z_s) as bf16, mimo_z (gate_s), mimo_o (out_w_s), y (y_s) and 1/rms (inv_s)."""

    def __init__(self, R: int):
        self.R = R

    @staticmethod
    def silu(u):
        return u * T.sigmoid(u)

    def d_gated(self, do_s, z_s, gate_s, out_w_s, row, pp):
        """∂loss/∂(ŷ ⊙ norm): dout · mimo_o · silu(z · mimo_z)."""
        i, r = row // self.R, row % self.R
        return T.cast(do_s[i, pp], F32) * out_w_s[r, pp] * self.silu(T.cast(z_s[i, pp], F32) * gate_s[r, pp])

    def d_gate_input(self, do_s, z_s, gate_s, out_w_s, y_s, inv_s, norm_s, row, pp):
        """∂loss/∂u with u = z · mimo_z: dout · mimo_o · (ŷ ⊙ norm) · silu'(u)."""
        i, r = row // self.R, row % self.R
        u = T.cast(z_s[i, pp], F32) * gate_s[r, pp]
        sig = T.sigmoid(u)
        return T.cast(do_s[i, pp], F32) * out_w_s[r, pp] * y_s[row, pp] * inv_s[row] * norm_s[pp] * sig * (1.0 + u * (1.0 - sig))


@T.macro
def split_bf16(src, hi_s, lo_s):
    """hi_s + lo_s = src (a 2-D fp32 fragment) to ~16 mantissa bits: a gradient operand of the gemms
    below enters as two bf16 halves (two gemms), so the backward does not round gradients to bf16."""
    for i, j in T.Parallel(*hi_s.shape):
        hi_s[i, j] = T.cast(src[i, j], BF16)
        lo_s[i, j] = bf16_rest(src[i, j], T.cast(src[i, j], BF16))  # not hi_s: no read back of shared memory


@T.macro
def split_tile_bf16(SRC, b, h, first, hi_s, lo_s):
    """`split_bf16` of the tile SRC[b, h, first : first + rows, :] of a (batch, H, rows, cols) fp32 tensor in
    one read, into hi_s and lo_s."""
    for i, j in T.Parallel(*hi_s.shape):
        value = SRC[b, h, first + i, j]
        hi_s[i, j] = T.cast(value, BF16)
        lo_s[i, j] = bf16_rest(value, T.cast(value, BF16))  # not hi_s: no read back of shared memory


def _gate_terms(c: KernelConfig) -> _GateTerms:
    return _GateTerms(c.R)


def _chunk_dy(c: KernelConfig):
    H, p, n, R, G, S, Q = c.H, c.p, c.n, c.R, c.G, c.S, c.Q
    QR = Q * R
    batch, L, LP, NC, LPR, SB, SNC = T.dynamic("batch, L, LP, NC, LPR, SB, SNC")
    outputs_of, _ = chunk_y_macro(c, finite_reads=True)
    gate_weights, _ = gate_macro(c)
    gate = _gate_terms(c)
    mimo = R > 1  # mimo_z and mimo_o are given exactly when R > 1

    @T.prim_func
    def chunk_dy(
        X: T.Tensor((batch, L, H, p), BF16),
        Z: T.Tensor((batch, L, H, p), BF16),
        Bk: T.Tensor((batch, L, R, G, n), BF16),
        Cq: T.Tensor((batch, L, R, G, n), BF16),
        ANG: T.Tensor((batch, L, S), BF16),
        DT: T.Tensor((batch, L, H), BF16),
        SEG: T.Tensor((batch, LP), "int32"),
        SPAN: T.Tensor((SB, SNC, 2), "int32"),
        CS: T.Tensor((batch, H, LP), F32),
        WD: T.Tensor((batch, H, LP), F32),
        WO: T.Tensor((batch, H, LP), F32),
        THS: T.Tensor((batch, NC, H, S), F32),
        HS: T.Tensor((batch, NC, H, n, p), BF16),
        B_BIAS: T.Tensor((H, R, n), F32),
        C_BIAS: T.Tensor((H, R, n), F32),
        D: T.Tensor((H,), F32),
        MIMO_X: T.Tensor((H, R, p), F32),
        MIMO_Z: T.Tensor((H, R, p), F32),
        MIMO_O: T.Tensor((H, R, p), F32),
        NORM: T.Tensor((H, p), F32),
        DOUT: T.Tensor((batch, L, H, p), BF16),
        DY: T.Tensor((batch, H, LPR, p), F32),
        DZ: T.Tensor((batch, L, H, p), BF16),
        GC: T.Tensor((batch, NC, H, n, p), F32),
        DGATE: T.Tensor((batch, NC, H, 3, R, p), F32),
    ):
        with T.Kernel(NC, H, batch, threads=CHUNK_THREADS) as (chunk, h, b):
            T.annotate_min_blocks_per_sm(gate_blocks_per_sm(c))
            first = span_first(c, SPAN, b, chunk)
            last = span_last(c, SPAN, b, chunk, L)
            seg_s = T.alloc_shared((Q,), "int32")
            cs_s = T.alloc_shared((Q,), F32)
            wd_s = T.alloc_shared((Q,), F32)
            wo_s = T.alloc_shared((Q,), F32)
            one_s = T.alloc_shared((Q,), F32)
            inter_s = T.alloc_shared((Q,), F32)
            turn_s = T.alloc_shared((Q, S), F32)
            cos_s = T.alloc_shared((Q, S), F32)
            sin_s = T.alloc_shared((Q, S), F32)
            theta_f = T.alloc_fragment((S,), F32)
            raw_s = T.alloc_shared((QR, n), BF16)
            bias_s = T.alloc_shared((R, n), F32)
            q_s = T.alloc_shared((QR, n), BF16)
            k_s = T.alloc_shared((QR, n), BF16)
            x_s = T.alloc_shared((Q, p), BF16)
            mx_s = T.alloc_shared((R, p), F32)
            v_s = T.alloc_shared((QR, p), BF16)
            hs_s = T.alloc_shared((n, p), BF16)
            mix_s = T.alloc_shared((QR, QR), BF16)
            y_s = T.alloc_shared((QR, p), F32)
            T.annotate_layout({y_s: bank_swizzled(y_s)})
            scores = T.alloc_fragment((QR, QR), F32)
            y = T.alloc_fragment((QR, p), F32)
            y_in = T.alloc_fragment((QR, p), F32)
            gate_s = T.alloc_shared((R, p), F32)
            out_w_s = T.alloc_shared((R, p), F32)
            norm_s = T.alloc_shared((p,), F32)
            do_s = T.alloc_shared((Q, p), BF16)  # bf16 as in device memory: half the shared memory of fp32
            z_s = T.alloc_shared((Q, p), BF16)
            inv_s = T.alloc_shared((QR,), F32)
            dy_s = T.alloc_shared((QR, p), BF16)
            dy_lo = T.alloc_shared((QR, p), BF16)
            dy = T.alloc_fragment((QR, p), F32)
            gc = T.alloc_fragment((n, p), F32)

            outputs_of(
                X, Bk, Cq, ANG, DT, SEG, CS, WD, WO, THS, HS, B_BIAS, C_BIAS, D, MIMO_X, first, last, b, h, chunk,
                seg_s, cs_s, wd_s, wo_s, one_s, inter_s, turn_s, cos_s, sin_s, theta_f, raw_s, bias_s,
                q_s, k_s, x_s, mx_s, v_s, hs_s, mix_s, scores, y, y_in, y_s,
            )
            gate_weights(MIMO_Z, MIMO_O, NORM, h, gate_s, out_w_s, norm_s)
            for i, pp in T.Parallel(Q, p):
                do_s[i, pp] = token_row(DOUT, first, last, b, h, i, pp)
                z_s[i, pp] = token_row(Z, first, last, b, h, i, pp)
            finite_in_place(z_s)
            if c.norm:
                squares = T.alloc_fragment((QR, p), F32)
                row_sum = T.alloc_fragment((QR,), F32)
                for row, pp in T.Parallel(QR, p):
                    squares[row, pp] = y_s[row, pp] * y_s[row, pp]
                T.reduce_sum(squares, row_sum, dim=1)
                for row in T.Parallel(QR):
                    inv_s[row] = T.rsqrt(row_sum[row] / p + NORM_EPS)
            else:
                for row in T.Parallel(QR):
                    inv_s[row] = 1.0

            # dy: through the gate, then the per-row RMSNorm.
            for row, pp in T.Parallel(QR, p):
                dy[row, pp] = gate.d_gated(do_s, z_s, gate_s, out_w_s, row, pp) * norm_s[pp]
            if c.norm:
                centred = T.alloc_fragment((QR, p), F32)
                mean = T.alloc_fragment((QR,), F32)
                for row, pp in T.Parallel(QR, p):
                    centred[row, pp] = dy[row, pp] * y_s[row, pp] * inv_s[row]
                T.reduce_sum(centred, mean, dim=1)
                for row, pp in T.Parallel(QR, p):
                    dy[row, pp] = inv_s[row] * (dy[row, pp] - y_s[row, pp] * inv_s[row] * mean[row] / p)
            T.copy(dy, DY[b, h, chunk * QR : (chunk + 1) * QR, :])
            for row, pp in T.Parallel(QR, p):  # G_c's operand (below): inter_i dy_i, 0 where inter_i is
                weight = inter_s[row // R]
                dy[row, pp] = T.if_then_else(weight != 0.0, dy[row, pp] * weight, 0.0)
            split_bf16(dy, dy_s, dy_lo)

            # dz = Σ_r ∂loss/∂(z·mimo_z_r) · mimo_z_r.
            for i, pp in T.Parallel(Q, p):
                if first + i <= last:
                    DZ[b, first + i, h, pp] = T.cast(
                        sum(
                            gate.d_gate_input(do_s, z_s, gate_s, out_w_s, y_s, inv_s, norm_s, i * R + r, pp) * gate_s[r, pp]
                            for r in range(R)
                        ),
                        BF16,
                    )

            # Per-chunk partial sums of the gradients of the gate weights present (summed over chunks on the
            # host): mimo_z and mimo_o for MIMO, norm with the output norm; SISO without it has none.
            if mimo or c.norm:
                if mimo:
                    dmz = T.alloc_fragment((R, p), F32)
                    dmo = T.alloc_fragment((R, p), F32)
                    T.clear(dmz)
                    T.clear(dmo)
                if c.norm:
                    dnw = T.alloc_fragment((R, p), F32)
                    T.clear(dnw)
                for i in T.serial(Q):
                    for r, pp in T.Parallel(R, p):
                        if mimo:
                            dmz[r, pp] += gate.d_gate_input(do_s, z_s, gate_s, out_w_s, y_s, inv_s, norm_s, i * R + r, pp) * T.cast(z_s[i, pp], F32)
                            y_norm = y_s[i * R + r, pp] * inv_s[i * R + r] * norm_s[pp]
                            dmo[r, pp] += T.cast(do_s[i, pp], F32) * y_norm * gate.silu(T.cast(z_s[i, pp], F32) * gate_s[r, pp])
                        if c.norm:
                            dnw[r, pp] += gate.d_gated(do_s, z_s, gate_s, out_w_s, i * R + r, pp) * y_s[i * R + r, pp] * inv_s[i * R + r]
                if mimo:
                    T.copy(dmz, DGATE[b, chunk, h, 0, :, :])
                    T.copy(dmo, DGATE[b, chunk, h, 1, :, :])
                if c.norm:
                    T.copy(dnw, DGATE[b, chunk, h, 2, :, :])

            # G_c = Σ_{i,r} q_{i,r} (inter_i dy_{i,r})ᵀ (n, p).
            T.gemm(q_s, dy_s, gc, transpose_A=True, clear_accum=True)
            T.gemm(q_s, dy_lo, gc, transpose_A=True)
            T.copy(gc, GC[b, chunk, h, :, :])

    return chunk_dy


def _state_pass_bwd(c: KernelConfig):
    H, p, n, Q, rows = c.H, c.p, c.n, c.Q, STATE_ROWS
    batch, NC, LP = T.dynamic("batch, NC, LP")
    NS = states_dim(c, batch)

    @T.prim_func
    def state_pass_bwd(
        GC: T.Tensor((batch, NC, H, n, p), F32),
        MULT: T.Tensor((batch, NC, H), F32),
        SEG: T.Tensor((batch, LP), "int32"),
        DH_FINAL: T.Tensor((NS, H, n, p), F32),
        DS: T.Tensor((batch, NC, H, 2, n, p), BF16),
        DH0: T.Tensor((NS, H, n, p), F32),
    ):
        with T.Kernel(n // rows, H, batch, threads=SCAN_THREADS) as (block, h, b):
            grad = T.alloc_fragment((rows, p), F32)
            g_s = T.alloc_shared((rows, p), F32)
            if c.packed:  # each document's ∂h_final at its last chunk, in the loop
                T.clear(grad)
            else:
                T.copy(DH_FINAL[b, h, block * rows : (block + 1) * rows, :], grad)
            for step in T.Pipelined(NC, num_stages=2):
                chunk = NC - 1 - step
                T.copy(GC[b, chunk, h, block * rows : (block + 1) * rows, :], g_s)
                mult = MULT[b, chunk, h]
                if c.packed:  # a document's last chunk: its ∂h_final
                    if (chunk == NC - 1) | (SEG[b, T.min(chunk + 1, NC - 1) * Q] != SEG[b, chunk * Q]):
                        if chunk < NC - 1:  # after the document that follows: its ∂h̃_0 (the first one's after the loop)
                            T.copy(grad, DH0[SEG[b, chunk * Q + Q], h, block * rows : (block + 1) * rows, :])
                        T.copy(DH_FINAL[SEG[b, chunk * Q], h, block * rows : (block + 1) * rows, :], grad)
                for i, pp in T.Parallel(rows, p):
                    DS[b, chunk, h, 0, block * rows + i, pp] = T.cast(grad[i, pp], BF16)
                    DS[b, chunk, h, 1, block * rows + i, pp] = bf16_rest(grad[i, pp], T.cast(grad[i, pp], BF16))
                    grad[i, pp] = T.if_then_else(mult != 0.0, grad[i, pp] * mult, 0.0) + g_s[i, pp]
            T.copy(grad, DH0[state_index(c, SEG, b, 0), h, block * rows : (block + 1) * rows, :])

    return state_pass_bwd


def _rotation_backward(c: KernelConfig):
    """Macros for the rotated vectors' gradients g (QR, n) fp32 in shared memory."""
    Q, R, n, S, H, G = c.Q, c.R, c.n, c.S, c.H, c.G
    half_split = R > 1

    @T.macro
    def scatter(g_s, cos_s, sin_s, first, last, b, h, chunk, SHARED_GRAD, BIAS_GRAD, bias_sum):
        """Rotate g_s back by −θ_i in place (one thread per rotated pair, the others are left as they are; g_s
        then holds ∂loss/∂(B + bias), or C),
        add it into SHARED_GRAD (b, L, R, G, n) (atomically: a group's heads share it; `head_sum_dtype`) and
        write its sum over the chunk's tokens to BIAS_GRAD[b, chunk, h]
        (R, n), summed in token order in the fp32 fragment bias_sum (R, n): each thread sums its own columns,
        no reduction across threads."""
        if not half_split:  # adjacent pairs: into registers first, then stored (as `keys_rotated`)
            back_a = T.alloc_fragment((Q * R, S), F32)
            back_b = T.alloc_fragment((Q * R, S), F32)
        for row, s in T.Parallel(Q * R, S):
            a, bb = pair_indices(s, n, half_split)
            ga, gb = g_s[row, a], g_s[row, bb]
            back = (ga * cos_s[row // R, s] + gb * sin_s[row // R, s], gb * cos_s[row // R, s] - ga * sin_s[row // R, s])
            if half_split:
                g_s[row, a] = back[0]
                g_s[row, bb] = back[1]
            else:
                back_a[row, s] = back[0]
                back_b[row, s] = back[1]
        if not half_split:
            for row, s in T.Parallel(Q * R, S):
                a, bb = pair_indices(s, n, False)
                g_s[row, a] = back_a[row, s]
                g_s[row, bb] = back_b[row, s]
        for row, nn in T.Parallel(Q * R, n):
            if first + row // R <= last:
                T.atomic_add(SHARED_GRAD[b, first + row // R, row % R, h // (H // G), nn], g_s[row, nn])
        T.clear(bias_sum)
        for i in T.serial(Q):
            for r, nn in T.Parallel(R, n):
                bias_sum[r, nn] += g_s[i * R + r, nn]
        for r, nn in T.Parallel(R, n):
            BIAS_GRAD[b, chunk, h, r, nn] = bias_sum[r, nn]

    @T.macro
    def angle_grad(g_s, value_s, theta_grad):
        """theta_grad (Q, S) += Σ_r g_b value_a − g_a value_b over the rotated pairs (a, b), with the values of the
        bf16 tile the matmuls used: the sum of dθ over a chunk then cancels as the kernels' own scores do
        (they depend on θ_i − θ_j only), which fp32 values would break at bf16 precision."""
        for i, s in T.Parallel(Q, S):
            a, bb = pair_indices(s, n, half_split)
            theta_grad[i, s] += sum(
                g_s[i * R + r, bb] * T.cast(value_s[i * R + r, a], F32) - g_s[i * R + r, a] * T.cast(value_s[i * R + r, bb], F32)
                for r in range(R)
            )

    return scatter, angle_grad


def head_sum_dtype(c: KernelConfig) -> str:
    """The dtype of dB and dC, sums over a group's heads by atomic adds (`scatter`). Deterministic
    (`KernelConfig.deterministic`): float64, where a sum of H / G fp32 terms is exact, hence the same bits
    whatever order the heads arrive in (unless the terms span more than 29 − log2(H / G) binades). Else fp32:
    the adds lower to four-wide vector atomics, 4x fewer than float64's scalar ones, which took a quarter of
    MIMO's chunk_dqkv (benchmarks/README.md), and the order the heads arrive in rounds the sum."""
    return F64 if c.deterministic else F32


def _chunk_dqkv(c: KernelConfig):
    H, p, n, R, G, S, Q = c.H, c.p, c.n, c.R, c.G, c.S, c.Q
    HEAD_SUM = head_sum_dtype(c)
    QR = Q * R
    # ∂mult_c = ⟨dS_c, h̃_c⟩: SISO at p = 64 sums it from each half of dS while it is in shared memory (no second
    # read of dS; 4 bytes spilled instead of 44; 5 % faster on an H200). The others read dS again after dv: MIMO's
    # partial sums held across the dS gemms took 242 registers instead of 216 and 4 % more time, and h̃'s tile
    # loaded that early does not fit SISO's shared memory at p = 128 (265 KB). benchmarks/README.md, the
    # twenty-third session.
    dmult_from_tiles = R == 1 and p == 64

    @T.macro
    def state_dot(ds_s, hs_s, state_prod):
        """state_prod (QR, p) += ds_s ⊙ hs_s over the state's rows in blocks of QR ((n, p) bf16 tiles): their
        inner product, part-summed."""
        for block in T.serial(n // QR):
            for row, pp in T.Parallel(QR, p):
                state_prod[row, pp] += T.cast(ds_s[block * QR + row, pp], F32) * T.cast(hs_s[block * QR + row, pp], F32)

    batch, L, LP, NC, LPR, BNC, SB, SNC = T.dynamic("batch, L, LP, NC, LPR, BNC, SB, SNC")
    load_scalars, rotation, keys, values, mix_weights = chunk_prologue(c)
    scatter, angle_grad = _rotation_backward(c)

    def piece_total(group_sums, seg_s, i, s):
        """φ_{i,s}: token i's running sum within its group (group_sums (Q, S)) plus the first-piece sums of the
        later groups whose first token is in i's document."""
        return group_sums[i, s] + sum(
            T.if_then_else((i < first) & (seg_s[first] == seg_s[i]), group_sums[first, s], 0.0)
            for first in range(PIECE_SPAN, Q, PIECE_SPAN)
        )

    @T.prim_func
    def chunk_dqkv(
        X: T.Tensor((batch, L, H, p), BF16),
        Bk: T.Tensor((batch, L, R, G, n), BF16),
        Cq: T.Tensor((batch, L, R, G, n), BF16),
        ANG: T.Tensor((batch, L, S), BF16),
        DT: T.Tensor((batch, L, H), BF16),
        SEG: T.Tensor((batch, LP), "int32"),
        SPAN: T.Tensor((SB, SNC, 2), "int32"),
        CS: T.Tensor((batch, H, LP), F32),
        WD: T.Tensor((batch, H, LP), F32),
        WO: T.Tensor((batch, H, LP), F32),
        THS: T.Tensor((batch, NC, H, S), F32),
        DS: T.Tensor((BNC, H, 2, n, p), BF16),
        HS: T.Tensor((batch, NC, H, n, p), BF16),
        DY: T.Tensor((batch, H, LPR, p), F32),
        MULT: T.Tensor((batch, NC, H), F32),
        B_BIAS: T.Tensor((H, R, n), F32),
        C_BIAS: T.Tensor((H, R, n), F32),
        D: T.Tensor((H,), F32),
        MIMO_X: T.Tensor((H, R, p), F32),
        DX: T.Tensor((batch, L, H, p), BF16),
        DB: T.Tensor((batch, L, R, G, n), HEAD_SUM),
        DC: T.Tensor((batch, L, R, G, n), HEAD_SUM),
        DB_BIAS: T.Tensor((batch, NC, H, R, n), F32),
        DC_BIAS: T.Tensor((batch, NC, H, R, n), F32),
        DMX: T.Tensor((batch, NC, H, R, p), F32),
        DD: T.Tensor((batch, H, LPR), F32),
        DLA: T.Tensor((batch, H, LP), F32),
        DWD: T.Tensor((batch, H, LP), F32),
        DWO: T.Tensor((batch, H, LP), F32),
        DTT: T.Tensor((batch, H, LP), F32),
        DTD: T.Tensor((batch, LP, S), F64),
        DTF: T.Tensor((batch, NC, H, S), F32),
    ):
        with T.Kernel(NC, H, batch, threads=dqkv_threads(R)) as (chunk, h, b):
            t0 = chunk * Q
            first = span_first(c, SPAN, b, chunk)
            last = span_last(c, SPAN, b, chunk, L)
            seg_s = T.alloc_shared((Q,), "int32")
            cs_s = T.alloc_shared((Q,), F32)
            wd_s = T.alloc_shared((Q,), F32)
            wo_s = T.alloc_shared((Q,), F32)
            one_s = T.alloc_shared((Q,), F32)
            inter_s = T.alloc_shared((Q,), F32)
            end_s = T.alloc_shared((Q,), F32)
            w_s = T.alloc_shared((Q,), F32)
            dw_s = T.alloc_shared((Q,), F32)
            turn_s = T.alloc_shared((Q, S), F32)
            cos_s = T.alloc_shared((Q, S), F32)
            sin_s = T.alloc_shared((Q, S), F32)
            theta_f = T.alloc_fragment((S,), F32)
            raw_s = T.alloc_shared((QR, n), BF16)
            bias_s = T.alloc_shared((R, n), F32)
            q_s = T.alloc_shared((QR, n), BF16)
            q_lo = T.alloc_shared((QR, n), BF16)
            k_s = T.alloc_shared((QR, n), BF16)
            k_lo = T.alloc_shared((QR, n), BF16)
            x_s = T.alloc_shared((Q, p), BF16)
            mx_s = T.alloc_shared((R, p), F32)
            v_s = T.alloc_shared((QR, p), BF16)
            ds_s = T.alloc_shared((n, p), BF16)
            hs_s = T.alloc_shared((n, p), BF16)
            dy_s = T.alloc_shared((QR, p), BF16)
            dy_lo = T.alloc_shared((QR, p), BF16)
            mix_s = T.alloc_shared((QR, QR), BF16)
            dmix_s = T.alloc_shared((QR, QR), BF16)
            g_s = T.alloc_shared((QR, n), F32)
            T.annotate_layout({g_s: bank_swizzled(g_s)})
            row_s = T.alloc_shared((QR,), F32)
            dinter_s = T.alloc_shared((QR,), F32)
            theta_grad = T.alloc_shared((Q, S), F32)
            scores = T.alloc_fragment((QR, QR), F32)
            dp = T.alloc_fragment((QR, QR), F32)
            dv = T.alloc_fragment((QR, p), F32)
            kds = T.alloc_fragment((QR, p), F32)
            dk = T.alloc_fragment((QR, n), F32)
            vds = T.alloc_fragment((QR, n), F32)
            dq = T.alloc_fragment((QR, n), F32)
            u = T.alloc_fragment((QR, n), F32)
            row_f = T.alloc_fragment((QR,), F32)
            vds_row = T.alloc_fragment((QR,), F32)
            u_row = T.alloc_fragment((QR,), F32)
            prod = T.alloc_fragment((QR, p), F32)
            bias_sum = T.alloc_fragment((R, n), F32)
            dmx = T.alloc_fragment((R, p), F32)
            later = T.alloc_fragment((Q, Q), F32)
            earlier = T.alloc_fragment((Q, Q), F32)
            below = T.alloc_fragment((Q,), F32)
            after = T.alloc_fragment((Q,), F32)
            end_terms = T.alloc_fragment((Q,), F32)
            ends = T.alloc_fragment((1,), F32)
            below_s = T.alloc_shared((Q,), F32)
            after_s = T.alloc_shared((Q,), F32)
            ends_s = T.alloc_shared((1,), F32)
            cs_grad_s = T.alloc_shared((Q,), F32)
            tanh_f = T.alloc_fragment((Q, S), F32)
            dt_f = T.alloc_fragment((Q, S), F32)
            mult_s = T.alloc_shared((1,), F32)
            group_run = T.alloc_fragment((Q // PIECE_SPAN, S), F32)
            piece_sum = T.alloc_fragment((Q,), F32)
            angle_terms = T.alloc_fragment((Q, S), F32)
            angle_dt = T.alloc_fragment((Q, S), F32)
            turn_sum = T.alloc_fragment((Q,), F32)

            load_scalars(SEG, CS, WD, WO, b, h, t0, seg_s, cs_s, wd_s, wo_s)
            seg_before = segment_before(c, SEG, b, t0)
            for i in T.Parallel(Q):
                one_s[i] = 1.0
                inter_s[i] = T.if_then_else(seg_s[i] == seg_before, T.exp(cs_s[i]), 0.0)
                end_s[i] = T.if_then_else(seg_s[i] == seg_s[Q - 1], T.exp(cs_s[Q - 1] - cs_s[i]), 0.0)
                w_s[i] = end_s[i] * wo_s[i]
            rotation(ANG, DT, THS, first, last, b, h, chunk, seg_s, seg_before, turn_s, theta_f, cos_s, sin_s)
            mult_s[0] = MULT[b, chunk, h]
            keys(Cq, C_BIAS, first, last, b, h, raw_s, bias_s, cos_s, sin_s, one_s, q_s, q_lo)
            keys(Bk, B_BIAS, first, last, b, h, raw_s, bias_s, cos_s, sin_s, one_s, k_s, k_lo)
            values(X, MIMO_X, first, last, b, h, x_s, mx_s, v_s, finite=True)
            split_tile_bf16(DY, b, h, chunk * QR, dy_s, dy_lo)
            table = None
            if R > 1:  # L once, for both masked products below
                table = T.alloc_shared((Q, Q), F32)
                decay_table(seg_s, cs_s, wd_s, wo_s, table)

            T.gemm(q_s, k_s, scores, transpose_B=True, clear_accum=True)
            T.gemm(dy_s, v_s, dp, transpose_B=True, clear_accum=True)
            T.gemm(dy_lo, v_s, dp, transpose_B=True)
            if R > 1:  # dL below sums a token's R x R block of scores: through shared memory
                pr_s = T.alloc_shared((QR, QR), F32)
                T.annotate_layout({pr_s: bank_swizzled(pr_s)})
                for row, col in T.Parallel(QR, QR):
                    pr_s[row, col] = dp[row, col] * scores[row, col]
            mix_weights(seg_s, cs_s, wd_s, wo_s, scores, mix_s, table)
            mix_weights(seg_s, cs_s, wd_s, wo_s, dp, dmix_s, table)

            # dL_ij = Σ_{r,s} dP ⊙ scores; ∂wd_j = dL_jj; spread_ij = dL_ij exp(cs_i − cs_j) (i > j, one document),
            # after_j = Σ_{m > j} spread_mj and below_j = Σ_{m < j} spread_jm wo_m, as reductions.
            for i, j in T.Parallel(Q, Q):
                total = dp[i, j] * scores[i, j] if R == 1 else sum(pr_s[i * R + r, j * R + s] for r in range(R) for s in range(R))
                inside = reaches(seg_s, i, j) & (j != i)
                spread = T.if_then_else(inside, total * T.exp(cs_s[i] - T.if_then_else(inside, cs_s[j], cs_s[i])), 0.0)
                later[i, j] = spread
                earlier[i, j] = spread * wo_s[j]
                if i == j:
                    DWD[b, h, t0 + j] = total
            T.reduce_sum(later, after, dim=0)
            T.copy(after, after_s)
            T.reduce_sum(earlier, below, dim=1)
            T.copy(below, below_s)

            # kds = k dS and vds = v dSᵀ, with dS's two bf16 halves taking turns in ds_s (shared memory is
            # short) and v as hi + lo halves where MIMO makes it inexact in bf16; ∂mult_c = ⟨dS_c, h̃_c⟩ from the
            # same tiles where `dmult_from_tiles`.
            state_prod = T.alloc_fragment((QR, p), F32)
            if dmult_from_tiles:
                load_state(HS, b, chunk, h, hs_s, finite=True)
                T.clear(state_prod)
            T.copy(DS[b * NC + chunk, h, 0, :, :], ds_s)
            T.gemm(k_s, ds_s, kds, clear_accum=True)
            T.gemm(v_s, ds_s, vds, transpose_B=True, clear_accum=True)
            if R > 1:
                v_lo = T.alloc_shared((QR, p), BF16)
                for row, pp in T.Parallel(QR, p):
                    v_lo[row, pp] = bf16_rest(T.cast(x_s[row // R, pp], F32) * mx_s[row % R, pp], v_s[row, pp])
                T.gemm(v_lo, ds_s, vds, transpose_B=True)
            if dmult_from_tiles:
                state_dot(ds_s, hs_s, state_prod)
            T.copy(DS[b * NC + chunk, h, 1, :, :], ds_s)
            T.gemm(k_s, ds_s, kds)
            T.gemm(v_s, ds_s, vds, transpose_B=True)
            if dmult_from_tiles:
                state_dot(ds_s, hs_s, state_prod)

            # dv = (scores ⊙ L)ᵀ dy + w_j k_j dS + D dy.
            T.gemm(mix_s, dy_s, dv, transpose_A=True, clear_accum=True)
            T.gemm(mix_s, dy_lo, dv, transpose_A=True)
            skip = D[h]
            for row, pp in T.Parallel(QR, p):
                dv[row, pp] = dv[row, pp] + w_s[row // R] * kds[row, pp] + skip * DY[b, h, chunk * QR + row, pp]
            for row, pp in T.Parallel(QR, p):  # v = x ⊙ mimo_x in fp32, as the reference
                prod[row, pp] = DY[b, h, chunk * QR + row, pp] * T.cast(x_s[row // R, pp], F32) * mx_s[row % R, pp]
            T.reduce_sum(prod, row_f, dim=1)
            T.copy(row_f, DD[b, h, chunk * QR : (chunk + 1) * QR])
            if R == 1:
                for i, pp in T.Parallel(Q, p):
                    if first + i <= last:
                        DX[b, first + i, h, pp] = T.cast(dv[i, pp] * mx_s[0, pp], BF16)
            else:  # dx and ∂mimo_x sum over a token's R rows: through shared memory
                dv_s = T.alloc_shared((QR, p), F32)
                T.annotate_layout({dv_s: bank_swizzled(dv_s)})
                T.copy(dv, dv_s)
                for i, pp in T.Parallel(Q, p):
                    if first + i <= last:
                        DX[b, first + i, h, pp] = T.cast(sum(dv_s[i * R + r, pp] * mx_s[r, pp] for r in range(R)), BF16)
                T.clear(dmx)
                for i in T.serial(Q):
                    for r, pp in T.Parallel(R, p):
                        dmx[r, pp] += dv_s[i * R + r, pp] * T.cast(x_s[i, pp], F32)
                T.copy(dmx, DMX[b, chunk, h, :, :])

            # ∂mult_c reduced (where not summed above: here, from dS in global memory).
            if not dmult_from_tiles:
                load_state(HS, b, chunk, h, hs_s, finite=True)
                T.clear(state_prod)
                for block in T.serial(n // QR):
                    for row, pp in T.Parallel(QR, p):
                        ds_value = T.cast(DS[b * NC + chunk, h, 0, block * QR + row, pp], F32) + T.cast(DS[b * NC + chunk, h, 1, block * QR + row, pp], F32)
                        state_prod[row, pp] += ds_value * T.cast(hs_s[block * QR + row, pp], F32)
            state_rows = T.alloc_fragment((QR,), F32)
            dmult = T.alloc_fragment((1,), F32)
            T.reduce_sum(state_prod, state_rows, dim=1)
            T.reduce_sum(state_rows, dmult, dim=0)

            # dq = (dP ⊙ L) k + inter_i h̃ dy_i (kept in registers until g_s is free); dinter_{i,r} = q_{i,r}·(h̃ dy_{i,r}).
            T.gemm(dmix_s, k_s, dq, clear_accum=True)
            T.gemm(dy_s, hs_s, u, transpose_B=True, clear_accum=True)
            T.gemm(dy_lo, hs_s, u, transpose_B=True)
            for row, nn in T.Parallel(QR, n):
                weight = inter_s[row // R]
                dq[row, nn] = dq[row, nn] + T.if_then_else(weight != 0.0, weight * u[row, nn], 0.0)
                u[row, nn] = u[row, nn] * (T.cast(q_s[row, nn], F32) + T.cast(q_lo[row, nn], F32))
            T.reduce_sum(u, u_row, dim=1)
            T.copy(u_row, dinter_s)

            # dk = (dP ⊙ L)ᵀ q + w_j v_j dSᵀ, then back through the rotation; dw_j = Σ_s k_{j,s}·(dS v_{j,s}) with
            # k as its hi + lo halves.
            T.gemm(dmix_s, q_s, dk, transpose_A=True, clear_accum=True)
            for row, nn in T.Parallel(QR, n):
                dk[row, nn] = dk[row, nn] + w_s[row // R] * vds[row, nn]
                vds[row, nn] = vds[row, nn] * (T.cast(k_s[row, nn], F32) + T.cast(k_lo[row, nn], F32))
            T.reduce_sum(vds, vds_row, dim=1)
            T.copy(vds_row, row_s)
            for i in T.Parallel(Q):
                dw_s[i] = sum(row_s[i * R + r] for r in range(R))
            T.copy(dk, g_s)
            T.clear(theta_grad)
            angle_grad(g_s, k_s, theta_grad)
            scatter(g_s, cos_s, sin_s, first, last, b, h, chunk, DB, DB_BIAS, bias_sum)

            T.copy(dq, g_s)
            angle_grad(g_s, q_s, theta_grad)
            scatter(g_s, cos_s, sin_s, first, last, b, h, chunk, DC, DC_BIAS, bias_sum)
            for i, s in T.Parallel(Q, S):  # tanh(angles) and Δ for the angle terms below
                inside = first + i <= last
                tanh_f[i, s] = T.if_then_else(inside, T.tanh(T.cast(ANG[b, first + i, s], F32)), 0.0)
                dt_f[i, s] = T.if_then_else(inside, T.cast(DT[b, first + i, h], F32), 0.0)

            # ends = Σ_m dw_m w_m; the per-token scalar gradients.
            for m in T.Parallel(Q):
                end_terms[m] = dw_s[m] * w_s[m]
            T.reduce_sum(end_terms, ends, dim=0)
            T.copy(ends, ends_s)
            for j in T.Parallel(Q):
                DWO[b, h, t0 + j] = after_s[j] + dw_s[j] * end_s[j]
                cs_grad_s[j] = (
                    below_s[j] - wo_s[j] * after_s[j] + sum(dinter_s[j * R + r] for r in range(R)) * inter_s[j] - dw_s[j] * w_s[j]
                    + T.if_then_else(j == Q - 1, ends_s[0], 0.0)
                )

            # Sums over each token's piece (its document in the chunk) from the token on: ∂(AΔ)_j of ∂cs, plus
            # ∂mult_c·mult_c in the last piece; φ_j of dθ, in two levels (running sums over groups of
            # PIECE_SPAN tokens into turn_s, spent since the rotation; then the first-piece sums of the later
            # groups the token's document reaches), written contracted with tanh(angles) (per token and head)
            # and with Δ (over the heads, in float64 atomics: exact, whatever `head_sum_dtype` is), and at the
            # chunk's first token.
            T.clear(piece_sum)
            for m in T.unroll(Q):
                for j in T.Parallel(Q):
                    piece_sum[j] += T.if_then_else((m >= j) & (seg_s[m] == seg_s[j]), cs_grad_s[m], 0.0)
            for j in T.Parallel(Q):
                DLA[b, h, t0 + j] = piece_sum[j] + T.if_then_else(seg_s[j] == seg_s[Q - 1], dmult[0] * mult_s[0], 0.0)
            for group, s in T.Parallel(Q // PIECE_SPAN, S):
                group_run[group, s] = 0.0
                for k in T.unroll(PIECE_SPAN):
                    i = (group + 1) * PIECE_SPAN - 1 - k
                    same_piece = (k > 0) & (seg_s[T.min(i + 1, Q - 1)] == seg_s[i])
                    group_run[group, s] = T.if_then_else(same_piece, group_run[group, s], 0.0) + theta_grad[i, s]
                    turn_s[i, s] = group_run[group, s]
            for i, s in T.Parallel(Q, S):
                phi = piece_total(turn_s, seg_s, i, s)
                angle_terms[i, s] = phi * tanh_f[i, s]
                angle_dt[i, s] = phi * dt_f[i, s]
                if first + i <= last:
                    T.atomic_add(DTD[b, t0 + i, s], angle_dt[i, s])
            T.reduce_sum(angle_terms, turn_sum, dim=1)
            for j in T.Parallel(Q):
                DTT[b, h, t0 + j] = turn_sum[j]
            for s in T.Parallel(S):
                DTF[b, chunk, h, s] = piece_total(turn_s, seg_s, 0, s)

    return chunk_dqkv


def _terms_grad(c: KernelConfig):
    H, S, Q = c.H, c.S, c.Q
    batch, L, LP, NC, SB, SNC = T.dynamic("batch, L, LP, NC, SB, SNC")
    NS = states_dim(c, batch)
    prep = c.A_floor is not None

    @T.prim_func
    def terms_grad(
        DT: T.Tensor((batch, L, H), BF16),
        A: T.Tensor((batch, L, H), BF16),
        TRAP: T.Tensor((batch, L, H), BF16),
        ANG: T.Tensor((batch, L, S), BF16),
        SEG: T.Tensor((batch, LP), "int32"),
        SPAN: T.Tensor((SB, SNC, 2), "int32"),
        DLA: T.Tensor((batch, H, LP), F32),
        DWD: T.Tensor((batch, H, LP), F32),
        DWO: T.Tensor((batch, H, LP), F32),
        DTT: T.Tensor((batch, H, LP), F32),
        DTD: T.Tensor((batch, LP, S), F64),
        CARRY: T.Tensor((batch, NC, H, S), F32),
        DW0: T.Tensor((NS, H), F32),
        DT_RAW: T.Tensor((batch, L, H), BF16),
        DT_BIAS: T.Tensor((H,), F32),
        DDT: T.Tensor((batch, L, H), BF16),
        DA: T.Tensor((batch, L, H), BF16),
        DTRAP: T.Tensor((batch, L, H), BF16),
        DANG: T.Tensor((batch, L, S), BF16),
        DBIAS: T.Tensor((batch, NC, H), F32),
    ):
        with T.Kernel(NC, batch, threads=SCAN_THREADS) as (chunk, b):
            t0 = chunk * Q  # the chunk's per-token terms; its tokens are first + i up to `last`
            first = span_first(c, SPAN, b, chunk)
            last = span_last(c, SPAN, b, chunk, L)
            opens = starts_state(c, SEG, b, chunk)  # its first token opens the row (packed: its document)
            st = state_index(c, SEG, b, t0)
            last_s = T.alloc_shared((Q,), "int32")  # 1 for the tokens of the chunk's last piece
            dt_s = T.alloc_shared((Q, H), F32)
            tanh_s = T.alloc_shared((Q, S), F32)
            # (+ 1: the per-(token, head) loop reads these down a column, whose entries then fall in distinct banks)
            carry_s = T.alloc_shared((H, S + 1), F32)
            scalars_s = T.alloc_shared((4, H, Q + 1), F32)  # ∂(AΔ), ∂wd, ∂wo, Σ_s φ tanh: written along the tokens
            dbeta_s = T.alloc_shared((H, Q + 1), F32)
            draw_s = T.alloc_shared((H, Q + 1), F32)  # with the prep: ∂(dt + dt_bias) per token, for ∂dt_bias

            for i in T.Parallel(Q):
                last_s[i] = T.if_then_else(SEG[b, t0 + i] == SEG[b, t0 + Q - 1], 1, 0)
            for i, h in T.Parallel(Q, H):
                dt_s[i, h] = T.if_then_else(first + i <= last, T.cast(DT[b, first + i, h], F32), 0.0)
            for i, s in T.Parallel(Q, S):
                tanh_s[i, s] = T.if_then_else(first + i <= last, T.tanh(T.cast(ANG[b, first + i, s], F32)), 0.0)
            for h, s in T.Parallel(H, S):
                carry_s[h, s] = CARRY[b, chunk, h, s]
            for h, i in T.Parallel(H, Q):
                t = t0 + i
                before = T.max(t - 1, 0)
                scalars_s[0, h, i] = DLA[b, h, t]
                scalars_s[1, h, i] = DWD[b, h, t]
                scalars_s[2, h, i] = DWO[b, h, t]
                scalars_s[3, h, i] = DTT[b, h, t]
                # ∂β_j = ∂wo_{j−1} (∂w0 at a row's or a packed document's first token), 0 where j starts a document
                dbeta_s[h, i] = T.if_then_else(
                    (i == 0) & opens, DW0[st, h], T.if_then_else(SEG[b, t] != SEG[b, before], 0.0, DWO[b, h, before])
                )

            for i, h in T.Parallel(Q, H):
                t = first + i
                if t <= last:
                    carried = sum(carry_s[h, s] * tanh_s[i, s] for s in range(S))
                    dincr_turn = scalars_s[3, h, i] + T.if_then_else(last_s[i] != 0, carried, 0.0)
                    dla, dt, dbeta = scalars_s[0, h, i], dt_s[i, h], dbeta_s[h, i]
                    dgamma = scalars_s[1, h, i] + scalars_s[2, h, i] - dbeta
                    lam = T.sigmoid(T.cast(TRAP[b, t, h], F32))
                    a_in = T.cast(A[b, t, h], F32)  # A, or with the prep the raw u of A = decay_rate(u)
                    ddt = dbeta + lam * dgamma + (decay_rate(a_in, c.A_floor) if prep else a_in) * dla + math.pi * dincr_turn
                    DTRAP[b, t, h] = T.cast(dt * dgamma * lam * (1.0 - lam), BF16)
                    if prep:  # through Δ = softplus(dt + dt_bias) and A = decay_rate(u)
                        u = T.cast(DT_RAW[b, t, h], F32) + DT_BIAS[h]
                        draw_s[h, i] = ddt * softplus_slope(u)
                        DDT[b, t, h] = T.cast(draw_s[h, i], BF16)
                        DA[b, t, h] = T.cast(dla * dt * decay_slope(a_in, c.A_floor), BF16)
                    else:
                        DDT[b, t, h] = T.cast(ddt, BF16)
                        DA[b, t, h] = T.cast(dla * dt, BF16)
            for i, s in T.Parallel(Q, S):
                if first + i <= last:
                    carried = sum(carry_s[h, s] * dt_s[i, h] for h in range(H))
                    dincr_dt = T.cast(DTD[b, t0 + i, s], F32) + T.if_then_else(last_s[i] != 0, carried, 0.0)
                    DANG[b, first + i, s] = T.cast(math.pi * dincr_dt * (1.0 - tanh_s[i, s] * tanh_s[i, s]), BF16)
            if prep:
                for h in T.Parallel(H):
                    DBIAS[b, chunk, h] = sum(T.if_then_else(first + i <= last, draw_s[h, i], 0.0) for i in range(Q))

    return terms_grad


def _norm_grad(c: KernelConfig):
    R, G, n, Q = c.R, c.G, c.n, c.Q
    HEAD_SUM = head_sum_dtype(c)
    batch, L, NC, SB, SNC = T.dynamic("batch, L, NC, SB, SNC")
    rows = Q * R * G  # the chunk's rows (i, r, g), contiguous in (b, l, R, G, n)

    def place(first, part, k):
        """(token, rank, group) of slot k of the chunk's rows `part`, the chunk's first token `first`."""
        row = part * PREP_ROWS + k
        return first + row // (R * G), row // G % R, row % G

    @T.prim_func
    def norm_grad(
        DN: T.Tensor((batch, L, R, G, n), HEAD_SUM),
        RAW: T.Tensor((batch, L, R, G, n), BF16),
        SPAN: T.Tensor((SB, SNC, 2), "int32"),
        WEIGHT: T.Tensor((n,), F32),
        DRAW: T.Tensor((batch, L, R, G, n), BF16),
        DWEIGHT: T.Tensor((batch, NC, n), F32),
    ):
        with T.Kernel(NC, batch, threads=SCAN_THREADS) as (chunk, b):
            first = span_first(c, SPAN, b, chunk)
            last = span_last(c, SPAN, b, chunk, L)
            raw = T.alloc_fragment((PREP_ROWS, n), F32)
            grad = T.alloc_fragment((PREP_ROWS, n), F32)
            terms = T.alloc_fragment((PREP_ROWS, n), F32)
            sums = T.alloc_fragment((PREP_ROWS,), F32)
            inv_s = T.alloc_shared((PREP_ROWS,), F32)
            weighted = T.alloc_fragment((PREP_ROWS, n), F32)  # Σ over the chunk's rows of ∂ŷ ⊙ x̂, by row slot
            weight_sum = T.alloc_fragment((n,), F32)
            T.clear(weighted)
            for part in T.serial(rows // PREP_ROWS):
                for k, nn in T.Parallel(PREP_ROWS, n):
                    t, r, g = place(first, part, k)
                    value = RAW[b, T.min(t, L - 1), r, g, nn]
                    raw[k, nn] = T.cast(value, F32)
                    grad[k, nn] = T.if_then_else(t <= last, T.cast(DN[b, T.min(t, L - 1), r, g, nn], F32), 0.0)
                    terms[k, nn] = raw[k, nn] * raw[k, nn]
                T.reduce_sum(terms, sums, dim=1)
                for k in T.Parallel(PREP_ROWS):
                    inv_s[k] = T.rsqrt(sums[k] / n + NORM_EPS)
                for k, nn in T.Parallel(PREP_ROWS, n):
                    raw[k, nn] = raw[k, nn] * inv_s[k]  # x̂
                    weighted[k, nn] += grad[k, nn] * raw[k, nn]
                    grad[k, nn] = grad[k, nn] * WEIGHT[nn]  # ∂x̂
                    terms[k, nn] = grad[k, nn] * raw[k, nn]
                T.reduce_sum(terms, sums, dim=1)
                for k, nn in T.Parallel(PREP_ROWS, n):
                    t, r, g = place(first, part, k)
                    if t <= last:
                        DRAW[b, t, r, g, nn] = T.cast(inv_s[k] * (grad[k, nn] - raw[k, nn] * sums[k] / n), BF16)
            T.reduce_sum(weighted, weight_sum, dim=0)
            for nn in T.Parallel(n):
                DWEIGHT[b, chunk, nn] = weight_sum[nn]

    return norm_grad


def _initial_grad(c: KernelConfig):
    H, p, n, R, S = c.H, c.p, c.n, c.R, c.S
    batch, L, DB, ND = T.dynamic("batch, L, DB, ND")
    NS = states_dim(c, batch)

    @T.prim_func
    def initial_grad(
        DH0: T.Tensor((NS, H, n, p), F32),
        H_IN: T.Tensor((NS, H, n, p), F32),
        K_PREV: T.Tensor((NS, R, H, n), F32),
        V_PREV: T.Tensor((NS, H, p), F32),
        MIMO_X: T.Tensor((H, R, p), F32),
        DT: T.Tensor((batch, L, H), BF16),
        TRAP: T.Tensor((batch, L, H), BF16),
        DOCS: T.Tensor((DB, ND, 2), "int32"),
        DK_PREV: T.Tensor((NS, R, H, n), F32),
        DV_PREV: T.Tensor((NS, H, p), F32),
        DMIMO_X: T.Tensor((NS, H, R, p), F32),
        DW0: T.Tensor((NS, H), F32),
        DTHETA0: T.Tensor((NS, H, S), F32),
    ):
        # grid (H, states): state b is row b's, or packed document b's, whose [first, last] tokens DOCS[0, b] holds
        with T.Kernel(H, NS, threads=SCAN_THREADS) as (h, b):
            dh_s = T.alloc_shared((n, p + 1), F32)  # + 1: the reads down a column fall in distinct banks
            k_s = T.alloc_shared((R, n), F32)
            values_s = T.alloc_shared((R, p), F32)
            dweighted = T.alloc_fragment((R, p), F32)  # ∂(w0 v_r) / w0 = ∂h̃_0 k_prev,r
            dkey = T.alloc_fragment((R, n), F32)
            dtheta = T.alloc_fragment((S,), F32)
            products = T.alloc_fragment((R, p), F32)
            rank_sums = T.alloc_fragment((R,), F32)
            dvalues_s = T.alloc_shared((R, p), F32)  # ∂v_prev's terms per rank, before the sum over ranks
            rank_s = T.alloc_shared((R,), F32)  # ∂w0's terms per rank

            for i, pp in T.Parallel(n, p):
                dh_s[i, pp] = DH0[b, h, i, pp]
            for r, i in T.Parallel(R, n):
                k_s[r, i] = K_PREV[b, r, h, i]
            for r, pp in T.Parallel(R, p):
                values_s[r, pp] = V_PREV[b, h, pp] * MIMO_X[h, r, pp]
            if c.packed:  # Δ_0 = 0 for an empty document
                dt_0 = T.if_then_else(DOCS[0, b, 0] <= DOCS[0, b, 1], T.cast(DT[0, DOCS[0, b, 0], h], F32), 0.0)
                w0 = dt_0 - T.sigmoid(T.cast(TRAP[0, T.min(DOCS[0, b, 0], L - 1), h], F32)) * dt_0
            else:
                dt_0 = T.cast(DT[b, 0, h], F32)
                w0 = dt_0 - T.sigmoid(T.cast(TRAP[b, 0, h], F32)) * dt_0

            T.clear(dweighted)
            T.clear(dkey)
            T.clear(dtheta)
            for i in T.serial(n):
                for r, pp in T.Parallel(R, p):
                    dweighted[r, pp] += dh_s[i, pp] * k_s[r, i]
            for pp in T.serial(p):
                for r, i in T.Parallel(R, n):
                    dkey[r, i] += dh_s[i, pp] * values_s[r, pp]
                for s in T.Parallel(S):  # h̃_0's term of ∂θ_0: −⟨∂h̃_0, J h̃_0⟩ over each rotated pair
                    first, second = pair_indices(s, n, R > 1)
                    dtheta[s] += dh_s[first, pp] * H_IN[b, h, second, pp] - dh_s[second, pp] * H_IN[b, h, first, pp]

            for r, pp in T.Parallel(R, p):
                products[r, pp] = dweighted[r, pp] * values_s[r, pp]
                DMIMO_X[b, h, r, pp] = w0 * dweighted[r, pp] * V_PREV[b, h, pp]
                dvalues_s[r, pp] = dweighted[r, pp] * MIMO_X[h, r, pp]
            for pp in T.Parallel(p):
                DV_PREV[b, h, pp] = w0 * sum(dvalues_s[r, pp] for r in range(R))
            for r, i in T.Parallel(R, n):
                DK_PREV[b, r, h, i] = w0 * dkey[r, i]
            for s in T.Parallel(S):
                DTHETA0[b, h, s] = dtheta[s]
            T.reduce_sum(products, rank_sums, dim=1)
            for r in T.Parallel(R):
                rank_s[r] = rank_sums[r]
            DW0[b, h] = sum(rank_s[r] for r in range(R))

    return initial_grad


MAKERS = (_chunk_dy, _state_pass_bwd, _chunk_dqkv, _terms_grad, _initial_grad, _norm_grad)


class BackwardSet(NamedTuple):
    chunk_dy: object
    state_pass_bwd: object
    chunk_dqkv: object
    terms_grad: object
    initial_grad: object
    norm_grad: object


@functools.cache
def backward_set(config: KernelConfig) -> BackwardSet:
    """The backward kernels for `config`, built once per process."""
    return BackwardSet(*build(config, MAKERS, "backward"))
