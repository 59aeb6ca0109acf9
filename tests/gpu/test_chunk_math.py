"""The chunk-parallel PyTorch form that the TileLang kernels compute and their backward recomputes
through (`megatron_mamba3.ops.tilelang.chunk_math.chunked_parallel`), against the float64 oracle.

CPU, float64, tolerance 1e-10 relative (outputs and states) and a float64 gradient check.
"""

import pytest
import torch

from megatron_mamba3.ops.interface import Mamba3State, scan_dims
from megatron_mamba3.ops.reference import mamba3_recurrent
from megatron_mamba3.ops.segments import document_starts
from megatron_mamba3.ops.tilelang.chunk_math import chunked_parallel
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
