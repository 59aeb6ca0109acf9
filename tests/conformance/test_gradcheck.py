"""`torch.autograd.gradcheck` of every float64 backend variant's registered scan function (the others
are held to the oracle's gradients, tests/conformance/test_packing.py and test_state.py): every input,
weight and initial-state tensor, on small shapes with two packed documents and a chunk of 4. The
function is called as `mamba3_scan` calls it, without the dispatch's per-call checks (a third of a
call here; they are tests/conformance/test_bad_inputs.py's)."""

import pytest
import torch

from megatron_mamba3.ops.registry import load_backend
from tests.conformance.targets import Model, cases, unnamed

MODELS = {"SISO": Model(R=1, G=2, norm=False), "MIMO-norm": Model(R=2, G=1, norm=True)}


@pytest.mark.parametrize("target, model", cases(MODELS, where=lambda target: target.dtype == torch.float64))
def test_scan_gradcheck(target, model):
    scan_fn = load_backend(target.backend).variants[target.variant].fn
    tensors = target.case(model, 2, 6, seed=7, states=2, H=2, p=3, n=8)
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 2]])

    def scan(*leaves):
        inputs, weights, state = unnamed(dict(zip(tensors, leaves)))
        out, final = scan_fn(inputs, weights, segment_ids=segment_ids, cu_seqlens=None, initial_state=state, chunk_size=4)
        return (out, *final)

    leaves = tuple(t.clone().requires_grad_() for t in tensors.values())
    assert torch.autograd.gradcheck(scan, leaves, eps=1e-6, atol=1e-7, rtol=1e-6)
