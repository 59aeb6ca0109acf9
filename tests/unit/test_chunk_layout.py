"""The kernels' chunk layout of `cu_seqlens` documents (`chunk_layout.packed_layout`), against the layout's
definition checked token by token: every document starts at a chunk boundary, takes max(1, ⌈len / Q⌉)
chunks in order, and every token sits in exactly one chunk row; the chunks past the last document's hold
no token. Runs on CPU (the GPU runs the same ops)."""

import pytest
import torch

from megatron_mamba3.ops.tilelang.chunk_layout import packed_layout, unpacked_layout

Q = 4


def _expected_chunks(offsets: list[int], length: int) -> list[tuple[int, int, int]]:
    """(document, first token, document's last token) of each chunk, by walking the documents."""
    chunks = []
    for doc, (begin, end) in enumerate(zip(offsets, offsets[1:])):
        for k in range(max(1, -(-(end - begin) // Q))):
            chunks.append((doc, begin + k * Q, end - 1))
    bound = -(-length // Q) + len(offsets) - 1
    while len(chunks) < bound:  # the spare chunks continue the last document with no token
        doc, first, last = chunks[-1]
        chunks.append((doc, first + Q, last))
    return chunks


@pytest.mark.parametrize(
    "offsets",
    [[0, 10], [0, 0, 5, 6, 6, 13, 16], [0, 4, 8, 12], [0, 1, 2, 3, 17], [0, 0, 0, 9]],
    ids=["one", "empty-and-short", "on-boundaries", "ones", "leading-empties"],
)
def test_packed_layout_starts_every_document_at_a_chunk(offsets):
    length = offsets[-1]
    layout = packed_layout(torch.tensor(offsets, dtype=torch.int32), length, Q)
    chunks = _expected_chunks(offsets, length)
    nc = len(chunks)
    assert layout.seg.shape == (1, nc * Q) and layout.seg.dtype == torch.int32
    assert layout.span.shape == (1, nc, 2) and layout.span.dtype == torch.int32
    assert layout.seg.view(nc, Q).tolist() == [[doc] * Q for doc, _, _ in chunks]
    assert layout.span[0].tolist() == [[first, last] for _, first, last in chunks]
    assert layout.docs.tolist() == [[[begin, end - 1] for begin, end in zip(offsets, offsets[1:])]]
    assert layout.last_tokens.tolist() == [max(end - 1, 0) for end in offsets[1:]]
    rows = [first + i for _, first, last in chunks for i in range(Q) if first + i <= last]
    assert rows == list(range(length))  # each token once, in order


def test_unpacked_layout_counts_document_starts_per_row():
    starts = torch.zeros(2, 10, dtype=torch.bool)
    starts[0, 3] = starts[0, 7] = starts[1, 9] = True
    layout = unpacked_layout(starts, 2, 10, Q, starts.device)
    assert layout.seg.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2], [0] * 9 + [1] * 3]
    assert layout.last_tokens is None
    # no starts: every row one document
    assert unpacked_layout(None, 2, 10, Q, starts.device).seg.tolist() == [[0] * 12] * 2
