"""Packed documents (SPEC 4): `cu_seqlens`, `segment_ids` and the data loader's `doc_ids`.

`segment_ids` (b, l) are per-token ints; a document starts wherever the id differs from the previous
token's. At a document start the state h, the previous (k, v) and θ reset to zero. All helpers keep
fixed shapes and run on the tensors' device, with no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def document_bounds(cu_seqlens: Tensor, total_length: int) -> list[tuple[int, int]]:
    """Check `cu_seqlens` and return each document's [start, end) token range (reads it on the host)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor of N + 1 >= 2 offsets, got {cu_seqlens!r}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total_length or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(
            f"cu_seqlens={offsets} must start at 0, never decrease and end at the packed length {total_length}"
        )
    return list(zip(offsets[:-1], offsets[1:]))
