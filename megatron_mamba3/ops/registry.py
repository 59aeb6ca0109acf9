"""Scan backends, their variants and how one is chosen (docs/backends.md, Backends).

Each backend lives in its own package and exports `BACKEND` (a `Backend`) from its `backend`
module; the registry imports it on first use, so a missing optional dependency (TileLang,
torch_xla) only matters when that backend is asked for.

A backend's scan has one signature, `ScanFn`, and receives the arguments that `mamba3_scan` has
already checked (shapes, chunk size, packing, initial state); it checks only what is its own (the
sizes its kernels support, the packings it cannot run).

Selection: the `backend` argument, else `MEGATRON_MAMBA3_BACKEND`, else "auto".
- An explicitly named backend (or variant) that cannot run here raises `ValueError` saying why.
- "auto" picks by the tensors' device type (cuda -> tilelang, xla -> xla, otherwise reference);
  when that backend cannot run it falls back to the reference and logs why, once.
- A decode step runs on the backend "auto" prefers for the device when it registers a `decode`,
  else on the reference's step.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from typing import Callable, Mapping, Protocol

from torch import Tensor

from megatron_mamba3.ops.interface import Mamba3Inputs, Mamba3State, Mamba3Weights

BACKEND_ENV = "MEGATRON_MAMBA3_BACKEND"
AUTO = "auto"

logger = logging.getLogger(__name__)


class ScanFn(Protocol):
    """A backend's scan: the signature of `mamba3_scan` without the selection arguments, called with
    arguments `mamba3_scan` has checked. Returns (gated output (b, l, H, p), final state). Only the scan
    of a backend with `fuses_prep` is ever passed `prep=` (a `Mamba3Prep`, with raw inputs)."""

    def __call__(
        self,
        inputs: Mamba3Inputs,
        weights: Mamba3Weights,
        *,
        segment_ids: Tensor | None,
        cu_seqlens: Tensor | None,
        initial_state: Mamba3State | None,
        chunk_size: int,
    ) -> tuple[Tensor, Mamba3State]: ...


class DecodeFn(Protocol):
    """A backend's decode step: per-token inputs (x: (b, H, p), ...) and the running state, checked by
    `mamba3_decode` -> (gated output (b, H, p), new state)."""

    def __call__(
        self, inputs: Mamba3Inputs, weights: Mamba3Weights, state: Mamba3State
    ) -> tuple[Tensor, Mamba3State]: ...


@dataclasses.dataclass(frozen=True)
class ScanVariant:
    """One implementation of the scan, `fn`, named `name` within its backend."""

    backend: str
    name: str
    fn: ScanFn


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend: its variants, the default one, `why_not(inputs)` (None when it can run the scan
    of these `Mamba3Inputs`: device, dtype and sizes; else the reason), `compile_count()` (kernels
    or graphs compiled so far), its decode step, if it has one, whether its scans take `prep=`
    and run the prep in their kernels (`fuses_prep`; otherwise `mamba3_scan` applies it first), and
    `path(inputs)`: which of its kernel paths a scan of these inputs takes, for the receipt ("" where
    it has one)."""

    name: str
    variants: Mapping[str, ScanVariant]
    default_variant: str
    why_not: Callable[[Mamba3Inputs], str | None]
    compile_count: Callable[[], int] = lambda: 0
    decode: DecodeFn | None = None
    fuses_prep: bool = False
    path: Callable[[Mamba3Inputs], str] = lambda inputs: ""


_MODULES = {
    "reference": "megatron_mamba3.ops.reference.backend",
    "tilelang": "megatron_mamba3.ops.tilelang.backend",
    "xla": "megatron_mamba3.ops.xla.backend",
}
BACKEND_NAMES = tuple(_MODULES)
_AUTO_BY_DEVICE = {"cuda": "tilelang", "xla": "xla"}
_fallbacks_logged: set[tuple[str, str]] = set()


def load_backend(name: str) -> Backend | str:
    """The registered backend `name`, or the reason it cannot be imported."""
    try:
        return importlib.import_module(_MODULES[name]).BACKEND
    except ImportError as error:
        return f"it cannot be imported ({error})"


def _runnable(name: str, inputs: Mamba3Inputs) -> Backend | str:
    backend = load_backend(name)
    if isinstance(backend, str):
        return backend
    return backend.why_not(inputs) or backend


def _auto(inputs: Mamba3Inputs) -> Backend:
    preferred = _AUTO_BY_DEVICE.get(inputs.x.device.type, "reference")
    chosen = _runnable(preferred, inputs)
    if isinstance(chosen, Backend):
        return chosen
    if (preferred, chosen) not in _fallbacks_logged:
        _fallbacks_logged.add((preferred, chosen))
        logger.warning("mamba3 backend auto: %s cannot run because %s; falling back to reference", preferred, chosen)
    return load_backend("reference")


def check_backend_name(name: str, source: str = "backend") -> None:
    """`ValueError` naming `source` unless `name` is "auto" or a registered backend."""
    if name != AUTO and name not in BACKEND_NAMES:
        raise ValueError(f"{source}={name!r} is not a backend; choose one of: {AUTO}, {', '.join(BACKEND_NAMES)}")


def select_backend(backend: str | None, inputs: Mamba3Inputs) -> Backend:
    """Resolve `backend` (None reads `MEGATRON_MAMBA3_BACKEND`, default "auto") for `inputs`."""
    requested = backend if backend is not None else os.environ.get(BACKEND_ENV, AUTO)
    source = "backend" if backend is not None else BACKEND_ENV
    check_backend_name(requested, source)
    if requested == AUTO:
        return _auto(inputs)
    chosen = _runnable(requested, inputs)
    if isinstance(chosen, str):
        x = inputs.x
        dtype = str(x.dtype).removeprefix("torch.")
        raise ValueError(f"{source}={requested!r} cannot run on {x.device.type} {dtype} tensors: {chosen}")
    return chosen


def select_decoder(inputs: Mamba3Inputs) -> Backend:
    """The backend whose `decode` runs a step of `inputs`: the one "auto" prefers for their device
    when it has a decode step, else the reference."""
    preferred = load_backend(_AUTO_BY_DEVICE.get(inputs.x.device.type, "reference"))
    if isinstance(preferred, Backend) and preferred.decode is not None:
        return preferred
    return load_backend("reference")


def select_variant(backend: str | None, variant: str | None, inputs: Mamba3Inputs) -> tuple[Backend, ScanVariant]:
    """The backend (see `select_backend`) and its `variant` (None: the backend's default)."""
    chosen = select_backend(backend, inputs)
    name = variant if variant is not None else chosen.default_variant
    if name not in chosen.variants:
        raise ValueError(
            f"variant={name!r} is not a variant of backend {chosen.name!r}; available: {', '.join(chosen.variants)}"
        )
    return chosen, chosen.variants[name]
