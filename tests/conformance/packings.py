"""The packings the conformance cases run, laid out for a target's row length and chunk.

Boundaries fall inside and across chunks; there are documents of one token, empty documents and
one ending on a chunk boundary (the last chunk of a row is partial whenever the length is not a
multiple of the chunk).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tests.conformance.targets import Target


class Document(NamedTuple):
    """Tokens [begin, end) of `row`; the initial state it starts from (an index into the call's
    initial states, None: zeros) and the final state it leaves (an index, None: not returned)."""

    row: int
    begin: int
    end: int
    state_in: int | None
    state_out: int | None


class Layout(NamedTuple):
    """b rows, the packing keywords of `mamba3_scan`, the documents, how many final states the call
    returns and whether it takes initial states."""

    b: int
    packing: dict[str, Tensor]
    documents: list[Document]
    states: int
    initial_state: bool


def _rows_of_documents(starts: list[list[int]], length: int, initial_state: bool) -> list[Document]:
    documents = []
    for row, row_starts in enumerate(starts):
        bounds = [*row_starts, length]
        for index, (begin, end) in enumerate(zip(bounds, bounds[1:])):
            first, last = index == 0, index == len(row_starts) - 1
            documents.append(Document(row, begin, end, row if first and initial_state else None, row if last else None))
    return documents


def layout(name: str, target: Target) -> Layout:
    """The packing `name` (one of PACKINGS) for rows of `target.length` tokens."""
    length, chunk = target.length, target.chunk
    if name == "rows+initial_state":
        return Layout(2, {}, _rows_of_documents([[0], [0]], length, True), 2, True)
    if name in ("segment_ids", "segment_ids+initial_state"):
        initial_state = name.endswith("initial_state")
        starts = [[0, length // 6, 2 * length // 3, length - 1], [0, length // 2 + 1]]
        ids = [[3, 0, 9, 4], [7, 3]]  # any ints; a document starts where the id changes
        segment_ids = torch.zeros(2, length, dtype=torch.int64)
        for row, (row_starts, row_ids) in enumerate(zip(starts, ids)):
            for begin, value in zip(row_starts, row_ids):
                segment_ids[row, begin:] = value
        return Layout(2, {"segment_ids": segment_ids}, _rows_of_documents(starts, length, initial_state), 2, initial_state)
    if name in ("cu_seqlens", "cu_seqlens+initial_state"):
        initial_state = name.endswith("initial_state")
        short, on_boundary = length // 4, chunk * ((length - 1) // chunk)
        offsets = [0, 0, short, short + 1, short + 1, on_boundary, length]  # lengths 0, a, 1, 0, ...
        documents = [
            Document(0, begin, end, index if initial_state else None, index)
            for index, (begin, end) in enumerate(zip(offsets, offsets[1:]))
        ]
        cu_seqlens = torch.tensor(offsets, dtype=torch.int32)
        return Layout(1, {"cu_seqlens": cu_seqlens}, documents, len(documents), initial_state)
    raise KeyError(name)


PACKINGS = ["rows+initial_state", "segment_ids+initial_state", "cu_seqlens", "cu_seqlens+initial_state"]
