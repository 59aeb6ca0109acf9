"""Packed documents: a packed batch equals each document run alone (outputs, states, gradients),
and nothing crosses a document boundary. Float64; tolerances 1e-10 relative unless exact."""

import pytest
import torch

from megatron_mamba3.ops import Mamba3State, mamba3_scan, segment_ids_from_cu_seqlens, segment_ids_from_doc_ids
from megatron_mamba3.ops.segments import document_starts
from megatron_mamba3.ops.oracle import mamba3_recurrent
from megatron_mamba3.ops.reference import mamba3_chunked
from tests.helpers import assert_states_close, make_case, make_state, rel_err

FORMS = {
    "chunked": lambda inputs, weights, **kw: mamba3_chunked(inputs, weights, chunk_size=8, **kw),
    "recurrent": mamba3_recurrent,
}
# Two rows of packed documents, boundaries inside and across chunks of 8: (row, begin, end).
LENGTH = 30
DOCUMENTS = [(0, 0, 5), (0, 5, 19), (0, 19, 20), (0, 20, 30), (1, 0, 16), (1, 16, 30)]
SEGMENT_IDS = torch.tensor([[0] * 5 + [1] * 14 + [2] + [3] * 10, [7] * 16 + [8] * 14])


def _alone(form, inputs, weights, row, begin, end, **kw):
    doc = inputs.tokens(slice(begin, end))
    return FORMS[form](type(inputs)(*(t[row : row + 1] for t in doc)), weights, **kw)


def _tensors(inputs, weights):
    return [*inputs, *(t for t in weights if t is not None)]


def _with_grad(case):
    inputs, weights = case
    inputs = type(inputs)(*(t.clone().requires_grad_() for t in inputs))
    weights = type(weights)(*(None if t is None else t.clone().requires_grad_() for t in weights))
    return inputs, weights


@pytest.mark.parametrize("R", [1, 4])
@pytest.mark.parametrize("form", FORMS)
def test_segment_ids_equal_documents_alone_outputs_and_gradients(form, R):
    inputs, weights = _with_grad(make_case(b=2, l=LENGTH, R=R, G=1, norm=R > 1, seed=11))
    out, _ = FORMS[form](inputs, weights, segment_ids=SEGMENT_IDS)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    packed_grads = torch.autograd.grad(out, _tensors(inputs, weights), cotangent)

    alone_weight_grads = None
    for row, begin, end in DOCUMENTS:
        doc_out, _ = _alone(form, inputs, weights, row, begin, end)
        assert rel_err(doc_out[0], out[row, begin:end]) < 1e-10
        grads = torch.autograd.grad(doc_out, _tensors(inputs, weights), cotangent[row : row + 1, begin:end])
        for packed, alone in zip(packed_grads[:8], grads[:8]):
            # relative to the whole gradient: a document's own slice can be exactly zero
            assert rel_err(packed[row, begin:end], alone[row, begin:end], scale=packed) < 1e-10
        weight_grads = grads[8:]
        alone_weight_grads = weight_grads if alone_weight_grads is None else [
            a + g for a, g in zip(alone_weight_grads, weight_grads)
        ]
    for packed, summed in zip(packed_grads[8:], alone_weight_grads):
        assert rel_err(packed, summed) < 1e-10


@pytest.mark.parametrize("R", [1, 2])
@pytest.mark.parametrize("form", FORMS)
def test_cu_seqlens_per_document_states_equal_documents_alone(form, R):
    lengths = [5, 14, 1, 0, 10]
    cu_seqlens = torch.tensor([0, 5, 19, 20, 20, 30])
    inputs, weights = make_case(b=1, l=sum(lengths), R=R, G=2, seed=12)
    initial = make_state(len(lengths), 4, 8, R, 16, 4)
    out, final = FORMS[form](inputs, weights, cu_seqlens=cu_seqlens, initial_state=initial)
    assert final.h.shape[0] == len(lengths)
    for index, (begin, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        if begin == end:  # an empty document keeps its initial state
            assert all(torch.equal(f[index], i[index]) for f, i in zip(final, initial))
            continue
        doc_out, doc_final = _alone(form, inputs, weights, 0, begin, end, initial_state=initial.rows(index))
        assert rel_err(doc_out, out[:, begin:end]) < 1e-10
        assert_states_close(doc_final, final.rows(index), 1e-10)


@pytest.mark.parametrize("form", FORMS)
def test_perturbing_one_document_changes_no_other(form):
    inputs, weights = make_case(b=2, l=LENGTH, R=2, G=1, seed=13)
    out, _ = FORMS[form](inputs, weights, segment_ids=SEGMENT_IDS)
    for row, begin, end in DOCUMENTS:
        inside = torch.zeros(2, LENGTH, dtype=torch.bool)
        inside[row, begin:end] = True
        # Every input of the document moves by half its size; Δ stays > 0 and A < 0.
        grow = lambda t: t + 0.5 * t.abs() * inside.view(2, LENGTH, *[1] * (t.dim() - 2))  # noqa: E731
        perturbed = type(inputs)(*(grow(t) for t in inputs))
        changed, _ = FORMS[form](perturbed, weights, segment_ids=SEGMENT_IDS)
        assert torch.equal(changed[~inside], out[~inside]), (row, begin, end)
        assert not torch.equal(changed[inside], out[inside])

        # ...and the document's outputs have exactly zero gradient in every other document.
        leaves = type(inputs)(*(t.clone().requires_grad_() for t in inputs))
        doc_out, _ = FORMS[form](leaves, weights, segment_ids=SEGMENT_IDS)
        grads = torch.autograd.grad(doc_out[inside].sum(), leaves)
        for name, grad in zip(inputs._fields, grads):
            assert not grad[~inside].any(), (name, row, begin, end)
        assert grads[0][inside].any()  # x always reaches its own outputs


def test_segment_helpers():
    doc_ids = torch.tensor([[4, 4, 9, 9, 9, 4], [1, 1, 1, 1, 1, 1]])
    segment_ids = segment_ids_from_doc_ids(doc_ids)
    assert segment_ids.tolist() == [[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    assert segment_ids.dtype == torch.int32 and segment_ids.shape == doc_ids.shape
    assert document_starts(segment_ids).tolist() == [[False, False, True, False, False, True], [False] * 6]
    cu = torch.tensor([0, 2, 2, 5, 6])
    assert segment_ids_from_cu_seqlens(cu, 6).tolist() == [[0, 0, 2, 2, 2, 3]]
    assert document_starts(segment_ids_from_cu_seqlens(cu, 6)).tolist() == [[False, False, True, False, False, True]]
    with pytest.raises(ValueError, match="doc_ids"):
        segment_ids_from_doc_ids(torch.zeros(6))


def test_cu_seqlens_and_segment_ids_packings_agree():
    inputs, weights = make_case(b=1, l=LENGTH, R=1, seed=14)
    cu = torch.tensor([0, 4, 17, 30])
    by_cu, _ = mamba3_chunked(inputs, weights, cu_seqlens=cu, chunk_size=8)
    by_segments, _ = mamba3_chunked(inputs, weights, segment_ids=segment_ids_from_cu_seqlens(cu, LENGTH), chunk_size=8)
    assert rel_err(by_segments, by_cu) < 1e-10


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(cu_seqlens=torch.tensor([0, 10, 29])), "end at the packed length 30"),
        (dict(cu_seqlens=torch.tensor([1, 10, 30])), "must start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 20, 10, 30])), "never decrease"),
        (dict(cu_seqlens=torch.tensor([[0, 30]])), "1-D integer tensor"),
        (dict(cu_seqlens=torch.tensor([0.0, 30.0])), "1-D integer tensor"),
        (dict(cu_seqlens=torch.tensor([0, 30]), segment_ids=torch.zeros(1, 30)), "either segment_ids or cu_seqlens"),
        (dict(segment_ids=torch.zeros(1, 29)), r"segment_ids has shape \(1, 29\)"),
    ],
)
def test_bad_packing_raises(options, message):
    inputs, weights = make_case(b=1, l=LENGTH, seed=15)
    for form in FORMS:
        with pytest.raises(ValueError, match=message):
            mamba3_scan(inputs, weights, backend="reference", variant=form, **options)


def test_cu_seqlens_needs_one_row_and_per_document_states():
    inputs, weights = make_case(b=2, l=LENGTH, seed=16)
    with pytest.raises(ValueError, match="batch b=2, expected 1"):
        mamba3_scan(inputs, weights, cu_seqlens=torch.tensor([0, 30]))
    one_row = type(inputs)(*(t[:1] for t in inputs))
    per_row = Mamba3State(*(t[:1] for t in make_state(2, 4, 8, 1, 16, 4)))
    with pytest.raises(ValueError, match=r"initial_state.h has shape \(1, 4, 8, 16\), expected \(2, 4, 8, 16\)"):
        mamba3_scan(one_row, weights, cu_seqlens=torch.tensor([0, 10, 30]), initial_state=per_row)
