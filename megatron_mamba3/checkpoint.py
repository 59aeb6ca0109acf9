"""Distributed-checkpoint layout of one Mamba-3 mixer (docs/parallelism.md): a checkpoint saved at one TP size
loads at any other, bit-exact.

Per-head parameters are sharded along their head axis (`parallel.HEAD_AXES`), B_norm / C_norm are
replicated, and in_proj's weight is saved as one tensor per piece (`in_proj.InProjLayout`), each
with a TP-independent global shape, through a `ShardedTensorFactory` per in_proj parameter (the
split rows, and at tp > 1 the replicated rows) that splits it on save and concatenates the pieces
back on load.
"""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.mapping import ReplicaId, ShardedStateDict, ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from torch import Tensor, nn

from megatron_mamba3.in_proj import InProjLayout
from megatron_mamba3.parallel import HEAD_AXES, REPLICATED_IN_PROJ


def mixer_sharded_state_dict(
    mixer: nn.Module, layout: InProjLayout, tp_group, prefix: str, sharded_offsets: tuple, metadata: dict | None
) -> ShardedStateDict:
    """The sharded state dict of `mixer` (a `Mamba3Mixer`) under `prefix`."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    groups = dict(tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"])
    own: dict[str, Tensor] = {}
    mixer._save_to_state_dict(own, "", keep_vars=True)
    sharded = make_sharded_tensors_for_checkpoint(
        own, prefix, {name: HEAD_AXES[name] for name in own}, sharded_offsets, **groups
    )
    for name, child in mixer.named_children():
        child_prefix = f"{prefix}{name}."
        if name == "norm":  # the per-head gated norm: sharded by head like the parameters above
            sharded.update(make_sharded_tensors_for_checkpoint(
                child.state_dict(keep_vars=True), child_prefix, {"weight": 0}, sharded_offsets, **groups
            ))
        else:
            sharded.update(sharded_state_dict_default(child, child_prefix, sharded_offsets, metadata, tp_group=tp_group))
    pieces = dict(zip(layout.local_pieces, layout.local_sizes))
    base = f"{prefix}in_proj.weight"
    for key in (base, f"{prefix}{REPLICATED_IN_PROJ}"):
        if key in sharded:
            replicated = key != base
            held = {piece: size for piece, size in pieces.items() if layout.is_replicated(piece) == replicated}
            sharded[key] = in_proj_factory(sharded[key], base, held, layout, sharded_offsets)
    return sharded


def in_proj_factory(
    saved: ShardedTensor, base: str, pieces: dict, layout: InProjLayout, sharded_offsets: tuple
) -> ShardedTensorFactory:
    """Replace one in_proj parameter's sharded tensor, holding `pieces` (piece -> local rows, in
    row order), by one sharded tensor per piece: `<base>.z`, `<base>.B`, ... Both in_proj
    parameters' factories carry the key `base` (optimizer states prefix it); their pieces differ."""
    if tuple(saved.local_shape)[-2] != sum(pieces.values()):
        raise ValueError(
            f"{saved.key} has {saved.local_shape[-2]} rows on this rank, the layout expects {sum(pieces.values())}"
        )
    prepend = len(sharded_offsets)

    @torch.no_grad()
    def build(key: str, weight: Tensor, replica_id: ReplicaId, flattened_range: slice | None) -> ShardedStateDict:
        if flattened_range is not None:
            raise NotImplementedError("Mamba-3 in_proj checkpoints do not support flattened (fully sharded) ranges")
        built = {}
        for piece, rows in zip(pieces, torch.split(weight, list(pieces.values()), dim=0)):
            local = rows.reshape(*piece.local_shape(layout.tp_size), weight.shape[1])
            if piece.shard_axis is None:
                offsets, replica = (), _with_tp_replica(replica_id, layout.tp_rank)
            else:
                offsets, replica = ((piece.shard_axis + prepend, layout.tp_rank, layout.tp_size),), replica_id
            built[piece.name] = ShardedTensor.from_rank_offsets(
                f"{key}.{piece.name}", local, *sharded_offsets, *offsets, replica_id=replica, prepend_axis_num=prepend
            )
        return built

    @torch.no_grad()
    def merge(loaded: dict[str, Tensor]) -> Tensor:
        return torch.cat([loaded[piece.name].flatten(0, -2) for piece in pieces], dim=0)

    return ShardedTensorFactory(base, saved.data, build, merge, saved.replica_id)


def _with_tp_replica(replica_id: ReplicaId, tp_rank: int) -> ReplicaId:
    """A replica id that also marks copies across TP ranks (only TP rank 0 writes a replicated piece)."""
    if isinstance(replica_id, int):
        return (replica_id, tp_rank)
    return (replica_id[0], tp_rank, *replica_id[2:])
