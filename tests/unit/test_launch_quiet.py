"""launch/quiet.py drops exactly the start-up notes it lists and keeps every other line and warning."""

from __future__ import annotations

import logging
import os
import warnings

from tests.helpers import launch_module

quiet = launch_module("quiet")


def test_gloo_connected_lines_are_dropped_from_the_file_descriptor(capfd):
    with quiet.without_gloo_connected_lines():
        os.write(1, b"[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n")
        os.write(1, b"a line of the program\n")
        os.write(1, b"[Gloo] Rank 0 is connected to 0 peer ranks. Expected number of connected peer ranks is : 0\n")
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "a line of the program\nafter\n"


def test_notes_that_do_not_apply_are_filtered_and_real_warnings_kept(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.quiet_notes(on_cuda=False)
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to local implementations", UserWarning)
        warnings.warn("When using async grad allreduce it is recommended to set CUDA_DEVICE_MAX_CONNECTIONS", UserWarning)
        warnings.warn("a real problem", UserWarning)
    assert [str(w.message) for w in caught] == ["a real problem"]
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/usr'")
        logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").warning("MCore's async save is deprecated")
        logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").warning("a real checkpoint problem")
    assert [record.getMessage() for record in caplog.records] == ["a real checkpoint problem"]
