"""A non-finite input stays in its document and after its token on the XLA backend (CPU PJRT, fp32):
the checks of tests/nonfinite.py, as for the reference backend in tests/unit/test_nonfinite.py."""

import pytest

from megatron_mamba3.ops.xla.scan_adapter import mamba3_xla_scan
from tests.nonfinite import BAD_INPUTS, CHUNK, check_forward, check_gradient

pytestmark = pytest.mark.xla


def scan(inputs, weights, **packing):
    out, state = mamba3_xla_scan(inputs, weights, chunk_size=CHUNK, **packing)
    import torch_xla

    torch_xla.sync()
    return out, state


@pytest.fixture
def to_device(device):
    return lambda t: (t.float() if t.is_floating_point() else t).to(device)


@pytest.mark.parametrize("field", list(BAD_INPUTS))
def test_bad_input_reaches_only_its_document_and_later_tokens(to_device, field):
    check_forward(scan, field, to_device)


@pytest.mark.parametrize("field", ["x", "dt", "z"])
def test_gradient_of_one_document_ignores_bad_input_of_another(to_device, field):
    check_gradient(scan, field, to_device)
