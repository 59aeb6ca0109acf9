"""Where the kernels' chunks take their tokens from (`ChunkLayout`).

Unpacked, chunk c of row b holds tokens c·Q … c·Q + Q − 1 of the row; documents (`segment_ids`) may start
anywhere and start from zero. With `cu_seqlens` (b = 1), every document starts at a chunk boundary of a
padded layout, so that it can start from its own initial state and leave its own final state at chunk
boundaries: document d takes max(1, ⌈len_d / Q⌉) chunks (an empty one still takes one, through which its
state passes unchanged), chunk c holds tokens first_c … of its document up to the document's last token,
and the chunks the bound ⌈l / Q⌉ + N leaves over hold no token (they belong to the last document). The
per-token terms the kernels keep (cs, wd, wo, ...) sit at the padded positions c·Q + i either way; inputs and
gradients stay at their tokens. Everything here runs on the device without host synchronisation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mamba3.ops.tilelang.chunk_math import chunk_count


class ChunkLayout(NamedTuple):
    """seg (b, nc·Q) int32: the document of each padded position (unpacked: its row's count of document
    starts so far; packed: its document's index); span (1, nc, 2) int32: each chunk's first token and its
    document's last token; docs (1, N, 2) int32: each document's first and last token; last_tokens (N,)
    int64: each document's last token (0 for an empty document at the start), None unpacked. Unpacked, span
    and docs are one (1, 1, 2) stand-in the kernels never read."""

    seg: Tensor
    span: Tensor
    docs: Tensor
    last_tokens: Tensor | None


def last_token_rows(t: Tensor, last_tokens: Tensor | None) -> Tensor:
    """Each state's last token of t (b, l, ...): (b, ...) per row (`last_tokens` None), or (N, ...) per
    `cu_seqlens` document (`ChunkLayout.last_tokens`)."""
    return t[:, -1] if last_tokens is None else t[0, last_tokens]


def unpacked_layout(starts: Tensor | None, b: int, length: int, Q: int, device: torch.device) -> ChunkLayout:
    """b rows of `length` tokens in chunks of Q, with document starts (b, length) bool (never at t = 0), or
    None: each row one document (seg all 0, one op instead of a pad and a cumsum)."""
    rows = chunk_count(length, Q) * Q
    if starts is None:
        seg = torch.zeros(b, rows, dtype=torch.int32, device=device)
    else:
        seg = (starts if rows == length else F.pad(starts, (0, rows - length))).cumsum(dim=1, dtype=torch.int32)
    stand_in = torch.empty(1, 1, 2, dtype=torch.int32, device=device)
    return ChunkLayout(seg, stand_in, stand_in, None)


def packed_layout(cu_seqlens: Tensor, length: int, Q: int) -> ChunkLayout:
    """`cu_seqlens` (N + 1,) offsets of documents packed into one row of `length` tokens (checked by the
    caller), each started at a chunk boundary."""
    offsets = cu_seqlens.to(torch.int64)
    documents = offsets.numel() - 1
    begin, last = offsets[:-1], offsets[1:] - 1  # each document's first and last token
    chunks = (last - begin + Q).div_(Q, rounding_mode="floor").clamp_min_(1)  # ⌈len / Q⌉, at least 1
    ends = chunks.cumsum(dim=0)  # the chunk after each document's last
    nc = chunk_count(length, Q) + documents  # a bound on Σ chunks that needs no host read
    chunk = torch.arange(nc, device=offsets.device)
    doc = torch.searchsorted(ends, chunk, right=True).clamp_max_(documents - 1)
    # chunk c of document d starts at token begin_d + (c − first chunk of d)·Q: (begin_d − first chunk·Q) + c·Q
    span = torch.stack((begin - (ends - chunks) * Q, last), dim=-1)[doc]
    span.select(1, 0).add_(chunk * Q)
    seg = doc.to(torch.int32).repeat_interleave(Q).view(1, nc * Q)
    docs = torch.stack((begin, last), dim=-1).to(torch.int32).view(1, documents, 2)
    return ChunkLayout(seg, span.to(torch.int32).view(1, nc, 2), docs, last.clamp_min(0))
