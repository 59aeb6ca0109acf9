"""Activation memory of the chunk scan: the backward recomputes each chunk (`partition.recompute_body`),
so a chunk saves only its entering carry, less than the default partition's intermediates. That the
gradients stay right is tests/conformance/test_packing.py (every input, weight and state gradient
against the float64 oracle, 1e-5), the test that caught min-cut rematerialization's wrong Δ and A gradients."""

import pytest
import torch
from functorch.compile import default_partition

from megatron_mamba3 import mamba3_scan
from megatron_mamba3.ops.xla import scan_adapter
from megatron_mamba3.ops.xla.partition import recompute_body
from tests.helpers import make_case
from megatron_mamba3.testing.xla_memory import saved_bytes_per_iteration

pytestmark = pytest.mark.xla


def saved_per_chunk(device, partition, monkeypatch) -> int:
    monkeypatch.setattr(scan_adapter, "PARTITION", partition)
    inputs, weights = make_case(b=1, l=16, H=2, p=4, R=1, G=1, n=8, seed=3, dtype=torch.float32)
    on_device = lambda t: type(t)(*(None if v is None else v.to(device).requires_grad_() for v in t))  # noqa: E731
    with saved_bytes_per_iteration() as recorded:
        mamba3_scan(on_device(inputs), on_device(weights), chunk_size=8, backend="xla")
    (saved,) = set(recorded)
    return saved


def test_recomputing_chunks_saves_only_the_entering_carry(device, monkeypatch):
    default = saved_per_chunk(device, default_partition, monkeypatch)
    recomputed = saved_per_chunk(device, recompute_body, monkeypatch)
    b, H, p, n, S, R = 1, 2, 4, 8, 2, 1
    carry = b * H * p * n + b * R * H * n + b * H * S  # h, k_prev, θ
    weights = 2 * H * R * n + H  # B_bias, C_bias, D ride along in the carry
    assert recomputed == 4 * (carry + weights)  # fp32
    assert default > 4 * recomputed, (default, recomputed)
