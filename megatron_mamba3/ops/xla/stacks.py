"""Running a stack of blocks on XLA (SPEC 6): identical Mamba-3 blocks through torch_xla's
`scan_layers`, mixed hybrid stacks through a plain loop.

A block is any `torch.nn.Module` mapping hidden states (b, l, d_model) to hidden states of the same
shape. `scan_layers` traces and compiles the first block once and runs it over the stacked weights
of all blocks, so it is only correct for blocks that compute the same function of their weights.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


def scan_identical_blocks(blocks: Sequence[nn.Module], hidden: Tensor) -> Tensor:
    """Run identical `blocks` in order with `torch_xla.experimental.scan_layers.scan_layers`.

    hidden: (b, l, d_model) on an XLA device -> the last block's output, same shape. Blocks must
    share their class and parameter / buffer names, shapes and dtypes (else `ValueError` naming the
    first block that differs) and must not depend on Python state that differs between them.
    """
    from torch_xla.experimental.scan_layers import scan_layers

    _check_identical(blocks)
    return scan_layers(blocks, hidden)


def run_hybrid_stack(blocks: Sequence[nn.Module], hidden: Tensor) -> Tensor:
    """Run a mixed stack (Mamba-3, attention, MLP, ... blocks) as a plain loop: hidden (b, l, d_model)
    -> (b, l, d_model). Each block is traced into the step's graph once per distinct block, which is
    what XLA compiles; `scan_layers` would be wrong for blocks that differ."""
    for block in blocks:
        hidden = block(hidden)
    return hidden


def _signature(block: nn.Module) -> tuple:
    tensors = {**dict(block.named_parameters()), **dict(block.named_buffers())}
    return type(block), tuple((name, tuple(t.shape), t.dtype) for name, t in tensors.items())


def _check_identical(blocks: Sequence[nn.Module]) -> None:
    if not blocks:
        raise ValueError("scan_identical_blocks needs at least one block")
    first = _signature(blocks[0])
    for index, block in enumerate(blocks[1:], start=1):
        if _signature(block) != first:
            raise ValueError(
                f"block {index} ({type(block).__name__}) differs from block 0 ({type(blocks[0]).__name__}) in "
                "class or parameter/buffer names, shapes or dtypes; scan_layers needs identical blocks, "
                "run a mixed stack with run_hybrid_stack"
            )
