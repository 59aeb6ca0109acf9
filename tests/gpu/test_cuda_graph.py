"""The TileLang forward in a CUDA graph (run on the GPU machine; skipped elsewhere): `mamba3_scan(
backend="tilelang")` captured once on bf16 inputs, then replayed after new inputs (new values, weights,
initial state, document boundaries and the prep's weights) are copied into the captured tensors, equals
an eager call on the new inputs bit for bit; with and without the layer's prep in the kernels, and for
`cu_seqlens` documents with their initial states (new offsets of as many documents).

Bit-exact, not within a tolerance: replay launches the same kernels with the same grids, shapes,
strides and values as the eager call, and each is deterministic on one GPU (the forward kernels use
no atomics; the PyTorch prep is elementwise ops, cumsum, searchsorted, gather and cuBLAS batched
matmuls, whose algorithm depends on shapes, strides and alignment, all alike). A capture fails if the forward
synchronises with the host; the eager warm-up runs under `torch.cuda.set_sync_debug_mode("error")`
first, so such an op is named. The host-side half, on CPU: tests/unit/test_tilelang_host_sync.py.
"""


import pytest
import torch

from megatron_mamba3.ops import Mamba3Inputs, Mamba3Prep, mamba3_scan
from megatron_mamba3.ops.tilelang.function import TILE_ROWS
from tests.helpers import TILELANG_GPU, deterministic_algorithms, make_case, make_state

pytestmark = TILELANG_GPU

BATCH, LENGTH, HEADS = 2, 200, 4
CONFIGS = [(128, 64, 1, 1, False), (128, 64, 4, 1, True)]  # (n, p, R, G, norm): SISO and MIMO R=4
A_FLOOR = 0.5  # the prep's (for the "+prep" packing), as tests/gpu/test_tilelang_kernels.py's
# The kernel configs (H, p, n, R, G, S, Q, norm, A_floor, packed) used here, compiled first (tests/conftest.py).
TILELANG_KERNELS = [
    (HEADS, p, n, R, G, n // 4, TILE_ROWS // R, norm, floor, False) for n, p, R, G, norm in CONFIGS for floor in (None, A_FLOOR)
] + [(HEADS, p, n, R, G, n // 4, TILE_ROWS // R, norm, None, True) for n, p, R, G, norm in CONFIGS]
CAPTURED_STARTS = [(0, 37), (0, 150), (1, 195)]  # (row, token) where a document starts
REPLAYED_STARTS = [(0, 64), (0, 100), (1, 5), (1, 128)]  # other boundaries, two on chunk boundaries
CAPTURED_OFFSETS = [0, 37, 150, LENGTH]  # cu_seqlens documents of row 0
REPLAYED_OFFSETS = [0, 0, 128, LENGTH]  # an empty document, one starting on a chunk boundary
OUTPUTS = ("out", "h", "k_prev", "v_prev", "theta")


def _case(n, p, R, G, norm, seed, starts, offsets):
    """(inputs bf16, weights fp32, initial state fp32, segment ids int64, the prep's dt_bias, B_norm, C_norm
    fp32, cu_seqlens int32, the documents' initial states fp32), all on the GPU; with the prep, the inputs'
    dt, A, B and C are taken as raw."""
    inputs, weights = make_case(b=BATCH, l=LENGTH, H=HEADS, p=p, R=R, G=G, n=n, norm=norm, seed=seed)
    state = make_state(BATCH, HEADS, p, R, n, n // 4, seed=seed + 1)
    documents = make_state(len(offsets) - 1, HEADS, p, R, n, n // 4, seed=seed + 3)
    segment_ids = torch.zeros(BATCH, LENGTH, dtype=torch.int64)
    for row, token in starts:
        segment_ids[row, token:] += 1
    generator = torch.Generator().manual_seed(seed + 2)
    prep = tuple(torch.randn(size, generator=generator) + 1 for size in (HEADS, n, n))
    cuda = lambda part, dtype: type(part)(*(None if t is None else t.to("cuda", dtype) for t in part))  # noqa: E731
    cases = cuda(inputs, torch.bfloat16), cuda(weights, torch.float32), cuda(state, torch.float32)
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device="cuda")
    return (*cases, segment_ids.cuda(), tuple(t.cuda() for t in prep), cu_seqlens, cuda(documents, torch.float32))


def _tensors(case):
    inputs, weights, state, segment_ids, prep, cu_seqlens, documents = case
    return [t for t in (*inputs, *weights, *state, segment_ids, *prep, cu_seqlens, *documents) if t is not None]


def _run(case, packing):
    """(out, *final state) of one `mamba3_scan` call on `case` (`_case`) with `packing`."""
    inputs, weights, state, segment_ids, prep, cu_seqlens, documents = case
    options = dict(segment_ids=segment_ids, initial_state=state) if packing != "plain" else {}
    if packing.endswith("+prep"):  # the layer's prep in chunk_prep
        options["prep"] = Mamba3Prep(*prep, A_FLOOR)
    if packing.startswith("cu_seqlens"):  # row 0's documents (views of the captured tensors)
        inputs = Mamba3Inputs(*(t[:1] for t in inputs))
        options = dict(cu_seqlens=cu_seqlens, initial_state=documents)
    out, final = mamba3_scan(inputs, weights, backend="tilelang", **options)
    return (out, *final)


def _capture(step, static):
    """(`step(static)` run eagerly once, its CUDA graph, the graph's outputs): warm-up and capture on one side
    stream, as torch's CUDA graph docs ask; the second warm-up runs under `torch.cuda.set_sync_debug_mode("error")`,
    so an op that synchronises with the host is named before the capture fails on it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        first = step(static)  # loads the kernels
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(static)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        captured = step(static)
    return first, graph, captured


def _replay(graph, targets, sources):
    """Copy the tensors `sources` into the captured tensors `targets`, then replay `graph`."""
    with torch.no_grad():
        for target, source in zip(targets, sources):
            target.copy_(source)
    graph.replay()


@pytest.mark.parametrize("config", CONFIGS, ids=["siso", "mimo-r4-norm"])
@pytest.mark.parametrize("packing", ["plain", "segment_ids", "segment_ids+prep", "cu_seqlens+initial_state"])
def test_graph_replay_equals_eager(packing, config):
    static = _case(*config, seed=0, starts=CAPTURED_STARTS, offsets=CAPTURED_OFFSETS)
    replayed = _case(*config, seed=10, starts=REPLAYED_STARTS, offsets=REPLAYED_OFFSETS)
    first, graph, captured = _capture(lambda case: _run(case, packing), static)
    _replay(graph, _tensors(static), _tensors(replayed))
    expected = _run(replayed, packing)
    torch.cuda.synchronize()

    assert not torch.equal(expected[0], first[0])  # the replayed inputs change the output
    for name, got, want in zip(OUTPUTS, captured, expected):
        assert torch.equal(got, want), f"{name}: graph replay differs from eager by {(got - want).abs().max()}"


def _with_gradients(case, packing, seed):
    """(`case` with its floating tensors made leaves that need gradients, random gradients of `_run`'s outputs)."""
    for t in _tensors(case):
        t.requires_grad_(t.is_floating_point())
    with torch.no_grad():
        outputs = _run(case, packing)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return case, [torch.randn(o.shape, generator=generator, device="cuda").to(o.dtype) for o in outputs]


@pytest.mark.parametrize("config", CONFIGS, ids=["siso", "mimo-r4-norm"])
@pytest.mark.parametrize("packing", ["plain", "segment_ids+prep", "cu_seqlens+initial_state"])
def test_forward_and_backward_graph_replay_equals_eager(packing, config):
    """A training step's share: the forward and the gradients of every floating input, weight and state from
    the output's and the final state's gradients, captured in one graph and replayed on new inputs and
    gradients, equal an eager run bit for bit. Under PyTorch's deterministic algorithms, so that dB and dC are
    summed over the heads exactly (`tests.helpers.deterministic_algorithms`)."""

    def step(training_case):
        case, output_grads = training_case
        outputs = _run(case, packing)
        differentiable, differentials = zip(*((o, g) for o, g in zip(outputs, output_grads) if o.requires_grad))
        leaves = [t for t in _tensors(case) if t.requires_grad]
        grads = torch.autograd.grad(differentiable, leaves, differentials, allow_unused=True)
        return (*outputs, *grads)

    def tensors(training_case):
        case, output_grads = training_case
        return [*_tensors(case), *output_grads]

    with deterministic_algorithms():
        static = _case(*config, seed=0, starts=CAPTURED_STARTS, offsets=CAPTURED_OFFSETS)
        replayed = _case(*config, seed=10, starts=REPLAYED_STARTS, offsets=REPLAYED_OFFSETS)
        static, replayed = _with_gradients(static, packing, 1), _with_gradients(replayed, packing, 11)
        first, graph, captured = _capture(step, static)
        _replay(graph, tensors(static), tensors(replayed))
        expected = step(replayed)
        torch.cuda.synchronize()

    names = [*OUTPUTS, *(f"gradient of leaf {index}" for index in range(len(expected) - len(OUTPUTS)))]
    assert sum(g is not None for g in expected[len(OUTPUTS):]) >= 8  # at least the 8 inputs' gradients
    for name, got, want, before in zip(names, captured, expected, first):
        assert (got is None) == (want is None), name
        if want is not None:
            assert not torch.equal(want, before), f"{name}: the replayed inputs leave it unchanged"
            assert torch.equal(got, want), f"{name}: graph replay differs from eager by {(got - want).abs().max()}"
