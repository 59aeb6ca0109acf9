"""Tensor parallelism for one Mamba-3 mixer (docs/parallelism.md): the gradient sync of replicated
weights and the (un)sharding of whole mixer state dicts; where in_proj's pieces live on each rank is
`in_proj.InProjLayout`.

At tp > 1 in_proj's replicated rows (B and C when tp % g == 0, the angles) live in a parameter of
their own, `in_proj.replicated_weight` (`detach_replicated_rows`): Megatron counts a parameter
without TP attributes once in the clipped gradient norm, as it does for every TP-duplicated
parameter.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron_mamba3.config import Mamba3Config
from megatron_mamba3.in_proj import InProjLayout, unshard

# Per-head parameters and the axis that holds the heads; everything else but in_proj is replicated.
HEAD_AXES = {
    "dt_bias": 0, "D": 0, "B_bias": 0, "C_bias": 0, "mimo_x": 0, "mimo_z": 0, "mimo_o": 0,
    "norm.weight": 0, "out_proj.weight": 1,
}
REPLICATED = ("B_norm.weight", "C_norm.weight")
# in_proj's replicated rows at tp > 1 (see the module docstring).
REPLICATED_IN_PROJ = "in_proj.replicated_weight"
_TP_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")


def shard_mixer_state(full: Mapping[str, Tensor], config: Mamba3Config, tp_size: int, tp_rank: int) -> dict[str, Tensor]:
    """A full (tp = 1, official names) mixer state dict -> the state dict of TP rank `tp_rank`."""
    local = {}
    for name, tensor in full.items():
        if name == "in_proj.weight":
            layout = InProjLayout(config, tp_size, tp_rank)
            rows = layout.shard(tensor)
            local[name] = rows[: layout.width - layout.replicated_width]
            if layout.replicated_width:
                local[REPLICATED_IN_PROJ] = rows[layout.width - layout.replicated_width :]
        elif name in HEAD_AXES:
            local[name] = tensor.chunk(tp_size, dim=HEAD_AXES[name])[tp_rank]
        elif name in REPLICATED:
            local[name] = tensor
        else:
            raise ValueError(f"{name!r} is not a Mamba-3 mixer parameter")
    return local


def unshard_mixer_state(locals_: Sequence[Mapping[str, Tensor]], config: Mamba3Config) -> dict[str, Tensor]:
    """Every TP rank's mixer state dict (rank order) -> the full (tp = 1) state dict; replicated
    tensors come from rank 0."""
    full = {}
    for name in locals_[0]:
        parts = [state[name] for state in locals_]
        if name == REPLICATED_IN_PROJ:
            continue
        if name == "in_proj.weight" and REPLICATED_IN_PROJ in locals_[0]:
            parts = [torch.cat([part, state[REPLICATED_IN_PROJ]]) for part, state in zip(parts, locals_)]
        if name == "in_proj.weight":
            full[name] = unshard(parts, config)
        elif name in HEAD_AXES:
            full[name] = torch.cat(parts, dim=HEAD_AXES[name])
        else:
            full[name] = parts[0]
    return full


def backend_device_type(tensor_device_type: str, backend_config: str) -> str:
    """The device type a collective on a tensor of `tensor_device_type` runs on, for a process group
    whose `dist.get_backend_config` is `backend_config` ("cuda:nccl", "cpu:gloo,cuda:gloo", or a
    bare backend name): the tensor's own when the backend serves it, else CUDA, else the CPU."""
    if ":" in backend_config:
        served = {pair.split(":")[0] for pair in backend_config.split(",")}
    elif backend_config in dist.Backend.backend_capability:
        served = set(dist.Backend.backend_capability[backend_config])
    else:
        raise ValueError(f"process group backend {backend_config!r}: unknown device types")
    for device_type in (tensor_device_type, "cuda", "cpu"):
        if device_type in served:
            return device_type
    raise ValueError(f"process group backend {backend_config!r} serves {sorted(served)}, neither CUDA nor the CPU")


def _on_backend_device(tensor: Tensor, group: dist.ProcessGroup, collective) -> None:
    """Run the in-place `collective` on `tensor` where `group`'s backend can take it: in place when it
    serves the tensor's device, else on a copy on that device (a CPU-initialised weight under NCCL
    goes to the current CUDA device), written back."""
    device_type = backend_device_type(tensor.device.type, dist.get_backend_config(group))
    if device_type == tensor.device.type:
        collective(tensor)
        return
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device(device_type)
    moved = tensor.to(device)
    collective(moved)
    tensor.copy_(moved)


def make_replicas_identical(param: Tensor, group: dist.ProcessGroup) -> None:
    """Give `param` the values of the group's first rank, and from then on sum its gradient over
    `group` before it is accumulated, so the copies stay identical. Both collectives run on
    the device `group`'s backend needs (`backend_device_type`), wherever `param` lives.

    Each rank's own gradient covers only the heads it computes; the sum is the full gradient. The
    hook runs on every backward, before accumulation, so gradient accumulation and Megatron's
    DDP buffers see the summed value once.
    """
    first = dist.get_global_rank(group, 0)
    with torch.no_grad():
        _on_backend_device(param, group, lambda t: dist.broadcast(t, src=first, group=group))

    def hook(grad: Tensor) -> Tensor:
        grad = grad.clone()
        _on_backend_device(grad, group, lambda t: dist.all_reduce(t, group=group))
        return grad

    param.register_hook(hook)


def detach_replicated_rows(linear: nn.Module, layout: InProjLayout) -> None:
    """Move the last `layout.replicated_width` rows of `linear.weight` (in_proj, built `layout.width`
    rows wide) into a parameter of their own, `linear.replicated_weight`, without TP attributes, so
    Megatron's gradient norm counts them once; `linear.weight` keeps the split rows and its TP
    attributes. `joined_weight(linear)` is the whole (width, d) weight for the forward."""
    weight = linear.weight
    if weight.shape[0] != layout.width:
        raise ValueError(f"in_proj.weight has {weight.shape[0]} rows on this rank, the layout expects {layout.width}")
    split = layout.width - layout.replicated_width
    own, replicated = (nn.Parameter(rows.clone(), requires_grad=weight.requires_grad) for rows in weight.detach().split([split, layout.replicated_width]))
    own.__dict__.update(weight.__dict__)  # Megatron's attributes: TP ones, allreduce
    replicated.__dict__.update((k, v) for k, v in weight.__dict__.items() if k not in _TP_ATTRIBUTES)
    linear.weight, linear.replicated_weight = own, replicated


def joined_weight(linear: nn.Module) -> Tensor:
    """in_proj's split rows followed by its replicated rows: this rank's (width, d) weight."""
    return torch.cat([linear.weight, linear.replicated_weight], dim=0)
