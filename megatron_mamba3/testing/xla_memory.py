"""Bytes that torch_xla's scan saves per iteration for the backward, read off its forward body."""

from __future__ import annotations

import contextlib

import torch_xla.experimental.scan as scan_module


@contextlib.contextmanager
def saved_bytes_per_iteration():
    """Within the block, every scan's forward body records the bytes of the activations it saves
    beyond its scanned inputs (which scan keeps anyway) into the yielded list, once per traced
    iteration (an int per call)."""
    recorded: list[int] = []
    original = scan_module.value_and_grad_partitioned

    def recording(*args, **kwargs):
        forward, alias_input, backward = original(*args, **kwargs)

        def measured_forward(carry, x):
            new_carry, (y, saved) = forward(carry, x)
            recorded.append(sum(t.numel() * t.element_size() for t in saved))
            return new_carry, (y, saved)

        return measured_forward, alias_input, backward

    scan_module.value_and_grad_partitioned = recording
    try:
        yield recorded
    finally:
        scan_module.value_and_grad_partitioned = original
