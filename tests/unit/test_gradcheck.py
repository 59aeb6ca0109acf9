"""`torch.autograd.gradcheck` in float64 on small shapes, for every input, weight and state tensor: the
decode step and the whole layer (the scan of every float64 backend: tests/conformance/test_gradcheck.py)."""

import pytest
import torch

from megatron_mamba3 import Mamba3Config, init_layer_params
from megatron_mamba3.ops import Mamba3Inputs, Mamba3State, Mamba3Weights
from megatron_mamba3.ops.layer import mamba3_layer
from megatron_mamba3.ops.oracle import mamba3_step
from tests.helpers import make_case, make_state

B_, L_, H_, P_, N_, S_ = 2, 6, 2, 3, 8, 2


def _leaves(case, state):
    inputs, weights = case
    present = [t for t in weights if t is not None]
    return tuple(t.clone().requires_grad_() for t in (*inputs, *present, *state))


def _rebuild(leaves, weights_template):
    inputs = Mamba3Inputs(*leaves[:8])
    rest = iter(leaves[8:])
    weights = Mamba3Weights(*(None if t is None else next(rest) for t in weights_template))
    return inputs, weights, Mamba3State(*rest)


@pytest.mark.parametrize("R", [1, 2])
def test_step_gradcheck(R):
    inputs, weights = make_case(b=B_, l=1, H=H_, p=P_, R=R, G=1, n=N_, S=S_, norm=True, seed=8)
    case = (inputs.tokens(0), weights)
    state = make_state(B_, H_, P_, R, N_, S_)

    def step(*leaves):
        token, weights_, previous = _rebuild(leaves, weights)
        out, new = mamba3_step(token, weights_, previous)
        return (out, *new)

    assert torch.autograd.gradcheck(step, _leaves(case, state), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("mimo_rank,ngroups", [(1, 2), (2, 1)])
def test_layer_gradcheck_every_parameter(mimo_rank, ngroups):
    config = Mamba3Config(d_model=4, headdim=4, d_state=8, ngroups=ngroups, mimo_rank=mimo_rank,
                          is_outproj_norm=True, chunk_size=4)
    generator = torch.Generator().manual_seed(9)
    params = init_layer_params(config, generator)
    names = sorted(params)
    jitter = lambda t: t.double() + 0.2 * torch.randn(t.shape, generator=generator, dtype=torch.float64)  # noqa: E731
    leaves = [torch.randn(2, 6, config.d_in_proj, generator=generator, dtype=torch.float64)]
    leaves += [jitter(params[name]) for name in names]
    leaves = tuple(t.requires_grad_() for t in leaves)

    def layer(projected, *values):
        out, state = mamba3_layer(projected, dict(zip(names, values)), config)
        return (out, *state)

    assert torch.autograd.gradcheck(layer, leaves, eps=1e-6, atol=1e-7, rtol=1e-6)
