"""The contract between the layer and every scan backend: inputs, per-head weights and state.

Shapes: b batch, l length, H heads, p head dim, R MIMO rank (1 = SISO), G groups of B/C,
n state size, S rotated pairs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from megatron_mamba3.config import MAX_CHUNK_SIZE


class Mamba3Inputs(NamedTuple):
    """Per-token inputs of the scan; drop the `l` dimension for a single decode step.

    x, z:   (b, l, H, p)    values and gate
    B, C:   (b, l, R, G, n) RMSNormed keys and queries, shared by the H/G heads of a group
    dt:     (b, l, H)       Δ > 0 (after softplus)
    A:      (b, l, H)       A < 0 (after the floor)
    trap:   (b, l, H)       trapezoid logit; λ = sigmoid(trap)
    angles: (b, l, S)       rotary logits shared by all heads; θ grows by π·tanh(angles)·Δ
    """

    x: Tensor
    z: Tensor
    B: Tensor
    C: Tensor
    dt: Tensor
    A: Tensor
    trap: Tensor
    angles: Tensor

    def tokens(self, index: int | slice) -> "Mamba3Inputs":
        """The inputs at `index` along the length dimension (an int drops that dimension)."""
        return Mamba3Inputs(*(t[:, index] for t in self))

    def to(self, dtype: torch.dtype) -> "Mamba3Inputs":
        return Mamba3Inputs(*(t.to(dtype) for t in self))


class Mamba3Weights(NamedTuple):
    """Per-head parameters the scan consumes. The mimo_* are given exactly when R > 1.

    B_bias, C_bias: (H, R, n)   added to the normalized B / C before rotation
    D:              (H,)        skip weight, y += D·v
    mimo_x/z/o:     (H, R, p)   MIMO up-projections of x and z, and down-projection of y
    norm:           (H·p,)      optional per-head RMSNorm weight applied to y before the gate
    """

    B_bias: Tensor
    C_bias: Tensor
    D: Tensor
    mimo_x: Tensor | None = None
    mimo_z: Tensor | None = None
    mimo_o: Tensor | None = None
    norm: Tensor | None = None

    def to(self, dtype: torch.dtype) -> "Mamba3Weights":
        return Mamba3Weights(*(None if t is None else t.to(dtype) for t in self))


class Mamba3Prep(NamedTuple):
    """The per-token prep from raw in_proj pieces to the scan's inputs (`toolkit.prep.apply_prep`):
    Δ = softplus(dt + dt_bias), A = `decay_rate`(A, A_floor), B and C RMSNormed (eps 1e-5) and scaled by
    B_norm / C_norm. Given to `mamba3_scan`, it marks its inputs' dt, A, B and C as raw (same shapes);
    a backend that fuses the prep into its kernels runs it there, the others get the inputs prepped.

    dt_bias:        (H,)
    B_norm, C_norm: (n,)
    A_floor:        float > 0
    """

    dt_bias: Tensor
    B_norm: Tensor
    C_norm: Tensor
    A_floor: float


class Mamba3State(NamedTuple):
    """Recurrent state per sequence (docs/packing_and_state.md, State), fp32 (fp64 in fp64 runs).

    h:      (b, H, p, n)  SSM state
    k_prev: (b, R, H, n)  previous token's key, biased and rotated
    v_prev: (b, H, p)     previous token's raw x
    theta:  (b, H, S)     accumulated rotary angle, reduced modulo 2π
    """

    h: Tensor
    k_prev: Tensor
    v_prev: Tensor
    theta: Tensor

    @staticmethod
    def zeros(batch: int, dims: "ScanDims", dtype: torch.dtype, device: torch.device) -> "Mamba3State":
        H, p, R, n, S = dims.H, dims.p, dims.R, dims.n, dims.S
        new = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        return Mamba3State(new(batch, H, p, n), new(batch, R, H, n), new(batch, H, p), new(batch, H, S))

    @staticmethod
    def given_or_zeros(state: "Mamba3State | None", count: int, dims: "ScanDims", x: Tensor) -> "Mamba3State":
        """`state`, or where it is None zeros for `count` rows or documents in the compute dtype of the inputs'
        x, on its device."""
        return Mamba3State.zeros(count, dims, compute_dtype(x.dtype), x.device) if state is None else state

    def rows(self, index: int | slice) -> "Mamba3State":
        """The state of the sequences at `index` (an int keeps a batch dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Mamba3State(*(t[index] for t in self))

    def to(self, dtype: torch.dtype) -> "Mamba3State":
        return Mamba3State(*(t.to(dtype) for t in self))


class ScanDims(NamedTuple):
    b: int
    l: int  # noqa: E741
    H: int
    p: int
    R: int
    G: int
    n: int
    S: int


TWO_PI = 2 * math.pi


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scan computes and keeps state in: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def check_chunk_size(chunk_size: object) -> None:
    """`ValueError` unless `chunk_size` is an int in [1, MAX_CHUNK_SIZE] (any such value leaves the
    math unchanged; a chunk costs memory quadratic in its size)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size={chunk_size!r} must be an int in [1, {MAX_CHUNK_SIZE}]")


def check_floating(name: str, tensor: Tensor) -> None:
    """`TypeError` naming `name` unless `tensor` is floating point (an int or bool input would
    truncate the output to its dtype)."""
    if not tensor.is_floating_point():
        raise TypeError(f"{name} has dtype {tensor.dtype}; Mamba-3 takes floating-point tensors")


def _check_shape(name: str, tensor: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")


def read_dims(inputs: Mamba3Inputs, *, per_token: bool = False) -> ScanDims:
    """The sizes of `inputs`, unchecked: backends read them off inputs that `scan_dims` has checked."""
    H, p = inputs.x.shape[-2:]
    R, G, n = inputs.B.shape[-3:]
    return ScanDims(inputs.x.shape[0], 1 if per_token else inputs.x.shape[1], H, p, R, G, n, inputs.angles.shape[-1])


def scan_dims(inputs: Mamba3Inputs, weights: Mamba3Weights, *, per_token: bool = False) -> ScanDims:
    """Read the sizes off `inputs` and check every tensor against them; `ValueError` names the bad one.

    `per_token=True` checks single-token (decode) inputs, which have no `l` dimension.
    """
    for name, tensor in (*zip(Mamba3Inputs._fields, inputs), *zip(Mamba3Weights._fields, weights)):
        if tensor is not None:
            check_floating(name, tensor)
    lead = inputs.x.shape[:1] if per_token else inputs.x.shape[:2]
    if inputs.x.dim() != len(lead) + 2:
        raise ValueError(f"x has shape {tuple(inputs.x.shape)}, expected (b, {'' if per_token else 'l, '}H, p)")
    if inputs.B.dim() != len(lead) + 3:
        raise ValueError(f"B has shape {tuple(inputs.B.shape)}, expected (b, {'' if per_token else 'l, '}R, G, n)")
    dims = read_dims(inputs, per_token=per_token)
    H, p, R, G, n, S = dims.H, dims.p, dims.R, dims.G, dims.n, dims.S
    lead = tuple(lead)
    for name, expected in (
        ("z", lead + (H, p)),
        ("C", lead + (R, G, n)),
        ("dt", lead + (H,)),
        ("A", lead + (H,)),
        ("trap", lead + (H,)),
        ("angles", lead + (S,)),
    ):
        _check_shape(name, getattr(inputs, name), expected)
    if H % G:
        raise ValueError(f"B/C have G={G} groups, which must divide the H={H} heads of x")
    if n % 2 or not 1 <= S <= n // 2:
        raise ValueError(f"angles carry S={S} angles; need 1 <= S <= n/2 with even n, n={n}")
    _check_shape("B_bias", weights.B_bias, (H, R, n))
    _check_shape("C_bias", weights.C_bias, (H, R, n))
    _check_shape("D", weights.D, (H,))
    for name in ("mimo_x", "mimo_z", "mimo_o"):
        tensor = getattr(weights, name)
        if (tensor is None) != (R == 1):
            state = "missing" if tensor is None else "given"
            raise ValueError(f"{name} must be given exactly when R > 1 (MIMO); R={R} and {name} is {state}")
        if tensor is not None:
            _check_shape(name, tensor, (H, R, p))
    if weights.norm is not None:
        _check_shape("norm", weights.norm, (H * p,))
    return dims


def check_prep(prep: Mamba3Prep, dims: ScanDims) -> None:
    """Check a `Mamba3Prep` against the scan sizes; `TypeError` unless it is one with floating-point
    tensors, `ValueError` naming a bad shape or A_floor."""
    if not isinstance(prep, Mamba3Prep):
        raise TypeError(f"prep must be a Mamba3Prep(dt_bias, B_norm, C_norm, A_floor), got {type(prep).__name__}")
    for name, expected in (("dt_bias", (dims.H,)), ("B_norm", (dims.n,)), ("C_norm", (dims.n,))):
        check_floating(f"prep.{name}", getattr(prep, name))
        _check_shape(f"prep.{name}", getattr(prep, name), expected)
    if isinstance(prep.A_floor, bool) or not isinstance(prep.A_floor, (int, float)) or not prep.A_floor > 0:
        raise ValueError(f"prep.A_floor={prep.A_floor!r} must be a number > 0")


def check_state(state: Mamba3State, batch: int, dims: ScanDims, name: str = "initial_state") -> None:
    """Check a state against the scan sizes; `TypeError` unless it is a `Mamba3State` of
    floating-point tensors, `ValueError` naming the field of a bad shape."""
    if not isinstance(state, Mamba3State):
        raise TypeError(f"{name} must be a Mamba3State(h, k_prev, v_prev, theta), got {type(state).__name__}")
    for field, tensor in zip(Mamba3State._fields, state):
        check_floating(f"{name}.{field}", tensor)
    H, p, R, n, S = dims.H, dims.p, dims.R, dims.n, dims.S
    for field, expected in zip(Mamba3State._fields, ((batch, H, p, n), (batch, R, H, n), (batch, H, p), (batch, H, S))):
        _check_shape(f"{name}.{field}", getattr(state, field), expected)
