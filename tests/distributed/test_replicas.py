"""`parallel.make_replicas_identical` runs its collectives on the device the process group's
backend needs (NCCL: CUDA, even for a CPU-initialised weight; gloo: where the tensor is).

The NCCL side (a CPU-initialised mixer under NCCL, 2 ranks) runs in tests/multigpu/tp_parity.py on
a machine with 2 GPUs; here: the device choice for every backend configuration torch reports, and
the whole broadcast-then-gradient-sum on 2 gloo processes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mamba3.parallel import backend_device_type, make_replicas_identical
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(
    "tensor_device, backend_config, expected",
    [
        ("cpu", "cuda:nccl", "cuda"),  # a CPU-initialised weight under NCCL goes to the GPU for the collective
        ("cuda", "cuda:nccl", "cuda"),
        ("cpu", "nccl", "cuda"),  # a bare backend name: torch's capability table
        ("cpu", "cpu:gloo,cuda:gloo", "cpu"),
        ("cuda", "cpu:gloo,cuda:gloo", "cuda"),
        ("cpu", "gloo", "cpu"),
        ("cpu", "cpu:gloo,cuda:nccl", "cpu"),
        ("cuda", "cpu:gloo,cuda:nccl", "cuda"),
        ("xla", "cpu:gloo", "cpu"),
    ],
)
def test_backend_device_type(tensor_device, backend_config, expected):
    assert backend_device_type(tensor_device, backend_config) == expected


def test_backend_device_type_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="backend 'fancy': unknown device types"):
        backend_device_type("cpu", "fancy")
    with pytest.raises(ValueError, match=r"serves \['xpu'\], neither CUDA nor the CPU"):
        backend_device_type("cpu", "xpu:xccl")


def _replicas(rank: int) -> dict:
    group = parallel_state.get_tensor_model_parallel_group()
    param = torch.nn.Parameter(torch.full((3, 2), float(rank + 1)))
    make_replicas_identical(param, group)
    after_broadcast = param.detach().clone()
    (param * (rank + 1)).sum().backward()  # this rank's gradient: rank + 1 everywhere
    return {"backend": dist.get_backend_config(group), "param": after_broadcast, "grad": param.grad, "device": param.device}


def test_broadcast_and_gradient_sum_on_gloo():
    ranks = run_ranks(_replicas, 2)
    for result in ranks:
        assert "cpu:gloo" in result["backend"] and result["device"].type == "cpu"
        assert torch.equal(result["param"], torch.ones(3, 2))  # rank 0's values
        assert torch.equal(result["grad"], torch.full((3, 2), 3.0))  # 1 + 2
