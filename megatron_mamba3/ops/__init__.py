"""Mamba-3 ops: `mamba3_scan` / `mamba3_decode` (every backend behind one signature), `mamba3_layer` (the layer math
around it), the interface types, and the packing helpers."""

from megatron_mamba3.ops.interface import Mamba3Inputs, Mamba3Prep, Mamba3State, Mamba3Weights
from megatron_mamba3.ops.layer import mamba3_layer
from megatron_mamba3.ops.scan import mamba3_decode, mamba3_scan
from megatron_mamba3.ops.segments import segment_ids_from_cu_seqlens, segment_ids_from_doc_ids

__all__ = [
    "Mamba3Inputs",
    "Mamba3Prep",
    "Mamba3State",
    "Mamba3Weights",
    "mamba3_decode",
    "mamba3_layer",
    "mamba3_scan",
    "segment_ids_from_cu_seqlens",
    "segment_ids_from_doc_ids",
]
