"""A non-finite input stays in its document and after its token on the TileLang backend (bf16 inputs,
fp32 weights; run on the GPU machine, skipped elsewhere): the checks of tests/nonfinite.py, as for
the reference (tests/unit/test_nonfinite.py) and XLA (tests/xla/test_nonfinite.py) backends."""

import importlib.util

import pytest
import torch

from megatron_mamba3.ops import Mamba3Weights, mamba3_scan
from tests.nonfinite import BAD_INPUTS, CHUNK, Sizes, check_forward, check_gradient

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("tilelang") is None,
        reason="needs a CUDA GPU and TileLang (runs on the GPU machine, not in CPU-only CI)",
    ),
]
SIZES = [Sizes(p=64, n=64), Sizes(p=64, n=64, R=2, norm=True)]  # sizes the kernels take


def scan(inputs, weights, **packing):
    weights = Mamba3Weights(*(None if w is None else w.float() for w in weights))
    return mamba3_scan(inputs, weights, chunk_size=CHUNK, backend="tilelang", **packing)


def to_device(t):
    return (t.bfloat16() if t.is_floating_point() else t).cuda()


@pytest.mark.parametrize("sizes", SIZES, ids=["SISO", "MIMO-norm"])
@pytest.mark.parametrize("field", list(BAD_INPUTS))
def test_bad_input_reaches_only_its_document_and_later_tokens(field, sizes):
    check_forward(scan, field, to_device, sizes)


@pytest.mark.parametrize("sizes", SIZES, ids=["SISO", "MIMO-norm"])
@pytest.mark.parametrize("field", list(BAD_INPUTS))
def test_gradient_of_one_document_ignores_bad_input_of_another(field, sizes):
    check_gradient(scan, field, to_device, sizes)
