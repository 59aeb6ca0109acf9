"""`FOREACH_MULTI_TENSOR` (patches/multi_tensor.py): the `torch._foreach_*` replacements of megatron-core's
local multi-tensor fallbacks give the fallbacks' results, read no value on the host, and are applied
only over bindings that are those fallbacks (pinned, idempotent, undo-able, allowed where CUDA is).

The oracle is Megatron's own `local_multi_tensor_l2_norm` / `local_multi_tensor_scale` (its norm
result is made on "cuda": served by the CPU here, `cuda_requests_on_cpu`), and the float64 norm of all
tensors concatenated. Every replacement also runs on the CPU, so this needs no GPU; the CUDA
counterpart (the same comparisons on the device, under `torch.cuda.set_sync_debug_mode("error")`) is
tests/gpu/test_multi_tensor_patch.py.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core import package_info, utils
from megatron.core.optimizer import clip_grads, optimizer

from megatron_mamba3 import patches
from megatron_mamba3.patches.cuda_on_cpu import cuda_requests_on_cpu
from megatron_mamba3.patches.multi_tensor import foreach_l2_norm, foreach_scale

SHAPES = [(7,), (3, 5), (2, 3, 4), (), (64, 33), (0, 3), (1,)]  # a 0-d and an empty tensor included
BINDINGS = [(clip_grads, "l2_norm_impl"), (clip_grads, "multi_tensor_scale_impl"), (optimizer, "multi_tensor_scale_impl")]
CHUNK = 2048 * 32  # what Megatron's local_multi_tensor_applier passes


def _tensors(seed: int, dtype=torch.float32, device="cpu") -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=generator) * 10.0 ** (i - 3)).to(device=device, dtype=dtype)
            for i, shape in enumerate(SHAPES)]


def _flag(device="cpu") -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int, device=device)


def _megatron_norm(tensor_lists) -> torch.Tensor:
    with cuda_requests_on_cpu():
        norm, per_tensor = utils.local_multi_tensor_l2_norm(CHUNK, _flag(), tensor_lists, False)
    assert per_tensor is None
    return norm


def _bits(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.view(torch.int16 if t.element_size() == 2 else torch.int32).clone() for t in tensors]


@pytest.fixture
def unpatched():
    patches.FOREACH_MULTI_TENSOR.undo()
    yield
    patches.FOREACH_MULTI_TENSOR.undo()


# Within 1e-6, not bit for bit: Megatron takes the norm of the per-tensor norms on the host (float32,
# via Python floats) while the replacement reduces them on the tensors' device, and on CUDA
# torch._foreach_norm sums in another order than torch.norm; each is a float32 rounding of the norm.
@pytest.mark.parametrize("lists", [1, 2])
def test_norm_is_megatrons_norm_of_all_tensors_of_all_lists(lists):
    tensor_lists = [_tensors(seed) for seed in range(lists)]
    norm, per_tensor = foreach_l2_norm(CHUNK, _flag(), tensor_lists, False)
    assert per_tensor is None
    assert norm.shape == (1,) and norm.dtype == torch.float32 and norm.device.type == "cpu"
    exact = torch.cat([t.double().flatten() for tensors in tensor_lists for t in tensors]).norm()
    torch.testing.assert_close(norm, _megatron_norm(tensor_lists), rtol=1e-6, atol=0)
    torch.testing.assert_close(norm.double(), exact.reshape(1), rtol=1e-6, atol=0)


def test_norm_of_no_tensors_is_zero_on_the_flags_device():
    for tensor_lists in ([], [[]], [[], []]):
        norm, _ = foreach_l2_norm(CHUNK, _flag(), tensor_lists, False)
        assert torch.equal(norm, torch.zeros(1)) and torch.equal(norm, _megatron_norm(tensor_lists))
    norm, _ = foreach_l2_norm(CHUNK, _flag("meta"), [[]], False)
    assert norm.device.type == "meta" and norm.shape == (1,)


def test_norm_refuses_per_tensor_norms():
    with pytest.raises(ValueError, match="per_tensor must be False, got True"):
        foreach_l2_norm(CHUNK, _flag(), [_tensors(0)], True)


@pytest.mark.parametrize("src_dtype, dst_dtype, scale", [
    (torch.float32, torch.float32, 0.37),   # an out-of-place scale
    (torch.float32, torch.float32, 1.0),    # a copy
    (torch.float32, torch.bfloat16, 1.0),   # fp32 main params into bf16 model params (every step)
    (torch.bfloat16, torch.float32, 1.0),   # bf16 model params into fp32 main params (loading)
    (torch.float32, torch.bfloat16, 0.37),  # scaled and converted
])
def test_scale_into_other_tensors_is_bitwise_megatrons(src_dtype, dst_dtype, scale):
    sources = _tensors(0, src_dtype)
    expected = [torch.zeros(t.shape, dtype=dst_dtype) for t in sources]
    utils.local_multi_tensor_scale(CHUNK, _flag(), [sources, expected], scale)
    destinations = [torch.zeros(t.shape, dtype=dst_dtype) for t in sources]
    before = _bits(sources)
    foreach_scale(CHUNK, _flag(), [sources, destinations], scale)
    assert all(map(torch.equal, _bits(destinations), _bits(expected)))
    assert all(map(torch.equal, _bits(sources), before))


@pytest.mark.parametrize("same_list", [True, False])
def test_scale_in_place_is_bitwise_megatrons(same_list):
    grads = _tensors(1)
    expected = [g.clone() for g in grads]
    utils.local_multi_tensor_scale(CHUNK, _flag(), [expected, expected], 0.37)
    storage = [g.data_ptr() for g in grads]
    foreach_scale(CHUNK, _flag(), [grads, grads if same_list else list(grads)], 0.37)  # clipping passes [grads, grads]
    assert all(map(torch.equal, _bits(grads), _bits(expected)))
    assert [g.data_ptr() for g in grads] == storage


def test_scale_of_no_tensors_does_nothing_and_unequal_lists_are_refused():
    foreach_scale(CHUNK, _flag(), [[], []], 0.5)
    with pytest.raises(ValueError, match="as many destinations as sources, got 1 and 2"):
        foreach_scale(CHUNK, _flag(), [[torch.ones(2), torch.ones(3)], [torch.ones(2)]], 1.0)


def test_no_value_is_read_on_the_host():
    # Meta tensors hold no data: any host synchronisation (.item(), float(), a Python `if` on a tensor,
    # torch.tensor of device tensors) raises on them, as Megatron's fallback does.
    tensor_lists = [_tensors(0, device="meta"), _tensors(1, device="meta")]
    with pytest.raises(RuntimeError, match="meta"):
        utils.local_multi_tensor_l2_norm(CHUNK, _flag("meta"), tensor_lists, False)
    norm, _ = foreach_l2_norm(CHUNK, _flag("meta"), tensor_lists, False)
    assert norm.device.type == "meta" and norm.shape == (1,) and norm.dtype == torch.float32
    foreach_scale(CHUNK, _flag("meta"), [tensor_lists[0], tensor_lists[0]], 0.5)
    foreach_scale(CHUNK, _flag("meta"), [tensor_lists[0], _tensors(2, torch.bfloat16, "meta")], 1.0)
    foreach_scale(CHUNK, _flag("meta"), tensor_lists, 0.5)


def test_apply_replaces_exactly_the_fallbacks_and_undo_restores(unpatched):
    originals = [getattr(owner, attr) for owner, attr in BINDINGS]
    assert originals == [utils.local_multi_tensor_l2_norm, utils.local_multi_tensor_scale, utils.local_multi_tensor_scale]
    assert patches.apply_cuda_patches() == (patches.FOREACH_MULTI_TENSOR,)
    assert [getattr(owner, attr) for owner, attr in BINDINGS] == [foreach_l2_norm, foreach_scale, foreach_scale]
    assert patches.apply_cuda_patches() == (patches.FOREACH_MULTI_TENSOR,)  # idempotent
    patches.FOREACH_MULTI_TENSOR.undo()
    patches.FOREACH_MULTI_TENSOR.undo()
    assert [getattr(owner, attr) for owner, attr in BINDINGS] == originals


def test_megatrons_callers_reach_the_replacements(unpatched):
    patches.FOREACH_MULTI_TENSOR.apply()
    main, model = _tensors(0), [torch.zeros(shape, dtype=torch.bfloat16) for shape in SHAPES]
    optimizer._multi_tensor_copy_this_to_that(this=main, that=model, overflow_buf=_flag("meta"))
    assert all(torch.equal(m, p.to(torch.bfloat16)) for m, p in zip(model, main))
    tensors = _tensors(1, device="meta")  # meta: any host read would raise
    norm, _ = clip_grads.multi_tensor_applier(clip_grads.l2_norm_impl, _flag("meta"), [tensors], False)
    assert norm.device.type == "meta"


def test_applies_where_cuda_is_available(unpatched, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    patches.FOREACH_MULTI_TENSOR.apply()  # for_cuda: no allow_cuda needed
    assert patches.FOREACH_MULTI_TENSOR.applied


def test_refuses_another_megatron_version(unpatched, monkeypatch):
    monkeypatch.setattr(package_info, "__version__", "0.20.0")
    with pytest.raises(patches.MegatronVersionError, match=r"foreach_multi_tensor.*0\.19\.2.*0\.20\.0"):
        patches.apply_cuda_patches()
    assert not patches.FOREACH_MULTI_TENSOR.applied
    assert clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm


def _fused(*args):  # stands for Transformer Engine's / apex's kernels
    raise AssertionError("not called")


def test_not_applied_where_megatron_did_not_fall_back(unpatched, monkeypatch):
    for owner, attr in BINDINGS:
        monkeypatch.setattr(owner, attr, _fused)
    assert patches.apply_cuda_patches() == ()
    with pytest.raises(RuntimeError, match=r"did not fall back to them here \(megatron\.core\.optimizer\.clip_grads"
                                           r"\.l2_norm_impl is <function _fused.*not needed"):
        patches.FOREACH_MULTI_TENSOR.apply()
    assert not patches.FOREACH_MULTI_TENSOR.applied
    assert all(getattr(owner, attr) is _fused for owner, attr in BINDINGS)


def test_only_the_bindings_that_fell_back_are_replaced(unpatched, monkeypatch):
    # e.g. a Transformer Engine without multi_tensor_scale_tensor: clip_grads falls back, optimizer.py does not
    monkeypatch.setattr(optimizer, "multi_tensor_scale_impl", _fused)
    patches.apply_cuda_patches()
    assert (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl) == (foreach_l2_norm, foreach_scale)
    assert optimizer.multi_tensor_scale_impl is _fused
    patches.FOREACH_MULTI_TENSOR.undo()
    assert clip_grads.multi_tensor_scale_impl is utils.local_multi_tensor_scale
