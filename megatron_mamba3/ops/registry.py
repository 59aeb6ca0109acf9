"""Scan backends and their variants; selection by argument or `MEGATRON_MAMBA3_BACKEND` (SPEC 6).

Only the reference backend exists so far: "chunked" (the default) and "recurrent" (the oracle).
An explicitly requested backend or variant that is not available raises `ValueError`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from megatron_mamba3.ops.reference import mamba3_chunked, mamba3_recurrent

BACKEND_ENV = "MEGATRON_MAMBA3_BACKEND"


@dataclasses.dataclass(frozen=True)
class ScanVariant:
    backend: str
    name: str
    fn: Callable
    takes_chunk_size: bool


_VARIANTS = {
    "reference": {
        "chunked": ScanVariant("reference", "chunked", mamba3_chunked, takes_chunk_size=True),
        "recurrent": ScanVariant("reference", "recurrent", mamba3_recurrent, takes_chunk_size=False),
    },
}
_DEFAULT_VARIANT = {"reference": "chunked"}


def select_variant(backend: str | None = None, variant: str | None = None) -> ScanVariant:
    """Resolve `backend` (None reads `MEGATRON_MAMBA3_BACKEND`, default "auto") and `variant`."""
    requested = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    name = "reference" if requested == "auto" else requested
    if name not in _VARIANTS:
        source = "backend" if backend is not None else BACKEND_ENV
        raise ValueError(f"{source}={requested!r} is not available; available: auto, {', '.join(_VARIANTS)}")
    variants = _VARIANTS[name]
    chosen = variant if variant is not None else _DEFAULT_VARIANT[name]
    if chosen not in variants:
        raise ValueError(f"variant={chosen!r} is not a variant of backend {name!r}; available: {', '.join(variants)}")
    return variants[chosen]
