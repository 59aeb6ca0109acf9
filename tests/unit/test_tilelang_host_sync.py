"""The TileLang forward's and backward's host-side work never reads a device value (so neither synchronises,
as capturing them in a CUDA graph requires): `mamba3_scan(backend="tilelang")`, from its argument checks through
packing, the autograd Function and `_prepare` / `kernel_terms`, and its backward (`_backward_kernels`,
`terms_backward`, in deterministic mode and not), runs here on meta tensors with the kernel launches recorded
instead of run.

Meta tensors hold no data, so every host synchronisation raises on them: `.item()`, `bool()` / `int()` /
a Python `if` on a tensor, `.tolist()`, `.cpu()`, and ops whose output shape depends on values
(`nonzero`, boolean-mask indexing, `torch.unique`, `masked_select`). `_MetaOnly` also fails on any host
tensor in an op (one copied to the device is a pageable copy, which CUDA graph capture refuses).
Needs neither CUDA nor TileLang: the kernel modules are replaced by `_kernel_modules`. `cu_seqlens` documents
run in the same one launch per kernel, their layout built on the device (`chunk_layout`). The GPU
counterpart, tests/gpu/test_cuda_graph.py, captures the real forward in a CUDA graph.
"""

import dataclasses
import sys
import types
from collections import namedtuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatron_mamba3 import clear_receipts, receipts
from megatron_mamba3.ops import mamba3_scan
from megatron_mamba3.ops.interface import Mamba3Prep
from megatron_mamba3.ops.tilelang import backend as tilelang_backend
from megatron_mamba3.ops.tilelang import function
from tests.helpers import deterministic_algorithms, make_case, make_state
from tests.unit.test_tilelang_host_ops import FORWARD_LAUNCHES, backward_launches

B, L, H, P, N = 2, 200, 4, 64, 128
DOCUMENTS = 5


class _MetaOnly(TorchDispatchMode):
    """Fails on any op that takes or returns a tensor that is not on the meta device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves((args, kwargs, out)):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                raise AssertionError(f"{func} works on a {tensor.device} tensor: host work in the forward")
        return out


def _kernel_modules(launches: list) -> tuple[types.ModuleType, types.ModuleType]:
    """Stand-ins for `megatron_mamba3.ops.tilelang.kernels` (its `KernelConfig` fields) and `backward_kernels`:
    kernels that record (name, tensor arguments) instead of launching."""
    forward = types.ModuleType("megatron_mamba3.ops.tilelang.kernels")
    forward.KernelConfig = namedtuple(
        "KernelConfig", "H p n R G S Q norm A_floor packed deterministic", defaults=(None, False, False)
    )

    def launcher(name):
        return lambda *args: launches.append((name, [a for a in args if isinstance(a, torch.Tensor)]))

    names = {name for kernels in FORWARD_LAUNCHES.values() for name in kernels}
    forward.kernel_set = lambda config: types.SimpleNamespace(**{name: launcher(name) for name in names})
    backward = types.ModuleType("megatron_mamba3.ops.tilelang.backward_kernels")
    backward_names = backward_launches(prep=True)
    backward.backward_set = lambda config: types.SimpleNamespace(**{name: launcher(name) for name in backward_names})
    return forward, backward


def _meta(tensors, dtype):
    return type(tensors)(*(None if t is None else torch.empty(t.shape, dtype=dtype, device="meta") for t in tensors))


def _scan_case(monkeypatch, packing, R, norm, walk, launches):
    """(inputs, weights, options) of one `mamba3_scan` call on meta tensors, with the kernel modules replaced by
    `_kernel_modules`' and the TileLang backend allowed anywhere."""
    monkeypatch.setattr(function, "walks", lambda p, rows, device: walk)  # (on the GPU: by the SM count)
    forward, backward = _kernel_modules(launches)
    monkeypatch.setitem(sys.modules, forward.__name__, forward)
    monkeypatch.setitem(sys.modules, backward.__name__, backward)
    runs_anywhere = dataclasses.replace(tilelang_backend.BACKEND, why_not=lambda inputs: None)
    monkeypatch.setattr(tilelang_backend, "BACKEND", runs_anywhere)  # meta tensors, TileLang not needed
    inputs, weights = make_case(b=B, l=L, H=H, p=P, R=R, G=1, n=N, norm=norm)
    inputs = _meta(inputs, torch.bfloat16)
    weights = _meta(weights, torch.float32)
    options = {}
    if packing == "segment_ids":  # values play no part on meta: only their shape and dtype reach the code
        state = _meta(make_state(B, H, P, R, N, N // 4), torch.float32)
        options = dict(segment_ids=torch.empty(B, L, dtype=torch.int64, device="meta"), initial_state=state)
    if packing.startswith("cu_seqlens"):  # one row of DOCUMENTS documents
        inputs = type(inputs)(*(t[:1] for t in inputs))
        options = dict(cu_seqlens=torch.empty(DOCUMENTS + 1, dtype=torch.int32, device="meta"))
        if packing.endswith("+initial_state"):
            options["initial_state"] = _meta(make_state(DOCUMENTS, H, P, R, N, N // 4), torch.float32)
    if packing.endswith("+prep"):  # raw dt, A, B, C: chunk_prep runs the prep
        meta = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
        options["prep"] = Mamba3Prep(meta(H), meta(N), meta(N), 1e-4)
    return inputs, weights, options


PACKINGS = ["plain", "segment_ids", "segment_ids+prep", "cu_seqlens", "cu_seqlens+initial_state"]


@pytest.mark.parametrize("walk", [False, True], ids=["chunks", "walk"])
@pytest.mark.parametrize("R,norm", [(1, False), (4, True)], ids=["siso", "mimo"])
@pytest.mark.parametrize("packing", PACKINGS)
def test_forward_host_work_reads_no_device_value(monkeypatch, packing, R, norm, walk):
    launches = []
    inputs, weights, options = _scan_case(monkeypatch, packing, R, norm, walk, launches)
    states = DOCUMENTS if packing.startswith("cu_seqlens") else B

    clear_receipts()
    with _MetaOnly():
        out, final = mamba3_scan(inputs, weights, backend="tilelang", **options)
    assert [receipt.path for receipt in receipts()] == ["chunk_walk" if walk else "chunk-parallel"]  # says which ran

    assert [name for name, _ in launches] == FORWARD_LAUNCHES[walk]  # one launch each, whatever the documents
    chunk_starts = [t for _, args in launches for t in args if t.dim() == 5 and t.shape[2:] == (H, N, P)]
    assert chunk_starts and all(t.shape[0] == (0 if walk else inputs.x.shape[0]) for t in chunk_starts)  # walk, no
    # backward: h̃_c (b, nc, H, n, p) neither allocated nor written; chunk_output reads it, so the others make it
    assert all(t.device.type == "meta" for _, args in launches for t in args)
    assert out.shape == (inputs.x.shape[0], L, H, P) and out.dtype == torch.bfloat16
    assert [tuple(t.shape) for t in final] == [(states, H, P, N), (states, R, H, N), (states, H, P), (states, H, N // 4)]


@pytest.mark.parametrize("walk", [False, True], ids=["chunks", "walk"])
@pytest.mark.parametrize("R,norm", [(1, False), (4, True)], ids=["siso", "mimo"])
@pytest.mark.parametrize("packing", PACKINGS)
def test_backward_host_work_reads_no_device_value(monkeypatch, packing, R, norm, walk):
    """The backward too, with gradients of the output and of every final-state field, in deterministic mode and
    not, after either forward path."""
    for deterministic in (False, True):
        launches = []
        inputs, weights, options = _scan_case(monkeypatch, packing, R, norm, walk, launches)
        tensors = [t for t in tree_leaves((inputs, weights, options)) if isinstance(t, torch.Tensor)]
        leaves = [t.requires_grad_() for t in tensors if t.is_floating_point()]
        with deterministic_algorithms(deterministic), _MetaOnly():
            out, final = mamba3_scan(inputs, weights, backend="tilelang", **options)
            launches.clear()
            outputs = (out, *final)
            grads = torch.autograd.grad(outputs, leaves, [torch.ones_like(t) for t in outputs], allow_unused=True)
        assert [name for name, _ in launches] == backward_launches("prep" in options)
        assert all(t.device.type == "meta" for _, args in launches for t in args)
        assert all(grad is not None and grad.shape == leaf.shape for leaf, grad in zip(leaves, grads))
