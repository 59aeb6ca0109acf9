"""Receipts (docs/backends.md, Receipts): which backend and kernel variant actually ran, per layer and step kind.

Each distinct receipt is logged once (this module's logger, a child of "megatron_mamba3", level INFO)
and counted; tests and users query them with `receipts()`.
"""

from __future__ import annotations

import dataclasses
import logging

logger = logging.getLogger(__name__)

_calls: dict["Receipt", int] = {}


@dataclasses.dataclass(frozen=True)
class Receipt:
    """One kind of call: `layer` (the caller's name or None), `step_kind` ("forward" or "decode"),
    the `backend` and `variant` that ran, the input `dtype`, the input `shapes` as (name, shape)
    pairs, `compile_count`, the kernels compiled for the call (0 for the reference), `fused_prep`:
    whether the backend ran the layer's prep (softplus, decay rate, B/C RMSNorm) inside its kernels
    (False where `apply_prep` ran it in PyTorch first, or where the inputs came prepped), and `path`: which
    of its kernel paths the backend took for these inputs, where it has more than one (the TileLang
    forward: "chunk_walk" or "chunk-parallel"), else ""."""

    layer: str | None
    step_kind: str
    backend: str
    variant: str
    dtype: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    compile_count: int = 0
    fused_prep: bool = False
    path: str = ""


def record(receipt: Receipt) -> None:
    """Count `receipt`; log it the first time it is seen."""
    if receipt not in _calls:
        logger.info("mamba3 receipt: %s", receipt)
    _calls[receipt] = _calls.get(receipt, 0) + 1


def receipts() -> dict[Receipt, int]:
    """Every distinct receipt recorded since the last `clear_receipts()`, with its call count."""
    return dict(_calls)


def clear_receipts() -> None:
    _calls.clear()
