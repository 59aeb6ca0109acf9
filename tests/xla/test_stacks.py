"""Layer stacks on XLA against the same blocks run on CPU by the reference backend (a plain loop):
the output and the gradients of the input and of every parameter within 1e-10 relative, in float64.

float64 because a stack is a badly conditioned comparison in fp32: for three residual SISO blocks
the CPU fp32 run is itself up to 1.3e-4 (XLA CPU fp32: 5e-4) away from float64 in some parameter
gradients, so an fp32-vs-fp32 bound would measure rounding, not the stack runner.
"""

import copy

import pytest
import torch
from torch import nn

from megatron_mamba3 import Mamba3Config, clear_receipts, receipts
from megatron_mamba3.ops.xla.stacks import run_hybrid_stack, scan_identical_blocks
from tests.helpers import rel_err
from tests.xla.blocks import Mamba3Block

pytestmark = pytest.mark.xla
TOL = 1e-10
SISO = Mamba3Config(d_model=8, headdim=4, d_state=8, chunk_size=4)
MIMO = Mamba3Config(d_model=8, headdim=4, d_state=8, mimo_rank=2, chunk_size=4)


def run_stack(runner, blocks, hidden, device, sync=lambda: None):
    """Output and gradients {name: CPU tensor} of `runner(blocks, hidden)` on `device`, then `sync`."""
    blocks = [copy.deepcopy(block).to(device, torch.float64) for block in blocks]
    hidden = hidden.detach().to(device, torch.float64).requires_grad_()
    out = runner(blocks, hidden)
    out.square().sum().backward()
    results = {"out": out, "grad_hidden": hidden.grad}
    for index, block in enumerate(blocks):
        results |= {f"grad_{index}.{name}": p.grad for name, p in block.named_parameters()}
    sync()
    return {name: value.detach().cpu() for name, value in results.items()}


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert value.abs().max() > 0, name
        assert rel_err(got[name], value) < TOL, name


def test_scan_layers_over_identical_blocks_matches_a_loop(device, sync):
    blocks = [Mamba3Block(SISO, seed) for seed in range(3)]
    hidden = torch.randn(2, 8, SISO.d_model, generator=torch.Generator().manual_seed(4))
    expected = run_stack(run_hybrid_stack, blocks, hidden, torch.device("cpu"))
    clear_receipts()
    got = run_stack(scan_identical_blocks, blocks, hidden, device, sync)
    assert {r.backend for r in receipts()} == {"xla"}  # the blocks' layers ran the XLA backend
    assert_same(got, expected)


def test_hybrid_stack_runs_as_a_loop(device, sync):
    blocks = [
        Mamba3Block(SISO, seed=0),
        nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8)),  # not GELU: torch_xla's float64 GELU is off by 5e-9
        Mamba3Block(MIMO, seed=1),
    ]
    hidden = torch.randn(1, 8, SISO.d_model, generator=torch.Generator().manual_seed(5))
    expected = run_stack(run_hybrid_stack, blocks, hidden, torch.device("cpu"))
    assert_same(run_stack(run_hybrid_stack, blocks, hidden, device, sync), expected)


def test_scan_layers_refuses_blocks_that_differ():
    with pytest.raises(ValueError, match=r"block 1 \(Mamba3Block\) differs from block 0 \(Mamba3Block\)"):
        scan_identical_blocks([Mamba3Block(SISO, 0), Mamba3Block(MIMO, 0)], torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match=r"block 1 \(Linear\) differs from block 0 \(Mamba3Block\)"):
        scan_identical_blocks([Mamba3Block(SISO, 0), nn.Linear(8, 8)], torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="needs at least one block"):
        scan_identical_blocks([], torch.zeros(1, 4, 8))
