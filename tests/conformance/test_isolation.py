"""Nothing crosses a document boundary, on every backend, bit for bit: a non-finite input reaches only
the outputs the recurrence says (tests/conformance/nonfinite.py), and perturbing one document changes
no output of another and gives its outputs zero gradient everywhere else."""

import pytest
import torch

from megatron_mamba3.ops import Mamba3Inputs
from tests.conformance import nonfinite
from tests.conformance.packings import layout
from tests.conformance.targets import TILELANG_KERNELS, cases, result_shapes  # noqa: F401 (tests/conftest.py)


@pytest.mark.parametrize("field", list(nonfinite.BAD_INPUTS))
@pytest.mark.parametrize("target, model", cases())
def test_bad_input_reaches_only_its_document_and_later_tokens_and_no_gradient(target, model, field):
    nonfinite.check(target, model, field)


@pytest.mark.parametrize("target, model", cases())
def test_perturbing_one_document_changes_no_other(target, model):
    """Runs the packing of test_packing's segment_ids case, with zero final-state cotangents (XLA
    reuses that case's compiled graphs)."""
    plan = layout("segment_ids+initial_state", target)
    b, length = plan.b, target.length
    tensors = target.case(model, b, length, seed=13, states=plan.states)
    zeros = {name: torch.zeros(shape) for name, shape in result_shapes(b, length, plan.states, target, model).items()}
    scan = lambda leaves: target.scan(leaves, **plan.packing)  # noqa: E731
    out = target.forward_backward(scan, tensors, zeros)["out"]
    for doc in plan.documents:
        inside = torch.zeros(b, length, dtype=torch.bool)
        inside[doc.row, doc.begin : doc.end] = True
        # Every input of the document moves by half its size; Δ stays > 0 and A < 0.
        grow = lambda t: (t.double() + 0.5 * t.double().abs() * inside.view(b, length, *[1] * (t.dim() - 2))).to(t.dtype)  # noqa: E731
        perturbed = {name: grow(t) if name in Mamba3Inputs._fields else t for name, t in tensors.items()}
        # ...and the document's outputs have exactly zero gradient in every other document.
        cotangent = inside[..., None, None].expand(out.shape).double()
        changed = target.forward_backward(scan, perturbed, zeros | {"out": cotangent})
        assert torch.equal(changed["out"][~inside], out[~inside]), doc
        assert not torch.equal(changed["out"][inside], out[inside]), doc
        for name in Mamba3Inputs._fields:
            assert not changed[f"grad_{name}"][~inside].any(), (name, doc)
        assert changed["grad_x"][inside].any(), doc  # x always reaches its own outputs
