"""launch/token_data.py: batches are a pure function of the step; token files are read in consecutive
windows; document ids become THD offsets; bad files are refused naming the flag."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import launch_module

token_data = launch_module("token_data")


def test_synthetic_batches_depend_only_on_the_step():
    data = token_data.SyntheticTokens(vocab_size=16, micro_batch_size=3, seq_length=10, seed=7)
    again = token_data.SyntheticTokens(vocab_size=16, micro_batch_size=3, seq_length=10, seed=7)
    batch = data.batch(5)
    assert batch.tokens.shape == (3, 11) and batch.tokens.dtype == torch.int64 and batch.cu_seqlens is None
    assert torch.equal(again.batch(5).tokens, batch.tokens)
    assert not torch.equal(data.batch(6).tokens, batch.tokens)
    successors = data.successors[batch.tokens[:, :-1]]  # every transition is one of the chain's
    assert (successors == batch.tokens[:, 1:, None]).any(-1).all()


def test_token_file_windows_and_packed_documents(tmp_path):
    tokens = np.arange(40, dtype=np.uint16) % 32
    doc_ids = np.repeat(np.arange(8), 5).astype(np.int32)  # documents of 5 tokens
    np.save(tmp_path / "tokens.npy", tokens)
    np.save(tmp_path / "docs.npy", doc_ids)
    data = token_data.TokenFile(str(tmp_path / "tokens.npy"), 32, 2, 8)
    assert data.batch(0).tokens.tolist() == [tokens[0:9].tolist(), tokens[8:17].tolist()]
    assert data.batch(1).tokens[0].tolist() == tokens[16:25].tolist()
    packed = token_data.TokenFile(str(tmp_path / "tokens.npy"), 32, 1, 8, str(tmp_path / "docs.npy"))
    batch = packed.batch(1)  # window tokens 8..16, inputs 8..15: documents start at 10 and 15
    assert batch.tokens[0].tolist() == tokens[8:17].tolist()
    assert batch.cu_seqlens.tolist() == [0, 2, 7, 8] and batch.cu_seqlens.dtype == torch.int32


def test_token_file_errors(tmp_path):
    np.save(tmp_path / "tokens.npy", np.arange(20, dtype=np.int64))
    np.save(tmp_path / "matrix.npy", np.zeros((4, 4), dtype=np.int64))
    np.save(tmp_path / "short_docs.npy", np.zeros(10, dtype=np.int64))
    with pytest.raises(ValueError, match="--data-path.*1-D integer"):
        token_data.TokenFile(str(tmp_path / "matrix.npy"), 32, 1, 2)
    with pytest.raises(ValueError, match="fewer than seq_length"):
        token_data.TokenFile(str(tmp_path / "tokens.npy"), 32, 1, 20)
    with pytest.raises(ValueError, match="--doc-ids-path.*10 ids for 20 tokens"):
        token_data.TokenFile(str(tmp_path / "tokens.npy"), 32, 1, 4, str(tmp_path / "short_docs.npy"))
    with pytest.raises(ValueError, match="outside \\[0, vocab_size=16\\)"):
        token_data.TokenFile(str(tmp_path / "tokens.npy"), 16, 1, 8).batch(1)
