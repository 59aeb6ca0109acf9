"""`mamba3_scan`: one entry point for every backend; it selects, runs and writes the receipt."""

from __future__ import annotations

from torch import Tensor

from megatron_mamba3.ops.interface import Mamba3Inputs, Mamba3State, Mamba3Weights
from megatron_mamba3.ops.registry import select_variant
from megatron_mamba3.receipts import Receipt, record


def mamba3_scan(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    *,
    segment_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Mamba3State | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
    variant: str | None = None,
    layer: str | None = None,
) -> tuple[Tensor, Mamba3State]:
    """Run the Mamba-3 scan: (b, l, ...) inputs -> (gated output (b, l, H, p), final state).

    See `Mamba3Inputs` / `Mamba3Weights` / `Mamba3State` for shapes. Packing: `segment_ids` (b, l)
    with per-row states (the initial state continues each row's first document; the final state is
    the state after its last token), or `cu_seqlens` (N + 1,) with b = 1 and per-document states
    (N, ...). Without either, each row is one sequence.
    `backend`/`variant` pick the implementation (default: `MEGATRON_MAMBA3_BACKEND` or "auto");
    `layer` names the caller in the receipt.
    """
    chosen = select_variant(backend, variant)
    options = dict(segment_ids=segment_ids, cu_seqlens=cu_seqlens, initial_state=initial_state)
    if chosen.takes_chunk_size:
        options["chunk_size"] = chunk_size
    out, state = chosen.fn(inputs, weights, **options)
    shapes = tuple((name, tuple(t.shape)) for name, t in zip(inputs._fields, inputs))
    record(Receipt(layer, "forward", chosen.backend, chosen.name, str(inputs.x.dtype).removeprefix("torch."), shapes))
    return out, state
