"""launch/integrity.py: checkpoint manifests catch truncated and changed files (naming the file and the
previous good step), and the checkpoint-root lock refuses a second holder while the first lives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import LAUNCH, launch_module

integrity = launch_module("integrity")

FILES = {".metadata": 300, "__0_0.distcp": 5000, "__1_0.distcp": 5000, "train_state.json": 120}


def checkpoint(root: Path, step: int) -> Path:
    """A folder shaped like a finished checkpoint (the files a dist checkpoint and train.py write)."""
    folder = root / f"iter_{step:07d}"
    folder.mkdir(parents=True)
    for index, (name, size) in enumerate(FILES.items()):
        (folder / name).write_bytes(bytes((index + i * 7) % 256 for i in range(size)))
    integrity.write_manifest(folder)
    return folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path, count: int = 256) -> None:
    data = bytearray(path.read_bytes())
    data[100 : 100 + count] = bytes(b ^ 0xFF for b in data[100 : 100 + count])
    path.write_bytes(bytes(data))


def test_good_checkpoint_passes(tmp_path):
    folder = checkpoint(tmp_path, 20)
    entries = json.loads((folder / integrity.MANIFEST).read_text())
    assert {name: entry["bytes"] for name, entry in entries.items()} == FILES
    integrity.verify(folder)


@pytest.mark.parametrize("name", list(FILES))
@pytest.mark.parametrize("fault", ["truncated", "deleted"])
def test_missing_or_short_file_names_it_and_the_previous_good_step(tmp_path, name, fault):
    checkpoint(tmp_path, 10)
    folder = checkpoint(tmp_path, 20)
    truncate(folder / name) if fault == "truncated" else (folder / name).unlink()
    for checksums in (True, False):  # sizes are always checked
        with pytest.raises(SystemExit, match=rf"{folder / name} (has \d+ bytes|is missing).*--ckpt-step 10$") as error:
            integrity.verify(folder, checksums=checksums)
        assert isinstance(error.value.code, str)


def test_changed_bytes_are_caught_by_the_checksum_only(tmp_path):
    folder = checkpoint(tmp_path, 20)
    flip_bytes(folder / "__1_0.distcp")
    with pytest.raises(SystemExit, match=r"__1_0.distcp does not match its checksum.*no earlier checkpoint"):
        integrity.verify(folder)
    integrity.verify(folder, checksums=False)  # the documented trade-off of --no-checkpoint-checksums


def test_damaged_earlier_checkpoints_are_skipped_and_a_bad_manifest_named(tmp_path):
    checkpoint(tmp_path, 10)
    flip_bytes(checkpoint(tmp_path, 15) / "__0_0.distcp")
    folder = checkpoint(tmp_path, 20)
    truncate(folder / integrity.MANIFEST)
    with pytest.raises(SystemExit, match=rf"{folder / integrity.MANIFEST} is not readable JSON.*--ckpt-step 10$"):
        integrity.verify(folder)


def test_lock_refuses_a_second_holder_while_the_first_lives(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(LAUNCH)!r}); import integrity; "
                               f"held = integrity.try_lock(__import__('pathlib').Path({str(tmp_path)!r})); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        refused = integrity.try_lock(tmp_path)
        assert isinstance(refused, str) and f"in use by pid {holder.pid} on " in refused and "stop that run first" in refused
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    held = integrity.try_lock(tmp_path)  # the holder ended: the kernel released its lock
    assert not isinstance(held, str)
    held.close()
