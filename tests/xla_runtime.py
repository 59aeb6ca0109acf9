"""torch_xla for the tests, on its CPU PJRT client: tests/xla and the XLA runs of tests/conformance.

Importing this module sets PJRT_DEVICE=CPU (unless already set) before torch_xla is imported, and
XLA_FLAGS (unless set) to LLVM optimisation level 0 for the CPU code generator: it halves compile
time (about 5 s -> 2.5 s per graph here) and changes no HLO pass, so the graphs under test are the
same. It then starts the XLA runtime, at collection, before any test runs a backward pass: the
autograd engine sizes its per-device queues at the first backward of the process, and an XLA
backward after a CPU one fails otherwise (pytorch/xla#4174).
"""

import os

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
try:
    import torch_xla

    DEVICE = torch_xla.device()
    UNAVAILABLE = None
except ImportError as error:
    DEVICE = None
    UNAVAILABLE = f"torch_xla cannot be imported ({error})"


def sync() -> None:
    """`torch_xla.sync`: compile (first time) and run every pending operation as one graph."""
    torch_xla.sync()
