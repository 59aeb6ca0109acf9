"""Run a function on several CPU processes with gloo and Megatron's model-parallel groups.

`run_ranks(fn, world_size, *args, context_parallel=cp)` spawns `world_size` processes (tensor
parallel size world_size / cp, context parallel size cp (default 1), data parallel 1), runs
`fn(rank, *args)` in each and returns every rank's result (anything `torch.save` takes), in rank
order. An exception in any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, cp: int, port: int, folder: str, fn, args: tuple) -> None:
    from megatron.core import parallel_state

    from megatron_mamba3.patches import apply_cpu_patches

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size // cp, context_parallel_size=cp)
    apply_cpu_patches()
    try:
        torch.save(fn(rank, *args), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, context_parallel: int = 1) -> list:
    """`fn(rank, *args)` on `world_size` spawned gloo processes forming one TP x CP grid (TP size
    world_size / context_parallel) -> results by rank."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(world_size, context_parallel, _free_port(), folder, fn, args), nprocs=world_size, join=True)
        # The results are our own test objects (dataclasses, receipts), so full unpickling is safe.
        return [torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=False) for rank in range(world_size)]
