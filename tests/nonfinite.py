"""Shared checks that a non-finite input stays where the recurrence puts it, for any scan backend.

One row of 200 tokens packed as documents A [0, 130), B [130, 196), C [196, 200) with chunk 64: the
bad token 150 shares chunk 2 with the end of A and the start of B, and B's bad state enters chunk 3,
where C starts. The expected reach (the recurrence, docs/math.md §2): a bad x reaches its head and channel, a
bad Δ / A / trap its head, a bad angle or B every head of the group (G = 1: all), at the bad token
and every later token of B; a bad z or C only its own token. Everything else must equal the clean
run bit for bit, and the gradient of A's outputs must be finite, equal the clean run's, and be
exactly zero outside A.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from megatron_mamba3.ops import Mamba3Inputs, Mamba3Weights
from tests.helpers import make_case

L, H, P, BAD, CHUNK = 200, 2, 8, 150, 64
DOCS = {"A": (0, 130), "B": (130, 196), "C": (196, 200)}
# field -> (value, index after (b, t) of the bad entry, what it reaches: "state" or "own token")
BAD_INPUTS = {
    "x": (math.nan, (0, 3), "state"),
    "dt": (math.inf, (1,), "state"),
    "angles": (math.nan, (0,), "state"),
    "B": (-math.inf, (0, 0, 5), "state"),
    "z": (math.nan, (1, 2), "own token"),
    "C": (math.nan, (0, 0, 1), "own token"),
}

Scan = Callable[..., tuple[Tensor, object]]


class Sizes(NamedTuple):
    """Head dim p, state n, MIMO rank R, and whether the per-head output norm is on."""

    p: int = P
    n: int = 16
    R: int = 1
    norm: bool = False


SISO, MIMO_NORM = Sizes(), Sizes(R=2, norm=True)


def case(sizes: Sizes) -> tuple[Mamba3Inputs, Mamba3Weights, Tensor]:
    """Clean float64 inputs (1, L, ...), weights (G = 1) and the (1, L) segment ids."""
    inputs, weights = make_case(b=1, l=L, H=H, p=sizes.p, R=sizes.R, G=1, n=sizes.n, norm=sizes.norm, seed=7)
    segment_ids = torch.zeros(1, L, dtype=torch.int64)
    for index, (begin, end) in enumerate(DOCS.values()):
        segment_ids[:, begin:end] = index
    return inputs, weights, segment_ids


def with_bad(inputs: Mamba3Inputs, field: str) -> Mamba3Inputs:
    value, index, _ = BAD_INPUTS[field]
    bad = getattr(inputs, field).clone()
    bad[(0, BAD, *index)] = value
    return inputs._replace(**{field: bad})


def expected_reach(field: str, sizes: Sizes) -> Tensor:
    """(L, H, p) bool: the outputs the bad entry makes non-finite."""
    _, index, kind = BAD_INPUTS[field]
    reach = torch.zeros(L, H, sizes.p, dtype=torch.bool)
    tokens = slice(BAD, DOCS["B"][1]) if kind == "state" else slice(BAD, BAD + 1)
    if field in ("x", "z"):
        reach[tokens, index[0], index[1]] = True
    elif field == "dt":
        reach[tokens, index[0]] = True
    else:  # angles, B, C: shared by every head (one group)
        reach[tokens] = True
    spreads = sizes.norm and field != "z"  # the norm mixes y's channels; z gates after it
    return reach.any(dim=-1, keepdim=True).expand_as(reach) if spreads else reach


def check_forward(scan: Scan, field: str, to_device: Callable = lambda t: t, sizes: Sizes = SISO) -> None:
    """`scan(inputs, weights, segment_ids=...)` on clean and bad inputs: the bad run is non-finite
    exactly at `expected_reach`, and bit-identical to the clean run everywhere else."""
    inputs, weights, segment_ids = case(sizes)
    move = lambda named: type(named)(*(None if t is None else to_device(t) for t in named))  # noqa: E731
    clean, _ = scan(move(inputs), move(weights), segment_ids=to_device(segment_ids))
    bad, _ = scan(move(with_bad(inputs, field)), move(weights), segment_ids=to_device(segment_ids))
    clean, bad = clean.cpu()[0], bad.cpu()[0]
    reach = expected_reach(field, sizes)
    assert torch.equal(~torch.isfinite(bad), reach), f"non-finite at {(~torch.isfinite(bad)).nonzero()[:5].tolist()}..."
    assert torch.equal(bad[~reach], clean[~reach])


def check_gradient(
    scan: Scan, field: str, to_device: Callable = lambda t: t, sizes: Sizes = SISO, *, plain_backward: bool = False
) -> None:
    """The gradient of a weighted sum of document A's outputs with respect to every input and weight:
    finite, equal to the clean run's bit for bit, and exactly zero at tokens outside A.

    `plain_backward` (the recurrent oracle): its backward multiplies B's zero output gradients by B's
    non-finite values (0 · NaN), so only A's tokens and the clean document C are checked."""
    inputs, weights, segment_ids = case(sizes)
    names = [*Mamba3Inputs._fields, *(name for name, w in weights._asdict().items() if w is not None)]
    probe = torch.randn(1, DOCS["A"][1], H, sizes.p, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def gradients(scan_inputs: Mamba3Inputs) -> list[Tensor]:
        leaves = [to_device(t).detach().requires_grad_() for t in (*scan_inputs, *(w for w in weights if w is not None))]
        named_weights = Mamba3Weights(**dict(zip(names[8:], leaves[8:])))
        out, _ = scan(Mamba3Inputs(*leaves[:8]), named_weights, segment_ids=to_device(segment_ids))
        (out[:, : DOCS["A"][1]] * to_device(probe)).sum().backward()
        return [leaf.grad.cpu() for leaf in leaves]

    a_end, (c_begin, _) = DOCS["A"][1], DOCS["C"]
    for name, clean, bad in zip(names, gradients(inputs), gradients(with_bad(inputs, field)), strict=True):
        per_token = name in Mamba3Inputs._fields
        if plain_backward and not per_token:
            continue
        if plain_backward:
            assert not clean[:, a_end:].any() and not bad[:, c_begin:].any(), name
            clean, bad = clean[:, :a_end], bad[:, :a_end]
        assert torch.isfinite(bad).all(), name
        assert torch.equal(bad, clean), name
        if per_token and not plain_backward:
            assert not bad[:, a_end:].any(), name
