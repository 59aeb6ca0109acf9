"""megatron_mamba3.patches: pinned to megatron-core 0.19.2, explicit, refusing on CUDA unless asked,
idempotent and undo-able, and each one visibly redirecting its CUDA-only Megatron code to the CPU.

These run in the pytest process; every test leaves Megatron unpatched (fixture `unpatched`).
The sequence-parallel and checkpoint-saving patches need a process group: their effect is covered by
the gloo runs in tests/distributed (test_hybrid_model.py, test_train.py).
"""

from __future__ import annotations

import pytest
import torch
from megatron.core import package_info
from megatron.core.fusions import fused_softmax
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer import FP32Optimizer
from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
from megatron.core.transformer import utils as transformer_utils
from megatron.core.utils import GlobalMemoryBuffer

from megatron_mamba3 import patches
from megatron_mamba3.patches import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patches refuse to apply where CUDA is available")


def _targets(patch: patches.Patch) -> list[tuple[object, str, object]]:
    """(owner, attribute, current value) of every attribute `patch` replaces."""
    return [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patch.targets()]


@pytest.fixture
def unpatched():
    patches.undo_cpu_patches()
    yield
    patches.undo_cpu_patches()


def test_import_changes_nothing():
    assert not any(patch.applied for patch in patches.CPU_PATCHES)
    assert patches.installed_megatron_core_version() == patches.SUPPORTED_MEGATRON_CORE == "0.19.2"


def test_the_git_label_megatron_adds_inside_a_checkout_is_not_a_version(monkeypatch):
    monkeypatch.setattr(package_info, "__version__", "0.19.2+f27faec")  # a .venv inside a git clone
    assert patches.installed_megatron_core_version() == "0.19.2"
    monkeypatch.setattr(package_info, "__version__", "0.19.3+f27faec")
    assert patches.installed_megatron_core_version() == "0.19.3"


@pytest.mark.parametrize("patch", patches.CPU_PATCHES, ids=lambda p: p.name)
def test_refuses_another_megatron_version(unpatched, monkeypatch, patch):
    before = _targets(patch)
    monkeypatch.setattr(package_info, "__version__", "0.20.0")
    with pytest.raises(patches.MegatronVersionError, match=rf"{patch.name}.*0\.19\.2.*0\.20\.0"):
        patch.apply()
    assert not patch.applied
    assert all(getattr(owner, attr) is value for owner, attr, value in before)


def test_apply_all_is_all_or_nothing(unpatched, monkeypatch):
    monkeypatch.setattr(package_info, "__version__", "0.19.3")
    with pytest.raises(patches.MegatronVersionError):
        patches.apply_cpu_patches()
    assert not any(patch.applied for patch in patches.CPU_PATCHES)


def test_refuses_on_cuda_unless_asked(unpatched, monkeypatch):
    for patch in patches.CPU_PATCHES:
        patch.targets()  # import the patched modules before CUDA is faked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is available.*allow_cuda=True"):
        patches.apply_cpu_patches()
    assert not any(patch.applied for patch in patches.CPU_PATCHES)
    patches.apply_cpu_patches(allow_cuda=True)
    assert all(patch.applied for patch in patches.CPU_PATCHES)


@pytest.mark.parametrize("patch", patches.CPU_PATCHES, ids=lambda p: p.name)
def test_apply_is_idempotent_and_undo_restores(unpatched, patch):
    originals = _targets(patch)
    patch.apply()
    replaced = _targets(patch)
    assert all(value is not original for (_, _, value), (_, _, original) in zip(replaced, originals))
    patch.apply()
    assert all(getattr(owner, attr) is value for owner, attr, value in replaced)
    patch.undo()
    patch.undo()
    assert all(getattr(owner, attr) is value for owner, attr, value in originals)


def test_memory_buffer_on_cpu(unpatched):
    with pytest.raises(RuntimeError):
        GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "mpu")
    patches.CPU_MEMORY_BUFFER.apply()
    buffer = GlobalMemoryBuffer()
    big = buffer.get_tensor((4, 3), torch.float32, "mpu")
    small = buffer.get_tensor((2, 3), torch.float32, "mpu")
    assert big.device.type == "cpu" and big.shape == (4, 3) and small.shape == (2, 3)
    assert small.data_ptr() == big.data_ptr()  # the buffer is reused, as on CUDA


def test_causal_mask_on_cpu(unpatched):
    with pytest.raises(RuntimeError):
        fused_softmax.get_default_causal_mask(4)
    patches.CPU_CAUSAL_MASK.apply()
    expected = torch.ones(4, 4).triu(diagonal=1).bool()
    for get_mask in (fused_softmax.get_default_causal_mask, transformer_utils.get_default_causal_mask):
        mask = get_mask(4)
        assert mask.device.type == "cpu" and torch.equal(mask, expected)
    with pytest.raises(RuntimeError):  # the redirection ends with the call
        torch.cuda.current_device()


def test_rng_tracker_on_cpu(unpatched):
    with pytest.raises(RuntimeError):
        CudaRNGStatesTracker().add("model-parallel-rng", 5)
    patches.CPU_RNG_TRACKER.apply()
    tracker = CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 5)
    tracker.add("other", 6)
    reference = torch.Generator().manual_seed(5)
    outer = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    with tracker.fork("other"):
        other = torch.rand(3)
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    assert torch.equal(first, torch.rand(3, generator=reference))
    assert torch.equal(second, torch.rand(3, generator=reference))  # the tracked stream goes on
    assert torch.equal(other, torch.rand(3, generator=torch.Generator().manual_seed(6)))
    assert torch.equal(torch.get_rng_state(), outer)  # the default stream is untouched
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("third", 5)


def test_optimizer_on_cpu(unpatched):
    param = torch.nn.Parameter(torch.ones(3))
    config = OptimizerConfig(optimizer="sgd", lr=0.1)
    with pytest.raises(RuntimeError):
        FP32Optimizer(torch.optim.SGD([param], lr=0.1), config, None)
    patches.CPU_OPTIMIZER.apply()
    scale = FP32Optimizer(torch.optim.SGD([param], lr=0.1), config, None).get_loss_scale()
    assert scale.device.type == "cpu" and torch.equal(scale, torch.ones(1))


@pytest.mark.parametrize("total_norm, expected_scale", [(4.0, 0.5 / (4.0 + 1e-6)), (0.25, 1.0)])
def test_cpu_clipping_scales_by_max_norm_over_total(total_norm, expected_scale):
    grads = [torch.tensor([3.0, -4.0]), torch.tensor([1.0])]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads] + [torch.nn.Parameter(torch.zeros(2))]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    cpu._clip_grads_on_cpu(params, max_norm=0.5, total_norm=total_norm)
    for param, grad in zip(params, grads):
        assert torch.equal(param.grad, grad * torch.tensor(expected_scale, dtype=torch.float32))
    assert params[2].grad is None
