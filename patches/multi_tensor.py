"""`FOREACH_MULTI_TENSOR`: Megatron's local multi-tensor fallbacks replaced by `torch._foreach_*` calls.

Without Transformer Engine and apex, megatron-core 0.19.2 binds at import time, as module attributes,
two pure-PyTorch stand-ins from `megatron.core.utils` for apex's fused multi-tensor kernels:

- `local_multi_tensor_l2_norm` as `optimizer.clip_grads.l2_norm_impl` (the gradient norm of every
  step with clipping): one `torch.norm` per tensor, then `torch.tensor(<list of 0-d device tensors>)`
  and `float(...)`, i.e. one host synchronisation per tensor;
- `local_multi_tensor_scale` as `optimizer.clip_grads.multi_tensor_scale_impl` (clipping, in place:
  `[grads, grads]`) and `optimizer.optimizer.multi_tensor_scale_impl` (the fp32 main parameters
  copied into the bf16/fp16 model parameters after each step, and back on loading): a Python loop
  `dst.copy_(src * scale)`, two launches per tensor.

This patch replaces exactly the bindings that are those fallbacks with `foreach_l2_norm` and
`foreach_scale` (same signatures, same results, a few launches per list and no host synchronisation);
it refuses, naming the bindings, when none is (Transformer Engine or apex provides fused kernels
there). `apply_cuda_patches()` applies it only where Megatron fell back. A speed patch for CUDA
machines (`for_cuda=True`), it runs on any device.

Not replaced: the fallback that `megatron_fsdp.mixed_precision` defines for itself (FP8 parameters
under Megatron-FSDP only), and `get_grad_norm_fp32`'s own `total_norm.item()` (one synchronisation per
step, in Megatron's code; with the fallbacks its clipping coefficient is a Python float).
"""

from __future__ import annotations

import importlib
import operator

import torch

from .patch import Patch, Target

_MEGATRON_FALLBACK_BINDINGS = (  # (module, attribute, the megatron.core.utils fallback it may be)
    ("megatron.core.optimizer.clip_grads", "l2_norm_impl", "local_multi_tensor_l2_norm"),
    ("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl", "local_multi_tensor_scale"),
    ("megatron.core.optimizer.optimizer", "multi_tensor_scale_impl", "local_multi_tensor_scale"),
)


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for `local_multi_tensor_l2_norm` (and `amp_C.multi_tensor_l2norm` without per-tensor
    norms): the L2 norm of every tensor of every list of `tensor_lists`, taken together as one vector.

    Returns `(norm, None)`, `norm` a (1,) float32 tensor on the tensors' device (on `noop_flag`'s when
    there are no tensors: 0), computed by `torch._foreach_norm` and one norm of the stacked per-tensor
    norms, without reading any value on the host. `chunk_size`, `noop_flag` and the trailing `args`
    are ignored, as the fallback ignores them; `per_tensor=True` is refused (the fallback silently
    returns no per-tensor norms, and no caller in megatron-core 0.19.2 asks for them).
    """
    if per_tensor:
        raise ValueError("foreach_l2_norm computes no per-tensor norms: per_tensor must be False, got True")
    tensors = [tensor for tensor_list in tensor_lists for tensor in tensor_list]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack(norms)).to(torch.float32).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale) -> None:
    """Drop-in for `local_multi_tensor_scale`: `dst.copy_(src * scale)` for each pair of
    `tensor_lists = [sources, destinations]` (lists of equal length; tensors of one shape per pair).

    In place (`torch._foreach_mul_`) where each destination is its source; a `torch._foreach_copy_`
    (converting the dtype, e.g. fp32 main parameters into bf16 model parameters) where `scale` is 1, so
    no scaled copy of all sources is held at once; else the scaled sources copied in. `chunk_size` and
    `noop_flag` are ignored, as the fallback ignores them (it sets no overflow flag either).
    """
    sources, destinations = tensor_lists
    if len(sources) != len(destinations):
        raise ValueError(f"foreach_scale needs as many destinations as sources, got {len(destinations)} and {len(sources)}")
    if not sources:
        return
    if all(map(operator.is_, sources, destinations)):
        torch._foreach_mul_(destinations, scale)
    elif not isinstance(scale, torch.Tensor) and scale == 1:
        torch._foreach_copy_(destinations, sources)
    else:
        torch._foreach_copy_(destinations, torch._foreach_mul(sources, scale))


_REPLACEMENTS = {"local_multi_tensor_l2_norm": foreach_l2_norm, "local_multi_tensor_scale": foreach_scale}


def megatron_uses_local_multi_tensor() -> bool:
    """Whether any binding this patch replaces is Megatron's local fallback here (no TE, no apex)."""
    return bool(_fallback_targets())


def _fallback_targets() -> list[Target]:
    from megatron.core import utils

    targets = []
    for module_name, attr, fallback in _MEGATRON_FALLBACK_BINDINGS:
        module = importlib.import_module(module_name)
        if getattr(module, attr) is getattr(utils, fallback):
            targets.append((module, attr, _REPLACEMENTS[fallback]))
    return targets


def _targets() -> list[Target]:
    targets = _fallback_targets()
    if not targets:
        bound = ", ".join(
            f"{module}.{attr} is {getattr(importlib.import_module(module), attr)!r}"
            for module, attr, _ in _MEGATRON_FALLBACK_BINDINGS
        )
        raise RuntimeError(
            f"patch 'foreach_multi_tensor' replaces megatron.core.utils' local multi-tensor fallbacks, and "
            f"megatron-core did not fall back to them here ({bound}): not needed"
        )
    return targets


FOREACH_MULTI_TENSOR = Patch(
    "foreach_multi_tensor",
    "without Transformer Engine and apex, megatron.core.optimizer's gradient norm and parameter copies "
    "loop over tensors in Python, the norm synchronising with the host once per tensor",
    _targets,
    for_cuda=True,
)
