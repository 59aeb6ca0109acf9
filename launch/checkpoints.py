"""Atomic Megatron distributed checkpoints of model and optimizer for `launch/train.py`.

Layout under a checkpoint root:

    iter_0000020/         one finished checkpoint: dist_checkpointing files + train_state.json
                          + manifest.json (every file's size and CRC-32, see integrity.py)
    latest                text file naming the newest finished checkpoint ("iter_0000020")
    .lock                 held by the run saving here (see integrity.py)

A checkpoint is written into `iter_XXXXXXX.partial/` and renamed to its final name only after every
rank has finished writing and `train_state.json` is in place; `latest` is then replaced atomically
(write to a temporary file, `os.replace`). A run killed at any moment leaves `latest` naming a
complete checkpoint (or absent); a left-over `.partial` folder is never read and is removed by the
next save of that step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
from integrity import write_manifest
from megatron.core import dist_checkpointing

TRACKER = "latest"
TRAIN_STATE = "train_state.json"


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    model_state = model.sharded_state_dict()
    return {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading)}


def save_checkpoint(root: str, iteration: int, model, optimizer, train_state: dict) -> Path:
    """Collectively save `model` (the bare HybridModel) and `optimizer` at `iteration` under `root`;
    `train_state` (JSON-able, rank 0's copy is kept) is stored beside them. Returns the folder."""
    root_path = Path(root)
    final = root_path / checkpoint_name(iteration)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        (partial / TRAIN_STATE).write_text(json.dumps({"iteration": iteration, **train_state}, indent=1))
        write_manifest(partial)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
        tracker_tmp = root_path / f".{TRACKER}.tmp"
        tracker_tmp.write_text(final.name + "\n")
        os.replace(tracker_tmp, root_path / TRACKER)
    dist.barrier()
    return final


def find_checkpoint(root: str, iteration: int | None = None) -> Path | None:
    """The folder of checkpoint `iteration` under `root`, or of the latest one when `iteration` is
    None (None when `root` has no `latest`). Raises `FileNotFoundError` for a named one that is missing."""
    root_path = Path(root)
    if iteration is not None:
        folder = root_path / checkpoint_name(iteration)
        if not (folder / TRAIN_STATE).is_file():
            raise FileNotFoundError(f"no finished checkpoint {folder} (looked for {TRAIN_STATE} in it)")
        return folder
    tracker = root_path / TRACKER
    if not tracker.is_file():
        return None
    folder = root_path / tracker.read_text().strip()
    if not (folder / TRAIN_STATE).is_file():
        raise FileNotFoundError(f"{tracker} names {folder}, which is not a finished checkpoint")
    return folder


def read_train_state(folder: Path) -> dict:
    return json.loads((folder / TRAIN_STATE).read_text())


def load_checkpoint(folder: Path, model, optimizer) -> None:
    """Collectively load model and optimizer state from `folder` into `model` and `optimizer`."""
    loaded = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), str(folder))
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
