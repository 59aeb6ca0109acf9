"""The layer entry point, backend selection, receipts, parameter init and the layer's input validation
(the scan's bad arguments on every backend: tests/conformance/test_bad_inputs.py)."""

import dataclasses
import logging
import math
import re

import pytest
import torch
import torch.nn.functional as F

from megatron_mamba3 import Mamba3Config, clear_receipts, init_layer_params, mamba3_layer, mamba3_scan, receipts
from megatron_mamba3.in_proj import InProjLayout
from megatron_mamba3.ops import registry
from megatron_mamba3.ops.interface import Mamba3Prep, Mamba3State, scan_dims
from megatron_mamba3.ops.registry import BACKEND_ENV
from megatron_mamba3.ops.scan import mamba3_decode
from megatron_mamba3.ops.toolkit.prep import apply_prep, decay_rate
from tests.helpers import make_case, rel_err


def test_decay_rate_follows_spec():
    u = torch.tensor([-3.0, -0.5, 0.0, 0.5, 2.0, -1e6], dtype=torch.float64)
    expected = torch.tensor([-1 / 4, -1 / 1.5, -1.0, -1.5, -3.0, -1e-4], dtype=torch.float64)
    assert torch.allclose(decay_rate(u, 1e-4), expected, rtol=1e-12, atol=0)


def test_init_layer_params_follow_spec():
    config = Mamba3Config(d_model=64, headdim=8, d_state=16, mimo_rank=4, is_outproj_norm=True)
    params = init_layer_params(config, torch.Generator().manual_seed(0))
    H, R, n, p = 16, 4, 16, 8
    shapes = {"dt_bias": (H,), "B_norm": (n,), "C_norm": (n,), "B_bias": (H, R, n), "C_bias": (H, R, n),
              "D": (H,), "mimo_x": (H, R, p), "mimo_z": (H, R, p), "mimo_o": (H, R, p), "norm": (128,)}
    assert {k: tuple(v.shape) for k, v in params.items()} == shapes
    assert all(v.dtype == torch.float32 for v in params.values())
    dt0 = F.softplus(params["dt_bias"])
    assert (dt0 >= config.dt_min * (1 - 1e-5)).all() and (dt0 <= config.dt_max * (1 + 1e-5)).all()
    assert torch.equal(params["mimo_x"], torch.full((H, R, p), 0.25)) and torch.equal(params["mimo_o"], params["mimo_x"])
    for name in ("B_norm", "C_norm", "B_bias", "C_bias", "D", "mimo_z", "norm"):
        assert torch.equal(params[name], torch.ones(shapes[name])), name
    siso = init_layer_params(Mamba3Config(d_model=64, headdim=8, d_state=16))
    assert "mimo_x" not in siso and "norm" not in siso and siso["B_bias"].shape == (H, 1, n)


def test_dt_floor_clamps_initial_dt():
    config = Mamba3Config(d_model=16, headdim=8, d_state=8, dt_min=1e-6, dt_max=2e-6, dt_floor=1e-3)
    assert torch.allclose(F.softplus(init_layer_params(config)["dt_bias"]), torch.full((4,), 1e-3))


def test_split_projection_layout_and_width_check():
    config = Mamba3Config(d_model=8, headdim=4, d_state=8, ngroups=2, mimo_rank=2)
    projected = torch.arange(config.d_in_proj, dtype=torch.float64).expand(1, 1, -1)
    z, x, B, C, dd_dt, dd_A, trap, angles = InProjLayout(config).split(projected)
    assert z.shape == x.shape == (1, 1, 4, 4) and B.shape == C.shape == (1, 1, 2, 2, 8)
    assert B[0, 0, 1, 0, 0] == 32 + 16  # (r g n): rank 1 comes after both groups of rank 0
    assert (dd_dt[0, 0, 0], dd_A[0, 0, 0], trap[0, 0, 0], angles[0, 0, 0]) == (96, 100, 104, 108)
    with pytest.raises(ValueError, match=f"width 10, expected {config.d_in_proj}: in_proj's columns on tensor parallel rank 0 of 1"):
        InProjLayout(config).split(torch.zeros(1, 1, 10))


def test_receipts_record_what_ran():
    clear_receipts()
    inputs, weights = make_case(b=1, l=9, seed=31)
    mamba3_scan(inputs, weights, layer="layer0")
    mamba3_scan(inputs, weights, layer="layer0")
    mamba3_scan(inputs, weights, variant="recurrent", layer="layer1")
    recorded = receipts()
    assert [(r.layer, r.backend, r.variant, r.step_kind, r.dtype) for r in recorded] == [
        ("layer0", "reference", "chunked", "forward", "float64"),
        ("layer1", "reference", "recurrent", "forward", "float64"),
    ]
    assert list(recorded.values()) == [2, 1]
    assert not any(r.fused_prep for r in recorded)  # inputs that came prepped
    assert dict(next(iter(recorded)).shapes)["B"] == (1, 9, 1, 2, 16)
    clear_receipts()
    assert receipts() == {}


def test_backend_selection(monkeypatch):
    inputs, weights = make_case(b=1, l=5, seed=32)
    with pytest.raises(ValueError, match="backend='tilelang' cannot run on cpu float64 tensors"):
        mamba3_scan(inputs, weights, backend="tilelang")
    with pytest.raises(ValueError, match="backend='triton' is not a backend; choose one of: auto, reference"):
        mamba3_scan(inputs, weights, backend="triton")
    with pytest.raises(ValueError, match="variant='fused' is not a variant of backend 'reference'"):
        mamba3_scan(inputs, weights, variant="fused")
    monkeypatch.setenv(BACKEND_ENV, "xla")
    with pytest.raises(ValueError, match=f"{BACKEND_ENV}='xla' cannot run on cpu float64 tensors"):
        mamba3_scan(inputs, weights)
    monkeypatch.setenv(BACKEND_ENV, "reference")
    out, _ = mamba3_scan(inputs, weights, chunk_size=2)
    reference, _ = mamba3_scan(inputs, weights, backend="auto", variant="recurrent")
    assert rel_err(out, reference) < 1e-10


def _raw_case(seed):
    """A fp64 case with raw dt, A, B, C (before the prep) and its `Mamba3Prep`."""
    inputs, weights = make_case(b=2, l=9, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(shape, generator=generator, dtype=torch.float64)  # noqa: E731
    raw = inputs._replace(
        dt=randn(*inputs.dt.shape) - 1, A=randn(*inputs.A.shape), B=2 * randn(*inputs.B.shape), C=2 * randn(*inputs.C.shape)
    )
    H, n = inputs.dt.shape[-1], inputs.B.shape[-1]
    return raw, weights, Mamba3Prep(randn(H), 1 + 0.1 * randn(n), 1 + 0.1 * randn(n), 0.5)


@pytest.mark.parametrize("fuses", [False, True])
def test_prep_runs_inside_a_backend_that_fuses_it_and_before_the_others(monkeypatch, fuses):
    """`mamba3_scan(..., prep=)` gives a fusing backend the raw inputs and the prep, every other backend the
    inputs `apply_prep` makes; the result is the scan of the prepped inputs either way."""
    raw, weights, prep = _raw_case(41)
    reference = registry.load_backend("reference")
    seen = []

    def scan(inputs, weights, prep=None, **options):
        seen.append((inputs, prep))
        prepped = inputs if prep is None else apply_prep(inputs, prep)
        return reference.variants["chunked"].fn(prepped, weights, **options)

    variant = registry.ScanVariant("reference", "chunked", scan)
    backend = dataclasses.replace(reference, variants={"chunked": variant}, fuses_prep=fuses)
    monkeypatch.setattr(registry, "load_backend", lambda name: backend)
    clear_receipts()
    out, final = mamba3_scan(raw, weights, prep=prep, backend="reference")

    assert [receipt.fused_prep for receipt in receipts()] == [fuses]  # the receipt says where the prep ran
    (inputs, given), = seen
    assert (given is prep) == fuses and (given is None) != fuses
    expected_inputs = raw if fuses else apply_prep(raw, prep)
    assert all(torch.equal(a, e) for a, e in zip(inputs, expected_inputs))
    expected, expected_final = reference.variants["chunked"].fn(apply_prep(raw, prep), weights, segment_ids=None,
                                                               cu_seqlens=None, initial_state=None, chunk_size=64)
    assert torch.equal(out, expected) and all(torch.equal(a, e) for a, e in zip(final, expected_final))


@pytest.mark.parametrize(
    "change,error",
    [
        (dict(dt_bias=torch.zeros(3)), "prep.dt_bias has shape \\(3,\\), expected \\(4,\\)"),
        (dict(B_norm=torch.zeros(5)), "prep.B_norm has shape \\(5,\\), expected \\(16,\\)"),
        (dict(A_floor=0.0), "prep.A_floor=0.0 must be a number > 0"),
        (dict(A_floor=True), "prep.A_floor=True must be a number > 0"),
    ],
)
def test_bad_prep_raises_naming_the_bad_value(change, error):
    raw, weights, prep = _raw_case(42)
    with pytest.raises(ValueError, match=error):
        mamba3_scan(raw, weights, prep=prep._replace(**change))
    with pytest.raises(TypeError, match="prep must be a Mamba3Prep"):
        mamba3_scan(raw, weights, prep=tuple(prep))


def test_auto_falls_back_to_reference_and_says_why(monkeypatch, caplog):
    inputs, weights = make_case(b=1, l=5, seed=32)
    monkeypatch.setattr(registry, "_AUTO_BY_DEVICE", {"cpu": "tilelang"})
    clear_receipts()
    with caplog.at_level(logging.WARNING, logger="megatron_mamba3"):
        mamba3_scan(inputs, weights, backend="auto")
    assert "auto: tilelang cannot run because" in caplog.text and "falling back to reference" in caplog.text
    assert [r.backend for r in receipts()] == ["reference"]


def test_decode_records_its_own_receipt():
    clear_receipts()
    inputs, weights = make_case(b=2, l=1, seed=34)
    state = Mamba3State.zeros(2, scan_dims(inputs, weights), torch.float64, torch.device("cpu"))
    out, _ = mamba3_decode(inputs.tokens(0), weights, state, layer="layer0")
    expected, _ = mamba3_scan(inputs, weights, variant="recurrent")
    assert rel_err(out, expected[:, 0]) < 1e-10
    assert [(r.step_kind, r.backend, r.variant) for r in receipts()][0] == ("decode", "reference", "step")


def test_non_floating_projection_and_state_raise_type_error():
    config = Mamba3Config(d_model=16, headdim=8, d_state=8)
    params = init_layer_params(config)
    with pytest.raises(TypeError, match="projected has dtype torch.int64"):
        mamba3_layer(torch.ones(1, 3, config.d_in_proj, dtype=torch.int64), params, config)
    _, state = mamba3_layer(torch.zeros(1, 3, config.d_in_proj), params, config)
    with pytest.raises(TypeError, match=r"initial_state must be a Mamba3State\(h, k_prev, v_prev, theta\), got tuple"):
        mamba3_layer(torch.zeros(1, 3, config.d_in_proj), params, config, initial_state=tuple(state))
    with pytest.raises(TypeError, match="initial_state.h has dtype torch.int64"):
        mamba3_layer(torch.zeros(1, 3, config.d_in_proj), params, config, initial_state=state._replace(h=state.h.long()))


@pytest.mark.parametrize("name, shape", [("dt_bias", (3,)), ("B_norm", (5,)), ("C_norm", (8, 1))])
def test_layer_params_of_the_wrong_shape_raise_naming_them(name, shape):
    config = Mamba3Config(d_model=16, headdim=8, d_state=8)  # H = 4, n = 8
    params = {**init_layer_params(config), name: torch.ones(shape)}
    with pytest.raises(ValueError, match=rf"params\['{name}'\] has shape {re.escape(str(shape))}, expected"):
        mamba3_layer(torch.zeros(1, 3, config.d_in_proj), params, config)


def test_short_input_is_not_padded_to_a_whole_chunk(monkeypatch):
    from megatron_mamba3.ops.reference import chunked

    seen = []
    scan_one = chunked.chunk_scan
    monkeypatch.setattr(chunked, "chunk_scan", lambda chunk, *rest: seen.append(chunk.x.shape[1]) or scan_one(chunk, *rest))
    inputs, weights = make_case(b=1, l=8, seed=36)
    out, _ = mamba3_scan(inputs, weights, chunk_size=1024, backend="reference")
    expected, _ = mamba3_scan(inputs, weights, variant="recurrent")
    assert seen == [8] and rel_err(out, expected) < 1e-10


def test_layer_needs_every_parameter():
    config = Mamba3Config(d_model=16, headdim=8, d_state=8)
    params = init_layer_params(config)
    del params["C_norm"]
    with pytest.raises(ValueError, match=r"params lacks \['C_norm'\]"):
        mamba3_layer(torch.zeros(1, 3, config.d_in_proj), params, config)


def test_layer_in_bfloat16_keeps_fp32_state():
    config = Mamba3Config(d_model=32, headdim=8, d_state=16, mimo_rank=2)
    params = init_layer_params(config)
    projected = torch.randn(2, 20, config.d_in_proj)
    y32, state32 = mamba3_layer(projected, params, config)
    y16, state16 = mamba3_layer(projected.bfloat16(), {k: v.bfloat16() for k, v in params.items()}, config)
    assert y16.dtype == torch.bfloat16 and state16.h.dtype == torch.float32 and y32.shape == (2, 20, 64)
    assert rel_err(y16, y32) < 0.05  # bf16 inputs and weights: a sanity bound, not an accuracy claim
    assert math.isfinite(state16.h.abs().sum().item())


def test_installed_subpackages_import():
    import megatron_mamba3.layer_specs
    import megatron_mamba3.patches

    assert megatron_mamba3.layer_specs.__doc__ and megatron_mamba3.patches.__doc__


def test_demo_runs(capsys):
    from megatron_mamba3.demo import run_layer

    run_layer(Mamba3Config(d_model=16, headdim=8, d_state=8, mimo_rank=2), batch=1, length=12, seed=0)
    printed = capsys.readouterr().out
    assert "backend=reference variant=chunked dtype=float32" in printed and "checksum" in printed
