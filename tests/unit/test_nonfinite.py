"""A non-finite input stays in its document and after its token: reference chunked and recurrent
(the checks and the case are in tests/nonfinite.py; the XLA run is tests/xla/test_nonfinite.py)."""

import pytest

from megatron_mamba3.ops.oracle import mamba3_recurrent
from megatron_mamba3.ops.reference import mamba3_chunked
from tests.nonfinite import BAD_INPUTS, CHUNK, MIMO_NORM, SISO, check_forward, check_gradient

chunked = lambda inputs, weights, **packing: mamba3_chunked(inputs, weights, chunk_size=CHUNK, **packing)  # noqa: E731
SCANS = {"chunked": chunked, "recurrent": mamba3_recurrent}


@pytest.mark.parametrize("sizes", [SISO, MIMO_NORM], ids=["SISO", "MIMO-norm"])
@pytest.mark.parametrize("field", list(BAD_INPUTS))
@pytest.mark.parametrize("variant", list(SCANS))
def test_bad_input_reaches_only_its_document_and_later_tokens(variant, field, sizes):
    check_forward(SCANS[variant], field, sizes=sizes)


@pytest.mark.parametrize("sizes", [SISO, MIMO_NORM], ids=["SISO", "MIMO-norm"])
@pytest.mark.parametrize("field", list(BAD_INPUTS))
@pytest.mark.parametrize("variant", list(SCANS))
def test_gradient_of_one_document_ignores_bad_input_of_another(variant, field, sizes):
    check_gradient(SCANS[variant], field, sizes=sizes, plain_backward=variant == "recurrent")
