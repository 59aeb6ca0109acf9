"""megatron-mamba3: the Mamba-3 mixer (SISO and MIMO) for Megatron-Core hybrid models.

Public API: `Mamba3Config`, `Mamba3Mixer` (+ `Mamba3MixerSubmodules`), the layer specs in
`megatron_mamba3.layer_specs`, `Mamba3` (the layer as a plain torch module, for models without
Megatron-Core, e.g. on TPU), and the ops (`mamba3_scan`, `mamba3_decode`, `mamba3_layer`, ...).
"""

import importlib

from megatron_mamba3.config import Mamba3Config
from megatron_mamba3.module import Mamba3
from megatron_mamba3.ops import (
    Mamba3Inputs,
    Mamba3Prep,
    Mamba3State,
    Mamba3Weights,
    mamba3_decode,
    mamba3_layer,
    mamba3_scan,
    segment_ids_from_cu_seqlens,
    segment_ids_from_doc_ids,
)
from megatron_mamba3.parameters import init_layer_params
from megatron_mamba3.receipt_log import Receipt, clear_receipts, receipts

# The Megatron-facing names import megatron.core, so they load on first use; the ops do not need it.
_MEGATRON_NAMES = {"Mamba3Mixer": "megatron_mamba3.mixer", "Mamba3MixerSubmodules": "megatron_mamba3.mixer"}


def __getattr__(name: str):
    if name in _MEGATRON_NAMES:
        return getattr(importlib.import_module(_MEGATRON_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Mamba3",
    "Mamba3Config",
    "Mamba3Mixer",
    "Mamba3MixerSubmodules",
    "Mamba3Inputs",
    "Mamba3Prep",
    "Mamba3State",
    "Mamba3Weights",
    "Receipt",
    "clear_receipts",
    "init_layer_params",
    "mamba3_decode",
    "mamba3_layer",
    "mamba3_scan",
    "receipts",
    "segment_ids_from_cu_seqlens",
    "segment_ids_from_doc_ids",
]
