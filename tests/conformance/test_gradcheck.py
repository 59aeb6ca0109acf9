"""`torch.autograd.gradcheck` of every float64 backend variant's scan (the others are held to the
oracle's gradients, tests/conformance/test_packing.py and test_state.py): every input, weight and
initial-state tensor, on small shapes with two packed documents and a chunk of 4."""

import dataclasses

import pytest
import torch

from tests.conformance.targets import Model, cases

MODELS = {"SISO": Model(R=1, G=2, norm=False), "MIMO-norm": Model(R=2, G=1, norm=True)}


@pytest.mark.parametrize("target, model", cases(MODELS, where=lambda target: target.dtype == torch.float64))
def test_scan_gradcheck(target, model):
    target = dataclasses.replace(target, chunk=4)
    tensors = target.case(model, 2, 6, seed=7, states=2, H=2, p=3, n=8)
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 2]])

    def scan(*leaves):
        return tuple(target.scan(dict(zip(tensors, leaves)), segment_ids=segment_ids).values())

    leaves = tuple(t.clone().requires_grad_() for t in tensors.values())
    assert torch.autograd.gradcheck(scan, leaves, eps=1e-6, atol=1e-7, rtol=1e-6)
