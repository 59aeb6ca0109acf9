"""The XLA backend's own behaviour: auto selection and compile counts, `why_not`, device offsets
checked behind the debug flag, and a short input run as one unpadded chunk (fp32, 1e-5 relative to
the reference). Its packing, isolation, state-split and bad-input cases against the float64 oracle
are the conformance suite's (tests/conformance)."""

import importlib.util

import pytest
import torch

from megatron_mamba3 import Mamba3Inputs, clear_receipts, mamba3_scan, receipts
from megatron_mamba3.ops.registry import load_backend
from megatron_mamba3.ops.xla.scan_adapter import mamba3_xla_scan
from tests.helpers import make_case, rel_err

pytestmark = pytest.mark.xla

TOL = 1e-5


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
