"""Quiet launches: drop the start-up messages that do not apply to `train.py` runs, keep every other.

Dropped, each by its exact source and text:
- gloo's "[Gloo] Rank r is connected to k peer ranks" line, one per process group and rank (about 50
  on a 2-process CPU run): written by C++ to the process's stdout while the groups are built;
- "No CUDA runtime is found" (torch's cpp_extension): a CPU run needs none;
- "MCore's async save is deprecated": this entry saves synchronously;
- megatron-core's import-time notes that Transformer Engine / Apex are missing (optional here, see
  the README), that MimoModelConfig is experimental (unused) and that the "full" CUDA-graph scope
  is deprecated (unused), and its CUDA_DEVICE_MAX_CONNECTIONS advice (CUDA only; shown on CUDA);
- torch's notes on megatron-core's checkpoint loading: that it reads the common state "in a single
  process" (megatron-core asks for exactly that, `no_dist=True`) and that `load`'s argument order
  changed (megatron-core's call, not ours).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings

GLOO_CONNECTED = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of connected peer ranks is : \d+\n?")
WARNING_NOTES = (
    r"Transformer Engine and Apex are not installed\. Falling back",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"MimoModelConfig is experimental",
    r"full scope is deprecated\. Use empty cuda_graph_modules",
    r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single process",
    r"The argument order of load has been changed",
)
LOG_NOTES = {
    "torch.utils.cpp_extension": "No CUDA runtime is found",
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
}


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_notes(on_cuda: bool) -> None:
    """Install the warning and log filters; call before megatron.core is imported."""
    for message in WARNING_NOTES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    if not on_cuda:
        warnings.filterwarnings("ignore", message=r"When using async grad allreduce it is recommended", category=UserWarning)
    for name, prefix in LOG_NOTES.items():
        logging.getLogger(name).addFilter(_DropPrefix(prefix))


@contextlib.contextmanager
def without_gloo_connected_lines():
    """Run the block with the process's stdout (file descriptor 1, where C++ writes) captured, then
    write it back without gloo's "connected" lines."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            captured.seek(0)
            os.write(1, GLOO_CONNECTED.sub("", captured.read().decode(errors="replace")).encode())
