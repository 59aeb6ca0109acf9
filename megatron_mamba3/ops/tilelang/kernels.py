"""The TileLang forward kernels of the scan (math in `chunk_math`): chunk_prep, then either the chunk-parallel
chunk_state, state_pass and chunk_output, or chunk_walk alone (`function.walks` picks).

    chunk_prep    grid (nc, H, b): the per-token terms cs, wd, wo (b, H, l_pad), each chunk's mult (b, nc, H)
                  and its last document's angle total Σ_j Δ_j·tanh(angles_j) (b, nc, H, S), fp32; a row's (packed:
                  a document's) first chunk's blocks also its h̃_0 (states, H, n, p), the initial state with its
                  incoming (k, v). With the prep (`KernelConfig.A_floor`), it takes raw dt, A, B and C:
                  Δ = softplus(dt + dt_bias) (b, l, H)
                  and the RMSNormed B, C (by each group's first head) come out in bf16 for the other kernels,
                  A = decay_rate(A) stays inside
    chunk_state   grid (nc, H, b): S_c = Σ_j w_j k_j v_jᵀ of each chunk, fp32 (b, nc, H, n, p), with θ counted
                  from the chunk's start
    state_pass    grid (n / 8, H, b): h̃_{c+1} = mult_c h̃_c + S_c over the chunks (S_c turned by θ carried into c,
                  which it scans from the totals: θ_c (b, nc, H, S) and after the last chunk (states, H, S));
                  writes h̃_c (bf16) and the final states' h (states, H, p, n) and key rot(θ_final, B_last + bias)
                  (states, R, H, n); packed, each document starts from its own h̃_0 and θ_0
    chunk_output  grid (nc, H, b): intra-chunk masked matmuls + q·h̃_c + D·v, per-head norm and gate
    chunk_walk    grid (H, b): the last three in one block per (head, row) that walks its chunks in order:
                  state_pass's θ scan and documents, chunk_output's work on the state carried in registers
                  (written as h̃_c, bf16, where a backward will read it), then h̃_{c+1} = mult_c h̃_c +
                  Σ_j w_j k_j v_jᵀ with the keys at their θ; the same outputs, fewer blocks (one per (row, head)).
                  Each chunk's inputs are fetched (cp.async) while the chunk before runs

Keys and queries are built per head inside the kernels (bias, RMSNormed B/C of the head's group,
rotation by θ) and values per rank (x ⊙ mimo_x), so no per-head copy of B/C and no rank-expanded
value ever reaches device memory. Batch, length and chunk count are runtime sizes (`T.dynamic`):
one compiled set per `KernelConfig`, whatever the length. States (initial and final) are one per row,
or with `KernelConfig.packed` one per `cu_seqlens` document, whose chunks `chunk_layout` lays out (chunk c
holds the tokens SPAN[c] names; the per-token terms sit at c·Q + i either way). Importing this module
needs TileLang.
"""


import functools
import math
import operator
from typing import NamedTuple

import tilelang.language as T
from tilelang.layout import make_full_bank_swizzled_layout as bank_swizzled

from megatron_mamba3.ops.tilelang.build import build

CHUNK_THREADS = 256  # two warpgroups per (chunk, head) block: 1.4x faster than 128 on an H100 (benchmarks/README.md)
SCAN_THREADS = 128  # the state passes (a bandwidth-bound scan)
STATE_ROWS = 8  # state rows (of n) per block in the state pass
H0_ROWS = 32  # state rows chunk_prep turns from h's (p, n) layout at a time
NORM_EPS = 1e-5
SOFTPLUS_THRESHOLD = 20.0  # torch's: softplus(u) = u above it
PREP_ROWS = 8  # B/C rows chunk_prep RMSNorms at a time
ROTATION_SPAN = 8  # tokens per group of θ's two-level running sums (`chunk_prologue`); divides every Q
NAN = float("nan")
F32, BF16, F64 = "float32", "bfloat16", "float64"


class KernelConfig(NamedTuple):
    """Static sizes of one compiled kernel set: H heads, p head dim, n state, R ranks, G groups,
    S rotated pairs, Q tokens per chunk, whether the per-head output norm is applied, the prep's A floor
    where the kernels run the prep (`interface.Mamba3Prep`: raw dt, A, B, C in), else None, whether the
    chunks hold `cu_seqlens` documents laid out to start at chunk boundaries (`chunk_layout`), and whether
    the backward is deterministic (PyTorch's `torch.use_deterministic_algorithms`, which Megatron-LM's
    `--deterministic-mode` turns on): dB and dC summed over a group's heads exactly, in float64 atomics,
    else in fp32 ones (`backward_kernels.scatter`)."""

    H: int
    p: int
    n: int
    R: int
    G: int
    S: int
    Q: int
    norm: bool
    A_floor: float | None = None
    packed: bool = False
    deterministic: bool = False


class KernelSet(NamedTuple):
    chunk_prep: object
    chunk_state: object
    state_pass: object
    chunk_output: object
    chunk_walk: object


@functools.cache
def kernel_set(config: KernelConfig) -> KernelSet:
    """The forward kernels for `config`, built once per process."""
    return KernelSet(*build(config, MAKERS, "forward"))


def gate_blocks_per_sm(c: KernelConfig) -> int:
    """Blocks per SM that `chunk_output` and `chunk_dy` are compiled for (registers capped to fit them), as their
    shared memory allows at p = 64 (tests/unit/test_tilelang_smem.py): three where their three (Q, S) fp32 θ
    tiles take at most 24 KB (74 KB SISO, 65 KB R = 4 at n = 128 with half the state rotated), but two at R = 2
    (TileLang's plan for its 32-token chunks takes 86 KB there) and where the θ tiles take more (SISO with all of
    the state rotated at n = 128: 98 KB); one at p = 128 (no cap)."""
    if c.p != 64:
        return 1
    return 3 if c.Q * c.S <= 2048 and c.R != 2 else 2


def walk_blocks_per_sm(c: KernelConfig) -> int:
    """Blocks per SM that `chunk_walk` is compiled for (registers capped to fit them): two at p = 64 where its
    three (Q, S) fp32 θ tiles take at most 24 KB, as its shared memory then allows (107 KB SISO, 108 KB MIMO R4
    at n = 128 with half the state rotated; 128 registers, 48-52 bytes spilled); one otherwise (SISO with all
    of the state rotated at n = 128 takes 151 KB)."""
    return 2 if c.p == 64 and c.Q * c.S <= 2048 else 1


def centred(theta):
    """θ reduced to [−π, π] (fp32 or float64), where the fast sin and cos (`build.pass_configs`) are accurate."""
    return theta - 2 * math.pi * T.round(theta * (0.5 / math.pi))


def shared_alias(src, shape, dtype):
    """A shared buffer of `shape` and `dtype` on src's memory where their sizes in bytes agree (the caller
    keeps their uses apart), else a buffer of its own."""
    elements = functools.reduce(operator.mul, shape, 1)
    if elements * T.dtype(dtype).bits == functools.reduce(operator.mul, src.shape, 1) * T.dtype(src.dtype).bits:
        return T.view(src, shape, dtype)
    return T.alloc_shared(shape, dtype)


def cp_async(dst, src, ok=True, width: int = 16):
    """One asynchronous copy (cp.async) of `width` bytes from device memory at src to shared memory at dst
    (element accesses; both aligned to `width`); where `ok` is false nothing is read and dst's bytes are zeroed.
    It completes at a `T.ptx_wait_group` after its `T.ptx_commit_group`; other threads see it after a barrier."""
    return T.call_extern("handle", f"tl::cp_async_gs_conditional<{width}>", T.address_of(dst), T.address_of(src), ok)


@T.macro
def head_rows(SRC, h, dst):
    """dst (R, k) = SRC[h] of an (H, R, k) per-head weight."""
    for r, k in T.Parallel(*dst.shape):
        dst[r, k] = SRC[h, r, k]


@T.macro
def carry_weights(seg_s, cs_s, seg_before, one_s, inter_s):
    """one_s (Q,) = 1 (the keys' scale in the chunk's outputs) and inter_s (Q,) = exp(cs_i) where token i's
    document is the one carried into the chunk (`seg_before`), else 0: the weights of the carried-in state."""
    for i in T.Parallel(seg_s.shape[0]):
        one_s[i] = 1.0
        inter_s[i] = T.if_then_else(seg_s[i] == seg_before, T.exp(cs_s[i]), 0.0)


def turns(theta):
    """θ (float64) reduced to [0, 2π): how θ_c and θ_final are stored."""
    return theta - 2 * math.pi * T.floor(theta * (0.5 / math.pi))


def final_key_macro(c: KernelConfig):
    """Macro: the final key of rotated pair `pair` at its θ (float64; pairs ≥ S pass unchanged) into K_OUT[st, :, h]:
    rot(θ_final, B_token + B_bias[h]) per rank, with `token` the document's last (an empty document's reads token 0
    or its predecessor's: the caller keeps its initial state instead)."""
    H, n, R, G, S = c.H, c.n, c.R, c.G, c.S

    @T.macro
    def final_key(Bk, B_BIAS, K_OUT, b, h, st, token, pair, theta):
        angle = T.cast(centred(theta), F32)
        first, second = pair_indices(pair, n, R > 1)
        for r in T.unroll(R):
            u = T.cast(Bk[b, T.max(token, 0), r, h // (H // G), first], F32) + B_BIAS[h, r, first]
            w = T.cast(Bk[b, T.max(token, 0), r, h // (H // G), second], F32) + B_BIAS[h, r, second]
            turned = rotate_pair(u, w, T.cos(angle), T.sin(angle))
            K_OUT[st, r, h, first] = T.if_then_else(pair < S, turned[0], u)
            K_OUT[st, r, h, second] = T.if_then_else(pair < S, turned[1], w)

    return final_key


def pair_indices(s, n: int, half_split: bool):
    """The state indices (a, b) of rotated pair s: (s, n/2 + s) half-split (MIMO), (2s, 2s + 1) adjacent
    (SISO). Rotation by θ turns (a, b) as `rotate_pair` does; pairs s ≥ S pass unchanged."""
    return (s, n // 2 + s) if half_split else (2 * s, 2 * s + 1)


def rotate_pair(a, b, cos, sin):
    """A pair's elements (a, b) turned by θ: (a cos θ − b sin θ, b cos θ + a sin θ)."""
    return a * cos - b * sin, b * cos + a * sin


def softplus(u):
    """log(1 + eᵘ) as torch's (u itself above 20), fp32."""
    return T.if_then_else(u > SOFTPLUS_THRESHOLD, u, T.log1p(T.exp(u)))


def softplus_slope(u):
    """d softplus / du as torch's backward takes it: sigmoid(u), 1 above the threshold."""
    return T.if_then_else(u > SOFTPLUS_THRESHOLD, 1.0, T.sigmoid(u))


def _decay_f(u):
    return T.if_then_else(u >= 0.0, 1.0 + u, 1.0 / (1.0 - u))


def decay_rate(u, floor: float):
    """A = −max(f(u), floor), f(u) = 1 + u for u ≥ 0 and 1 / (1 − u) below (`toolkit.prep.decay_rate`)."""
    return -T.max(_decay_f(u), floor)


def decay_slope(u, floor: float):
    """dA/du of `decay_rate`: −f'(u) (1 above 0, f² below) where f(u) ≥ floor, as torch's clamp passes it; else 0."""
    f = _decay_f(u)
    return T.if_then_else(f >= floor, -T.if_then_else(u >= 0.0, 1.0, f * f), 0.0)


def bf16_rest(value, hi):
    """The bf16 lo half of fp32 `value` whose hi half is `hi` (its bf16 rounding): hi + lo is `value` to ~16
    mantissa bits, which is how fp32 operands enter the bf16 matmuls."""
    return T.cast(value - T.cast(hi, F32), BF16)


@T.macro
def load_state(HS, b, chunk, h, hs_s, finite: bool):
    """hs_s (n, p) bf16 = the chunk start HS[b, chunk, h]; with `finite`, its non-finite entries read as 0
    (the backward's view of the states, which the forward left non-finite only where a bad value reaches)."""
    if finite:
        for i, j in T.Parallel(*hs_s.shape):
            value = HS[b, chunk, h, i, j]
            hs_s[i, j] = T.if_then_else(T.isfinite(T.cast(value, F32)), value, T.cast(0, BF16))
    else:
        T.copy(HS[b, chunk, h, :, :], hs_s)


def state_weight(seg_s, cs_s, wo_s, i):
    """w_i = exp(cs_last − cs_i)·wo_i, token i's weight in the chunk's state S_c = Σ_i w_i k_i v_iᵀ: 0 outside the
    chunk's last document (seg_s, cs_s, wo_s: the chunk's (Q,) document ids and terms)."""
    last = seg_s.shape[0] - 1
    return T.if_then_else(seg_s[i] == seg_s[last], T.exp(cs_s[last] - cs_s[i]) * wo_s[i], 0.0)


def token_row(SRC, first, last, b, h, i, pp):
    """SRC[b, first + i, h, pp] of a (b, l, H, p) bf16 tensor: the chunk's row i, 0 past `last`."""
    return T.if_then_else(first + i <= last, SRC[b, first + i, h, pp], T.cast(0, BF16))


@T.macro
def finite_in_place(tile_s):
    """tile_s (rows, cols) bf16 in shared memory with its non-finite entries set to 0: the backward's view of x
    and z, made after their rows are loaded (a select inside `token_row`'s load turns its 16-byte loads into
    2-byte ones, each made twice)."""
    for i, j in T.Parallel(*tile_s.shape):
        value = tile_s[i, j]
        tile_s[i, j] = T.if_then_else(T.isfinite(T.cast(value, F32)), value, T.cast(0, BF16))


def reaches(seg_s, i, j):
    """Whether token j's value reaches row i of the chunk: j ≤ i in the same document (seg_s (Q,) int32)."""
    return (seg_s[i] == seg_s[j]) & (j <= i)


def decay_weight(seg_s, cs_s, wd_s, wo_s, i, j):
    """L_ij = wd_j (i = j), exp(cs_i − cs_j) wo_j (i > j in one document); elsewhere a finite value the
    caller discards."""
    inside = reaches(seg_s, i, j)
    return T.if_then_else(i == j, wd_s[j], T.exp(cs_s[i] - T.if_then_else(inside, cs_s[j], cs_s[i])) * wo_s[j])


@T.macro
def decay_table(seg_s, cs_s, wd_s, wo_s, table):
    """table (Q, Q) fp32 = L (`decay_weight`), which `mix_weights` reads where R > 1 (a token's R x R block
    shares one weight)."""
    for i, j in T.Parallel(*table.shape):
        table[i, j] = decay_weight(seg_s, cs_s, wd_s, wo_s, i, j)


def states_dim(c: KernelConfig, batch):
    """The leading size of the initial and final states: the batch, or packed (`cu_seqlens`) the documents."""
    return T.dynamic("NS") if c.packed else batch


def span_first(c: KernelConfig, SPAN, b, chunk):
    """The token (an index into the inputs' l) of a chunk's row 0: chunk·Q, or SPAN[b, chunk, 0] packed. The
    chunk's per-token terms sit at chunk·Q either way: `chunk_layout`'s padded positions."""
    return SPAN[b, chunk, 0] if c.packed else chunk * c.Q


def span_last(c: KernelConfig, SPAN, b, chunk, L):
    """The last token of the chunk's document (row i holds a token where first + i ≤ last): L − 1, or
    SPAN[b, chunk, 1] packed."""
    return SPAN[b, chunk, 1] if c.packed else L - 1


def segment_before_at(c: KernelConfig, t0):
    """The padded position whose document is the one before the chunk at t0, as the chunk's carried-in state
    belongs to it: the previous token's (the row's first at t0 = 0); packed, the chunk's own, since a
    `cu_seqlens` document starts at a chunk start from its own initial state."""
    return t0 if c.packed else T.max(t0 - 1, 0)


def segment_before(c: KernelConfig, SEG, b, t0):
    """The document before the chunk at padded position t0 (`segment_before_at`)."""
    return SEG[b, segment_before_at(c, t0)]


def state_index(c: KernelConfig, SEG, b, t0):
    """The initial and final state a chunk's document reads and writes: its row b, or packed its document."""
    return SEG[b, t0] if c.packed else b


def starts_state(c: KernelConfig, SEG, b, chunk):
    """Whether the chunk is the first of a row (packed: of a document), which starts from its initial state."""
    if c.packed:
        return (chunk == 0) | (SEG[b, T.max(chunk * c.Q - 1, 0)] != SEG[b, chunk * c.Q])
    return chunk == 0


def chunk_prologue(c: KernelConfig):
    """Macros shared by the per-chunk kernels: per-token scalars, θ, and rotated keys/queries."""
    Q, S, R, n, p = c.Q, c.S, c.R, c.n, c.p

    @T.macro
    def load_scalars(SEG, CS, WD, WO, b, h, t0, seg_s, cs_s, wd_s, wo_s):
        for i in T.Parallel(Q):
            seg_s[i] = SEG[b, t0 + i]
            cs_s[i] = CS[b, h, t0 + i]
            wd_s[i] = WD[b, h, t0 + i]
            wo_s[i] = WO[b, h, t0 + i]

    @T.macro
    def rotation(
        ANG, DT, THS, first, last, b, h, chunk, seg_s, seg_before, turn_s, theta_f, cos_s, sin_s, theta_in=None
    ):
        """cos_s, sin_s (Q, S) of each token's θ: θ carried into the chunk (THS, or the shared (S,) `theta_in`
        where given; 0 where THS is None) plus the increments π·tanh(angles)·Δ of its document so far,
        restarting at each document start; row i holds token first + i where that is at most `last`
        (`span_first`, `span_last`). With ANG None, turn_s already holds the increments."""
        if ANG is not None:
            for i, s in T.Parallel(Q, S):
                turn_s[i, s] = T.if_then_else(
                    first + i <= last,
                    math.pi * T.tanh(T.cast(ANG[b, first + i, s], F32)) * T.cast(DT[b, first + i, h], F32),
                    0.0,
                )
        # θ's running sums in two levels, so no chain of Q dependent shared-memory round trips: within each group
        # of ROTATION_SPAN tokens (into cos_s), then the θ each group takes over from the one before (into turn_s,
        # whose increments are spent by then), one step per group.
        for i, s in T.Parallel(Q, S):
            first = i // ROTATION_SPAN * ROTATION_SPAN
            cos_s[i, s] = sum(
                T.if_then_else((first + k <= i) & (seg_s[first + k] == seg_s[i]), turn_s[first + k, s], 0.0)
                for k in range(ROTATION_SPAN)
            )
        for s in T.Parallel(S):
            if theta_in is not None:
                theta_f[s] = theta_in[s]
            elif THS is None:
                theta_f[s] = 0.0
            else:
                theta_f[s] = THS[b, chunk, h, s]
        for group in T.unroll(Q // ROTATION_SPAN):  # theta_f: θ at the previous group's end (replicated per warp)
            for s in T.Parallel(S):
                first, last = group * ROTATION_SPAN, (group + 1) * ROTATION_SPAN - 1
                previous = seg_before if group == 0 else seg_s[first - 1]
                carried = T.if_then_else(seg_s[first] == previous, theta_f[s], 0.0)
                turn_s[group, s] = carried
                theta_f[s] = cos_s[last, s] + T.if_then_else(seg_s[last] == seg_s[first], carried, 0.0)
        for i, s in T.Parallel(Q, S):
            first = i // ROTATION_SPAN * ROTATION_SPAN
            angle = centred(cos_s[i, s] + T.if_then_else(seg_s[i] == seg_s[first], turn_s[i // ROTATION_SPAN, s], 0.0))
            sin_s[i, s] = T.sin(angle)
            cos_s[i, s] = T.cos(angle)

    @T.macro
    def store_key(out_s, lo_s, row, index, key, scale):
        """out_s[row, index] = scale · key as bf16 (exactly 0 where scale is); with lo_s, its bf16 rest."""
        scaled = T.if_then_else(scale != 0.0, key * scale, 0.0)
        out_s[row, index] = T.cast(scaled, BF16)
        if lo_s is not None:  # the rest from the value, not read back from out_s (no barrier between the two)
            lo_s[row, index] = bf16_rest(scaled, T.cast(scaled, BF16))

    @T.macro
    def keys_rotated(raw_s, bias_s, cos_s, sin_s, scale_s, out_s, lo_s):
        """`keys`' rotation phase. Half-split pairs (R > 1) are turned in one loop; adjacent pairs (SISO) in two,
        every pair into registers and then stored, since TileLang cannot tell that an in-place turn of (2s, 2s + 1)
        misses the other threads' pairs and would put a barrier in each iteration of one loop."""
        adjacent = R == 1
        if adjacent:
            turned_a = T.alloc_fragment((Q, S), F32)
            turned_b = T.alloc_fragment((Q, S), F32)
        for row, s in T.Parallel(Q * R, S):
            i, r = row // R, row % R
            a, bb = pair_indices(s, n, not adjacent)
            u = T.cast(raw_s[row, a], F32) + bias_s[r, a]
            w = T.cast(raw_s[row, bb], F32) + bias_s[r, bb]
            turned = rotate_pair(u, w, cos_s[i, s], sin_s[i, s])
            if adjacent:
                turned_a[row, s] = turned[0]
                turned_b[row, s] = turned[1]
            else:
                store_key(out_s, lo_s, row, a, turned[0], scale_s[i])
                store_key(out_s, lo_s, row, bb, turned[1], scale_s[i])
        if adjacent:
            for i, s in T.Parallel(Q, S):
                a, bb = pair_indices(s, n, False)
                store_key(out_s, lo_s, i, a, turned_a[i, s], scale_s[i])
                store_key(out_s, lo_s, i, bb, turned_b[i, s], scale_s[i])
        if S < n // 2:  # the elements of the unrotated pairs: [S, n/2) and [n/2 + S, n) half-split, [2S, n) adjacent
            first, parts, width = (S, 2, n // 2 - S) if R > 1 else (2 * S, 1, n - 2 * S)
            for row, part, k in T.Parallel(Q * R, parts, width):
                index = part * (n // 2) + first + k
                store_key(out_s, lo_s, row, index, T.cast(raw_s[row, index], F32) + bias_s[row % R, index], scale_s[row // R])

    @T.macro
    def keys(SRC, BIAS, first, last, b, h, raw_s, bias_s, cos_s, sin_s, scale_s, out_s, lo_s=None, load=True, rotate=True):
        """out_s[(i, r), :] = scale_i · rot(θ_i, SRC[first + i, r, group] + BIAS[h, r]) as bf16 (exactly 0 where
        scale_i is); with lo_s, also the bf16 rest lo_s = key − out_s, so out_s + lo_s is the key to ~16 bits.
        One thread makes both elements of a pair, reading each operand once (so out_s may be raw_s: rotated in
        place); the rotated pairs and those passed unchanged run as two loops, so neither needs a per-pair select.
        `load` (BIAS and SRC's rows into bias_s and raw_s) and `rotate` (into out_s) split it in two phases."""
        if load:
            head_rows(BIAS, h, bias_s)
            for row, nn in T.Parallel(Q * R, n):
                raw_s[row, nn] = T.if_then_else(
                    first + row // R <= last, SRC[b, first + row // R, row % R, h // (c.H // c.G), nn], T.cast(0, BF16)
                )
        if rotate:
            keys_rotated(raw_s, bias_s, cos_s, sin_s, scale_s, out_s, lo_s)

    @T.macro
    def values(X, MIMO_X, first, last, b, h, x_s, mx_s, v_s, product=True, finite=False):
        """x_s = the chunk's x (bf16, zero past `last`, and with `finite` where not finite: `finite_in_place`),
        mx_s = mimo_x[h]; with `product`, v_s[(i, r), :] = x_i ⊙ mimo_x[h, r] (bf16)."""
        for i, pp in T.Parallel(Q, p):
            x_s[i, pp] = token_row(X, first, last, b, h, i, pp)
        if finite:
            finite_in_place(x_s)
        head_rows(MIMO_X, h, mx_s)
        if product:
            for row, pp in T.Parallel(Q * R, p):
                v_s[row, pp] = T.cast(T.cast(x_s[row // R, pp], F32) * mx_s[row % R, pp], BF16)

    @T.macro
    def mix_weights(seg_s, cs_s, wd_s, wo_s, scores, out_s, table=None):
        """out_s = scores ⊙ L as bf16, exactly 0 outside L's support (never a product with 0, so a
        non-finite score cannot leak). For R > 1 each element reads L from `table` (`decay_table`, made by the
        caller, ahead of the matmul that makes the scores), instead of computing it per element."""
        if R == 1:
            for row, col in T.Parallel(Q, Q):
                weight = decay_weight(seg_s, cs_s, wd_s, wo_s, row, col)
                out_s[row, col] = T.cast(T.if_then_else(reaches(seg_s, row, col), scores[row, col] * weight, 0.0), BF16)
        else:
            for row, col in T.Parallel(Q * R, Q * R):
                i, j = row // R, col // R
                out_s[row, col] = T.cast(T.if_then_else(reaches(seg_s, i, j), scores[row, col] * table[i, j], 0.0), BF16)

    return load_scalars, rotation, keys, values, mix_weights


def chunk_y_macro(c: KernelConfig, finite_reads: bool = False):
    """Macros for one chunk's per-rank outputs y (before norm and gate) into y_s (QR, p) fp32: `chunk_y` from its
    inputs in device memory, leaving the chunk's queries in q_s, keys in k_s, values in v_s, x in x_s and the
    carried-state weights in inter_s; `chunk_mix`, chunk_y's part from the chunk's scalars, rotated queries and
    keys, x and mimo_x in shared memory on (as `chunk_walk`, which fetches them ahead, has them). With
    `finite_reads` (the backward's view), x's and the chunk start's non-finite entries read as 0 (`finite_in_place`,
    `load_state`)."""
    Q, R, p = c.Q, c.R, c.p
    QR = Q * R
    load_scalars, rotation, keys, values, mix_weights = chunk_prologue(c)

    @T.macro
    def chunk_mix(
        HS, D, d_at, b, h, chunk, seg_s, cs_s, wd_s, wo_s, inter_s, q_s, k_s, x_s, mx_s, v_s, hs_s, mix_s, scores,
        y, y_in, y_s, state=None, inside_s=None,
    ):
        """y_s, with D[d_at] the head's D (D (H,) at h, or a copy of it). The chunk start is HS[b, chunk, h], or given `state` that fragment
        (n, p) fp32, written to HS (where HS has the row: none without a backward) as it enters hs_s.
        `inside_s`: the (QR, QR) bf16 buffer the poison mask takes (a shared buffer of its own where None)."""
        bad_s = T.alloc_shared((QR, p), BF16)
        if inside_s is None:
            inside_s = T.alloc_shared((QR, QR), BF16)
        poison = T.alloc_fragment((QR, p), F32)
        bad_f = T.alloc_fragment((QR, p), F32)
        v_f = T.alloc_fragment((QR, p), F32)
        seen = T.alloc_local((1,), F32)  # whether this thread's values hold a non-finite one
        any_bad = T.alloc_local((1,), "int32")  # whether the block's do
        table = None
        if R > 1:
            table = T.alloc_shared((Q, Q), F32)
            decay_table(seg_s, cs_s, wd_s, wo_s, table)
        for row, pp in T.Parallel(QR, p):  # a non-finite value enters the matmul as 0 and is tracked apart
            value = T.cast(x_s[row // R, pp], F32) * mx_s[row % R, pp]
            finite = T.abs(value) < T.infinity(F32)  # isfinite, in a form TileLang vectorizes
            bad_f[row, pp] = T.if_then_else(finite, 0.0, 1.0)
            v_f[row, pp] = T.if_then_else(finite, value, 0.0)
        T.copy(bad_f, bad_s)
        T.copy(v_f, v_s)
        # whether any value is non-finite: each thread's own, then the block's in one barrier (a flag stored from
        # the loop above would keep it scalar)
        seen[0] = 0.0
        for row, pp in T.Parallel(QR, p):
            seen[0] = T.max(seen[0], bad_f[row, pp])
        any_bad[0] = T.call_extern("int32", "__syncthreads_or", T.if_then_else(seen[0] != 0.0, 1, 0))

        T.gemm(q_s, k_s, scores, transpose_B=True, clear_accum=True)
        mix_weights(seg_s, cs_s, wd_s, wo_s, scores, mix_s, table)
        # late: hs_s then shares memory with the keys' operands
        if state is not None:
            for i, j in T.Parallel(*hs_s.shape):
                hs_s[i, j] = T.cast(state[i, j], BF16)
            if b < HS.shape[0]:  # saved for the backward (HS has no rows where none will run)
                T.copy(hs_s, HS[b, chunk, h, :, :])
        else:
            load_state(HS, b, chunk, h, hs_s, finite_reads)
        T.gemm(mix_s, v_s, y, clear_accum=True)
        T.gemm(q_s, hs_s, y_in, clear_accum=True)
        skip = D[d_at]
        for row, pp in T.Parallel(QR, p):
            carried = T.if_then_else(inter_s[row // R] != 0.0, inter_s[row // R] * y_in[row, pp], 0.0)
            y[row, pp] = y[row, pp] + carried + skip * T.cast(x_s[row // R, pp], F32) * mx_s[row % R, pp]
        if any_bad[0] != 0:  # rows (i, r) whose document holds a non-finite value at j ≤ i
            for row, col in T.Parallel(QR, QR):
                i, j = row // R, col // R
                inside_s[row, col] = T.if_then_else(reaches(seg_s, i, j), T.cast(1, BF16), T.cast(0, BF16))
            T.gemm(inside_s, bad_s, poison, clear_accum=True)
            for row, pp in T.Parallel(QR, p):
                y[row, pp] = T.if_then_else(poison[row, pp] != 0.0, NAN, y[row, pp])
        T.copy(y, y_s)

    @T.macro
    def chunk_y(
        X, Bk, Cq, ANG, DT, SEG, CS, WD, WO, THS, HS, B_BIAS, C_BIAS, D, MIMO_X, first, last, b, h, chunk,
        seg_s, cs_s, wd_s, wo_s, one_s, inter_s, turn_s, cos_s, sin_s, theta_f, raw_s, bias_s,
        q_s, k_s, x_s, mx_s, v_s, hs_s, mix_s, scores, y, y_in, y_s,
    ):
        t0 = chunk * Q
        load_scalars(SEG, CS, WD, WO, b, h, t0, seg_s, cs_s, wd_s, wo_s)
        seg_before = segment_before(c, SEG, b, t0)
        carry_weights(seg_s, cs_s, seg_before, one_s, inter_s)
        rotation(ANG, DT, THS, first, last, b, h, chunk, seg_s, seg_before, turn_s, theta_f, cos_s, sin_s)
        keys(Cq, C_BIAS, first, last, b, h, raw_s, bias_s, cos_s, sin_s, one_s, q_s)
        keys(Bk, B_BIAS, first, last, b, h, raw_s, bias_s, cos_s, sin_s, one_s, k_s)
        values(X, MIMO_X, first, last, b, h, x_s, mx_s, v_s, False, finite_reads)  # v_s: chunk_mix's finite check
        chunk_mix(HS, D, h, b, h, chunk, seg_s, cs_s, wd_s, wo_s, inter_s, q_s, k_s, x_s, mx_s, v_s, hs_s, mix_s, scores, y, y_in, y_s)

    return chunk_y, chunk_mix


def _chunk_prep(c: KernelConfig):
    H, S, Q, n, p, R, G = c.H, c.S, c.Q, c.n, c.p, c.R, c.G
    batch, L, LP, NC, SB, SNC = T.dynamic("batch, L, LP, NC, SB, SNC")
    NS = states_dim(c, batch)
    prep, heads = c.A_floor is not None, H // G

    @T.macro
    def norm_rows(SRC, WEIGHT, DST, L, b, first, last, g):
        """DST = SRC's rows (i, r) of group g for the chunk's tokens, RMSNormed and scaled by WEIGHT (n,), bf16."""
        rows_f = T.alloc_fragment((PREP_ROWS, n), F32)
        squares = T.alloc_fragment((PREP_ROWS, n), F32)
        sums = T.alloc_fragment((PREP_ROWS,), F32)
        for part in T.serial(Q * R // PREP_ROWS):
            for k, nn in T.Parallel(PREP_ROWS, n):
                row = part * PREP_ROWS + k
                value = SRC[b, T.min(first + row // R, L - 1), row % R, g, nn]
                rows_f[k, nn] = T.cast(value, F32)
                squares[k, nn] = rows_f[k, nn] * rows_f[k, nn]
            T.reduce_sum(squares, sums, dim=1)
            for k, nn in T.Parallel(PREP_ROWS, n):
                row = part * PREP_ROWS + k
                if first + row // R <= last:
                    normed = rows_f[k, nn] * T.rsqrt(sums[k] / n + NORM_EPS) * WEIGHT[nn]
                    DST[b, first + row // R, row % R, g, nn] = T.cast(normed, BF16)

    @T.prim_func
    def chunk_prep(
        DT: T.Tensor((batch, L, H), BF16),
        A: T.Tensor((batch, L, H), BF16),
        TRAP: T.Tensor((batch, L, H), BF16),
        ANG: T.Tensor((batch, L, S), BF16),
        SEG: T.Tensor((batch, LP), "int32"),
        SPAN: T.Tensor((SB, SNC, 2), "int32"),
        H0: T.Tensor((NS, H, p, n), F32),
        K_PREV: T.Tensor((NS, R, H, n), F32),
        V_PREV: T.Tensor((NS, H, p), F32),
        MIMO_X: T.Tensor((H, R, p), F32),
        DT_BIAS: T.Tensor((H,), F32),
        Bk: T.Tensor((batch, L, R, G, n), BF16),
        Cq: T.Tensor((batch, L, R, G, n), BF16),
        B_NORM: T.Tensor((n,), F32),
        C_NORM: T.Tensor((n,), F32),
        CS: T.Tensor((batch, H, LP), F32),
        WD: T.Tensor((batch, H, LP), F32),
        WO: T.Tensor((batch, H, LP), F32),
        MULT: T.Tensor((batch, NC, H), F32),
        TOTALS: T.Tensor((batch, NC, H, S), F32),
        H_IN: T.Tensor((NS, H, n, p), F32),
        DT_OUT: T.Tensor((batch, L, H), BF16),
        B_OUT: T.Tensor((batch, L, R, G, n), BF16),
        C_OUT: T.Tensor((batch, L, R, G, n), BF16),
    ):
        with T.Kernel(NC, H, batch, threads=SCAN_THREADS) as (chunk, h, b):
            T.annotate_min_blocks_per_sm(12)  # at most 40 registers: the h̃_0 loop below would take 48-128
            t0 = chunk * Q
            first = span_first(c, SPAN, b, chunk)
            last = span_last(c, SPAN, b, chunk, L)
            seg_s = T.alloc_shared((Q + 1,), "int32")  # the chunk's tokens and the next one
            dt_s = T.alloc_shared((Q + 1,), F32)
            lam_s = T.alloc_shared((Q + 1,), F32)
            decay_s = T.alloc_shared((Q,), F32)
            cs_s = T.alloc_shared((Q,), F32)
            turn_s = T.alloc_shared((Q, S), F32)
            running = T.alloc_fragment((1,), F32)
            reset = T.alloc_fragment((1,), "int32")
            total = T.alloc_fragment((S,), F32)
            h0_s = T.alloc_shared((p, H0_ROWS + 1), F32)  # + 1: the turned reads fall in distinct banks

            # Δ = A = 0 past the document's end; the next token of the last one continues its document
            for i in T.Parallel(Q + 1):
                seg_s[i] = T.if_then_else(t0 + i < LP, SEG[b, t0 + i], SEG[b, LP - 1])
                dt_in = T.cast(DT[b, first + i, h], F32)
                if prep:  # Δ rounded to bf16 as DT_OUT holds it for the other kernels
                    dt_in = T.cast(T.cast(softplus(dt_in + DT_BIAS[h]), BF16), F32)
                dt_s[i] = T.if_then_else(first + i <= last, dt_in, 0.0)
                lam_s[i] = T.if_then_else(first + i <= last, T.sigmoid(T.cast(TRAP[b, first + i, h], F32)), 0.0)
            for i in T.Parallel(Q):
                rate = T.cast(A[b, first + i, h], F32)
                if prep:
                    rate = decay_rate(rate, c.A_floor)
                decay_s[i] = T.if_then_else(first + i <= last, rate, 0.0) * dt_s[i]
            if prep:
                for i in T.Parallel(Q):
                    if first + i <= last:
                        DT_OUT[b, first + i, h] = T.cast(dt_s[i], BF16)
                if h % heads == 0:  # the group's first head RMSNorms its B and C rows
                    norm_rows(Bk, B_NORM, B_OUT, L, b, first, last, h // heads)
                    norm_rows(Cq, C_NORM, C_OUT, L, b, first, last, h // heads)
            for i, s in T.Parallel(Q, S):
                turn_s[i, s] = T.if_then_else(first + i <= last, T.tanh(T.cast(ANG[b, first + i, s], F32)), 0.0)

            # cs: a running sum of A·Δ that restarts at the chunk start and at each document start.
            seg_before = segment_before(c, SEG, b, t0)
            running[0] = 0.0
            reset[0] = T.if_then_else((chunk > 0) & (seg_s[0] != seg_before), 1, 0)
            for i in T.serial(Q):
                starts = (i > 0) & (seg_s[i] != seg_s[T.max(i - 1, 0)])
                running[0] = T.if_then_else(starts, 0.0, running[0]) + decay_s[i]
                reset[0] = T.if_then_else(starts, 1, reset[0])
                cs_s[i] = running[0]
            MULT[b, chunk, h] = T.if_then_else(reset[0] != 0, 0.0, T.exp(running[0]))

            # wd = λΔ, wo = λΔ + (1 − λ_{j+1})Δ_{j+1}, the second term exactly 0 where j + 1 starts a document.
            for i in T.Parallel(Q):
                diagonal = lam_s[i] * dt_s[i]
                following = T.if_then_else(seg_s[i + 1] != seg_s[i], 0.0, dt_s[i + 1] - lam_s[i + 1] * dt_s[i + 1])
                CS[b, h, t0 + i] = cs_s[i]
                WD[b, h, t0 + i] = diagonal
                WO[b, h, t0 + i] = diagonal + following

            # The angle total of the chunk's last document (θ's increments over π), summed in token order.
            T.clear(total)
            for i in T.serial(Q):
                for s in T.Parallel(S):
                    total[s] += T.if_then_else(seg_s[i] == seg_s[Q - 1], dt_s[i] * turn_s[i, s], 0.0)
            for s in T.Parallel(S):
                TOTALS[b, chunk, h, s] = total[s]

            # A row's (packed: a document's) first chunk: h̃_0 = h + (1 − λ_0)Δ_0 Σ_r (v_prev ⊙ mimo_x_r) k_prev,rᵀ
            # of its initial state, in the kernels' (n, p) layout
            if starts_state(c, SEG, b, chunk):
                st = state_index(c, SEG, b, t0)
                for block in T.serial(n // H0_ROWS):  # h's (p, n) layout turned through shared memory: both sides coalesced
                    for pp, i in T.Parallel(p, H0_ROWS):
                        h0_s[pp, i] = H0[st, h, pp, block * H0_ROWS + i]
                    for i, pp in T.Parallel(H0_ROWS, p):
                        row = block * H0_ROWS + i
                        incoming = sum(V_PREV[st, h, pp] * MIMO_X[h, r, pp] * K_PREV[st, r, h, row] for r in range(R))
                        H_IN[st, h, row, pp] = h0_s[pp, i] + (dt_s[0] - lam_s[0] * dt_s[0]) * incoming

    return chunk_prep


def _chunk_state(c: KernelConfig):
    H, p, n, R, G, S, Q = c.H, c.p, c.n, c.R, c.G, c.S, c.Q
    batch, L, LP, NC, SB, SNC = T.dynamic("batch, L, LP, NC, SB, SNC")
    load_scalars, rotation, keys, values, mix_weights = chunk_prologue(c)

    @T.prim_func
    def chunk_state(
        X: T.Tensor((batch, L, H, p), BF16),
        Bk: T.Tensor((batch, L, R, G, n), BF16),
        ANG: T.Tensor((batch, L, S), BF16),
        DT: T.Tensor((batch, L, H), BF16),
        SEG: T.Tensor((batch, LP), "int32"),
        SPAN: T.Tensor((SB, SNC, 2), "int32"),
        CS: T.Tensor((batch, H, LP), F32),
        WD: T.Tensor((batch, H, LP), F32),
        WO: T.Tensor((batch, H, LP), F32),
        B_BIAS: T.Tensor((H, R, n), F32),
        MIMO_X: T.Tensor((H, R, p), F32),
        ST: T.Tensor((batch, NC, H, n, p), F32),
    ):
        with T.Kernel(NC, H, batch, threads=CHUNK_THREADS) as (chunk, h, b):
            t0 = chunk * Q
            first = span_first(c, SPAN, b, chunk)
            last = span_last(c, SPAN, b, chunk, L)
            seg_s = T.alloc_shared((Q,), "int32")
            cs_s = T.alloc_shared((Q,), F32)
            wd_s = T.alloc_shared((Q,), F32)
            wo_s = T.alloc_shared((Q,), F32)
            w_s = T.alloc_shared((Q,), F32)
            turn_s = T.alloc_shared((Q, S), F32)
            cos_s = T.alloc_shared((Q, S), F32)
            sin_s = T.alloc_shared((Q, S), F32)
            theta_f = T.alloc_fragment((S,), F32)
            raw_s = T.alloc_shared((Q * R, n), BF16)
            bias_s = T.alloc_shared((R, n), F32)
            k_s = T.alloc_shared((Q * R, n), BF16)
            x_s = T.alloc_shared((Q, p), BF16)
            mx_s = T.alloc_shared((R, p), F32)
            v_s = T.alloc_shared((Q * R, p), BF16)
            acc = T.alloc_fragment((n, p), F32)

            load_scalars(SEG, CS, WD, WO, b, h, t0, seg_s, cs_s, wd_s, wo_s)
            seg_before = segment_before(c, SEG, b, t0)
            for i in T.Parallel(Q):
                w_s[i] = state_weight(seg_s, cs_s, wo_s, i)
            # θ from 0 at the chunk start: S_c in the frame of θ carried into the chunk (state_pass turns it)
            rotation(ANG, DT, None, first, last, b, h, chunk, seg_s, seg_before, turn_s, theta_f, cos_s, sin_s)
            keys(Bk, B_BIAS, first, last, b, h, raw_s, bias_s, cos_s, sin_s, w_s, k_s)
            values(X, MIMO_X, first, last, b, h, x_s, mx_s, v_s)
            for row, pp in T.Parallel(Q * R, p):  # exactly 0 outside the last document, whatever the value
                v_s[row, pp] = T.if_then_else(w_s[row // R] != 0.0, v_s[row, pp], T.cast(0, BF16))
            T.gemm(k_s, v_s, acc, transpose_A=True, clear_accum=True)
            T.copy(acc, ST[b, chunk, h, :, :])

    return chunk_state


def _state_pass(c: KernelConfig):
    H, p, n, R, G, S, Q, rows = c.H, c.p, c.n, c.R, c.G, c.S, c.Q, STATE_ROWS
    pairs = rows // 2  # rotated pairs per block: its rows are both elements of each
    half_split = R > 1
    batch, L, NC, LP, SB, SNC = T.dynamic("batch, L, NC, LP, SB, SNC")
    NS = states_dim(c, batch)
    final_key = final_key_macro(c)

    def state_row(block, i):
        """The state row of the block's row i: (s, n/2 + s) pairs half-split, (2s, 2s + 1) adjacent."""
        if half_split:
            return T.if_then_else(i < pairs, block * pairs + i, n // 2 + block * pairs + i - pairs)
        return block * rows + i

    def pair_slot(i):
        """(the block's pair of row i, its partner row, whether row i is the pair's first element)."""
        if half_split:
            return i % pairs, (i + pairs) % rows, i < pairs
        return i // 2, i + 1 - 2 * (i % 2), i % 2 == 0

    @T.macro
    def load_initial(H_IN, THETA_0, h, block, st, state, theta):
        """state, theta = the block's rows of h̃_0 and its pairs' θ_0 (float64; 0 past S) of initial state st."""
        for i, pp in T.Parallel(rows, p):
            state[i, pp] = H_IN[st, h, state_row(block, i), pp]
        for k in T.unroll(pairs):
            theta[k] = T.if_then_else(
                block * pairs + k < S, T.cast(THETA_0[st, h, T.min(block * pairs + k, S - 1)], F64), 0.0
            )

    @T.macro
    def write_final(Bk, B_BIAS, H_OUT, THETA_OUT, K_OUT, b, h, block, thread, st, token, state, theta):
        """Final state st from the block's rows of h (state) and its pairs' θ: h in the state's (p, n) layout,
        θ_final, and the final key (`final_key_macro`)."""
        for i, pp in T.Parallel(rows, p):
            H_OUT[st, h, pp, state_row(block, i)] = state[i, pp]
        for k in T.unroll(pairs):
            pair = block * pairs + k
            if thread == k:
                if pair < S:
                    THETA_OUT[st, h, pair] = T.cast(turns(theta[k]), F32)
                final_key(Bk, B_BIAS, K_OUT, b, h, st, token, pair, theta[k])

    @T.prim_func
    def state_pass(
        ST: T.Tensor((batch, NC, H, n, p), F32),
        MULT: T.Tensor((batch, NC, H), F32),
        H_IN: T.Tensor((NS, H, n, p), F32),
        SEG: T.Tensor((batch, LP), "int32"),
        SPAN: T.Tensor((SB, SNC, 2), "int32"),
        TOTALS: T.Tensor((batch, NC, H, S), F32),
        THETA_0: T.Tensor((NS, H, S), F32),
        Bk: T.Tensor((batch, L, R, G, n), BF16),
        B_BIAS: T.Tensor((H, R, n), F32),
        HS: T.Tensor((batch, NC, H, n, p), BF16),
        H_OUT: T.Tensor((NS, H, p, n), F32),
        THS: T.Tensor((batch, NC, H, S), F32),
        THETA_OUT: T.Tensor((NS, H, S), F32),
        K_OUT: T.Tensor((NS, R, H, n), F32),
    ):
        with T.Kernel(n // rows, H, batch, threads=SCAN_THREADS) as (block, h, b):
            state = T.alloc_fragment((rows, p), F32)
            chunk_s = T.alloc_shared((rows, p), F32)
            totals = T.alloc_local((2, pairs), F32)  # this chunk's and the next one's angle totals (loaded a chunk ahead)
            last = T.alloc_local((2,), "int32")  # this chunk's and the next one's last document
            mults = T.alloc_local((2,), F32)  # this chunk's and the next one's mult
            theta = T.alloc_local((pairs,), F64)  # θ after the chunks so far, per pair of the block (every thread)
            cos_sin_s = T.alloc_shared((2, pairs), F32)  # cos, sin of θ carried into the chunk (shared: read at a per-thread pair)
            document = T.alloc_local((1,), "int32")  # the document θ belongs to
            carried = T.alloc_local((1,), "int32")  # the chunk's last document is that one
            thread = T.get_thread_binding(0)
            # the row's initial h̃_0 and θ_0 (packed, each document's at its first chunk, in the loop: a load there
            # costs the unpacked rows their pipelining, 0.69 -> 0.86 ms at MIMO R4 b8 l2048 H32)
            if c.packed:  # cleared only so that no read precedes a write
                for i, pp in T.Parallel(rows, p):
                    state[i, pp] = 0.0
                for k in T.unroll(pairs):
                    theta[k] = 0.0
            else:
                load_initial(H_IN, THETA_0, h, block, b, state, theta)
            document[0] = 0
            last[1] = SEG[b, Q - 1]
            mults[1] = MULT[b, 0, h]
            for k in T.unroll(pairs):
                totals[1, k] = TOTALS[b, 0, h, T.min(block * pairs + k, S - 1)]
            for chunk in T.Pipelined(NC, num_stages=2):  # the next chunk's loads overlap this one's work
                for i, pp in T.Parallel(rows, p):
                    chunk_s[i, pp] = ST[b, chunk, h, state_row(block, i), pp]
                last[0] = last[1]
                mults[0] = mults[1]
                for k in T.unroll(pairs):
                    totals[0, k] = totals[1, k]
                if chunk + 1 < NC:
                    last[1] = SEG[b, chunk * Q + 2 * Q - 1]
                    mults[1] = MULT[b, chunk + 1, h]
                    for k in T.unroll(pairs):
                        totals[1, k] = TOTALS[b, chunk + 1, h, T.min(block * pairs + k, S - 1)]
                if c.packed:
                    if starts_state(c, SEG, b, chunk):  # a document's first chunk, after the one before
                        if chunk > 0:  # the final state of the document before (the last one's after the loop)
                            write_final(
                                Bk, B_BIAS, H_OUT, THETA_OUT, K_OUT, b, h, block, thread, SEG[b, chunk * Q - 1],
                                SPAN[b, chunk - 1, 1], state, theta,
                            )
                        st = SEG[b, chunk * Q]
                        load_initial(H_IN, THETA_0, h, block, st, state, theta)
                        document[0] = st
                carried[0] = T.if_then_else(last[0] == document[0], 1, 0)
                for k in T.unroll(pairs):  # θ carried into the chunk, then past it (chunk_angles' scan)
                    s = T.min(block * pairs + k, S - 1)
                    if thread == k:
                        angle = T.cast(centred(theta[k]), F32)
                        cos_sin_s[0, k] = T.cos(angle)
                        cos_sin_s[1, k] = T.sin(angle)
                        if block * pairs + k < S:
                            THS[b, chunk, h, s] = T.cast(turns(theta[k]), F32)
                    theta[k] = T.if_then_else(carried[0] != 0, theta[k], 0.0) + math.pi * T.cast(totals[0, k], F64)
                document[0] = last[0]
                for i, pp in T.Parallel(rows, p):
                    # S_c of a chunk whose last document was carried in is in the frame of θ carried in: turn it
                    k, partner, first = pair_slot(i)
                    turned = T.if_then_else(
                        first,
                        cos_sin_s[0, k] * chunk_s[i, pp] - cos_sin_s[1, k] * chunk_s[partner, pp],
                        cos_sin_s[0, k] * chunk_s[i, pp] + cos_sin_s[1, k] * chunk_s[partner, pp],
                    )
                    rotate = (carried[0] != 0) & (block * pairs + k < S)
                    HS[b, chunk, h, state_row(block, i), pp] = T.cast(state[i, pp], BF16)
                    state[i, pp] = T.if_then_else(mults[0] != 0.0, state[i, pp] * mults[0], 0.0) + T.if_then_else(
                        rotate, turned, chunk_s[i, pp]
                    )
            write_final(  # the row's (packed: the last document's) final state
                Bk, B_BIAS, H_OUT, THETA_OUT, K_OUT, b, h, block, thread, state_index(c, SEG, b, (NC - 1) * Q),
                span_last(c, SPAN, b, NC - 1, L), state, theta,
            )

    return state_pass


def _chunk_output(c: KernelConfig):
    H, p, n, R, G, S, Q = c.H, c.p, c.n, c.R, c.G, c.S, c.Q
    QR = Q * R
    batch, L, LP, NC, SB, SNC = T.dynamic("batch, L, LP, NC, SB, SNC")
    chunk_y, _ = chunk_y_macro(c)
    gate_weights, gate_out = gate_macro(c)

    @T.prim_func
    def chunk_output(
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
        OUT: T.Tensor((batch, L, H, p), BF16),
    ):
        with T.Kernel(NC, H, batch, threads=CHUNK_THREADS) as (chunk, h, b):
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
            gate_s = T.alloc_shared((R, p), F32)
            out_w_s = T.alloc_shared((R, p), F32)
            norm_s = T.alloc_shared((p,), F32)
            y_s = T.alloc_shared((QR, p), F32)
            T.annotate_layout({y_s: bank_swizzled(y_s)})
            scores = T.alloc_fragment((QR, QR), F32)
            y = T.alloc_fragment((QR, p), F32)
            y_in = T.alloc_fragment((QR, p), F32)
            T.annotate_min_blocks_per_sm(gate_blocks_per_sm(c))

            chunk_y(
                X, Bk, Cq, ANG, DT, SEG, CS, WD, WO, THS, HS, B_BIAS, C_BIAS, D, MIMO_X, first, last, b, h, chunk,
                seg_s, cs_s, wd_s, wo_s, one_s, inter_s, turn_s, cos_s, sin_s, theta_f, raw_s, bias_s,
                q_s, k_s, x_s, mx_s, v_s, hs_s, mix_s, scores, y, y_in, y_s,
            )
            gate_weights(MIMO_Z, MIMO_O, NORM, h, gate_s, out_w_s, norm_s)
            gate_out(Z, OUT, first, last, b, h, gate_s, out_w_s, norm_s, y_s)

    return chunk_output


def gate_macro(c: KernelConfig):
    """Macros: `gate_weights`, head h's mimo_z, mimo_o and norm weight into gate_s, out_w_s (R, p) and norm_s (p,);
    `gate_out`, a chunk's output from its per-rank y_s (QR, p) fp32 (normed in place where `c.norm`) and those:
    OUT[first + i] = Σ_r mimo_o_r · y_(i, r) · silu(z_i · mimo_z_r) for the rows up to `last`, z read from Z, or
    from z_s (Q, p) bf16 where given."""
    Q, R, p = c.Q, c.R, c.p
    QR = Q * R

    @T.macro
    def gate_weights(MIMO_Z, MIMO_O, NORM, h, gate_s, out_w_s, norm_s):
        for r, pp in T.Parallel(R, p):
            gate_s[r, pp] = MIMO_Z[h, r, pp]
            out_w_s[r, pp] = MIMO_O[h, r, pp]
        for pp in T.Parallel(p):
            norm_s[pp] = NORM[h, pp]

    @T.macro
    def gate_out(Z, OUT, first, last, b, h, gate_s, out_w_s, norm_s, y_s, z_s=None):
        if c.norm:
            squares = T.alloc_fragment((QR, p), F32)
            inv_rms = T.alloc_fragment((QR,), F32)
            T.copy(y_s, squares)
            for row, pp in T.Parallel(QR, p):
                squares[row, pp] = squares[row, pp] * squares[row, pp]
            T.reduce_sum(squares, inv_rms, dim=1)
            for row in T.Parallel(QR):
                inv_rms[row] = T.rsqrt(inv_rms[row] / p + NORM_EPS)
            for row, pp in T.Parallel(QR, p):
                y_s[row, pp] = y_s[row, pp] * inv_rms[row] * norm_s[pp]
        for i, pp in T.Parallel(Q, p):
            if first + i <= last:
                zz = T.cast(Z[b, first + i, h, pp] if z_s is None else z_s[i, pp], F32)
                gated = [zz * gate_s[r, pp] for r in range(R)]
                total = sum(out_w_s[r, pp] * y_s[i * R + r, pp] * gated[r] * T.sigmoid(gated[r]) for r in range(R))
                OUT[b, first + i, h, pp] = T.cast(total, BF16)

    return gate_weights, gate_out


def walk_stages_queries(c: KernelConfig) -> bool:
    """Whether `chunk_walk` fetches a chunk's raw query rows (C) during the chunk before, into a staging tile of
    their own (QR·n bf16), and not into q_s after the chunk before's gate: where the walk then still fits two
    blocks per SM, as lowered at p = 64 (`tests/unit/test_tilelang_smem.py`): R = 4 with half the state
    rotated (rope_fraction 0.5; 110 KB at n = 128). Staged, R = 4 with all of it rotated would take 117 KB,
    R = 2 at n = 128 also 117 KB and SISO 123 KB, over the 113 KB two blocks may each have."""
    return c.R == 4 and 2 * c.S < c.n


def query_stage(staged: bool, q_s):
    """`chunk_walk`'s tile for the next chunk's raw query rows: one of its own where `staged`, else q_s."""
    return T.alloc_shared(q_s.shape, q_s.dtype) if staged else q_s


def _chunk_walk(c: KernelConfig):
    H, p, n, R, G, S, Q = c.H, c.p, c.n, c.R, c.G, c.S, c.Q
    QR = Q * R
    batch, L, LP, NC, SB, SNC, HB = T.dynamic("batch, L, LP, NC, SB, SNC, HB")
    NS = states_dim(c, batch)
    _, rotation, keys, _, _ = chunk_prologue(c)
    _, chunk_mix = chunk_y_macro(c)
    gate_weights, gate_out = gate_macro(c)
    final_key = final_key_macro(c)
    stages_queries = walk_stages_queries(c)

    @T.macro
    def start_from(H_IN, THETA_0, h, st, state, theta_s):
        """state (n, p) = h̃_0 and theta_s (S,) float64 = θ_0 of initial state st."""
        for i, pp in T.Parallel(n, p):
            state[i, pp] = H_IN[st, h, i, pp]
        for s in T.Parallel(S):
            theta_s[s] = T.cast(THETA_0[st, h, s], F64)

    @T.macro
    def end_at(Bk, B_BIAS, H_OUT, THETA_OUT, K_OUT, b, h, st, token, state, theta_s):
        """Final state st: h (state) in the state's (p, n) layout, θ_final and the final key (`final_key_macro`)."""
        for i, pp in T.Parallel(n, p):
            H_OUT[st, h, pp, i] = state[i, pp]
        for s in T.Parallel(S):
            THETA_OUT[st, h, s] = T.cast(turns(theta_s[s]), F32)
        for pair in T.Parallel(n // 2):
            theta = T.if_then_else(pair < S, theta_s[T.min(pair, S - 1)], 0.0)
            final_key(Bk, B_BIAS, K_OUT, b, h, st, token, pair, theta)

    @T.macro
    def fetch_terms(SEG, CS, WD, WO, MULT, TOTALS, ANG, DT, L, b, h, chunk, first, last, thread, staged, dt_r):
        """Start fetching chunk `chunk`'s per-token terms, mult, angle totals, the document before it and its
        angles into `staged` (seg, cs, wd, wo, mult, totals, before, angles), and load the Δ of its token `thread`
        (thread < Q; 0 past `last`) into dt_r."""
        seg_n, cs_n, wd_n, wo_n, mult_n, totals_n, before_n, angles_n = staged
        t0 = chunk * Q
        for k in T.Parallel(Q // 4):
            cp_async(seg_n[4 * k], SEG[b, t0 + 4 * k])
            cp_async(cs_n[4 * k], CS[b, h, t0 + 4 * k])
            cp_async(wd_n[4 * k], WD[b, h, t0 + 4 * k])
            cp_async(wo_n[4 * k], WO[b, h, t0 + 4 * k])
        for k in T.Parallel(S // 4):
            cp_async(totals_n[4 * k], TOTALS[b, chunk, h, 4 * k])
        for i, k in T.Parallel(Q, S // 8):
            cp_async(angles_n[i, 8 * k], ANG[b, T.min(first + i, L - 1), 8 * k], first + i <= last)
        if thread == 0:
            cp_async(mult_n[0], MULT[b, chunk, h], True, 4)
            cp_async(before_n[0], SEG[b, segment_before_at(c, t0)], True, 4)
        if thread < Q:
            dt_r[0] = T.if_then_else(first + thread <= last, T.cast(DT[b, T.min(first + thread, L - 1), h], F32), 0.0)

    @T.macro
    def fetch_keys(SRC, L, b, h, first, last, dst):
        """Start fetching the chunk's raw key rows (i, r) of SRC (b, l, R, G, n) into dst (QR, n), 0 past `last`."""
        for row, k in T.Parallel(QR, n // 8):
            token = first + row // R
            cp_async(dst[row, 8 * k], SRC[b, T.min(token, L - 1), row % R, h // (H // G), 8 * k], token <= last)

    @T.macro
    def fetch_rows(SRC, L, b, h, first, last, dst):
        """Start fetching the chunk's rows of SRC (b, l, H, p) into dst (Q, p), 0 past `last`."""
        for i, k in T.Parallel(Q, p // 8):
            cp_async(dst[i, 8 * k], SRC[b, T.min(first + i, L - 1), h, 8 * k], first + i <= last)

    @T.prim_func
    def chunk_walk(
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
        MULT: T.Tensor((batch, NC, H), F32),
        TOTALS: T.Tensor((batch, NC, H, S), F32),
        H_IN: T.Tensor((NS, H, n, p), F32),
        THETA_0: T.Tensor((NS, H, S), F32),
        B_BIAS: T.Tensor((H, R, n), F32),
        C_BIAS: T.Tensor((H, R, n), F32),
        D: T.Tensor((H,), F32),
        MIMO_X: T.Tensor((H, R, p), F32),
        MIMO_Z: T.Tensor((H, R, p), F32),
        MIMO_O: T.Tensor((H, R, p), F32),
        NORM: T.Tensor((H, p), F32),
        OUT: T.Tensor((batch, L, H, p), BF16),
        HS: T.Tensor((HB, NC, H, n, p), BF16),  # HB = batch where a backward reads h̃_c, else 0: not written
        THS: T.Tensor((batch, NC, H, S), F32),
        H_OUT: T.Tensor((NS, H, p, n), F32),
        THETA_OUT: T.Tensor((NS, H, S), F32),
        K_OUT: T.Tensor((NS, R, H, n), F32),
    ):
        with T.Kernel(H, batch, threads=CHUNK_THREADS) as (h, b):
            seg_s = T.alloc_shared((Q,), "int32")
            cs_s = T.alloc_shared((Q,), F32)
            wd_s = T.alloc_shared((Q,), F32)
            wo_s = T.alloc_shared((Q,), F32)
            one_s = T.alloc_shared((Q,), F32)
            inter_s = T.alloc_shared((Q,), F32)
            w_s = T.alloc_shared((Q,), F32)
            dt_s = T.alloc_shared((Q,), F32)
            mult_s = T.alloc_shared((1,), F32)
            turn_s = T.alloc_shared((Q, S), F32)
            cos_s = T.alloc_shared((Q, S), F32)
            sin_s = T.alloc_shared((Q, S), F32)
            theta_f = T.alloc_fragment((S,), F32)
            theta_s = T.alloc_shared((S,), F64)  # θ after the chunks so far
            ths_s = T.alloc_shared((S,), F32)  # θ carried into the chunk, reduced (THS)
            bias_s = T.alloc_shared((R, n), F32)
            k_bias_s = T.alloc_shared((R, n), F32)
            q_s = T.alloc_shared((QR, n), BF16)
            k_s = T.alloc_shared((QR, n), BF16)  # (the raw keys arrive here and are rotated in place)
            x_s = T.alloc_shared((Q, p), BF16)
            mx_s = T.alloc_shared((R, p), F32)
            v_s = T.alloc_shared((QR, p), BF16)
            hs_s = T.alloc_shared((n, p), BF16)
            # The next chunk's inputs, fetched while the chunk before runs (cp.async): its per-token terms, mult,
            # angle totals, document before it and angles (`fetch_terms`), and where `walk_stages_queries` its raw
            # query rows; its raw keys and x arrive in k_s and x_s once this chunk is done with them.
            staged = (
                T.alloc_shared((Q,), "int32"), T.alloc_shared((Q,), F32), T.alloc_shared((Q,), F32),
                T.alloc_shared((Q,), F32), T.alloc_shared((1,), F32), T.alloc_shared((S,), F32),
                T.alloc_shared((1,), "int32"), T.alloc_shared((Q, S), BF16),
            )
            seg_n, cs_n, wd_n, wo_n, mult_n, totals_n, before_n, angles_n = staged
            raw_q = query_stage(stages_queries, q_s)
            dt_r = T.alloc_local((1,), F32)  # the next chunk's Δ of token `thread`
            before = T.alloc_local((1,), "int32")  # the document carried into the chunk
            skip = T.alloc_local((1,), F32)  # D of the head
            # Every buffer used in the loop over chunks stays live through all of it (TileLang's shared-memory
            # planner), so the phases' buffers share memory by hand where sizes allow: y with the queries, the
            # masked scores (and the poison mask after them) with cos θ, z (fetched once the keys are rotated)
            # with sin θ.
            mix_s = shared_alias(cos_s, (QR, QR), BF16)
            z_s = shared_alias(sin_s, (Q, p), BF16)
            gate_s = T.alloc_shared((R, p), F32)
            out_w_s = T.alloc_shared((R, p), F32)
            norm_s = T.alloc_shared((p,), F32)
            y_s = shared_alias(q_s, (QR, p), F32)
            T.annotate_layout({y_s: bank_swizzled(y_s)})
            scores = T.alloc_fragment((QR, QR), F32)
            y = T.alloc_fragment((QR, p), F32)
            y_in = T.alloc_fragment((QR, p), F32)
            state = T.alloc_fragment((n, p), F32)  # h̃ carried from chunk to chunk
            document = T.alloc_local((1,), "int32")  # the document θ and the state belong to
            thread = T.get_thread_binding(0)
            T.annotate_min_blocks_per_sm(walk_blocks_per_sm(c))

            if c.packed:  # cleared only so that no read precedes a write: each document starts in the loop
                for i, pp in T.Parallel(n, p):
                    state[i, pp] = 0.0
                for s in T.Parallel(S):
                    theta_s[s] = 0.0
            else:
                start_from(H_IN, THETA_0, h, b, state, theta_s)
            document[0] = 0
            # the head's weights, once
            head_rows(C_BIAS, h, bias_s)
            head_rows(B_BIAS, h, k_bias_s)
            head_rows(MIMO_X, h, mx_s)
            skip[0] = D[h]
            gate_weights(MIMO_Z, MIMO_O, NORM, h, gate_s, out_w_s, norm_s)
            # the first chunk's inputs
            first_0 = span_first(c, SPAN, b, 0)
            last_0 = span_last(c, SPAN, b, 0, L)
            fetch_terms(SEG, CS, WD, WO, MULT, TOTALS, ANG, DT, L, b, h, 0, first_0, last_0, thread, staged, dt_r)
            fetch_keys(Cq, L, b, h, first_0, last_0, raw_q)
            fetch_keys(Bk, L, b, h, first_0, last_0, k_s)
            fetch_rows(X, L, b, h, first_0, last_0, x_s)
            T.ptx_commit_group()
            for chunk in T.serial(NC):
                t0 = chunk * Q
                first = span_first(c, SPAN, b, chunk)
                last = span_last(c, SPAN, b, chunk, L)
                following = T.min(chunk + 1, NC - 1)  # the chunk whose inputs this one fetches (none after the last)
                first_f = span_first(c, SPAN, b, following)
                last_f = span_last(c, SPAN, b, following, L)
                if c.packed:
                    if starts_state(c, SEG, b, chunk):  # a document's first chunk: the one before ends there
                        if chunk > 0:
                            end_at(
                                Bk, B_BIAS, H_OUT, THETA_OUT, K_OUT, b, h, SEG[b, t0 - 1], SPAN[b, chunk - 1, 1],
                                state, theta_s,
                            )
                        start_from(H_IN, THETA_0, h, SEG[b, t0], state, theta_s)
                        document[0] = SEG[b, t0]
                T.ptx_wait_group(0)  # the chunk's inputs are in
                T.sync_threads()
                for i in T.Parallel(Q):
                    seg_s[i] = seg_n[i]
                    cs_s[i] = cs_n[i]
                    wd_s[i] = wd_n[i]
                    wo_s[i] = wo_n[i]
                if thread < Q:
                    dt_s[thread] = dt_r[0]
                mult_s[0] = mult_n[0]
                before[0] = before_n[0]
                # θ carried into the chunk, then past it (state_pass's scan)
                for s in T.Parallel(S):
                    ths_s[s] = T.cast(turns(theta_s[s]), F32)
                    THS[b, chunk, h, s] = ths_s[s]
                    carried = seg_n[Q - 1] == document[0]
                    total = math.pi * T.cast(totals_n[s], F64)
                    theta_s[s] = T.if_then_else(carried, theta_s[s], 0.0) + total
                carry_weights(seg_s, cs_s, before[0], one_s, inter_s)
                for i in T.Parallel(Q):  # the state step's weights, early: a phase of their own would cost a barrier
                    w_s[i] = state_weight(seg_s, cs_s, wo_s, i)
                for i, s in T.Parallel(Q, S):
                    turn_s[i, s] = math.pi * T.tanh(T.cast(angles_n[i, s], F32)) * dt_s[i]
                rotation(None, None, None, first, last, b, h, chunk, seg_s, before[0], turn_s, theta_f, cos_s, sin_s, ths_s)
                keys(Cq, C_BIAS, first, last, b, h, raw_q, bias_s, cos_s, sin_s, one_s, q_s, load=False)
                keys(Bk, B_BIAS, first, last, b, h, k_s, k_bias_s, cos_s, sin_s, one_s, k_s, load=False)
                # staged inputs and sin θ spent: this chunk's z (for the gate), the next chunk's terms (and queries)
                T.sync_threads()
                fetch_rows(Z, L, b, h, first, last, z_s)
                T.ptx_commit_group()
                if chunk + 1 < NC:
                    fetch_terms(
                        SEG, CS, WD, WO, MULT, TOTALS, ANG, DT, L, b, h, following, first_f, last_f, thread, staged, dt_r
                    )
                    if stages_queries:
                        fetch_keys(Cq, L, b, h, first_f, last_f, raw_q)
                T.ptx_commit_group()
                chunk_mix(
                    HS, skip, 0, b, h, chunk, seg_s, cs_s, wd_s, wo_s, inter_s, q_s, k_s, x_s, mx_s, v_s, hs_s, mix_s,
                    scores, y, y_in, y_s, state, mix_s,
                )

                # h̃_{c+1} = mult_c h̃_c + Σ_j w_j k_j v_jᵀ over the chunk's last document (keys at their θ, as
                # chunk_mix left them; the weighted values, exactly 0 outside that document, in v_s, spent by then)
                for row, pp in T.Parallel(QR, p):
                    weight = w_s[row // R]
                    weighted = T.cast(x_s[row // R, pp], F32) * mx_s[row % R, pp] * weight
                    v_s[row, pp] = T.if_then_else(weight != 0.0, T.cast(weighted, BF16), T.cast(0, BF16))
                for i, pp in T.Parallel(n, p):
                    state[i, pp] = T.if_then_else(mult_s[0] != 0.0, state[i, pp] * mult_s[0], 0.0)
                T.gemm(k_s, v_s, state, transpose_A=True)
                # keys and x spent: the next chunk's, while the gate runs
                T.sync_threads()
                if chunk + 1 < NC:
                    fetch_keys(Bk, L, b, h, first_f, last_f, k_s)
                    fetch_rows(X, L, b, h, first_f, last_f, x_s)
                T.ptx_commit_group()
                T.ptx_wait_group(2)  # this chunk's z (committed before the next chunk's terms, and its keys and x)
                T.sync_threads()
                gate_out(Z, OUT, first, last, b, h, gate_s, out_w_s, norm_s, y_s, z_s)
                if not stages_queries:  # y spent: the next chunk's queries into its memory
                    T.sync_threads()
                    if chunk + 1 < NC:
                        fetch_keys(Cq, L, b, h, first_f, last_f, raw_q)
                    T.ptx_commit_group()
                document[0] = seg_s[Q - 1]
            end_at(  # the row's (packed: the last document's) final state
                Bk, B_BIAS, H_OUT, THETA_OUT, K_OUT, b, h, state_index(c, SEG, b, (NC - 1) * Q),
                span_last(c, SPAN, b, NC - 1, L), state, theta_s,
            )

    return chunk_walk


MAKERS = (_chunk_prep, _chunk_state, _state_pass, _chunk_output, _chunk_walk)
