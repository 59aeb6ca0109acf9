"""A run split in two, the second half continuing from the first half's final state, equals the
float64 oracle's unsplit run on every backend: outputs and final state at every split position the
target lists, and at the middle one also the gradients of every input, weight and the initial
state (which flow back through the state between the halves)."""

import pytest
import torch

from megatron_mamba3.ops import Mamba3Inputs, Mamba3State
from tests.conformance.targets import (
    ORACLE,
    TILELANG_KERNELS,  # noqa: F401 (compiled first by tests/conftest.py)
    Named,
    Target,
    assert_close,
    cases,
    float64,
    oracle_scan,
    result_shapes,
)


def halves(target: Target, leaves: Named, split: int) -> Named:
    """The target's scan of tokens [0, split), then of [split, l) from the state it left."""
    tokens = lambda part: {name: t[:, part] if name in Mamba3Inputs._fields else t for name, t in leaves.items()}  # noqa: E731
    first = target.scan(tokens(slice(0, split)))
    middle = {f"initial_{name}": first[f"final_{name}"] for name in Mamba3State._fields}
    second = target.scan(tokens(slice(split, None)) | middle)
    return second | {"out": torch.cat((first["out"], second["out"]), dim=1)}


@pytest.mark.parametrize("target, model", cases())
def test_split_run_equals_the_oracle_run(target, model):
    length, splits = target.split
    tensors = target.case(model, 2, length, seed=21, states=2)
    cotangents = target.cotangents(result_shapes(2, length, 2, target, model))
    expected = ORACLE.forward_backward(oracle_scan, float64(tensors), cotangents)
    tol = target.bound(lambda: target.own_error(tensors, expected["out"]))
    with_gradients = splits[len(splits) // 2]
    for split in splits:  # empty halves and chunk-unaligned splits where the target lists them
        scan = lambda leaves: halves(target, leaves, split)  # noqa: E731
        if split == with_gradients:
            assert_close(target.forward_backward(scan, tensors, cotangents), expected, tol)
        else:
            got = target.forward(scan, tensors)
            assert_close(got, {name: expected[name] for name in got}, tol)
