"""Running a stack of blocks on XLA (docs/backends.md, XLA): a hybrid pattern as repeating units scanned with
`torch_xla.experimental.scan` (`scan_units`), or any stack as a plain loop (`run_hybrid_stack`).

A block is any `torch.nn.Module` mapping hidden states (b, l, d_model) to hidden states of the same
shape, called as `block(hidden, **runtime)` with the runtime tensors (e.g. `segment_ids`) of the
step. A pattern such as `M*M-` x 12 is 12 copies of the unit `M*M-`: `repeating_units` groups the
blocks into `Unit`s (a short plain loop each), and `scan_units` traces and compiles one unit and runs
it over the stacked weights of all units, so the traced graph holds one unit whatever the depth.
"""

from __future__ import annotations

import copy
import weakref
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from megatron_mamba3.ops.xla.partition import recompute_body


class Unit(nn.Module):
    """The repeating unit of a stack: its blocks run in order, hidden (b, l, d) -> (b, l, d)."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, hidden: Tensor, **runtime: Tensor) -> Tensor:
        return run_hybrid_stack(self.blocks, hidden, **runtime)


def repeating_units(blocks: Sequence[nn.Module], unit_length: int) -> list[Unit]:
    """Group `blocks` (e.g. 24 blocks of `M*M-` x 6) into consecutive units of `unit_length` blocks
    (`ValueError` unless it divides their number)."""
    if unit_length < 1 or len(blocks) % unit_length:
        raise ValueError(f"unit_length={unit_length} must be >= 1 and divide the {len(blocks)} blocks")
    return [Unit(blocks[start:start + unit_length]) for start in range(0, len(blocks), unit_length)]


def scan_units(units: Sequence[nn.Module], hidden: Tensor, **runtime: Tensor) -> Tensor:
    """Run identical `units` in order with `torch_xla.experimental.scan` over their stacked weights.

    hidden: (b, l, d_model) on an XLA device -> the last unit's output, same shape. `runtime`
    tensors (e.g. `segment_ids` (b, l)) reach every unit as scanned data, never as trace constants,
    so a new value does not recompile. Units must agree in their module tree (classes, any `config`
    attribute) and parameter / buffer names, shapes and dtypes (else `ValueError` naming the first
    unit that differs), and must not depend on other Python state that differs between them: the
    first unit is the one traced. Inside the traced unit, Mamba-3 layers unroll their chunk loop
    (torch_xla's scan cannot nest). The backward recomputes each unit from its input hidden states
    (`partition.recompute_body`), so a unit saves only those: (b, l, d_model) per unit.
    """
    from torch_xla.experimental.scan import scan

    _check_identical(units)
    weights = [{**dict(unit.named_parameters()), **dict(unit.named_buffers())} for unit in units]
    stacked = tree_map(lambda *tensors: torch.stack(tensors), *weights)
    repeated = {name: value.expand(len(units), *value.shape) for name, value in runtime.items()}
    step = _unit_step(units[0], tuple(t.requires_grad for t in stacked.values()))
    final, _ = scan(step, hidden, (stacked, repeated), partition_fn=recompute_body, is_fn_pure=True)
    return final


def run_hybrid_stack(blocks: Sequence[nn.Module], hidden: Tensor, **runtime: Tensor) -> Tensor:
    """Run a stack (Mamba-3, attention, MLP, ... blocks) as a plain loop: hidden (b, l, d_model)
    -> (b, l, d_model), each block called as `block(hidden, **runtime)`. Every block is traced into
    the step's graph on every step; `scan_units` traces one unit of a repeating pattern instead."""
    for block in blocks:
        hidden = block(hidden, **runtime)
    return hidden


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unit_step(template: nn.Module, grad_pattern: tuple[bool, ...]) -> Callable:
    """The scan body for units like `template`: (hidden, (weights, runtime)) -> (hidden, None).

    One function object per template and weight-gradient pattern, kept while the template lives:
    torch_xla caches a traced body by function and shapes (not by `requires_grad`), so the same
    object on every step skips re-tracing, and a no-grad call never reuses a training trace."""
    steps = _STEPS.setdefault(template, {})
    if grad_pattern not in steps:
        # The traced module: the template's structure sharing its tensors (a copy of them would be
        # device work in this step's graph alone, so the next step would compile a new graph);
        # functional_call swaps in each unit's tensors.
        shared = {id(t): t for t in (*template.parameters(), *template.buffers())}
        copied = copy.deepcopy(template, shared)

        def step(hidden, unit):
            weights, runtime = unit
            return torch.func.functional_call(copied, weights, (hidden,), runtime, strict=True), None

        steps[grad_pattern] = step
    return steps[grad_pattern]


def _signature(unit: nn.Module) -> tuple:
    modules = tuple((name, type(m), getattr(m, "config", None)) for name, m in unit.named_modules())
    tensors = {**dict(unit.named_parameters()), **dict(unit.named_buffers())}
    return modules, tuple((name, tuple(t.shape), t.dtype) for name, t in tensors.items())


def _check_identical(units: Sequence[nn.Module]) -> None:
    if not units:
        raise ValueError("scan_units needs at least one unit")
    first = _signature(units[0])
    for index, unit in enumerate(units[1:], start=1):
        signature = _signature(unit)
        if signature != first:
            where = _first_difference(first, signature)
            raise ValueError(
                f"unit {index} ({type(unit).__name__}) differs from unit 0 ({type(units[0]).__name__}) at {where}; "
                "scan_units needs identical units (same module tree, configs and tensor names, shapes and "
                "dtypes): regroup the pattern with repeating_units, or run it with run_hybrid_stack"
            )


def _first_difference(first: tuple, other: tuple) -> str:
    """Where two signatures first differ, in words: a submodule or a tensor."""
    for kind, ours, theirs in (("module", first[0], other[0]), ("tensor", first[1], other[1])):
        for mine, yours in zip(ours, theirs):
            if mine != yours:
                return f"{kind} {yours[0] or '<root>'!r}: {_describe(kind, yours)} vs {_describe(kind, mine)}"
        if len(ours) != len(theirs):
            return f"its {kind}s: {len(theirs)} vs {len(ours)}"
    return "<unknown>"


def _describe(kind: str, entry: tuple) -> str:
    if kind == "module":
        return entry[1].__name__ if entry[2] is None else f"{entry[1].__name__} with {entry[2]}"
    return f"shape {entry[1]} {entry[2]}"
