"""The chunk-parallel PyTorch form that the TileLang kernels compute and their backward recomputes
through (`megatron_mamba3.ops.tilelang.chunk_math.chunked_parallel`), against the float64 oracle; the
closed-form scalar backward (`chunk_grad.terms_backward`) against autograd of the forward definitions.

CPU, float64, tolerance 1e-10 relative (outputs, states and gradients) and a float64 gradient check.
"""

import pytest
import torch

from megatron_mamba3.ops.interface import Mamba3Inputs, Mamba3State, Mamba3Weights, scan_dims
from megatron_mamba3.ops.oracle import mamba3_recurrent
from megatron_mamba3.ops.segments import document_starts
from megatron_mamba3.ops.tilelang.chunk_grad import (
    BoundaryStates,
    TermGrads,
    TermParts,
    chunked_backward,
    initial_state_grads,
    piece_grads,
    terms_backward,
    token_grads,
)
from megatron_mamba3.ops.tilelang.chunk_math import chunk_count, chunk_terms, chunked_parallel, final_state, token_theta
from tests.helpers import assert_states_close, make_case, make_state, rel_err


@pytest.mark.parametrize("chunk", [7])
@pytest.mark.parametrize("R,G,norm", [(1, 2, False), (2, 2, False), (4, 1, True)])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "segments+initial_state"])
def test_chunked_parallel_matches_oracle(packed, R, G, norm, chunk):
    b, l, H, p, n = 2, 50, 2, 8, 16  # noqa: E741
    inputs, weights = make_case(b=b, l=l, H=H, p=p, R=R, G=G, n=n, norm=norm, seed=R + chunk)
    dims = scan_dims(inputs, weights)
    if packed:
        segment_ids = torch.tensor([[0] * 9 + [1] * 20 + [2] * (l - 29), [0] * (l - 3) + [5] * 3])
        state = make_state(b, H, p, R, n, dims.S)
        options = dict(segment_ids=segment_ids, initial_state=state)
    else:
        segment_ids = torch.zeros(b, l, dtype=torch.int64)
        state, options = Mamba3State.zeros(b, dims, torch.float64, inputs.x.device), {}
    out_ref, state_ref = mamba3_recurrent(inputs, weights, **options)
    out, final = chunked_parallel(inputs, weights, document_starts(segment_ids), state, chunk)
    assert rel_err(out, out_ref) < 1e-10
    assert_states_close(final, state_ref, 1e-10)


def test_chunked_parallel_gradcheck():
    inputs, weights = make_case(b=2, l=6, H=2, p=3, R=2, G=1, n=8, S=2, norm=True, seed=5)
    state = make_state(2, 2, 3, 2, 8, 2)
    starts = document_starts(torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 2]]))
    leaves = tuple(t.clone().requires_grad_() for t in (*inputs, *[w for w in weights if w is not None], *state))

    def scan(*leaves):
        rebuilt_inputs = type(inputs)(*leaves[:8])
        rebuilt_weights = weights._replace(
            B_bias=leaves[8], C_bias=leaves[9], D=leaves[10], mimo_x=leaves[11], mimo_z=leaves[12],
            mimo_o=leaves[13], norm=leaves[14],
        )
        out, final = chunked_parallel(rebuilt_inputs, rebuilt_weights, starts, Mamba3State(*leaves[15:]), 4)
        return (out, *final)

    assert torch.autograd.gradcheck(scan, leaves, eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("R,G,norm", [(1, 2, False), (2, 2, True), (4, 1, True)])
def test_chunked_backward_matches_oracle_gradients(R, G, norm):
    """The backward kernels' decomposition (`chunked_backward`, float64) against autograd through the
    float64 recurrence, for every input, weight and initial-state gradient, with packed documents, an
    initial state and a length that is not a multiple of the chunk."""
    b, l, H, p, n, chunk = 2, 23, 4, 6, 8, 4  # noqa: E741
    inputs, weights = make_case(b=b, l=l, H=H, p=p, R=R, G=G, n=n, S=2, norm=norm, seed=R)
    state = make_state(b, H, p, R, n, 2)
    segment_ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * (l - 14), [3] * (l - 3) + [4] * 3])
    present = [t for t in (*inputs, *weights, *state) if t is not None]
    leaves = [t.clone().requires_grad_() for t in present]
    rest = iter(leaves[8:])
    leaf_weights = Mamba3Weights(*(None if t is None else next(rest) for t in weights))
    out, final = mamba3_recurrent(
        Mamba3Inputs(*leaves[:8]), leaf_weights, segment_ids=segment_ids, initial_state=Mamba3State(*rest)
    )
    generator = torch.Generator().manual_seed(9)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grad_final = Mamba3State(*(torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in final))
    torch.autograd.backward((out, *final), (grad_out, *grad_final))

    found = chunked_backward(inputs, weights, document_starts(segment_ids), state, chunk, grad_out, grad_final)
    mine = [g for part in found for g in part if g is not None]
    assert len(mine) == len(leaves)
    for index, (grad, leaf) in enumerate(zip(mine, leaves)):
        assert rel_err(grad, leaf.grad) < 1e-10, index


def _autograd_terms_backward(inputs, weights, starts, state, chunk, grads):
    """What `terms_backward` computes, by autograd through `chunk_terms`, `token_theta` and `final_state`
    (float64): gradients of Δ, A, trap, angles, the initial state, the last token's B and x, B_bias, mimo_x."""
    present = (*inputs[4:], *state, inputs.B[:, -1:], inputs.x[:, -1:], weights.B_bias)
    leaves = [t.clone().requires_grad_() for t in present]
    if weights.mimo_x is not None:
        leaves.append(weights.mimo_x.clone().requires_grad_())
    scalars = inputs._replace(dt=leaves[0], A=leaves[1], trap=leaves[2], angles=leaves[3])
    leaf_weights = weights._replace(B_bias=leaves[10], mimo_x=leaves[11] if len(leaves) > 11 else None)
    terms = chunk_terms(scalars, leaf_weights, starts, Mamba3State(*leaves[4:8]), chunk)
    theta = token_theta(scalars, terms, chunk).flatten(1, 2)
    final = final_state(scalars._replace(B=leaves[8], x=leaves[9]), leaf_weights, terms.theta_final, grads.final.h)
    outputs = (terms.cs, terms.wd, terms.wo, terms.mult, theta, terms.h_in, *final[1:])
    found = torch.autograd.grad(outputs, leaves, (*grads[:6], *grads.final[1:]))
    return found[:8], found[8][:, 0], found[9][:, 0], found[10:]


@pytest.mark.parametrize("R,G", [(1, 2), (4, 1)], ids=["siso", "mimo"])
def test_terms_backward_matches_autograd(R, G):
    """The closed-form gradients of the per-token scalars, θ, h̃_0 and the final state's (k, v, θ) against
    autograd of their forward definitions, float64, for random upstream gradients: documents starting
    mid-chunk, at a chunk boundary and twice in one chunk, an initial state, and a length that is not a
    multiple of the chunk (row 1 is one document continuing the initial state to the end)."""
    b, l, H, p, n, chunk = 2, 29, 4, 3, 8, 6  # noqa: E741
    inputs, weights = make_case(b=b, l=l, H=H, p=p, R=R, G=G, n=n, S=2, seed=11 + R)
    state = make_state(b, H, p, R, n, 2)
    segment_ids = torch.tensor([[0] * 4 + [1] * 8 + [2] * 7 + [3] * 3 + [4] * (l - 22), [7] * l])
    starts = document_starts(segment_ids)
    l_pad, nc = chunk_count(l, chunk) * chunk, chunk_count(l, chunk)
    generator = torch.Generator().manual_seed(R)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    grads = TermGrads(
        randn(b, l_pad, H), randn(b, l_pad, H), randn(b, l_pad, H), randn(b, nc, H), randn(b, l_pad, H, 2),
        randn(b, H, p, n), Mamba3State(randn(b, H, p, n), randn(b, R, H, n), randn(b, H, p), randn(b, H, 2)),
    )

    terms = chunk_terms(inputs, weights, starts, state, chunk)
    boundary = BoundaryStates(terms.h_in, randn(b, H, p, n))
    found = terms_backward(inputs, weights, starts, state, terms, piece_grads(inputs, terms, grads), boundary)
    state_grads, B_last, x_last, weight_grads = _autograd_terms_backward(inputs, weights, starts, state, chunk, grads)
    expected = [*state_grads[:4], *state_grads[4:], B_last, x_last, *weight_grads]
    mine = [*found[:4], *found.state, found.B_last, found.x_last, found.B_bias]
    mine += [] if found.mimo_x is None else [found.mimo_x]
    names = ["dt", "A", "trap", "angles", *Mamba3State._fields, "B_last", "x_last", "B_bias", "mimo_x"][: len(expected)]
    assert len(mine) == len(expected)
    # ∂θ_0 (rotation invariance) holds for the gradients of one loss, not for random ones: it is checked
    # against the oracle in test_chunked_backward_matches_oracle_gradients
    for name, grad, reference in zip(names, mine, expected):
        if name != "theta":
            assert rel_err(grad, reference) < 1e-10, name


@pytest.mark.parametrize("final_theta", [False, True], ids=["no-final-theta", "final-theta"])
@pytest.mark.parametrize("R,G", [(1, 2), (4, 1)], ids=["siso", "mimo"])
def test_terms_backward_without_starts_is_one_document_a_row(R, G, final_theta):
    """starts=None (each row one document: the kernels' layout without segment ids) gives the very bits of
    an all-False starts tensor: θ's carry takes every chunk's document to the row's end and ∂θ_0 the final
    state's terms, without searching the layout. float64, random upstream gradients, a padded last chunk."""
    b, l, H, p, n, chunk = 2, 29, 4, 3, 8, 6  # noqa: E741
    inputs, weights = make_case(b=b, l=l, H=H, p=p, R=R, G=G, n=n, S=2, seed=5 + R)
    state = make_state(b, H, p, R, n, 2)
    no_starts = torch.zeros(b, l, dtype=torch.bool)
    l_pad, nc = chunk_count(l, chunk) * chunk, chunk_count(l, chunk)
    generator = torch.Generator().manual_seed(R)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    final = Mamba3State(randn(b, H, p, n), randn(b, R, H, n), randn(b, H, p), randn(b, H, 2) if final_theta else None)
    grads = TermGrads(
        randn(b, l_pad, H), randn(b, l_pad, H), randn(b, l_pad, H), randn(b, nc, H), randn(b, l_pad, H, 2),
        randn(b, H, p, n), final,
    )
    terms = chunk_terms(inputs, weights, no_starts, state, chunk)
    boundary = BoundaryStates(terms.h_in, randn(b, H, p, n))
    pieces = piece_grads(inputs, terms, grads)
    # the PyTorch per-token part reads the starts (the kernels' reads seg): it gets the all-False ones either way
    parts = TermParts(initial_state_grads, lambda inputs, starts, *rest: token_grads(inputs, no_starts, *rest))
    expected = terms_backward(inputs, weights, no_starts, state, terms, pieces, boundary, parts)
    found = terms_backward(inputs, weights, None, state, terms, pieces, boundary, parts)
    for name, got, want in zip(expected._fields, found, expected):
        for part, (g, w) in enumerate(zip(got, want) if isinstance(want, tuple) else [(got, want)]):
            assert (g is None and w is None) or torch.equal(g, w), (name, part)


@pytest.mark.parametrize("R, G", [(1, 2), (4, 1)], ids=["siso", "mimo"])
def test_gradients_of_one_document_are_exactly_zero_in_the_others(R, G):
    """`chunked_backward` (the kernels' decomposition, float32 as the kernels run it) with an output
    gradient on one document only, in a chunk it shares with two others: every per-token gradient is
    exactly 0 outside that document (the decay cumsum restarts at document starts, so the other
    documents' terms never enter as a rounding-sized difference)."""
    b, l, H, p, n, chunk = 1, 24, 2, 4, 8, 8  # noqa: E741
    inputs, weights = make_case(b=b, l=l, H=H, p=p, R=R, G=G, n=n, S=2, seed=5, dtype=torch.float32)
    state = make_state(b, H, p, R, n, 2).to(torch.float32)
    segment_ids = torch.tensor([[0] * 10 + [1] * 4 + [2] * 10])  # document 1: tokens 10-13, inside chunk 1
    inside = segment_ids == 1
    grad_out = torch.randn(b, l, H, p, generator=torch.Generator().manual_seed(2)) * inside[..., None, None]
    grad_final = Mamba3State(*(torch.zeros_like(t) for t in state))
    grads, _, _ = chunked_backward(inputs, weights, document_starts(segment_ids), state, chunk, grad_out, grad_final)
    for name, grad in grads._asdict().items():
        assert not grad[~inside].any(), name
        assert grad[inside].any(), name
