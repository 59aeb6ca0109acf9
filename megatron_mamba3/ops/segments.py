"""Packed documents (docs/packing_and_state.md, Packing): `cu_seqlens`, `segment_ids` and the data loader's `doc_ids`.

`segment_ids` (b, l) are per-token ints; a document starts wherever the id differs from the previous
token's. At a document start the state h, the previous (k, v) and θ reset to zero. The segment-id
helpers keep fixed shapes and run on the tensors' device without host synchronisation;
`document_bounds` reads the offsets on the host (it serves backends that run one call per document).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

DEBUG_CHECKS = "MEGATRON_MAMBA3_DEBUG"  # "1": also check offsets that are on the device
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def segment_ids_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """(b, l) document ids from a data loader -> (b, l) int32 segment ids counting documents from 0.

    Every change of id starts a new segment, so an id that comes back later is a new document.
    """
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, expected (b, l)")
    changes = torch.zeros_like(doc_ids, dtype=torch.int32)
    changes[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).to(torch.int32)
    return changes.cumsum(dim=1, dtype=torch.int32)


def segment_ids_from_cu_seqlens(cu_seqlens: Tensor, total_length: int) -> Tensor:
    """(N + 1,) cumulative document lengths of a THD batch -> (1, total_length) int32 segment ids:
    token t's id counts the offsets cu_seqlens[1:] at or before t (tokens past the last offset form
    one more segment). A fixed-shape comparison, so it lowers on XLA too (`searchsorted` does not)."""
    positions = torch.arange(total_length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return (positions[:, None] >= cu_seqlens[None, 1:]).sum(dim=1, dtype=torch.int32).unsqueeze(0)


def document_starts(segment_ids: Tensor) -> Tensor:
    """(b, l) segment ids -> (b, l) bool, True where a token starts a new document (never at t = 0)."""
    starts = torch.zeros_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def check_cu_seqlens(cu_seqlens: Tensor, total_length: int, *, to_the_end: bool = True) -> None:
    """`ValueError` unless `cu_seqlens` is a 1-D integer tensor of N + 1 >= 2 offsets that start at 0,
    never decrease and end at `total_length` (at or before it when not `to_the_end`). The offsets'
    values are read only on the host, or with MEGATRON_MAMBA3_DEBUG=1 (reading device values stalls
    the step); the shape and dtype are always checked."""
    _check_offsets_tensor(cu_seqlens)
    if cu_seqlens.device.type == "cpu" or os.environ.get(DEBUG_CHECKS) == "1":
        _check_offsets(cu_seqlens.tolist(), total_length, to_the_end)


def document_bounds(cu_seqlens: Tensor, total_length: int) -> list[tuple[int, int]]:
    """Check `cu_seqlens` and return each document's [start, end) token range (reads it on the host)."""
    _check_offsets_tensor(cu_seqlens)
    offsets = cu_seqlens.tolist()
    _check_offsets(offsets, total_length, to_the_end=True)
    return list(zip(offsets[:-1], offsets[1:]))


def _check_offsets_tensor(cu_seqlens: Tensor) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in INTEGER_DTYPES:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor of N + 1 >= 2 offsets, got shape "
                         f"{tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}")


def _check_offsets(offsets: list[int], total_length: int, to_the_end: bool) -> None:
    ends_well = offsets[-1] == total_length if to_the_end else offsets[-1] <= total_length
    if offsets[0] != 0 or not ends_well or any(b < a for a, b in zip(offsets, offsets[1:])):
        end = f"end at the packed length {total_length}" if to_the_end else f"end at most at the sequence length {total_length}"
        raise ValueError(f"cu_seqlens={offsets} must start at 0, never decrease and {end}")
