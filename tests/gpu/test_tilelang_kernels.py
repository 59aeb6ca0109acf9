"""TileLang kernels on a CUDA GPU (run on the GPU machine; skipped elsewhere): every kernel size
config against the reference, one compile for every length, and unsupported sizes.

Every output, final state and gradient of the kernels on bf16 inputs is compared with the fp32
reference (`mamba3_chunked` on the same bf16-valued inputs upcast to fp32). Tolerance: `bf16_bound`,
ERROR_MULTIPLE times the bf16 reference's own error, i.e. max |mamba3_chunked(bf16 inputs) − oracle|
/ max |oracle| with the oracle the float64 recurrence on the same values. Packing, isolation and
state splits on the kernels against the oracle are the conformance suite's (tests/conformance).
"""

import functools

import pytest
import torch

from megatron_mamba3.ops import Mamba3Inputs, Mamba3State, Mamba3Weights, mamba3_scan
from megatron_mamba3.ops.interface import Mamba3Prep
from megatron_mamba3.ops.oracle import mamba3_recurrent
from megatron_mamba3.ops.reference import mamba3_chunked
from megatron_mamba3.ops.tilelang.function import TILE_ROWS
from megatron_mamba3.ops.toolkit.prep import apply_prep
from megatron_mamba3.receipt_log import clear_receipts, receipts
from tests.helpers import ERROR_MULTIPLE, TILELANG_GPU, bf16_bound, make_case, make_state, rel_err

pytestmark = TILELANG_GPU

HEADS = 4
LENGTH = 200  # not a multiple of the kernels' chunks (64 SISO, 32 R=2, 16 R=4)
CONFIGS = [  # (n, p, R, G, norm)
    (128, 64, 1, 1, False),
    (64, 128, 1, 2, True),
    (128, 64, 2, 2, False),
    (128, 64, 4, 1, True),
    (64, 64, 4, 1, False),
]
IDS = [f"n{n}-p{p}-R{R}-G{G}{'-norm' if norm else ''}" for n, p, R, G, norm in CONFIGS]
PREP_CONFIGS = [CONFIGS[0], CONFIGS[1], CONFIGS[3]]
PREP_IDS = [IDS[0], IDS[1], IDS[3]]
A_FLOOR = 0.5  # large, so that the floor clamps some tokens' A (f(u) = 1 / (1 − u) < 0.5 below u = −1)
ALL_ROTATED = CONFIGS[0]  # run once with every pair rotated (rope_fraction 1.0: S = n / 2)
# The kernel configs (H, p, n, R, G, S, Q, norm, A_floor) these tests use, compiled first (tests/conftest.py).
TILELANG_KERNELS = [(HEADS, p, n, R, G, n // 4, TILE_ROWS // R, norm, None) for n, p, R, G, norm in CONFIGS] + [
    (HEADS, p, n, R, G, n // 4, TILE_ROWS // R, norm, A_FLOOR) for n, p, R, G, norm in PREP_CONFIGS
] + [(HEADS, p, n, R, G, n // 2, TILE_ROWS // R, norm, None) for n, p, R, G, norm in [ALL_ROTATED]]


def _cuda(case):
    return tuple(type(part)(*(None if t is None else t.cuda() for t in part)) for part in case)


def _case(n, p, R, G, norm, b=2, l=LENGTH, seed=0, wide_angles=False, pairs=None):  # noqa: E741
    """bf16 inputs, fp32 weights, fp32 initial state and segment ids on the GPU, with `pairs` rotated pairs
    (default n / 4). With `wide_angles`, Δ ≈ 2.2 and tanh(angles) ≥ 0.76, so θ grows by about 5 rad per token
    (hundreds of radians within a chunk), with A scaled down so that the decays still reach across the chunk."""
    pairs = n // 4 if pairs is None else pairs
    inputs, weights = make_case(b=b, l=l, H=HEADS, p=p, R=R, G=G, n=n, S=pairs, norm=norm, seed=seed)
    if wide_angles:
        inputs = inputs._replace(dt=inputs.dt + 2.0, A=0.01 * inputs.A, angles=inputs.angles.abs() + 1.0)
    state = make_state(b, HEADS, p, R, n, pairs, seed=seed + 1).to(torch.float32)
    inputs, weights, state = _cuda((inputs.to(torch.bfloat16), weights.to(torch.float32), state))
    segment_ids = torch.zeros(b, l, dtype=torch.int64, device="cuda")
    segment_ids[0, 37:] = 1
    segment_ids[0, 150:] = 2
    segment_ids[-1, l - 5 :] = 7
    return inputs, weights, state, segment_ids


@functools.cache
def _tolerance(config, wide_angles=False, segments=True, pairs=None):
    """`bf16_bound` of the bf16 reference's own relative error against the float64 oracle (on `_case`'s
    segment ids, or without: each row one document)."""
    inputs, weights, state, segment_ids = _case(*config, wide_angles=wide_angles, pairs=pairs)
    segment_ids = segment_ids if segments else None
    options = dict(segment_ids=segment_ids, initial_state=state)
    oracle, _ = mamba3_recurrent(
        inputs.to(torch.float64), weights.to(torch.float64), segment_ids=segment_ids, initial_state=state.to(torch.float64)
    )
    own, _ = mamba3_chunked(inputs, weights, chunk_size=16, **options)
    return bf16_bound(rel_err(own, oracle))


def _leaves(inputs, weights, state):
    return [t.detach().clone().requires_grad_() for t in (*inputs, *weights, *state) if t is not None]


def _rebuild(leaves, weights_template):
    rest = iter(leaves[8:])
    weights = Mamba3Weights(*(None if t is None else next(rest) for t in weights_template))
    return Mamba3Inputs(*leaves[:8]), weights, Mamba3State(*rest)


def _run(backend, leaves, weights_template, segment_ids, upcast=False):
    inputs, weights, state = _rebuild(leaves, weights_template)
    if upcast:
        inputs = inputs.to(torch.float32)
    return mamba3_scan(inputs, weights, segment_ids=segment_ids, initial_state=state, backend=backend)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_forward_and_gradients_match_reference(config):
    _check_against_reference(config)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=[IDS[0], IDS[3]])
def test_rows_without_segment_ids_match_reference(config):
    """Each row one document (no segment ids: the kernels' layout without starts, θ's carry across chunks to
    the row's end), from the initial state: within the same bound."""
    _check_against_reference(config, segments=False)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=[IDS[0], IDS[3]])
def test_wide_rotation_angles_match_reference(config):
    """θ far outside [−π, π] inside a chunk: the kernels' sin and cos (nvcc's fast approximations, on θ
    reduced to [−π, π]) stay within the same bound."""
    _check_against_reference(config, wide_angles=True)


def test_every_pair_rotated_matches_reference():
    """rope_fraction 1.0 (S = n / 2) at SISO n = 128, p = 64, where chunk_output's and chunk_dy's θ tiles take twice
    the shared memory, so that they are compiled for two blocks per SM instead of three
    (`kernels.gate_blocks_per_sm`): within the same bound."""
    _check_against_reference(ALL_ROTATED, pairs=ALL_ROTATED[0] // 2)


def _check_against_reference(config, wide_angles=False, segments=True, pairs=None):
    """Outputs, final state and every gradient of the kernels against the fp32 reference's, within `_tolerance`;
    on `_case`'s segment ids, or (not `segments`) without them."""
    tol = _tolerance(config, wide_angles, segments, pairs)
    inputs, weights, state, segment_ids = _case(*config, wide_angles=wide_angles, pairs=pairs)
    segment_ids = segment_ids if segments else None
    leaves_k, leaves_r = _leaves(inputs, weights, state), _leaves(inputs, weights, state)
    out, final = _run("tilelang", leaves_k, weights, segment_ids)
    out_ref, final_ref = _run("reference", leaves_r, weights, segment_ids, upcast=True)
    assert out.dtype == torch.bfloat16 and final.h.dtype == torch.float32
    errors = {"out": rel_err(out, out_ref)}
    errors.update({f"state.{name}": rel_err(a, e) for name, a, e in zip(Mamba3State._fields, final, final_ref)})
    generator = torch.Generator(device="cuda").manual_seed(3)
    grad_out = torch.randn(out.shape, device="cuda", generator=generator).to(out.dtype)  # the same values for both
    grad_state = [torch.randn(t.shape, device="cuda", generator=generator) for t in final_ref]
    torch.autograd.backward((out, *final), (grad_out, *grad_state))
    torch.autograd.backward((out_ref, *final_ref), (grad_out.float(), *grad_state))
    for index, (a, e) in enumerate(zip(leaves_k, leaves_r)):
        errors[f"grad[{index}]"] = rel_err(a.grad, e.grad)
    print(config, f"tol={tol:.2e}", {k: f"{v / tol * ERROR_MULTIPLE:.2f}x" for k, v in errors.items()})
    assert all(error <= tol for error in errors.values()), errors


def _raw_case(config):
    """`_case` with raw dt, A, B and C (before the prep) and the prep's dt_bias, B_norm, C_norm (fp32)."""
    inputs, weights, state, segment_ids = _case(*config)
    generator = torch.Generator(device="cuda").manual_seed(5)
    randn = lambda *shape: torch.randn(shape, device="cuda", generator=generator)  # noqa: E731
    b, l, H = inputs.dt.shape  # noqa: E741
    n = inputs.B.shape[-1]
    raw = inputs._replace(
        dt=randn(b, l, H) - 1.5, A=randn(b, l, H), B=2 * randn(*inputs.B.shape), C=2 * randn(*inputs.C.shape)
    ).to(torch.bfloat16)
    return raw, weights, state, segment_ids, (0.5 * randn(H), 1 + 0.2 * randn(n), 1 + 0.2 * randn(n))


def _bf16_valued(t):
    """t rounded to bf16 values, kept in its dtype; autograd passes its gradient straight through."""
    return t + (t.to(torch.bfloat16).to(t.dtype) - t).detach()


@pytest.mark.parametrize("config", PREP_CONFIGS, ids=PREP_IDS)
def test_prep_in_the_kernels_matches_reference(config):
    """With a `Mamba3Prep` (raw dt, A, B, C) the kernels run the prep (Δ = softplus, the decay rate with its
    floor, B/C RMSNorm) and its backward. Against the fp32 reference on the same raw values with the prep in
    PyTorch and Δ, B and C rounded to bf16 values where the kernels round them (chunk_prep's outputs, which
    the other kernels read; A stays fp32): outputs, final state and the gradients of the raw inputs, weights,
    state and the prep's weights, within ERROR_MULTIPLE times the bf16 reference's own error."""
    raw, weights, state, segment_ids, prep_weights = _raw_case(config)
    prep64 = Mamba3Prep(*(t.double() for t in prep_weights), A_FLOOR)
    oracle, _ = mamba3_recurrent(
        apply_prep(raw.to(torch.float64), prep64), weights.to(torch.float64), segment_ids=segment_ids,
        initial_state=state.to(torch.float64),
    )
    prepped = apply_prep(raw.to(torch.float32), Mamba3Prep(*prep_weights, A_FLOOR)).to(torch.bfloat16)
    own, _ = mamba3_chunked(prepped, weights, chunk_size=16, segment_ids=segment_ids, initial_state=state)
    tol = bf16_bound(rel_err(own, oracle))

    results, leaves = [], []
    for backend in ("tilelang", "reference"):
        run_leaves = _leaves(raw, weights, state) + [t.detach().clone().requires_grad_() for t in prep_weights]
        inputs, run_weights, run_state = _rebuild(run_leaves[:-3], weights)
        prep = Mamba3Prep(*run_leaves[-3:], A_FLOOR)
        options = dict(segment_ids=segment_ids, initial_state=run_state, backend=backend)
        if backend == "reference":
            inputs = apply_prep(inputs.to(torch.float32), prep)
            inputs, prep = inputs._replace(dt=_bf16_valued(inputs.dt), B=_bf16_valued(inputs.B), C=_bf16_valued(inputs.C)), None
        results.append(mamba3_scan(inputs, run_weights, prep=prep, **options))
        leaves.append(run_leaves)
    (out, final), (out_ref, final_ref) = results
    assert out.dtype == torch.bfloat16
    errors = {"out": rel_err(out, out_ref)}
    errors.update({f"state.{name}": rel_err(a, e) for name, a, e in zip(Mamba3State._fields, final, final_ref)})
    generator = torch.Generator(device="cuda").manual_seed(3)
    grad_out = torch.randn(out.shape, device="cuda", generator=generator).to(out.dtype)
    grad_state = [torch.randn(t.shape, device="cuda", generator=generator) for t in final_ref]
    torch.autograd.backward((out, *final), (grad_out, *grad_state))
    torch.autograd.backward((out_ref, *final_ref), (grad_out.float(), *grad_state))
    for index, (a, e) in enumerate(zip(*leaves)):
        errors[f"grad[{index}]"] = rel_err(a.grad, e.grad)
    print(config, f"tol={tol:.2e}", {k: f"{v / tol * ERROR_MULTIPLE:.2f}x" for k, v in errors.items()})
    assert all(error <= tol for error in errors.values()), errors


def test_one_compile_for_every_length_and_auto_receipt():
    from megatron_mamba3.ops.tilelang.build import compile_count

    config = CONFIGS[0]
    tol = _tolerance(config)
    clear_receipts()
    counts = []
    for length in (1, 63, 64, 65, 1000):
        inputs, weights, _, _ = _case(*config, b=3, l=length, seed=length)
        out, _ = mamba3_scan(inputs, weights, layer="probe")  # auto: tilelang on CUDA
        ref, _ = mamba3_chunked(inputs.to(torch.float32), weights)
        assert rel_err(out, ref) <= tol, length
        counts.append(compile_count())
    assert len(set(counts)) == 1 and counts[0] >= 3
    ran = {(r.backend, r.variant) for r in receipts() if r.layer == "probe"}
    assert ran == {("tilelang", "chunked")}


def test_unsupported_sizes_raise_when_asked_for_and_fall_back_under_auto():
    inputs, weights, _, _ = _case(128, 64, 1, 1, False)
    bad = Mamba3Inputs(*(t[..., :96] if name in ("B", "C") else t for name, t in zip(Mamba3Inputs._fields, inputs)))
    bad_weights = weights._replace(B_bias=weights.B_bias[..., :96], C_bias=weights.C_bias[..., :96])
    with pytest.raises(ValueError, match="backend='tilelang' cannot run .*n=96 is not supported"):
        mamba3_scan(bad, bad_weights, backend="tilelang")
    clear_receipts()
    mamba3_scan(bad, bad_weights, layer="fallback")  # auto: the reference runs, and the log says why
    assert {r.backend for r in receipts() if r.layer == "fallback"} == {"reference"}
