"""Tensor parallelism for one Mamba-3 mixer (docs/parallelism.md): the in_proj layout per TP rank, the gradient
sync of replicated weights, and the checkpoint layout that lets any TP size load any other.

in_proj's pieces in the official order: z, x (heads), B, C (groups), dd_dt, dd_A, trap (heads),
angles (all S). At tp = 1 in_proj's rows are exactly that order. At tp > 1 a rank holds first the
pieces split across ranks (z, x, B and C when g % tp == 0, dd_dt, dd_A, trap: this rank's part), in
that order, then the replicated pieces (B and C when tp % g == 0, angles), which live in a parameter
of their own, `in_proj.replicated_weight` (`detach_replicated_rows`): Megatron counts a parameter
without TP attributes once in the clipped gradient norm, as it does for every TP-duplicated
parameter. In checkpoints each piece is its own tensor with a global shape that does not depend on
tp: z, x (d_inner, d); B, C (R, g, n, d); dd_dt, dd_A, trap (H, d); angles (S, d).
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron_mamba3.config import Mamba3Config

# Per-head parameters and the axis that holds the heads; everything else but in_proj is replicated.
HEAD_AXES = {
    "dt_bias": 0, "D": 0, "B_bias": 0, "C_bias": 0, "mimo_x": 0, "mimo_z": 0, "mimo_o": 0,
    "norm.weight": 0, "out_proj.weight": 1,
}
REPLICATED = ("B_norm.weight", "C_norm.weight")
# in_proj's replicated rows at tp > 1 (see the module docstring).
REPLICATED_IN_PROJ = "in_proj.replicated_weight"
_TP_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")


@dataclasses.dataclass(frozen=True)
class Piece:
    """One block of in_proj rows: `name`, its checkpoint shape without d_model (`global_shape`) and
    the axis of that shape split across TP ranks (`shard_axis`, None when replicated)."""

    name: str
    global_shape: tuple[int, ...]
    shard_axis: int | None

    def local_shape(self, tp_size: int) -> tuple[int, ...]:
        if self.shard_axis is None:
            return self.global_shape
        shape = list(self.global_shape)
        shape[self.shard_axis] //= tp_size
        return tuple(shape)


@dataclasses.dataclass(frozen=True)
class InProjLayout:
    """Where each piece of in_proj lives on TP rank `tp_rank` of `tp_size`.

    Raises `ValueError` at construction when tp does not divide H, or when B/C groups can be
    neither split (g % tp == 0) nor replicated with every rank's heads inside one group (tp % g == 0).
    """

    config: Mamba3Config
    tp_size: int
    tp_rank: int

    def __post_init__(self) -> None:
        self.config.heads_per_rank(self.tp_size)
        g = self.config.ngroups
        if g % self.tp_size and self.tp_size % g:
            raise ValueError(
                f"ngroups={g} with tensor parallel size {self.tp_size}: B/C groups are split across "
                f"ranks when g % tp == 0 and replicated when tp % g == 0; neither holds"
            )
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank={self.tp_rank} is outside the tensor parallel group of size {self.tp_size}")

    @property
    def groups_sharded(self) -> bool:
        return self.config.ngroups % self.tp_size == 0

    @property
    def heads(self) -> int:
        return self.config.nheads // self.tp_size

    @cached_property
    def pieces(self) -> tuple[Piece, ...]:
        c = self.config
        bc_axis = 1 if self.groups_sharded else None
        return (
            Piece("z", (c.d_inner,), 0),
            Piece("x", (c.d_inner,), 0),
            Piece("B", (c.mimo_rank, c.ngroups, c.d_state), bc_axis),
            Piece("C", (c.mimo_rank, c.ngroups, c.d_state), bc_axis),
            Piece("dd_dt", (c.nheads,), 0),
            Piece("dd_A", (c.nheads,), 0),
            Piece("trap", (c.nheads,), 0),
            Piece("angles", (c.num_rope_angles,), None),
        )

    def is_replicated(self, piece: Piece) -> bool:
        """Whether every rank holds all of `piece` (never at tp = 1)."""
        return piece.shard_axis is None and self.tp_size > 1

    @cached_property
    def local_pieces(self) -> tuple[Piece, ...]:
        """The pieces in this rank's row order: those split across ranks, then the replicated ones."""
        return tuple(sorted(self.pieces, key=self.is_replicated))

    @cached_property
    def local_sizes(self) -> tuple[int, ...]:
        """Rows of each piece on this rank, in `local_pieces` order."""
        return tuple(math.prod(piece.local_shape(self.tp_size)) for piece in self.local_pieces)

    @property
    def width(self) -> int:
        """Rows of in_proj on this rank."""
        return sum(self.local_sizes)

    @property
    def replicated_width(self) -> int:
        """Rows of the replicated pieces, the last rows of this rank's in_proj (0 at tp = 1)."""
        return sum(size for piece, size in zip(self.local_pieces, self.local_sizes) if self.is_replicated(piece))

    @cached_property
    def used_groups(self) -> slice:
        """The local B/C groups this rank's heads read: all local ones when split, else the one group."""
        if self.groups_sharded:
            return slice(None)
        group = self.tp_rank * self.heads // (self.config.nheads // self.config.ngroups)
        return slice(group, group + 1)

    def split(self, projected: Tensor) -> tuple[Tensor, ...]:
        """(..., width) in_proj output -> z, x (..., H_tp, p); B, C (..., R, g_used, n);
        dd_dt, dd_A, trap (..., H_tp); angles (..., S)."""
        c, lead = self.config, projected.shape[:-1]
        by_name = dict(zip((piece.name for piece in self.local_pieces), torch.split(projected, self.local_sizes, dim=-1)))
        z, x, B, C, dd_dt, dd_A, trap, angles = (by_name[piece.name] for piece in self.pieces)
        groups = (*lead, c.mimo_rank, -1, c.d_state)
        B, C = (t.reshape(groups)[..., self.used_groups, :] for t in (B, C))
        heads = (*lead, self.heads, c.headdim)
        return z.reshape(heads), x.reshape(heads), B, C, dd_dt, dd_A, trap, angles

    def shard(self, weight: Tensor) -> Tensor:
        """The full in_proj weight (d_in_proj, d) in the official row order -> this rank's rows
        (`width`, d) in `local_pieces` order."""
        blocks = dict(zip((piece.name for piece in self.pieces), torch.split(weight, self.config.in_proj_sizes, dim=0)))
        local = [
            _narrow(blocks[piece.name].reshape(*piece.global_shape, -1), piece, self.tp_size, self.tp_rank)
            .reshape(-1, weight.shape[1])
            for piece in self.local_pieces
        ]
        return torch.cat(local, dim=0)


def _narrow(tensor: Tensor, piece: Piece, tp_size: int, tp_rank: int) -> Tensor:
    if piece.shard_axis is None:
        return tensor
    size = piece.global_shape[piece.shard_axis] // tp_size
    return tensor.narrow(piece.shard_axis, tp_rank * size, size)


def unshard_in_proj(local_weights: Sequence[Tensor], config: Mamba3Config) -> Tensor:
    """Every rank's in_proj rows (rank order; all `width` rows, the replicated ones included) ->
    the full weight in the official row order. Replicated pieces are taken from rank 0."""
    tp = len(local_weights)
    layouts = [InProjLayout(config, tp, rank) for rank in range(tp)]
    split = [
        dict(zip((piece.name for piece in layout.local_pieces), torch.split(w, layout.local_sizes, dim=0)))
        for w, layout in zip(local_weights, layouts)
    ]
    d = local_weights[0].shape[1]
    full = []
    for piece in layouts[0].pieces:
        if piece.shard_axis is None:
            full.append(split[0][piece.name])
            continue
        blocks = [rows[piece.name].reshape(*piece.local_shape(tp), d) for rows in split]
        full.append(torch.cat(blocks, dim=piece.shard_axis).reshape(-1, d))
    return torch.cat(full, dim=0)


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
            full[name] = unshard_in_proj(parts, config)
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
