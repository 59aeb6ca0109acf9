"""Initial and final states: a split run equals the whole run, and decode equals the parallel forward.
Float64, 1e-10 relative (angles compared modulo 2π)."""

import pytest
import torch

from megatron_mamba3.ops import mamba3_decode, mamba3_scan
from megatron_mamba3.ops.oracle import mamba3_recurrent, mamba3_step
from megatron_mamba3.ops.reference import mamba3_chunked
from tests.helpers import assert_states_close, make_case, make_state, rel_err

LENGTH, CHUNK, TOL = 29, 8, 1e-10


@pytest.mark.parametrize("R,G,n", [(1, 2, 16), (2, 1, 16), (4, 2, 32)])
def test_split_at_every_position_equals_one_run(R, G, n):
    inputs, weights = make_case(b=2, l=LENGTH, H=4, p=8, R=R, G=G, n=n, norm=R == 4, seed=21)
    initial = make_state(2, 4, 8, R, n, n // 4)
    whole, whole_state = mamba3_chunked(inputs, weights, initial_state=initial, chunk_size=CHUNK)
    for t in range(LENGTH + 1):  # includes empty halves and every chunk-unaligned split
        first, middle = mamba3_chunked(inputs.tokens(slice(0, t)), weights, initial_state=initial, chunk_size=CHUNK)
        second, final = mamba3_chunked(inputs.tokens(slice(t, LENGTH)), weights, initial_state=middle, chunk_size=CHUNK)
        assert rel_err(torch.cat((first, second), dim=1), whole) < TOL, t
        assert_states_close(final, whole_state, TOL)


@pytest.mark.parametrize("R", [1, 2])
def test_oracle_split_equals_one_run(R):
    inputs, weights = make_case(b=2, l=LENGTH, R=R, G=1, seed=22)
    whole, whole_state = mamba3_recurrent(inputs, weights)
    for t in (0, 1, 13, LENGTH):
        first, middle = mamba3_recurrent(inputs.tokens(slice(0, t)), weights)
        second, final = mamba3_recurrent(inputs.tokens(slice(t, LENGTH)), weights, initial_state=middle)
        assert rel_err(torch.cat((first, second), dim=1), whole) < TOL
        assert_states_close(final, whole_state, TOL)


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


def test_bad_state_raises():
    inputs, weights = make_case(b=2, l=5, seed=25)
    state = make_state(2, 4, 8, 1, 16, 4)
    with pytest.raises(ValueError, match=r"initial_state.theta has shape \(2, 4, 3\), expected \(2, 4, 4\)"):
        mamba3_scan(inputs, weights, initial_state=state._replace(theta=state.theta[..., :3]))
    with pytest.raises(ValueError, match=r"state.k_prev has shape \(2, 2, 4, 16\), expected \(2, 1, 4, 16\)"):
        mamba3_decode(inputs.tokens(0), weights, state._replace(k_prev=state.k_prev.repeat(1, 2, 1, 1)))
