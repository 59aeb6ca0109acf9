"""Run by `test_spmd.py` in its own process (4 CPU PJRT devices, SPMD): the XLA scan with every
per-head tensor sharded over heads, forward and backward; writes the results and XLA's HLO dump.

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 XLA_FLAGS=--xla_dump_to=DIR/hlo python -m tests.xla.spmd_heads DIR
"""

import sys
from pathlib import Path

import numpy as np
import torch
import torch_xla
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr

from tests.xla.test_spmd import CASE, HEAD_AXES, forward_backward

DEVICES = 4


def main(out_dir: Path) -> None:
    xr.use_spmd()
    if xr.global_runtime_device_count() != DEVICES:
        raise SystemExit(f"expected {DEVICES} devices, got {xr.global_runtime_device_count()}")
    mesh = xs.Mesh(np.arange(DEVICES), (1, DEVICES), ("data", "heads"))
    specs = {}

    def shard_heads(name, tensor):
        if name in HEAD_AXES:
            spec = [None] * tensor.dim()
            spec[HEAD_AXES[name]] = "heads"
            xs.mark_sharding(tensor, mesh, tuple(spec))
        specs[name] = torch_xla._XLAC._get_xla_sharding_spec(tensor)
        return tensor

    results = forward_backward(torch_xla.device(), torch_xla.sync, "xla", *CASE(), place=shard_heads)
    torch.save({"results": results, "specs": specs}, out_dir / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
