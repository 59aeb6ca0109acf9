"""What `train.py` checks before any process group, model or optimizer exists, and how it reports a
project error: one line on rank 0 ("[train] error: ..."), exit status 1 (2 for a bad flag).

The launchers run `train.py --check-only` in one process (with WORLD_SIZE set to the number of
processes they will start) before torchrun, so a bad flag is reported on its own, not under
torchrun's ChildFailedError summary.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

MAMBA3_FLAGS = "d_model: --hidden-size, headdim: --mamba-head-dim, d_state: --mamba-state-dim, ngroups: --mamba-num-groups"


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on rank 0 (every rank exits 2)."""

    def error(self, message: str):
        if is_rank_zero():
            print(f"[train] error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def report_project_errors(run) -> None:
    """Call `run()`; a `SystemExit` with a message becomes that one line on rank 0 and exit status 1."""
    try:
        run()
    except SystemExit as error:
        if not isinstance(error.code, str):
            raise
        if is_rank_zero():
            print(f"[train] error: {error.code}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def check_up_front(args: argparse.Namespace) -> None:
    """SystemExit naming the bad value for the process count, the model's sizes against the TP size,
    the Mamba-3 backend and the data files; sets args.tensor_model_parallel_size (processes / CP)."""
    from megatron_mamba3 import Mamba3Config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp = args.context_parallel_size
    tp = args.tensor_model_parallel_size or world // cp
    if tp * cp != world:
        raise SystemExit(f"--tensor-model-parallel-size {tp} x --context-parallel-size {cp} with {world} processes: "
                         f"this entry runs one data-parallel replica, so TP x CP must equal the number of processes")
    args.tensor_model_parallel_size = tp
    for flag, value in (("--vocab-size", args.vocab_size), ("--num-attention-heads", args.num_attention_heads)):
        if value % tp:
            raise SystemExit(f"{flag} {value} must be divisible by the TP size {tp}")
    if args.sequence_parallel and args.seq_length % (tp * cp):
        raise SystemExit(f"--sequence-parallel needs --seq-length ({args.seq_length}) divisible by TP x CP = {tp * cp}")
    try:
        config = Mamba3Config(
            d_model=args.hidden_size, headdim=args.mamba_head_dim, d_state=args.mamba_state_dim,
            ngroups=args.mamba_num_groups, mimo_rank=args.mimo_rank, rope_fraction=args.rope_fraction,
            chunk_size=args.chunk_size, is_outproj_norm=args.outproj_norm,
        )
        _check_layout(config, tp)
        _check_backend(args, config, tp)
    except ValueError as error:
        raise SystemExit(f"the Mamba-3 layers ({MAMBA3_FLAGS}): {error}") from None
    for flag, path in (("--data-path", args.data_path), ("--doc-ids-path", args.doc_ids_path)):
        if path is not None and not os.path.isfile(path):
            raise SystemExit(f"{flag} {path}: no such file")


def _check_layout(config, tp: int) -> None:
    from megatron_mamba3.in_proj import InProjLayout

    InProjLayout(config, tp, 0)  # tp divides the heads; B/C groups split or replicated


def _check_backend(args: argparse.Namespace, config, tp: int) -> None:
    """The backend asked for (--mamba3-backend, else MEGATRON_MAMBA3_BACKEND) can run this model's
    scan on this device and dtype: the registry is asked about one token of the real sizes."""
    from megatron_mamba3.ops import Mamba3Inputs
    from megatron_mamba3.ops.registry import AUTO, BACKEND_ENV, select_backend

    if (args.mamba3_backend or os.environ.get(BACKEND_ENV, AUTO)) == AUTO:
        return  # auto always runs something
    H, p, R, n = config.nheads // tp, config.headdim, config.mimo_rank, config.d_state
    new = lambda *shape: torch.zeros(shape, device=args.device, dtype=torch.bfloat16 if args.bf16 else torch.float32)  # noqa: E731
    token = Mamba3Inputs(new(1, 1, H, p), new(1, 1, H, p), new(1, 1, R, 1, n), new(1, 1, R, 1, n),
                         new(1, 1, H), new(1, 1, H), new(1, 1, H), new(1, 1, config.num_rope_angles))
    select_backend(args.mamba3_backend, token)  # ValueError saying why it cannot run
