"""Decode: token by token from a state equals the parallel forward (float64, 1e-10 relative, angles
modulo 2π; fp32 1e-5). Split runs on every backend are the conformance suite's (tests/conformance)."""

import pytest
import torch

from megatron_mamba3.ops import mamba3_decode
from megatron_mamba3.ops.oracle import mamba3_step
from megatron_mamba3.ops.reference import mamba3_chunked
from tests.helpers import assert_states_close, make_case, make_state, rel_err

LENGTH, CHUNK, TOL = 29, 8, 1e-10


@pytest.mark.parametrize("R,norm", [(1, False), (1, True), (4, True)])
def test_decode_token_by_token_equals_chunked_forward(R, norm):
    inputs, weights = make_case(b=2, l=LENGTH, H=4, p=8, R=R, G=2, norm=norm, seed=23)
    state = make_state(2, 4, 8, R, 16, 4)
    parallel, parallel_state = mamba3_chunked(inputs, weights, initial_state=state, chunk_size=CHUNK)
    for t in range(LENGTH):
        out, state = mamba3_step(inputs.tokens(t), weights, state)
        assert rel_err(out, parallel[:, t]) < TOL, t
    assert_states_close(state, parallel_state, TOL)


def test_prefill_then_decode_in_float32():
    inputs, weights = make_case(b=2, l=LENGTH, R=2, G=1, seed=24, dtype=torch.float32)
    parallel, _ = mamba3_chunked(inputs, weights, chunk_size=CHUNK)
    _, state = mamba3_chunked(inputs.tokens(slice(0, 20)), weights, chunk_size=CHUNK)
    assert state.h.dtype == torch.float32
    for t in range(20, LENGTH):
        out, state = mamba3_step(inputs.tokens(t), weights, state)
        assert out.dtype == torch.float32 and state.h.dtype == torch.float32
        assert rel_err(out, parallel[:, t]) < 1e-5


def test_bad_decode_state_raises():
    inputs, weights = make_case(b=2, l=5, seed=25)
    state = make_state(2, 4, 8, 1, 16, 4)
    with pytest.raises(ValueError, match=r"state.k_prev has shape \(2, 2, 4, 16\), expected \(2, 1, 4, 16\)"):
        mamba3_decode(inputs.tokens(0), weights, state._replace(k_prev=state.k_prev.repeat(1, 2, 1, 1)))
