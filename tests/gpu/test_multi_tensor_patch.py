"""`FOREACH_MULTI_TENSOR` on the GPU (run on the GPU machine; skipped elsewhere): the `torch._foreach_*`
replacements against Megatron's own local fallbacks on CUDA tensors of the optimizer's kind (many
tensors, some spanning several of the foreach kernels' chunks), with no host synchronisation
(`torch.cuda.set_sync_debug_mode("error")` raises on one). Bounds and reasons as in the CPU test,
tests/unit/test_multi_tensor_patch.py: copies and scales bit for bit, the norm within 1e-6.
"""

import pytest
import torch
from megatron.core import utils

from megatron_mamba3.patches.multi_tensor import foreach_l2_norm, foreach_scale

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the GPU machine, not in CPU-only CI)"),
]

SHAPES = [(2048, 4096), (4096,), (3, 5), ()] + [(257, 63)] * 60  # one tensor over 8M elements, 64 in all
CHUNK = 2048 * 32


def _tensors(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(shape, generator=generator, device="cuda").to(dtype) for shape in SHAPES]


def _flag() -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int, device="cuda")


def _without_sync(function, *args):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return function(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_norm_on_the_gpu():
    tensor_lists = [_tensors(0), _tensors(1)]
    norm, _ = _without_sync(foreach_l2_norm, CHUNK, _flag(), tensor_lists, False)
    assert norm.shape == (1,) and norm.dtype == torch.float32 and norm.is_cuda
    expected, _ = utils.local_multi_tensor_l2_norm(CHUNK, _flag(), tensor_lists, False)
    exact = torch.cat([t.double().flatten() for tensors in tensor_lists for t in tensors]).norm()
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(norm.double(), exact.reshape(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dst_dtype, scale, in_place", [
    (torch.bfloat16, 1.0, False),  # fp32 main params into bf16 model params (every step)
    (torch.float32, 0.37, True),   # gradient clipping
    (torch.float32, 0.37, False),
])
def test_scale_on_the_gpu(dst_dtype, scale, in_place):
    sources = _tensors(0)
    expected = [s.clone() if in_place else torch.zeros_like(s, dtype=dst_dtype) for s in sources]
    utils.local_multi_tensor_scale(CHUNK, _flag(), [expected if in_place else sources, expected], scale)
    destinations = sources if in_place else [torch.zeros_like(s, dtype=dst_dtype) for s in sources]
    _without_sync(foreach_scale, CHUNK, _flag(), [sources, destinations], scale)
    assert all(map(torch.equal, destinations, expected))  # finite, nonzero values: equal means same bits
