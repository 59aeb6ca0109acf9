"""Checks that a non-finite input stays where the recurrence puts it, for any target and model.

Row 0 of 3c + 7 tokens, c the target's chunk (199 tokens for c = 64; the last chunk is partial),
packed as documents A [0, 2c + 2), B [2c + 2, 3c + 4), C [3c + 4, 3c + 7): the bad token 2c + 4
shares chunk 2 with the end of A and the start of B, and B's bad state enters chunk 3, where C
starts. Row 1 is one clean document; both rows start from initial states. These are the shapes of
the target's packed rows (`Target.length`), so XLA runs the graphs the packing cases compile. The expected reach (the recurrence, docs/math.md §2): a bad x reaches its head and
channel, a bad Δ its head, a bad angle every head, a bad B every head of its group, at the bad token
and every later token of B; a bad z only its own token, head and channel, a bad C its own token and
the heads of its group. The output norm spreads a head's bad channel over the head. Everything else
must equal the clean run bit for bit, and the gradient of A's outputs must be finite, equal the
clean run's, and be exactly zero outside A.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from megatron_mamba3.ops import Mamba3Inputs
from tests.conformance.targets import Model, Named, Target, result_shapes
from tests.helpers import deterministic_algorithms

# field -> (value, index after (b, t) of the bad entry, what it reaches: "state" or "own token")
BAD_INPUTS = {
    "x": (math.nan, (0, 3), "state"),
    "dt": (math.inf, (1,), "state"),
    "angles": (math.nan, (0,), "state"),
    "B": (-math.inf, (0, 0, 5), "state"),
    "z": (math.nan, (1, 2), "own token"),
    "C": (math.nan, (0, 0, 1), "own token"),
}


class Row(NamedTuple):
    """The row's length, its documents {name: (begin, end)} and the bad token."""

    length: int
    docs: dict[str, tuple[int, int]]
    bad: int


def row(chunk: int) -> Row:
    c = chunk
    return Row(3 * c + 7, {"A": (0, 2 * c + 2), "B": (2 * c + 2, 3 * c + 4), "C": (3 * c + 4, 3 * c + 7)}, 2 * c + 4)


def case(target: Target, model: Model) -> tuple[Named, Tensor]:
    """Clean inputs (2, length, ...), weights and initial states in the target's dtypes, and the
    (2, length) segment ids."""
    length, docs, _ = row(target.chunk)
    tensors = target.case(model, 2, length, seed=7, states=2)
    segment_ids = torch.full((2, length), len(docs), dtype=torch.int64)
    for index, (begin, end) in enumerate(docs.values()):
        segment_ids[0, begin:end] = index
    return tensors, segment_ids


def with_bad(tensors: Named, field: str, bad_token: int) -> Named:
    value, index, _ = BAD_INPUTS[field]
    bad = tensors[field].clone()
    bad[(0, bad_token, *index)] = value
    return tensors | {field: bad}


def expected_reach(field: str, target: Target, model: Model) -> Tensor:
    """(2, length, H, p) bool: the outputs the bad entry makes non-finite."""
    _, index, kind = BAD_INPUTS[field]
    length, docs, bad = row(target.chunk)
    H = target.H
    everywhere = torch.zeros(2, length, H, target.p, dtype=torch.bool)
    reach = everywhere[0]
    tokens = slice(bad, docs["B"][1]) if kind == "state" else slice(bad, bad + 1)
    if field in ("x", "z"):
        reach[tokens, index[0], index[1]] = True
    elif field == "dt":
        reach[tokens, index[0]] = True
    elif field == "angles":  # shared by every head
        reach[tokens] = True
    else:  # B, C: shared by the heads of the group
        group = index[1]
        reach[tokens, group * H // model.G : (group + 1) * H // model.G] = True
    spreads = model.norm and field != "z"  # the norm mixes y's channels; z gates after it
    if spreads:
        reach[:] = reach.any(dim=-1, keepdim=True)
    return everywhere


def check(target: Target, model: Model, field: str) -> None:
    """The target's scan on clean and bad inputs, and the gradient of a weighted sum of document A's
    outputs with respect to every input and weight. The bad run's outputs are non-finite exactly at
    `expected_reach` and bit-identical to the clean run's everywhere else; its gradients are finite,
    equal to the clean run's bit for bit, and exactly zero at tokens outside A. Both run under PyTorch's
    deterministic algorithms, as two runs compared bit for bit must.

    `target.plain_backward` (the recurrent oracle): its backward multiplies B's zero output gradients
    by B's non-finite values (0 · NaN), so only A's tokens and the clean document C are checked."""
    tensors, segment_ids = case(target, model)
    length, docs, bad_token = row(target.chunk)
    a_end, (c_begin, _) = docs["A"][1], docs["C"]
    # A's outputs weighted, and zero weights for the final states (the packing cases' backward).
    cotangents = {name: torch.zeros(shape) for name, shape in result_shapes(2, length, 2, target, model).items()}
    cotangents["out"][0, :a_end] = target.cotangents({"out": (a_end, target.H, target.p)}, seed=3)["out"]
    run = lambda scan_tensors: target.forward_backward(  # noqa: E731
        lambda leaves: target.scan(leaves, segment_ids=segment_ids), scan_tensors, cotangents
    )
    with deterministic_algorithms():
        clean, bad = run(tensors), run(with_bad(tensors, field, bad_token))

    reach = expected_reach(field, target, model)
    clean_out, bad_out = clean["out"], bad["out"]
    assert torch.equal(~torch.isfinite(bad_out), reach), f"non-finite at {(~torch.isfinite(bad_out)).nonzero()[:5].tolist()}"
    assert torch.equal(bad_out[~reach], clean_out[~reach])

    for name in tensors:
        per_token = name in Mamba3Inputs._fields
        if target.plain_backward and not per_token:
            continue
        clean_grad, bad_grad = clean[f"grad_{name}"], bad[f"grad_{name}"]
        if target.plain_backward:
            assert not clean_grad[:, a_end:].any() and not bad_grad[:, c_begin:].any(), name
            clean_grad, bad_grad = clean_grad[:, :a_end], bad_grad[:, :a_end]
        assert torch.isfinite(bad_grad).all(), name
        assert torch.equal(bad_grad, clean_grad), name
        if per_token and not target.plain_backward:
            assert not bad_grad[:, a_end:].any(), name
