"""`on_cpu(fn)`: run CUDA-assuming Megatron code unchanged, with its CUDA requests served by the CPU.

Most CUDA-only code in megatron-core only asks for a CUDA device: `device="cuda"`,
`device=torch.cuda.current_device()`, `torch.cuda.synchronize()`. Inside `cuda_requests_on_cpu()`
tensors requested on a CUDA device are made on the CPU, `torch.cuda.current_device()` returns 0
(an ordinal, which the same redirection maps to the CPU) and `torch.cuda.synchronize()` returns at
once. Everything else, including real CUDA work, is untouched (and still fails without CUDA).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode


class _CudaFactoriesOnCpu(TorchFunctionMode):
    """While active, torch functions called with a CUDA `device=` keyword (a CUDA device, or an int
    ordinal) run with `device="cpu"` instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and (isinstance(device, int) or torch.device(device).type == "cuda"):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


_CUDA_STAND_INS = {"current_device": lambda: 0, "synchronize": lambda device=None: None}


@contextlib.contextmanager
def cuda_requests_on_cpu():
    """Serve CUDA device requests from the CPU while active (see the module docstring)."""
    saved = {name: getattr(torch.cuda, name) for name in _CUDA_STAND_INS}
    for name, stand_in in _CUDA_STAND_INS.items():
        setattr(torch.cuda, name, stand_in)
    try:
        with _CudaFactoriesOnCpu():
            yield
    finally:
        for name, original in saved.items():
            setattr(torch.cuda, name, original)


def on_cpu(fn: Callable) -> Callable:
    """`fn`, run inside `cuda_requests_on_cpu()`."""

    @functools.wraps(fn)
    def run_on_cpu(*args, **kwargs):
        with cuda_requests_on_cpu():
            return fn(*args, **kwargs)

    return run_on_cpu
