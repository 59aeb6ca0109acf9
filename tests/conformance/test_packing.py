"""Packed documents on every backend equal the float64 oracle run on each document alone: outputs,
final states and the gradients of every input, weight and initial state, within the target's bound.

Packings (tests/conformance/packings.py): rows with initial states; segment_ids rows whose first
document continues the row's initial state; cu_seqlens documents (empty ones included) from zero
states and from per-document initial states. A backend that refuses a packing raises its own error.
"""

import pytest
import torch

from megatron_mamba3 import clear_receipts
from megatron_mamba3.ops import Mamba3Inputs
from tests.conformance.packings import PACKINGS, Layout, layout
from tests.conformance.targets import (
    ORACLE,
    TILELANG_KERNELS,  # noqa: F401 (compiled first by tests/conftest.py)
    STATE_FIELDS,
    Named,
    assert_close,
    cases,
    float64,
    oracle_scan,
    result_shapes,
)


def oracle_alone(plan: Layout, tensors: Named, cotangents: Named) -> Named:
    """The oracle's results and gradients for the packed call `plan`, assembled from one oracle call per
    document alone (its tokens, its initial state or zeros, its slice of the cotangents)."""
    tensors, expected = float64(tensors), {}
    for doc in plan.documents:
        rows = slice(doc.row, doc.row + 1)
        alone = {
            name: t[rows, doc.begin : doc.end] if name in Mamba3Inputs._fields else t
            for name, t in tensors.items()
            if name not in STATE_FIELDS
        }
        doc_cotangents = {"out": cotangents["out"][rows, doc.begin : doc.end]}
        if doc.state_in is not None:
            alone |= {name: tensors[name][doc.state_in : doc.state_in + 1] for name in STATE_FIELDS}
        if doc.state_out is not None:
            finals = (name for name in cotangents if name.startswith("final_"))
            doc_cotangents |= {name: cotangents[name][doc.state_out : doc.state_out + 1] for name in finals}
        got = ORACLE.forward_backward(oracle_scan, alone, doc_cotangents)
        if not expected:
            expected = {"out": torch.zeros_like(cotangents["out"])}
            expected |= {name: torch.zeros_like(t) for name, t in cotangents.items() if name.startswith("final_")}
            expected |= {f"grad_{name}": torch.zeros_like(t) for name, t in tensors.items()}
        expected["out"][doc.row, doc.begin : doc.end] = got["out"][0]
        for name, value in got.items():
            if name.startswith("final_") and doc.state_out is not None:
                expected[name][doc.state_out] = value[0]
            elif name.removeprefix("grad_") in Mamba3Inputs._fields:
                expected[name][doc.row, doc.begin : doc.end] = value[0]
            elif name.removeprefix("grad_") in STATE_FIELDS:
                expected[name][doc.state_in] = value[0]
            elif name.startswith("grad_"):  # weights: every document adds its part
                expected[name] += value
    return expected


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("target, model", cases())
def test_packed_documents_equal_the_oracle_on_each_document_alone(target, model, packing):
    plan = layout(packing, target)
    tensors = target.case(model, plan.b, target.length, seed=11, states=plan.states if plan.initial_state else 0)
    refusal = dict(target.refuses).get(packing)
    if refusal is not None:
        with pytest.raises(ValueError, match=refusal):
            target.run(tensors, **plan.packing)
        return
    cotangents = target.cotangents(result_shapes(plan.b, target.length, plan.states, target, model))
    clear_receipts()
    got = target.forward_backward(lambda leaves: target.scan(leaves, **plan.packing), tensors, cotangents)
    target.assert_ran()
    expected = oracle_alone(plan, tensors, cotangents)
    assert_close(got, expected, target.bound(lambda: target.own_error(tensors, expected["out"], **plan.packing)))
