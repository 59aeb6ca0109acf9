"""The error measures the tests state bounds in, and the random cases they run (defined in
`megatron_mamba3.testing`, shared with the benchmarks)."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import Tensor

from megatron_mamba3.ops import Mamba3State
from megatron_mamba3.testing import make_case, make_state, rel_err  # noqa: F401  (re-exported for the tests)

__all__ = ["ERROR_MULTIPLE", "TILELANG_GPU", "angle_err", "assert_states_close", "bf16_bound", "make_case", "make_state", "rel_err"]

# The marks of a test module that runs the TileLang kernels: it needs a CUDA GPU and TileLang.
TILELANG_GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("tilelang") is None,
        reason="needs a CUDA GPU and TileLang (runs on the GPU machine, not in CPU-only CI)",
    ),
]

# The training entry's scripts (launch/ is not a package: they import each other by their file names).
LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def launch_module(name: str) -> types.ModuleType:
    """launch/<name>.py executed as the module `name` and registered in `sys.modules` under it, as the launch
    scripts import one another."""
    spec = importlib.util.spec_from_file_location(name, LAUNCH / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A bf16 kernel may err against the float64 oracle at most this many times the bf16 reference's own error.
ERROR_MULTIPLE = 4


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """PyTorch's deterministic algorithms on (or off) inside the block, warn-only (an op without one warns
    instead of raising), restored after it. A test that compares two runs bit for bit needs them: the
    TileLang backward then sums dB and dC over the heads exactly (`backward_kernels.head_sum_dtype`)."""
    enabled_before = torch.are_deterministic_algorithms_enabled()
    warn_only_before = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled_before, warn_only=warn_only_before)


def angle_err(actual: Tensor, expected: Tensor) -> float:
    """Largest difference of two angle tensors modulo 2π."""
    delta = torch.remainder(actual.double() - expected.double() + math.pi, 2 * math.pi) - math.pi
    return delta.abs().max().item()


def assert_states_close(actual: Mamba3State, expected: Mamba3State, tol: float) -> None:
    """h, k_prev and v_prev within `tol` relative; θ within `tol` modulo 2π."""
    for name in ("h", "k_prev", "v_prev"):
        assert rel_err(getattr(actual, name), getattr(expected, name)) < tol, name
    assert angle_err(actual.theta, expected.theta) < tol


def bf16_bound(own_error: float) -> float:
    """The relative error a bf16 kernel may have against the float64 oracle: ERROR_MULTIPLE times
    `own_error`, the relative error of the reference's chunked form on the same bf16-valued inputs."""
    assert 0 < own_error < 1e-2
    return ERROR_MULTIPLE * own_error
