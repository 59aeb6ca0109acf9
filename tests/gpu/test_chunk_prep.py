"""The `chunk_prep` kernel's terms and the θ that `state_pass` scans from its angle totals (run on the GPU
machine; skipped elsewhere) against `chunk_terms`, the PyTorch form of the same definitions, on the same
bf16 inputs.

Both compute in fp32 (the PyTorch angle totals in float64); the kernel sums the decay sequentially
within each document piece, the PyTorch form as a difference of two running sums. Tolerances: cs, wd,
wo and mult within 1e-5 of the larger of 1 and the value (fp32 sums of at most 64 terms), θ within 1e-4
rad (fp32 angle totals of at most 64 increments against float64). Values that the definitions make
exactly 0 (wo's second term at a document start, mult of a chunk holding a start) are compared exactly.
"""


import pytest
import torch

from megatron_mamba3.ops.interface import Mamba3Prep
from megatron_mamba3.ops.segments import document_starts
from megatron_mamba3.ops.tilelang.chunk_math import chunk_terms
from megatron_mamba3.ops.tilelang.function import TILE_ROWS
from megatron_mamba3.ops.toolkit.prep import apply_prep
from tests.helpers import TILELANG_GPU, make_case, make_state

pytestmark = TILELANG_GPU

HEADS, N, P = 4, 128, 64
CONFIGS = [(1, 1, False), (4, 1, True)]  # (R, G, norm)
A_FLOOR = 0.5  # clamps A where f(u) = 1 / (1 − u) < 0.5 (u < −1)
# The kernel configs (H, p, n, R, G, S, Q, norm, A_floor) these tests use, compiled first (tests/conftest.py).
TILELANG_KERNELS = [
    (HEADS, P, N, R, G, N // 4, TILE_ROWS // R, norm, floor) for R, G, norm in CONFIGS for floor in (None, A_FLOOR)
]


def _close(found, expected, tol):
    return torch.allclose(found, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("R, G, norm", CONFIGS)
@pytest.mark.parametrize("length", [200, 64 * 3])
def test_chunk_prep_matches_chunk_terms(R, G, norm, length):
    from megatron_mamba3.ops.tilelang.function import _chunk_starts, _prepare

    inputs, weights = make_case(b=2, l=length, H=HEADS, p=P, R=R, G=G, n=N, norm=norm, seed=5)
    state = make_state(2, HEADS, P, R, N, N // 4, seed=6).to(torch.float32)
    inputs = type(inputs)(*(t.to("cuda", torch.bfloat16) for t in inputs))
    weights = type(weights)(*(None if t is None else t.to("cuda", torch.float32) for t in weights))
    state = type(state)(*(t.cuda() for t in state))
    segment_ids = torch.zeros(2, length, dtype=torch.int64, device="cuda")
    segment_ids[0, 37:] = 1  # crosses a chunk boundary
    segment_ids[0, 64:] = 2  # starts exactly at a chunk start (SISO)
    segment_ids[0, 150:] = 3
    segment_ids[1, length - 5 :] = 7  # in the last (partial) chunk
    starts = document_starts(segment_ids)

    launch = _prepare(inputs, weights, starts, None, state, None)
    _chunk_starts(launch)  # state_pass fills theta_start and theta_final
    Q = launch.config.Q
    expected = chunk_terms(inputs, weights, starts, state, Q)
    per_head = lambda t: t.transpose(1, 2)  # noqa: E731  (b, l_pad, H) -> (b, H, l_pad)

    assert torch.equal(launch.seg, expected.seg)
    for name in ("cs", "wd", "wo"):
        assert _close(getattr(launch, name), per_head(getattr(expected, name)), 1e-5), name
    assert _close(launch.mult, expected.mult, 1e-5)
    assert torch.equal(launch.mult == 0, expected.mult == 0)
    following = per_head(expected.wo - expected.wd)
    assert torch.equal(launch.wo - launch.wd == 0, following == 0)
    for found, reference in ((launch.theta_start, expected.theta_start), (launch.theta_final, expected.theta_final)):
        gap = torch.remainder(found.double() - reference.double() + torch.pi, 2 * torch.pi) - torch.pi
        assert gap.abs().max() <= 1e-4
    assert _close(launch.h_in, expected.h_in.transpose(-1, -2), 1e-6)


@pytest.mark.parametrize("R, G, norm", CONFIGS)
def test_chunk_prep_runs_the_prep(R, G, norm):
    """With a `Mamba3Prep`, chunk_prep's Δ, B and C are the PyTorch prep's (`apply_prep` in fp32) rounded to
    bf16 (within one bf16 rounding: a relative 2⁻⁸), and its cs and mult are `chunk_terms`' on its Δ and the
    fp32 decay rate (1e-5 as above)."""
    from megatron_mamba3.ops.tilelang.function import _prepare

    length = 200
    inputs, weights = make_case(b=2, l=length, H=HEADS, p=P, R=R, G=G, n=N, norm=norm, seed=5)
    state = make_state(2, HEADS, P, R, N, N // 4, seed=6).to(torch.float32)
    generator = torch.Generator().manual_seed(7)
    randn = lambda *shape: torch.randn(shape, generator=generator)  # noqa: E731
    raw = inputs._replace(
        dt=randn(2, length, HEADS) - 1.5, A=randn(2, length, HEADS), B=2 * randn(*inputs.B.shape), C=2 * randn(*inputs.C.shape)
    )
    raw = type(raw)(*(t.to("cuda", torch.bfloat16) for t in raw))
    weights = type(weights)(*(None if t is None else t.to("cuda", torch.float32) for t in weights))
    state = type(state)(*(t.cuda() for t in state))
    prep = Mamba3Prep(0.5 * randn(HEADS).cuda(), 1 + 0.2 * randn(N).cuda(), 1 + 0.2 * randn(N).cuda(), A_FLOOR)
    starts = torch.zeros(2, length, dtype=torch.bool, device="cuda")
    starts[0, 37] = True

    launch = _prepare(raw, weights, starts, None, state, prep)
    expected = apply_prep(raw.to(torch.float32), prep)
    for name in ("dt", "B", "C"):
        found, value = getattr(launch, name), getattr(expected, name)
        assert found.dtype == torch.bfloat16, name
        assert ((found.float() - value).abs() <= 2**-8 * value.abs()).all(), name
    terms = chunk_terms(expected._replace(dt=launch.dt.float()), weights, starts, state, launch.config.Q)
    assert _close(launch.cs, terms.cs.transpose(1, 2), 1e-5)
    assert _close(launch.mult, terms.mult, 1e-5)
