"""Tensor parallelism for one Mamba-3 mixer (SPEC 5): the in_proj layout per TP rank, the gradient
sync of replicated weights, and the checkpoint layout that lets any TP size load any other.

in_proj's rows on one rank, in order: z, x (this rank's heads), B, C (this rank's groups when
g % tp == 0, else all g groups), dd_dt, dd_A, trap (this rank's heads), angles (all S). At tp = 1
this is exactly the official row order. In checkpoints each piece is its own tensor with a global
shape that does not depend on tp: z, x (d_inner, d); B, C (R, g, n, d); dd_dt, dd_A, trap (H, d);
angles (S, d).
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_mamba3.config import Mamba3Config

# Per-head parameters and the axis that holds the heads; everything else but in_proj is replicated.
HEAD_AXES = {
    "dt_bias": 0, "D": 0, "B_bias": 0, "C_bias": 0, "mimo_x": 0, "mimo_z": 0, "mimo_o": 0,
    "norm.weight": 0, "out_proj.weight": 1,
}
REPLICATED = ("B_norm.weight", "C_norm.weight")


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

    @cached_property
    def local_sizes(self) -> tuple[int, ...]:
        """Rows of each piece on this rank, in order."""
        return tuple(math.prod(piece.local_shape(self.tp_size)) for piece in self.pieces)

    @property
    def width(self) -> int:
        """Rows of in_proj on this rank."""
        return sum(self.local_sizes)

    @cached_property
    def replicated_rows(self) -> tuple[slice, ...]:
        """The local in_proj rows whose weights are copies on every rank (angles; B, C unless split)."""
        starts = [0, *torch.tensor(self.local_sizes).cumsum(0).tolist()]
        return tuple(
            slice(start, stop)
            for piece, start, stop in zip(self.pieces, starts, starts[1:])
            if piece.shard_axis is None and self.tp_size > 1
        )

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
        z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(projected, self.local_sizes, dim=-1)
        groups = (*lead, c.mimo_rank, -1, c.d_state)
        B, C = (t.reshape(groups)[..., self.used_groups, :] for t in (B, C))
        heads = (*lead, self.heads, c.headdim)
        return z.reshape(heads), x.reshape(heads), B, C, dd_dt, dd_A, trap, angles

    def shard(self, weight: Tensor) -> Tensor:
        """The full in_proj weight (d_in_proj, d) in the official row order -> this rank's rows."""
        blocks = torch.split(weight, self.config.in_proj_sizes, dim=0)
        local = [
            _narrow(block.reshape(*piece.global_shape, -1), piece, self.tp_size, self.tp_rank).reshape(-1, weight.shape[1])
            for piece, block in zip(self.pieces, blocks)
        ]
        return torch.cat(local, dim=0)


def _narrow(tensor: Tensor, piece: Piece, tp_size: int, tp_rank: int) -> Tensor:
    if piece.shard_axis is None:
        return tensor
    size = piece.global_shape[piece.shard_axis] // tp_size
    return tensor.narrow(piece.shard_axis, tp_rank * size, size)


def unshard_in_proj(local_weights: Sequence[Tensor], config: Mamba3Config) -> Tensor:
    """Every rank's in_proj rows (rank order) -> the full weight in the official row order.
    Replicated pieces are taken from rank 0."""
    layouts = [InProjLayout(config, len(local_weights), rank) for rank in range(len(local_weights))]
    split = [torch.split(w, layout.local_sizes, dim=0) for w, layout in zip(local_weights, layouts)]
    d = local_weights[0].shape[1]
    full = []
    for index, piece in enumerate(layouts[0].pieces):
        if piece.shard_axis is None:
            full.append(split[0][index])
            continue
        blocks = [rows[index].reshape(*piece.local_shape(len(local_weights)), d) for rows in split]
        full.append(torch.cat(blocks, dim=piece.shard_axis).reshape(-1, d))
    return torch.cat(full, dim=0)


def shard_mixer_state(full: Mapping[str, Tensor], config: Mamba3Config, tp_size: int, tp_rank: int) -> dict[str, Tensor]:
    """A full (tp = 1, official names) mixer state dict -> the state dict of TP rank `tp_rank`."""
    local = {}
    for name, tensor in full.items():
        if name == "in_proj.weight":
            local[name] = InProjLayout(config, tp_size, tp_rank).shard(tensor)
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
        if name == "in_proj.weight":
            full[name] = unshard_in_proj(parts, config)
        elif name in HEAD_AXES:
            full[name] = torch.cat(parts, dim=HEAD_AXES[name])
        else:
            full[name] = parts[0]
    return full


def _on_rows(tensor: Tensor, rows: tuple[slice, ...] | None, collective) -> None:
    """Run the in-place `collective` once over `tensor`'s `rows` (all of it when None), packed into
    one contiguous buffer, and write the result back."""
    if rows is None:
        collective(tensor)
        return
    merged = torch.cat([tensor[r] for r in rows], dim=0)
    collective(merged)
    for r, block in zip(rows, torch.split(merged, [r.stop - r.start for r in rows], dim=0)):
        tensor[r] = block


def make_replicas_identical(param: Tensor, group: dist.ProcessGroup, rows: tuple[slice, ...] | None = None) -> None:
    """Give `param` (or its `rows`) the values of the group's first rank, and from then on sum its
    gradient over `group` before it is accumulated (SPEC 5), so the copies stay identical.

    Each rank's own gradient covers only the heads it computes; the sum is the full gradient. The
    hook runs on every backward, before accumulation, so gradient accumulation and Megatron's
    DDP buffers see the summed value once.
    """
    first = dist.get_global_rank(group, 0)
    with torch.no_grad():
        _on_rows(param, rows, lambda t: dist.broadcast(t, src=first, group=group))

    def hook(grad: Tensor) -> Tensor:
        grad = grad.clone()
        _on_rows(grad, rows, lambda t: dist.all_reduce(t, group=group))
        return grad

    param.register_hook(hook)
