"""Training tokens for `launch/train.py`, the same on every rank and a pure function of the step.

`batch(step)` returns `Batch(tokens (b, l + 1) int64, cu_seqlens (N + 1,) int32 or None)`; the
model reads tokens[:, :-1] and predicts tokens[:, 1:]. Because a batch depends only on the step,
a run resumed from a checkpoint sees exactly the batches the uninterrupted run saw.

- `SyntheticTokens`: a fixed random Markov chain over the vocabulary (each token has `branching`
  possible successors, so a model can learn the loss down from ln(vocab) towards ln(branching)).
- `TokenFile`: a memory-mapped 1-D integer `.npy` token file, read in consecutive windows (wrapping
  at the end). With a document-id file of the same length, each window is one packed sequence
  (micro-batch 1) and `cu_seqlens` marks where its documents start.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from megatron_mamba3.ops.segments import document_starts, segment_ids_from_doc_ids


@dataclasses.dataclass(frozen=True)
class Batch:
    tokens: Tensor  # (b, l + 1) int64
    cu_seqlens: Tensor | None  # (N + 1,) int32 document offsets in the l model inputs, micro-batch 1


class SyntheticTokens:
    """Markov-chain tokens: `vocab_size` states, `branching` successors each, drawn from `seed`."""

    def __init__(self, vocab_size: int, micro_batch_size: int, seq_length: int, seed: int, branching: int = 2):
        if branching < 1 or branching > vocab_size:
            raise ValueError(f"branching={branching} must be in [1, vocab_size={vocab_size}]")
        self.shape = (micro_batch_size, seq_length + 1)
        self.seed = seed
        self.branching = branching
        table_rng = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(vocab_size, (vocab_size, branching), generator=table_rng)

    def batch(self, step: int) -> Batch:
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 1)
        rows, length = self.shape
        choices = torch.randint(self.branching, (rows, length), generator=rng)
        tokens = torch.empty(rows, length, dtype=torch.int64)
        tokens[:, 0] = torch.randint(len(self.successors), (rows,), generator=rng)
        for t in range(1, length):
            tokens[:, t] = self.successors[tokens[:, t - 1], choices[:, t]]
        return Batch(tokens, None)


def _load_1d_integers(path: Path, what: str) -> np.ndarray:
    if path.suffix != ".npy":
        raise ValueError(f"{what} {path}: expected a .npy file (numpy.save of a 1-D integer array)")
    array = np.load(path, mmap_mode="r")
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} {path}: expected a 1-D integer array, got shape {array.shape} dtype {array.dtype}")
    return array


class TokenFile:
    """Consecutive windows of a memory-mapped token file; optional per-token document ids."""

    def __init__(
        self, path: str, vocab_size: int, micro_batch_size: int, seq_length: int, doc_ids_path: str | None = None
    ):
        self.path = Path(path)
        self.tokens = _load_1d_integers(self.path, "--data-path")
        self.vocab_size = vocab_size
        self.rows, self.window = micro_batch_size, seq_length + 1
        if len(self.tokens) < self.window:
            raise ValueError(f"--data-path {path} holds {len(self.tokens)} tokens, fewer than seq_length + 1 = {self.window}")
        self.doc_ids = None
        if doc_ids_path is not None:
            self.doc_ids = _load_1d_integers(Path(doc_ids_path), "--doc-ids-path")
            if len(self.doc_ids) != len(self.tokens):
                raise ValueError(
                    f"--doc-ids-path {doc_ids_path} has {len(self.doc_ids)} ids for {len(self.tokens)} tokens"
                )
            if micro_batch_size != 1:
                raise ValueError(f"packed documents (--doc-ids-path) need --micro-batch-size 1, got {micro_batch_size}")

    def _window(self, array: np.ndarray, start: int) -> Tensor:
        return torch.from_numpy(np.array(array[start : start + self.window], dtype=np.int64))

    def batch(self, step: int) -> Batch:
        starts = [
            ((step * self.rows + row) * (self.window - 1)) % (len(self.tokens) - self.window + 1)
            for row in range(self.rows)
        ]
        tokens = torch.stack([self._window(self.tokens, start) for start in starts])
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(
                f"--data-path {self.path}: tokens at offsets {starts} fall outside [0, vocab_size={self.vocab_size})"
            )
        if self.doc_ids is None:
            return Batch(tokens, None)
        inputs_doc_ids = self._window(self.doc_ids, starts[0])[None, :-1]
        starts_in_window = document_starts(segment_ids_from_doc_ids(inputs_doc_ids))[0].nonzero().flatten()
        length = self.window - 1
        cu_seqlens = torch.cat([torch.tensor([0]), starts_in_window, torch.tensor([length])]).to(torch.int32)
        return Batch(tokens, cu_seqlens)
