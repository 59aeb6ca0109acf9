"""Every registered backend and variant refuses bad arguments alike: `mamba3_scan` checks them once,
before any backend is chosen or runs (here no backend may run at all), whatever device the backend
needs; the error names the bad value. Case: b = 1, l = 5, H = 4, p = 8, R = 2, G = 2, n = 16, S = 4."""

import pytest
import torch

from megatron_mamba3.ops import Mamba3State, mamba3_scan
from megatron_mamba3.ops.interface import scan_dims
from tests.conformance.targets import registered
from tests.helpers import make_case


def _state(inputs, weights, batch=1):
    return Mamba3State.zeros(batch, scan_dims(inputs, weights), torch.float64, torch.device("cpu"))


def _floats_to(dtype, field):
    def change(inputs, weights):
        if field in inputs._fields:
            return inputs._replace(**{field: getattr(inputs, field).to(dtype)}), weights, {}
        return inputs, weights._replace(**{field: getattr(weights, field).to(dtype)}), {}

    return change


def _options(**options):
    return lambda inputs, weights: (inputs, weights, options)


# id -> (change(inputs, weights) -> (inputs, weights, mamba3_scan options), error, message)
BAD_ARGUMENTS = {
    "x-head-dim": (lambda i, w: (i._replace(x=i.x[..., :7]), w, {}), ValueError,
                   r"z has shape \(1, 5, 4, 8\), expected \(1, 5, 4, 7\)"),
    "x-no-length": (lambda i, w: (i._replace(x=i.x[0]), w, {}), ValueError,
                    r"x has shape \(5, 4, 8\), expected \(b, l, H, p\)"),
    "B-groups": (lambda i, w: (i._replace(B=i.B[..., :1, :]), w, {}), ValueError,
                 r"C has shape \(1, 5, 2, 2, 16\), expected \(1, 5, 2, 1, 16\)"),
    "dt-length": (lambda i, w: (i._replace(dt=i.dt[:, :4]), w, {}), ValueError,
                  r"dt has shape \(1, 4, 4\), expected \(1, 5, 4\)"),
    "angles-too-many": (lambda i, w: (i._replace(angles=i.angles.repeat(1, 1, 3)), w, {}), ValueError,
                        r"angles carry S=12 angles"),
    "mimo_z-missing": (lambda i, w: (i, w._replace(mimo_z=None), {}), ValueError,
                       r"mimo_z must be given exactly when R > 1"),
    "D-heads": (lambda i, w: (i, w._replace(D=w.D[:3]), {}), ValueError, r"D has shape \(3,\), expected \(4,\)"),
    "norm-width": (lambda i, w: (i, w._replace(norm=torch.ones(8, dtype=torch.float64)), {}), ValueError,
                   r"norm has shape \(8,\), expected \(32,\)"),
    **{
        f"{field}-{str(dtype).removeprefix('torch.')}": (_floats_to(dtype, field), TypeError,
                                                         f"{field} has dtype {dtype}; Mamba-3 takes floating-point tensors")
        for field in ("x", "dt", "B_bias")
        for dtype in (torch.int64, torch.bool)
    },
    "chunk_size-0": (_options(chunk_size=0), ValueError, r"chunk_size=0 must be an int in \[1, 1024\]"),
    "chunk_size-4096": (_options(chunk_size=4096), ValueError, r"chunk_size=4096 must be an int in \[1, 1024\]"),
    "both-packings": (_options(cu_seqlens=torch.tensor([0, 5]), segment_ids=torch.zeros(1, 5)), ValueError,
                      "either segment_ids or cu_seqlens"),
    "segment_ids-length": (_options(segment_ids=torch.zeros(1, 4)), ValueError,
                           r"segment_ids has shape \(1, 4\), expected \(b, l\) = \(1, 5\)"),
    "cu_seqlens-short": (_options(cu_seqlens=torch.tensor([0, 2, 4])), ValueError,
                         r"cu_seqlens=\[0, 2, 4\] must start at 0, never decrease and end at the packed length 5"),
    "cu_seqlens-start": (_options(cu_seqlens=torch.tensor([1, 2, 5])), ValueError, "must start at 0"),
    "cu_seqlens-decreasing": (_options(cu_seqlens=torch.tensor([0, 4, 2, 5])), ValueError, "never decrease"),
    "cu_seqlens-2d": (_options(cu_seqlens=torch.tensor([[0, 5]])), ValueError, "1-D integer tensor"),
    "cu_seqlens-float": (_options(cu_seqlens=torch.tensor([0.0, 5.0])), ValueError, "1-D integer tensor"),
    "cu_seqlens-two-rows": (lambda i, w: (type(i)(*(t.repeat(2, *[1] * (t.dim() - 1)) for t in i)), w,
                                          {"cu_seqlens": torch.tensor([0, 5])}), ValueError,
                            "packs documents into one row; got batch b=2, expected 1"),
    "state-not-a-state": (lambda i, w: (i, w, {"initial_state": tuple(_state(i, w))}), TypeError,
                          r"initial_state must be a Mamba3State\(h, k_prev, v_prev, theta\), got tuple"),
    "state-int": (lambda i, w: (i, w, {"initial_state": _state(i, w)._replace(h=_state(i, w).h.long())}), TypeError,
                  "initial_state.h has dtype torch.int64"),
    "state-theta": (lambda i, w: (i, w, {"initial_state": _state(i, w)._replace(theta=_state(i, w).theta[..., :3])}),
                    ValueError, r"initial_state.theta has shape \(1, 4, 3\), expected \(1, 4, 4\)"),
    "state-per-row-for-documents": (lambda i, w: (i, w, {"cu_seqlens": torch.tensor([0, 2, 5]), "initial_state": _state(i, w)}),
                                    ValueError, r"initial_state.h has shape \(1, 4, 8, 16\), expected \(2, 4, 8, 16\)"),
}


@pytest.mark.parametrize("bad", BAD_ARGUMENTS)
@pytest.mark.parametrize("backend, variant", registered())
def test_bad_arguments_raise_before_any_backend_runs(backend, variant, bad, monkeypatch):
    never = lambda *args, **kwargs: pytest.fail("a backend was chosen for bad arguments")  # noqa: E731
    monkeypatch.setattr("megatron_mamba3.ops.scan.select_variant", never)
    change, error, message = BAD_ARGUMENTS[bad]
    inputs, weights, options = change(*make_case(b=1, l=5, R=2, G=2, seed=35))
    with pytest.raises(error, match=message):
        mamba3_scan(inputs, weights, backend=backend, variant=variant, **options)
