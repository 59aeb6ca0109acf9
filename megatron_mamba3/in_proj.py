"""in_proj's output columns (its weight's rows): the one statement of their order, shapes and
tensor-parallel layout (docs/math.md §1, docs/parallelism.md "Tensor parallelism"). Torch only.

`InProjPieces` names the pieces in the official column order; everything else derives from it and
from `InProjLayout.pieces`: `Mamba3Config.in_proj_sizes` and `d_in_proj`, the split that
`ops.layer` feeds the scan (`InProjLayout.split`), the rows each TP rank holds (`InProjLayout.shard`,
`unshard`, used by `parallel.shard_mixer_state` and the converter) and the checkpoint's tensor per
piece (`checkpoint`).

At tp = 1 in_proj's rows are the official order. At tp > 1 a rank holds first the pieces split
across ranks (z, x, B and C when g % tp == 0, dd_dt, dd_A, trap: this rank's part), in that order,
then the replicated pieces (B and C when tp % g == 0, angles), which the mixer keeps in a parameter
of its own (`parallel.detach_replicated_rows`). In checkpoints each piece is its own tensor with a
global shape that does not depend on tp: `Piece.global_shape` followed by d_model.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property
from typing import TYPE_CHECKING, Generic, NamedTuple, Sequence, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from megatron_mamba3.config import Mamba3Config

T = TypeVar("T")


class InProjPieces(NamedTuple, Generic[T]):
    """in_proj's pieces in column order. As `InProjLayout.split` returns them: z, x (..., H, p);
    B, C (..., R, G, n); dd_dt, dd_A, trap (..., H); angles (..., S), where H and G are the heads of
    this TP rank and the B/C groups they read."""

    z: T
    x: T
    B: T
    C: T
    dd_dt: T
    dd_A: T
    trap: T
    angles: T


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
    """Where each piece of in_proj lives on TP rank `tp_rank` of `tp_size` (default: the whole in_proj).

    Raises `ValueError` at construction when tp does not divide H, or when B/C groups can be
    neither split (g % tp == 0) nor replicated with every rank's heads inside one group (tp % g == 0).
    """

    config: Mamba3Config
    tp_size: int = 1
    tp_rank: int = 0

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
    def pieces(self) -> InProjPieces[Piece]:
        """Every piece's global shape and TP axis: heads split along their first axis, B and C
        along their groups when g % tp == 0, the angles (and otherwise B and C) replicated."""
        c = self.config
        by_head, bc = ((c.nheads,), 0), ((c.mimo_rank, c.ngroups, c.d_state), 1 if self.groups_sharded else None)
        shapes = InProjPieces(
            z=((c.d_inner,), 0), x=((c.d_inner,), 0), B=bc, C=bc,
            dd_dt=by_head, dd_A=by_head, trap=by_head, angles=((c.num_rope_angles,), None),
        )
        return InProjPieces(*(Piece(name, *spec) for name, spec in zip(InProjPieces._fields, shapes)))

    @property
    def sizes(self) -> InProjPieces[int]:
        """Columns of each piece in the whole in_proj (tp = 1)."""
        return InProjPieces(*(math.prod(piece.global_shape) for piece in self.pieces))

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

    def split(self, projected: Tensor) -> InProjPieces[Tensor]:
        """(..., width) in_proj output of this rank -> its pieces, shaped as `InProjPieces` says."""
        if projected.shape[-1] != self.width:
            raise ValueError(
                f"projected has width {projected.shape[-1]}, expected {self.width}: in_proj's columns on "
                f"tensor parallel rank {self.tp_rank} of {self.tp_size} (d_in_proj = {self.config.d_in_proj})"
            )
        c, lead = self.config, projected.shape[:-1]
        by_name = dict(zip((piece.name for piece in self.local_pieces), torch.split(projected, self.local_sizes, dim=-1)))
        pieces = InProjPieces(*(by_name[name] for name in InProjPieces._fields))
        heads, groups = (*lead, self.heads, c.headdim), (*lead, c.mimo_rank, -1, c.d_state)
        return pieces._replace(
            z=pieces.z.reshape(heads), x=pieces.x.reshape(heads),
            B=pieces.B.reshape(groups)[..., self.used_groups, :], C=pieces.C.reshape(groups)[..., self.used_groups, :],
        )

    def shard(self, weight: Tensor) -> Tensor:
        """The full in_proj weight (d_in_proj, d) in the official row order -> this rank's rows
        (`width`, d) in `local_pieces` order."""
        blocks = torch.split(weight, self.sizes, dim=0)
        local = {
            piece.name: _narrow(rows.reshape(*piece.global_shape, -1), piece, self.tp_size, self.tp_rank)
            for piece, rows in zip(self.pieces, blocks)
        }
        return torch.cat([local[piece.name].reshape(-1, weight.shape[1]) for piece in self.local_pieces], dim=0)


def _narrow(tensor: Tensor, piece: Piece, tp_size: int, tp_rank: int) -> Tensor:
    if piece.shard_axis is None:
        return tensor
    size = piece.global_shape[piece.shard_axis] // tp_size
    return tensor.narrow(piece.shard_axis, tp_rank * size, size)


def unshard(local_weights: Sequence[Tensor], config: Mamba3Config) -> Tensor:
    """Every rank's in_proj rows (rank order; all `width` rows, the replicated ones included) ->
    the full weight (d_in_proj, d) in the official row order. Replicated pieces come from rank 0."""
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
