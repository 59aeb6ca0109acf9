"""tests/xla: the XLA backend on torch_xla's CPU PJRT client.

Sets PJRT_DEVICE=CPU (unless already set) before torch_xla is imported, and XLA_FLAGS (unless set)
to LLVM optimisation level 0 for the CPU code generator: it halves compile time (about 5 s -> 2.5 s
per graph here) and changes no HLO pass, so the graphs under test are the same. Starts the XLA runtime
here, at collection, before any test runs a backward pass: the autograd engine sizes its per-device
queues at the first backward of the process, and an XLA backward after a CPU one fails otherwise
(pytorch/xla#4174). Without torch_xla every test in this folder is skipped, saying why; the test
modules reach torch_xla only through the fixtures below, so they still import.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
try:
    import torch_xla

    torch_xla.device()
    UNAVAILABLE = None
except ImportError as error:
    UNAVAILABLE = f"torch_xla cannot be imported ({error})"


def pytest_collection_modifyitems(items):
    if UNAVAILABLE is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.skip(reason=UNAVAILABLE))


@pytest.fixture
def device():
    """The XLA device (CPU PJRT in CI)."""
    return torch_xla.device()


@pytest.fixture
def sync():
    """`torch_xla.sync`: compile (first time) and run every pending operation as one graph."""
    return torch_xla.sync
