"""Layer stacks on XLA against the same blocks run on CPU by the reference backend as a plain loop:
the output and the gradients of the input and of every parameter within 1e-10 relative, in float64.

float64 because a stack is a badly conditioned comparison in fp32: for three residual SISO blocks
the CPU fp32 run is itself up to 1.3e-4 (XLA CPU fp32: 5e-4) away from float64 in some parameter
gradients, so an fp32-vs-fp32 bound would measure rounding, not the stack runner.
"""

import copy

import pytest
import torch

from megatron_mamba3 import Mamba3Config, clear_receipts, receipts
from megatron_mamba3.ops.xla.stacks import repeating_units, run_hybrid_stack, scan_units
from tests.helpers import rel_err
from megatron_mamba3.testing.blocks import Mamba3Block, MLPBlock, hybrid_blocks
from megatron_mamba3.testing.xla_memory import saved_bytes_per_iteration

pytestmark = pytest.mark.xla
TOL = 1e-10
SISO = Mamba3Config(d_model=8, headdim=4, d_state=8, chunk_size=4)
MIMO = Mamba3Config(d_model=8, headdim=4, d_state=8, mimo_rank=2, chunk_size=4)
SEGMENTS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [4, 4, 4, 4, 4, 4, 9, 9]])


def run_stack(runner, stack, hidden, device, sync=lambda: None, **runtime):
    """Output and gradients {name: CPU tensor} of `runner(stack, hidden, **runtime)` on `device`."""
    stack = [copy.deepcopy(module).to(device, torch.float64) for module in stack]
    hidden = hidden.detach().to(device, torch.float64).requires_grad_()
    out = runner(stack, hidden, **{k: v.to(device) for k, v in runtime.items()})
    out.square().sum().backward()
    results = {"out": out, "grad_hidden": hidden.grad}
    for index, module in enumerate(stack):
        results |= {f"grad_{index}.{name}": p.grad for name, p in module.named_parameters()}
    sync()
    return {name: value.detach().cpu() for name, value in results.items()}


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert value.abs().max() > 0, name
        assert rel_err(got[name], value) < TOL, name


def test_scan_over_units_of_a_hybrid_pattern_matches_a_loop(device, sync):
    """`M*M-` x 2 with packed documents: one traced unit of four blocks, scanned twice."""
    units = repeating_units(hybrid_blocks("M*M-" * 2, SISO), 4)
    hidden = torch.randn(2, 8, SISO.d_model, generator=torch.Generator().manual_seed(4))
    expected = run_stack(run_hybrid_stack, units, hidden, torch.device("cpu"), segment_ids=SEGMENTS)
    clear_receipts()
    with saved_bytes_per_iteration() as saved:
        got = run_stack(scan_units, units, hidden, device, sync, segment_ids=SEGMENTS)
    assert {r.backend for r in receipts()} == {"xla"}  # the units' Mamba-3 layers ran the XLA backend
    assert_same(got, expected)
    assert saved == [hidden.numel() * 8]  # the backward recomputes a unit from its float64 input alone


def test_scan_over_identical_blocks_matches_a_loop(device, sync):
    blocks = [Mamba3Block(MIMO, seed) for seed in range(3)]
    hidden = torch.randn(1, 8, MIMO.d_model, generator=torch.Generator().manual_seed(5))
    expected = run_stack(run_hybrid_stack, blocks, hidden, torch.device("cpu"))
    assert_same(run_stack(scan_units, blocks, hidden, device, sync), expected)


def test_scan_units_refuses_the_first_unit_that_differs():
    hidden = torch.zeros(1, 4, 8)
    units = repeating_units(hybrid_blocks("M*M-M*M-M-M*", SISO), 4)
    with pytest.raises(ValueError, match=r"unit 2 \(Unit\) differs from unit 0 \(Unit\) at module 'blocks.1': "
                                         r"MLPBlock vs AttentionBlock"):
        scan_units(units, hidden)
    other_config = Mamba3Config(d_model=8, headdim=4, d_state=8, chunk_size=8)  # same shapes, other function
    with pytest.raises(ValueError, match=r"unit 1 \(Mamba3Block\) differs .* at module '<root>': Mamba3Block with "
                                         r"Mamba3Config\(.*chunk_size=8"):
        scan_units([Mamba3Block(SISO, 0), Mamba3Block(other_config, 0)], hidden)
    with pytest.raises(ValueError, match=r"unit 1 \(MLPBlock\) differs .* at tensor 'norm.weight': shape "
                                         r"\(16,\) torch.float32 vs shape \(8,\)"):
        scan_units([MLPBlock(8, 0), MLPBlock(16, 0)], hidden)
    with pytest.raises(ValueError, match="needs at least one unit"):
        scan_units([], hidden)
    with pytest.raises(ValueError, match="unit_length=3 must be >= 1 and divide the 8 blocks"):
        repeating_units(hybrid_blocks("M*M-" * 2, SISO), 3)
