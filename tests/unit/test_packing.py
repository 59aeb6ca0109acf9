"""The packing helpers: segment ids from a loader's doc ids and from cu_seqlens, and document starts.
What the backends do with packed documents is the conformance suite's (tests/conformance)."""

import pytest
import torch

from megatron_mamba3.ops import segment_ids_from_cu_seqlens, segment_ids_from_doc_ids
from megatron_mamba3.ops.segments import document_starts


def test_segment_helpers():
    doc_ids = torch.tensor([[4, 4, 9, 9, 9, 4], [1, 1, 1, 1, 1, 1]])
    segment_ids = segment_ids_from_doc_ids(doc_ids)
    assert segment_ids.tolist() == [[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    assert segment_ids.dtype == torch.int32 and segment_ids.shape == doc_ids.shape
    assert document_starts(segment_ids).tolist() == [[False, False, True, False, False, True], [False] * 6]
    cu = torch.tensor([0, 2, 2, 5, 6])
    assert segment_ids_from_cu_seqlens(cu, 6).tolist() == [[0, 0, 2, 2, 2, 3]]
    assert document_starts(segment_ids_from_cu_seqlens(cu, 6)).tolist() == [[False, False, True, False, False, True]]
    with pytest.raises(ValueError, match="doc_ids"):
        segment_ids_from_doc_ids(torch.zeros(6))
