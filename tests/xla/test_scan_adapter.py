"""The XLA scan against the reference backend, in fp32: outputs, final states and every gradient
(inputs, weights, initial state) within 1e-5 relative (θ: 1e-5 modulo 2π); and its dispatch.

Cases are tiny (l = 21 with chunk 8, so the last chunk is padded) and cover SISO and MIMO (with the
output norm), unpacked rows, segment_ids packing with per-row initial states, and cu_seqlens
packing with an empty document and a document ending on a chunk boundary.
"""

import importlib.util

import pytest
import torch

from megatron_mamba3 import Mamba3Inputs, clear_receipts, mamba3_scan, receipts
from megatron_mamba3.ops.registry import load_backend
from megatron_mamba3.ops.xla.scan_adapter import mamba3_xla_scan
from tests.helpers import angle_err, make_case, make_state, rel_err

pytestmark = pytest.mark.xla

TOL = 1e-5
LENGTH, CHUNK = 21, 8
PACKINGS = {
    "rows+initial_state": lambda b: dict(initial_state=True),
    "segment_ids+initial_state": lambda b: dict(
        segment_ids=torch.tensor([[0] * 5 + [1] * 11 + [2] * 5, [7] * 16 + [3] * 5]), initial_state=True
    ),
    "cu_seqlens": lambda b: dict(cu_seqlens=torch.tensor([0, 0, 5, 5, 16, 21])),
}


def forward_backward(device, sync, backend, inputs, weights, initial_state=None, place=None, **packing):
    """Run `mamba3_scan` on `device` (then `sync`) and backpropagate fixed random cotangents of the
    output and of every final-state field; returns {name: CPU tensor} for outputs and all gradients.
    `place(name, tensor)`, when given, is called on each input leaf once it is on `device`."""
    leaves = {**inputs._asdict(), **{k: v for k, v in weights._asdict().items() if v is not None}}
    if initial_state is not None:
        leaves |= {f"initial_{k}": v for k, v in initial_state._asdict().items()}
    leaves = {k: v.detach().to(device) for k, v in leaves.items()}
    if place is not None:
        leaves = {k: place(k, v) for k, v in leaves.items()}
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    state = None
    if initial_state is not None:
        state = type(initial_state)(*(leaves[f"initial_{k}"] for k in initial_state._fields))
    out, final = mamba3_scan(
        type(inputs)(*(leaves[k] for k in inputs._fields)),
        type(weights)(*(leaves.get(k) for k in weights._fields)),
        initial_state=state, chunk_size=CHUNK, backend=backend,
        **{k: v.to(device) for k, v in packing.items()},
    )
    results = {"out": out, **{f"final_{k}": v for k, v in final._asdict().items()}}
    generator = torch.Generator().manual_seed(0)
    loss = sum((t * torch.randn(t.shape, generator=generator).to(device)).sum() for t in results.values())
    loss.backward()
    results |= {f"grad_{k}": v.grad for k, v in leaves.items()}
    sync()
    return {k: v.detach().cpu() for k, v in results.items()}


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("R", [1, 4], ids=["SISO", "MIMO"])
def test_xla_matches_reference_forward_and_gradients(device, sync, R, packing):
    options = PACKINGS[packing](2)
    b = 1 if "cu_seqlens" in options else 2
    inputs, weights = make_case(b=b, l=LENGTH, H=2, p=4, R=R, G=1, n=8, norm=R > 1, seed=R, dtype=torch.float32)
    if options.pop("initial_state", False):
        options["initial_state"] = make_state(b, 2, 4, R, 8, 2).to(torch.float32)
    clear_receipts()
    got = forward_backward(device, sync, "xla", inputs, weights, **options)
    assert [(r.backend, r.variant) for r in receipts()] == [("xla", "scan")]
    expected = forward_backward(torch.device("cpu"), lambda: None, "reference", inputs, weights, **options)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if name == "final_theta":
            assert angle_err(got[name], value) < TOL
        else:
            assert value.abs().max() > 0, name  # every compared tensor carries signal
            assert rel_err(got[name], value) < TOL, name


def test_auto_picks_xla_for_xla_tensors_and_records_compiles(device, sync):
    inputs, weights = make_case(b=1, l=9, H=2, p=4, n=8, G=1, seed=5, dtype=torch.float32)
    to_device = lambda t: type(t)(*(None if v is None else v.to(device) for v in t))  # noqa: E731
    clear_receipts()
    with torch.no_grad():  # inference: torch_xla's scan traces a backward even here
        out, _ = mamba3_scan(to_device(inputs), to_device(weights), chunk_size=4, backend="auto")
    sync()
    expected, _ = mamba3_scan(inputs, weights, chunk_size=4, backend="reference")
    assert rel_err(out.cpu(), expected) < TOL
    (receipt,) = [r for r in receipts() if r.backend != "reference"]
    assert (receipt.backend, receipt.variant) == ("xla", "scan")
    assert receipt.compile_count == load_backend("xla").compile_count() - 1  # this call's graph compiled at sync
    with pytest.raises(ValueError, match="backend='xla' cannot run on cpu float32 tensors: it needs XLA tensors"):
        mamba3_scan(inputs, weights, backend="xla")


def test_why_not_names_the_device_or_the_missing_package(device, monkeypatch):
    backend = load_backend("xla")
    on = lambda where: Mamba3Inputs(*[torch.zeros(1, device=where)] * len(Mamba3Inputs._fields))  # noqa: E731
    assert backend.why_not(on("cpu")) == "it needs XLA tensors, got cpu tensors"
    assert backend.why_not(on(device)) is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert backend.why_not(on(device)) == "torch_xla is not installed"


def test_bad_packing_raises_before_tracing():
    inputs, weights = make_case(b=2, l=6, H=2, p=4, n=8, G=1, dtype=torch.float32)
    one_row = type(inputs)(*(t[:1] for t in inputs))
    with pytest.raises(ValueError, match="per-document initial states are not supported"):
        mamba3_xla_scan(one_row, weights, cu_seqlens=torch.tensor([0, 2, 6]), initial_state=make_state(2, 2, 4, 1, 8, 2))
    with pytest.raises(ValueError, match="got batch b=2, expected 1"):
        mamba3_scan(inputs, weights, cu_seqlens=torch.tensor([0, 6]), backend="xla")
    with pytest.raises(ValueError, match=r"cu_seqlens=\[0, 4, 5\] must start at 0, never decrease and end at"):
        mamba3_scan(one_row, weights, cu_seqlens=torch.tensor([0, 4, 5]), backend="xla")
    with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 5\), expected \(b, l\) = \(2, 6\)"):
        mamba3_scan(inputs, weights, segment_ids=torch.zeros(2, 5, dtype=torch.int32), backend="xla")
    with pytest.raises(ValueError, match=r"chunk_size=0 must be an int in \[1, 1024\]"):
        mamba3_scan(inputs, weights, chunk_size=0, backend="xla")


def test_device_offsets_are_checked_behind_the_debug_flag(device, monkeypatch):
    from megatron_mamba3.ops.segments import DEBUG_CHECKS, check_cu_seqlens

    decreasing = torch.tensor([0, 5, 3, 6], device=device)
    check_cu_seqlens(decreasing, 6)  # reading device offsets would stall the step: not done by default
    with pytest.raises(ValueError, match="1-D integer tensor"):  # dtype and shape: always
        check_cu_seqlens(torch.tensor([0.0, 6.0], device=device), 6)
    monkeypatch.setenv(DEBUG_CHECKS, "1")
    with pytest.raises(ValueError, match=r"cu_seqlens=\[0, 5, 3, 6\] must start at 0, never decrease"):
        check_cu_seqlens(decreasing, 6)


def test_short_input_is_one_unpadded_chunk(device, sync, monkeypatch):
    from megatron_mamba3.ops.xla import scan_adapter

    chunk_shapes, loop = [], scan_adapter._loop
    monkeypatch.setattr(scan_adapter, "_loop", lambda step, carry, xs, traced: chunk_shapes.append(tuple(xs[1].shape))
                        or loop(step, carry, xs, traced))
    inputs, weights = make_case(b=2, l=8, H=2, p=4, n=8, G=1, dtype=torch.float32)
    expected, _ = mamba3_scan(inputs, weights, variant="recurrent")
    on_device = lambda named: type(named)(*(None if t is None else t.to(device) for t in named))  # noqa: E731
    out, _ = mamba3_xla_scan(on_device(inputs), on_device(weights), chunk_size=1024)
    sync()
    assert chunk_shapes == [(1, 2, 8)] and rel_err(out.cpu(), expected) < TOL  # (chunks, b, c): no padding to 1024
