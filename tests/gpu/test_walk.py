"""The TileLang forward as `chunk_walk` (run on the GPU machine; skipped elsewhere): the checks that the other
GPU and conformance tests make of the kernels, with the forward made to walk the chunks whatever the size.

At these tests' sizes (a few (row, head) pairs) `function.walks` picks the chunk-parallel forward, which the
other modules then test; here it is replaced by one that always walks, so that `chunk_walk` is held to the
same oracles and bounds: the fp32 reference within `bf16_bound` (every output, final state and gradient, wide
angles), the float64 oracle on each packed document alone (rows with states, `segment_ids`, `cu_seqlens`),
bad inputs that reach only their own document, a split run continued from its state, CUDA-graph replay, and
the forward without a backward (which keeps no chunk starts) against the one with.
"""

import pytest
import torch

from megatron_mamba3.ops import mamba3_scan
from megatron_mamba3.ops.tilelang import function
from tests.conformance import nonfinite, test_isolation, test_packing, test_state
from tests.conformance.packings import PACKINGS
from tests.conformance.targets import TILELANG_KERNELS as CONFORMANCE_KERNELS
from tests.conformance.targets import cases
from tests.gpu import test_cuda_graph, test_tilelang_kernels
from tests.helpers import TILELANG_GPU

pytestmark = TILELANG_GPU

TILELANG_KERNELS = (  # (tests/conftest.py)
    test_tilelang_kernels.TILELANG_KERNELS + test_cuda_graph.TILELANG_KERNELS + CONFORMANCE_KERNELS
)
TILELANG_CASES = cases(where=lambda target: target.backend == "tilelang")
KERNEL_CONFIGS = test_tilelang_kernels.CONFIGS


@pytest.fixture(autouse=True)
def _walking(monkeypatch):
    monkeypatch.setattr(function, "walks", lambda p, rows, device: True)


@pytest.mark.parametrize("wide_angles", [False, True], ids=["angles", "wide-angles"])
@pytest.mark.parametrize("config", KERNEL_CONFIGS, ids=test_tilelang_kernels.IDS)
def test_forward_and_gradients_match_reference(config, wide_angles):
    test_tilelang_kernels._check_against_reference(config, wide_angles=wide_angles)


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("target, model", TILELANG_CASES)
def test_packed_documents_equal_the_oracle_on_each_document_alone(target, model, packing):
    test_packing.test_packed_documents_equal_the_oracle_on_each_document_alone(target, model, packing)


@pytest.mark.parametrize("field", list(nonfinite.BAD_INPUTS))
@pytest.mark.parametrize("target, model", TILELANG_CASES)
def test_bad_input_reaches_only_its_document_and_later_tokens(target, model, field):
    nonfinite.check(target, model, field)


@pytest.mark.parametrize("target, model", TILELANG_CASES)
def test_perturbing_one_document_changes_no_other(target, model):
    test_isolation.test_perturbing_one_document_changes_no_other(target, model)


@pytest.mark.parametrize("target, model", TILELANG_CASES)
def test_split_run_equals_the_oracle_run(target, model):
    test_state.test_split_run_equals_the_oracle_run(target, model)


@pytest.mark.parametrize("config", test_cuda_graph.CONFIGS, ids=["siso", "mimo-r4-norm"])
@pytest.mark.parametrize("packing", ["plain", "segment_ids", "segment_ids+prep", "cu_seqlens+initial_state"])
def test_graph_replay_equals_eager(packing, config):
    test_cuda_graph.test_graph_replay_equals_eager(packing, config)


@pytest.mark.parametrize("config", test_cuda_graph.CONFIGS, ids=["siso", "mimo-r4-norm"])
def test_forward_without_a_backward_equals_the_forward_that_saves_for_one(config):
    """Without a backward to follow (no gradient wanted) the walk keeps no chunk starts (`function._walk`); its
    outputs and final state are those of the same forward with gradients on, bit for bit."""
    inputs, weights, state, segment_ids, *_ = test_cuda_graph._case(
        *config, seed=5, starts=test_cuda_graph.CAPTURED_STARTS, offsets=test_cuda_graph.CAPTURED_OFFSETS
    )
    options = dict(segment_ids=segment_ids, initial_state=state, backend="tilelang")
    with torch.no_grad():
        without = mamba3_scan(inputs, weights, **options)
    wanting = type(inputs)(*(t.detach().requires_grad_() for t in inputs))
    with_grad = mamba3_scan(wanting, weights, **options)
    for name, got, expected in zip(test_cuda_graph.OUTPUTS, (without[0], *without[1]), (with_grad[0], *with_grad[1])):
        assert torch.equal(got, expected.detach()), name
