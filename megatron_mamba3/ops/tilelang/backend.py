"""The TileLang backend (CUDA, H100/H200): chunk-parallel forward kernels, bf16 inputs, fp32 state.

Importing this module needs neither TileLang nor CUDA; `why_not` says what is missing.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from megatron_mamba3.ops.registry import Backend, ScanVariant
from megatron_mamba3.ops.tilelang.function import SUPPORTED_P, tilelang_scan


def why_not(x: Tensor) -> str | None:
    """None when the kernels can run on tensors like `x` (b, l, H, p), else the reason. n and R are
    checked when the scan is called (a ValueError naming the value)."""
    if x.device.type != "cuda":
        return "needs CUDA tensors"
    if importlib.util.find_spec("tilelang") is None:
        return "tilelang is not installed"
    if x.dtype != torch.bfloat16:
        return f"dtype {str(x.dtype).removeprefix('torch.')} is not supported (bfloat16)"
    if x.shape[-1] not in SUPPORTED_P:
        return f"p={x.shape[-1]} is not supported {SUPPORTED_P}"
    return None


def compile_count() -> int:
    if importlib.util.find_spec("tilelang") is None:
        return 0
    from megatron_mamba3.ops.tilelang.kernels import compile_count as count

    return count()


BACKEND = Backend(
    name="tilelang",
    variants={"chunked": ScanVariant("tilelang", "chunked", tilelang_scan)},
    default_variant="chunked",
    why_not=why_not,
    compile_count=compile_count,
)
