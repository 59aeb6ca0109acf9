"""The TileLang backend (CUDA, H100/H200): chunk-parallel kernels, bf16 inputs, fp32 state; it runs the
layer's prep (`Mamba3Prep`) in its kernels.

Importing this module needs neither TileLang nor CUDA; `why_not` says what is missing.
"""

from __future__ import annotations

import importlib.util

import torch

from megatron_mamba3.ops.interface import Mamba3Inputs
from megatron_mamba3.ops.registry import Backend, ScanVariant
from megatron_mamba3.ops.tilelang.build import compile_count
from megatron_mamba3.ops.tilelang.function import forward_path, tilelang_scan, unsupported


def why_not(inputs: Mamba3Inputs) -> str | None:
    """None when the kernels can run these inputs (CUDA, TileLang installed, bf16, supported
    n / p / R), else the reason; auto selection then falls back to the reference."""
    x = inputs.x
    if x.device.type != "cuda":
        return "needs CUDA tensors"
    if importlib.util.find_spec("tilelang") is None:
        return "tilelang is not installed"
    if x.dtype != torch.bfloat16:
        return f"dtype {str(x.dtype).removeprefix('torch.')} is not supported (bfloat16)"
    R, _, n = inputs.B.shape[-3:]
    return unsupported(n, x.shape[-1], R)


BACKEND = Backend(
    name="tilelang",
    variants={"chunked": ScanVariant("tilelang", "chunked", tilelang_scan)},
    default_variant="chunked",
    why_not=why_not,
    compile_count=compile_count,
    fuses_prep=True,
    path=forward_path,
)
