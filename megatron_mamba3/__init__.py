"""megatron-mamba3: the Mamba-3 mixer (SISO and MIMO) for Megatron-Core hybrid models."""

from megatron_mamba3.config import Mamba3Config
from megatron_mamba3.ops import (
    Mamba3Inputs,
    Mamba3State,
    Mamba3Weights,
    mamba3_layer,
    mamba3_scan,
    segment_ids_from_cu_seqlens,
    segment_ids_from_doc_ids,
)
from megatron_mamba3.parameters import init_layer_params
from megatron_mamba3.receipts import Receipt, clear_receipts, receipts

__all__ = [
    "Mamba3Config",
    "Mamba3Inputs",
    "Mamba3State",
    "Mamba3Weights",
    "Receipt",
    "clear_receipts",
    "init_layer_params",
    "mamba3_layer",
    "mamba3_scan",
    "receipts",
    "segment_ids_from_cu_seqlens",
    "segment_ids_from_doc_ids",
]
