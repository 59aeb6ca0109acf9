"""The angle gradients of `chunk_grad.terms_backward` in float32 over a long packed sequence, against a
float64 sum of their definition.

∂incr_j sums ∂θ_i over the tokens i ≥ j of j's document (plus ∂θ_final in the last one). Taken as the
difference of two float32 running sums over the whole sequence, it errs by the rounding of the running
sum (~1e7 here), far above the 1e-5 tolerance for a short document late in the sequence; the chunked
form's float32 sums never span more than a chunk. Tolerance: fp32, 1e-5 relative to the scale of the
result in each document: the largest there of the same sums taken over the terms' magnitudes (each
document's gradients are their own; one scale for the whole sequence would let the long first
document's hide the short ones' errors, and the signed result may cancel below its terms). The initial
θ's gradient is not such a sum (`terms_backward` takes it from the boundary states; the oracle test of
`chunked_backward` checks it).
"""

import math

import torch
from torch import Tensor

from megatron_mamba3.ops.interface import Mamba3State
from megatron_mamba3.ops.segments import document_starts
from megatron_mamba3.ops.tilelang.chunk_grad import BoundaryStates, TermGrads, piece_grads, terms_backward
from megatron_mamba3.ops.tilelang.chunk_math import chunk_count, chunk_terms
from tests.helpers import make_case, make_state

CHUNK = 64
LENGTH = 16_421  # 256 full chunks and 37 tokens
OFFSET = 1000.0  # common to every ∂θ: the running sum reaches ~OFFSET · LENGTH


def _segment_ids(generator: torch.Generator) -> Tensor:
    """Row 0: a long document over many chunk boundaries, one ending at a chunk boundary, one over two
    boundaries, one inside a chunk, then 3 to 40-token documents and a last one running into the padding;
    row 1: one document (θ_0 reaches θ_final)."""
    lengths = [5000, 56, 130, 20]  # the 20-token document starts 2 tokens into chunk 81
    while sum(lengths) < LENGTH - 100:
        lengths.append(int(torch.randint(3, 41, (), generator=generator)))
    lengths.append(LENGTH - sum(lengths))
    packed = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return torch.stack((packed, torch.zeros(LENGTH, dtype=torch.int64)))


def _document_suffix_sums(theta_grad: Tensor, final_grad: Tensor, segment_ids: Tensor) -> Tensor:
    """float64 (b, l, H, S): per token j, Σ of theta_grad (b, l_pad, H, S) over the tokens i ≥ j of j's
    document, plus final_grad (b, H, S) in the last one; the padding belongs to the last document."""
    b, length = segment_ids.shape
    out = torch.zeros(theta_grad.shape, dtype=torch.float64)
    for row in range(b):
        counts = torch.unique_consecutive(segment_ids[row], return_counts=True)[1].tolist()
        counts[-1] += theta_grad.shape[1] - length
        for start, count in zip(torch.tensor([0, *counts[:-1]]).cumsum(0).tolist(), counts):
            out[row, start : start + count] = theta_grad[row, start : start + count].double().flip(0).cumsum(0).flip(0)
        out[row, -counts[-1] :] += final_grad[row].double()
    return out[:, :length]


def _per_document_error(found: Tensor, expected: Tensor, scale: Tensor, segment_ids: Tensor) -> float:
    """Largest over documents of max |found − expected| / max scale there; tensors (b, l, ...)."""
    rows = torch.arange(segment_ids.shape[0])[:, None]
    documents = torch.unique(segment_ids + (segment_ids.max() + 1) * rows, return_inverse=True)[1].flatten()
    per_document = lambda t: torch.zeros(int(documents.max()) + 1, dtype=torch.float64).scatter_reduce(  # noqa: E731
        0, documents, t.flatten(2).amax(dim=2).flatten(), "amax"
    )
    return (per_document((found.double() - expected).abs()) / per_document(scale)).max().item()


def test_angle_gradients_keep_float32_precision_over_a_long_packed_sequence():
    b, H, p, n, S = 2, 2, 2, 8, 2
    inputs, weights = make_case(b=b, l=LENGTH, H=H, p=p, R=1, G=1, n=n, S=S, seed=3, dtype=torch.float32)
    state = make_state(b, H, p, 1, n, S).to(torch.float32)
    generator = torch.Generator().manual_seed(4)
    segment_ids = _segment_ids(generator)
    nc = chunk_count(LENGTH, CHUNK)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    zeros = lambda *shape: torch.zeros(*shape)  # noqa: E731
    theta_grad = OFFSET * (1 + 0.1 * randn(b, nc * CHUNK, H, S))
    final_grad = OFFSET * randn(b, H, S)
    # Only θ has an upstream gradient, and the final key none: ∂θ_final is final_grad itself, and ∂Δ is
    # the θ term alone.
    grads = TermGrads(
        zeros(b, nc * CHUNK, H), zeros(b, nc * CHUNK, H), zeros(b, nc * CHUNK, H), zeros(b, nc, H), theta_grad,
        zeros(b, H, p, n), Mamba3State(zeros(b, H, p, n), zeros(b, 1, H, n), zeros(b, H, p), final_grad),
    )

    starts = document_starts(segment_ids)
    terms = chunk_terms(inputs, weights, starts, state, CHUNK)
    boundary = BoundaryStates(terms.h_in, zeros(b, H, p, n))
    found = terms_backward(inputs, weights, starts, state, terms, piece_grads(inputs, terms, grads), boundary)

    # The definitions in float64, and the same over the terms' magnitudes (dt > 0, tanh' > 0).
    dincr = _document_suffix_sums(theta_grad, final_grad, segment_ids)  # (b, l, H, S)
    magnitude = _document_suffix_sums(theta_grad.abs(), final_grad.abs(), segment_ids)
    turn, dt_pi = torch.tanh(inputs.angles.double()), math.pi * inputs.dt.double()
    dangles, dangles_scale = ((1 - turn**2) * torch.einsum("blhs,blh->bls", t, dt_pi) for t in (dincr, magnitude))
    ddt = math.pi * torch.einsum("blhs,bls->blh", dincr, turn)
    ddt_scale = math.pi * torch.einsum("blhs,bls->blh", magnitude, turn.abs())
    assert found.angles.dtype == found.dt.dtype == torch.float32
    assert _per_document_error(found.angles, dangles, dangles_scale, segment_ids) < 1e-5
    assert _per_document_error(found.dt, ddt, ddt_scale, segment_ids) < 1e-5
