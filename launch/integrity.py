"""Checkpoint integrity: a manifest written with every checkpoint and checked before it is read, and
a lock that keeps a second run from saving into the same checkpoint root.

`manifest.json` in a checkpoint folder lists every other file of it with its size and CRC-32. A
resume checks the sizes always and the checksums unless `--no-checkpoint-checksums` (they read the
whole checkpoint once, which matters only for very large ones). A damaged checkpoint is refused,
naming the damaged file and the newest earlier checkpoint that passes the same check (`--ckpt-step`).

The lock is `.lock` in the checkpoint root, an exclusive `flock` held by rank 0 of the saving run for
its whole life: the kernel drops it when that process ends, however it ends, so it is never stale.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import zlib
from pathlib import Path

MANIFEST = "manifest.json"
LOCK = ".lock"
_CHUNK = 1 << 24


class CheckpointDamaged(SystemExit):
    """A checkpoint that fails its manifest; the message names the file and the previous good step."""


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as file:
        while block := file.read(_CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Record the size and CRC-32 of every file under `folder` (hidden ones too) in its manifest."""
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "crc32": _crc32(p)} for p in _files(folder)}
    (folder / MANIFEST).write_text(json.dumps(entries, indent=1))


def damage(folder: Path, checksums: bool = True) -> str | None:
    """None when `folder` matches its manifest, else what is wrong, naming the file. A folder without a
    manifest (saved before manifests existed) is taken as it is."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{manifest} is not readable JSON"
    for name, expected in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path} has {size} bytes, the manifest says {expected['bytes']}"
        if checksums and _crc32(path) != expected["crc32"]:
            return f"{path} does not match its checksum in the manifest (its bytes changed after the save)"
    return None


def verify(folder: Path, checksums: bool = True) -> None:
    """`CheckpointDamaged` when `folder` (root/iter_XXXXXXX) fails its manifest, naming the newest
    earlier checkpoint under the same root that passes."""
    problem = damage(folder, checksums)
    if problem is None:
        return
    step = int(folder.name.removeprefix("iter_"))
    earlier = sorted((p for p in folder.parent.glob("iter_???????") if p.is_dir() and int(p.name[5:]) < step), reverse=True)
    good = next((p for p in earlier if (p / "train_state.json").is_file() and damage(p, checksums) is None), None)
    advice = (f"resume from the previous good one with --ckpt-step {int(good.name[5:])}" if good
              else "no earlier checkpoint under it passes: start afresh (or restore the file)")
    raise CheckpointDamaged(f"checkpoint {folder} is damaged: {problem}; {advice}")


def try_lock(root: Path):
    """Take the exclusive lock of checkpoint root `root`: returns the open lock file (keep it open
    to hold the lock), or a message naming the holder when another process holds it."""
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return (f"checkpoint root {root} is in use by {holder}, a run still saving there: stop that run first "
                f"(see the README, 'Stopping a run'), or save elsewhere")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def check_unlocked(root: Path) -> None:
    """SystemExit naming the holder when another process holds the lock of checkpoint root `root`."""
    held = try_lock(root)
    if isinstance(held, str):
        raise SystemExit(held)
    held.close()
