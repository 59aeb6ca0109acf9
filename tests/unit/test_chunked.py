"""The chunked form against the float64 sequential oracle (`mamba3_recurrent`).

Tolerances: float64 1e-10 relative; fp32 1e-5 relative; bf16 at most 2x the error of the oracle's
own output rounded to bf16 (the bf16 reference's own error), on the same bf16-valued inputs.
"""

import functools

import pytest
import torch

from megatron_mamba3.ops.oracle import mamba3_recurrent
from megatron_mamba3.ops.reference import mamba3_chunked
from tests.helpers import assert_states_close, make_case, make_state, rel_err

LENGTH = 50


def _packing(b, l, H, p, R, n, S, packed):  # noqa: E741
    if not packed:
        return {}
    segment_ids = torch.tensor([[0] * 9 + [1] * 20 + [2] * (l - 29), [0] * (l - 3) + [5] * 3])[:b]
    return dict(segment_ids=segment_ids, initial_state=make_state(b, H, p, R, n, S))


@functools.cache
def _oracle(n, p, R, packed):
    G = 2 if R == 2 else 1
    inputs, weights = make_case(b=2, l=LENGTH, H=2, p=p, R=R, G=G, n=n, seed=n + p + R, norm=R == 4)
    options = _packing(2, LENGTH, 2, p, R, n, n // 4, packed)
    return inputs, weights, options, mamba3_recurrent(inputs, weights, **options)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "segments+initial_state"])
@pytest.mark.parametrize("chunk_size", [7, 16, 64])
@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("p", [16, 64])
@pytest.mark.parametrize("n", [16, 64, 128])
def test_chunked_matches_oracle_float64(n, p, R, chunk_size, packed):
    inputs, weights, options, (out_ref, state_ref) = _oracle(n, p, R, packed)
    out, state = mamba3_chunked(inputs, weights, chunk_size=chunk_size, **options)
    assert out.dtype == torch.float64 and state.h.dtype == torch.float64
    assert rel_err(out, out_ref) < 1e-10
    assert_states_close(state, state_ref, 1e-10)


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_tiny_chunks_match_oracle(chunk_size):
    inputs, weights = make_case(R=2, G=1, norm=True)
    out_ref, state_ref = mamba3_recurrent(inputs, weights)
    out, state = mamba3_chunked(inputs, weights, chunk_size=chunk_size)
    assert rel_err(out, out_ref) < 1e-10
    assert_states_close(state, state_ref, 1e-10)


@pytest.mark.parametrize("R", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_low_precision(dtype, R):
    inputs, weights = make_case(b=2, l=200, H=4, p=32, R=R, G=2, n=64, seed=3)
    inputs, weights = inputs.to(dtype), weights.to(dtype)
    # The oracle sees the very same (rounded) values, in float64.
    out_ref, state_ref = mamba3_recurrent(inputs.to(torch.float64), weights.to(torch.float64))
    out, state = mamba3_chunked(inputs, weights, chunk_size=64 if R == 1 else 16)
    assert out.dtype == dtype and state.h.dtype == torch.float32
    if dtype == torch.float32:
        assert rel_err(out, out_ref) < 1e-5
    else:
        own_error = (out_ref.to(dtype).double() - out_ref).abs().max().item()
        assert 0 < own_error
        assert (out.double() - out_ref).abs().max().item() <= 2 * own_error
    assert_states_close(state, state_ref, 1e-5)  # the state is fp32 in both cases
