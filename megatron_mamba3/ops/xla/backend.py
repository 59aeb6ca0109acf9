"""Registers the XLA backend: the chunk scan, when it can run, and how many graphs XLA has compiled."""

from __future__ import annotations

import importlib.util
import sys

from megatron_mamba3.ops.interface import Mamba3Inputs
from megatron_mamba3.ops.registry import Backend, ScanVariant
from megatron_mamba3.ops.xla.scan_adapter import mamba3_xla_scan


def why_not(inputs: Mamba3Inputs) -> str | None:
    """None for inputs on an XLA device, else why this backend cannot run them."""
    if importlib.util.find_spec("torch_xla") is None:
        return "torch_xla is not installed"
    if inputs.x.device.type != "xla":
        return f"it needs XLA tensors, got {inputs.x.device.type} tensors"
    return None


def compile_count() -> int:
    """XLA graph compilations in this process so far (torch_xla's CompileTime metric; 0 before any).

    XLA compiles lazily, at the next `torch_xla.sync()`, so a receipt written during a step shows
    the compilations of the steps before it."""
    if "torch_xla" not in sys.modules:  # never imported: nothing compiled, and no import for a count
        return 0
    from torch_xla.debug import metrics

    data = metrics.metric_data("CompileTime")
    return 0 if data is None else int(data[0])


BACKEND = Backend(
    name="xla",
    variants={"scan": ScanVariant("xla", "scan", mamba3_xla_scan)},
    default_variant="scan",
    why_not=why_not,
    compile_count=compile_count,
)
