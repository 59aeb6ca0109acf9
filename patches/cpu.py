"""The CPU seams megatron-core 0.19.2 lacks: the functions that insist on a CUDA device on the paths
a CPU (gloo) run of a Megatron hybrid model takes, from building the model through the optimizer step
to saving a distributed checkpoint.

Functions that only ask for a CUDA device are patched to run unchanged under `cuda_on_cpu.on_cpu`;
two need CPU code of their own (the RNG tracker and gradient clipping). The patches:

- `CPU_MEMORY_BUFFER`: `GlobalMemoryBuffer.get_tensor` (sequence-parallel all-gathers, local
  `DotProductAttention`).
- `CPU_SEQUENCE_PARALLEL` (`sequence_parallel.py`): the sequence-parallel gathers and
  reduce-scatters of `tensor_parallel.mappings` and the column/row-parallel linear autograd function.
- `CPU_CAUSAL_MASK`: `get_default_causal_mask` (local attention).
- `CPU_RNG_TRACKER`: `CudaRNGStatesTracker.add` / `.fork` (`model_parallel_cuda_manual_seed`,
  attention dropout) track CPU generator states instead of CUDA ones, so the tracked streams keep
  their meaning (per-TP-rank or shared seeds).
- `CPU_OPTIMIZER`: `FP32Optimizer.__init__` (loss scale), `get_grad_norm_fp32` and
  `MegatronOptimizer.has_grad_norm_group` (norm reductions), and `clip_grad_by_total_norm_fp32`,
  which asserts CUDA gradients and is replaced by a CPU version.
- `CPU_CHECKPOINT_SAVE`: `TorchDistSaveShardedStrategy.save` (dist-checkpoint saving synchronizes
  CUDA and reduces its status flags on the current CUDA device).

The final-norm seam (`HybridStack` builds `TENorm` unconditionally) is not a patch: the stack in
`megatron_mamba3.layer_specs` takes its final norm from the spec, on every device.

Not covered (CPU runs must avoid them): Megatron's `DistributedDataParallel` (CUDA buffers and
streams), activation recomputation (saves the CUDA RNG state), the fp16/bf16 and distributed
optimizers, and MoE layers (the router moves its weights to CUDA in forward).
"""

from __future__ import annotations

import contextlib

import torch

from .cuda_on_cpu import on_cpu
from .patch import Patch, Target
from .sequence_parallel import CPU_SEQUENCE_PARALLEL


def _memory_buffer_targets() -> list[Target]:
    from megatron.core.utils import GlobalMemoryBuffer

    return [(GlobalMemoryBuffer, "get_tensor", on_cpu(GlobalMemoryBuffer.get_tensor))]


def _causal_mask_targets() -> list[Target]:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    mask_on_cpu = on_cpu(utils.get_default_causal_mask)
    # fused_softmax imported the function by name, so both bindings are replaced.
    return [(utils, "get_default_causal_mask", mask_on_cpu), (fused_softmax, "get_default_causal_mask", mask_on_cpu)]


def _add_cpu_state(self, name: str, seed: int) -> None:
    """`CudaRNGStatesTracker.add` on the CPU: track a CPU generator state seeded with `seed`."""
    if seed in self.seeds_:
        raise ValueError(f"rng seed {seed} already exists")
    if name in self.states_:
        raise ValueError(f"rng state {name!r} already exists")
    self._is_initialized = True
    self.seeds_.add(seed)
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


def _fork_cpu_state(self, name: str | None = None):
    """`CudaRNGStatesTracker.fork` on the CPU: run the body with the CPU generator in the tracked
    state `name` (default: the model-parallel state), then store that state and restore the outer."""
    from megatron.core.tensor_parallel import random

    name = random._MODEL_PARALLEL_RNG_TRACKER_NAME if name is None else name
    if name not in self.states_:
        raise KeyError(f"rng state {name!r} is not added")
    return _forked_cpu_state(self.states_, name)


@contextlib.contextmanager
def _forked_cpu_state(states: dict, name: str):
    outer = torch.get_rng_state()
    torch.set_rng_state(states[name])
    try:
        yield
    finally:
        states[name] = torch.get_rng_state()
        torch.set_rng_state(outer)


def _rng_tracker_targets() -> list[Target]:
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    return [(CudaRNGStatesTracker, "add", _add_cpu_state), (CudaRNGStatesTracker, "fork", _fork_cpu_state)]


def _clip_grads_on_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False) -> None:
    """`clip_grad_by_total_norm_fp32` for CPU gradients: scale each gradient of `parameters` in place
    by min(1, max_norm / (total_norm + 1e-6))."""
    attribute = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attribute) for p in parameters if getattr(p, attribute, None) is not None]
    coefficient = float(max_norm / (total_norm + 1.0e-6))
    if grads and coefficient < 1.0:
        torch._foreach_mul_(grads, coefficient)


def _optimizer_targets() -> list[Target]:
    from megatron.core.optimizer import optimizer

    # optimizer.py imported the clip_grads functions by name: its bindings are the ones it calls.
    return [
        (optimizer.FP32Optimizer, "__init__", on_cpu(optimizer.FP32Optimizer.__init__)),
        (optimizer.MegatronOptimizer, "has_grad_norm_group", on_cpu(optimizer.MegatronOptimizer.has_grad_norm_group)),
        (optimizer, "get_grad_norm_fp32", on_cpu(optimizer.get_grad_norm_fp32)),
        (optimizer, "clip_grad_by_total_norm_fp32", _clip_grads_on_cpu),
    ]


def _checkpoint_save_targets() -> list[Target]:
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return [(TorchDistSaveShardedStrategy, "save", on_cpu(TorchDistSaveShardedStrategy.save))]


CPU_MEMORY_BUFFER = Patch(
    "cpu_memory_buffer",
    "megatron.core.utils.GlobalMemoryBuffer.get_tensor allocates on torch.cuda.current_device()",
    _memory_buffer_targets,
)
CPU_CAUSAL_MASK = Patch(
    "cpu_causal_mask",
    'megatron.core.transformer.utils.get_default_causal_mask builds its mask on device="cuda"',
    _causal_mask_targets,
)
CPU_RNG_TRACKER = Patch(
    "cpu_rng_tracker",
    "megatron.core.tensor_parallel.random.CudaRNGStatesTracker tracks CUDA generator states only",
    _rng_tracker_targets,
)
CPU_OPTIMIZER = Patch(
    "cpu_optimizer",
    "megatron.core.optimizer keeps its loss scale and gradient norms on CUDA and asserts CUDA gradients",
    _optimizer_targets,
)
CPU_CHECKPOINT_SAVE = Patch(
    "cpu_checkpoint_save",
    "megatron.core.dist_checkpointing's torch_dist save synchronizes CUDA and reduces flags on CUDA",
    _checkpoint_save_targets,
)

CPU_PATCHES = (
    CPU_MEMORY_BUFFER, CPU_SEQUENCE_PARALLEL, CPU_CAUSAL_MASK, CPU_RNG_TRACKER, CPU_OPTIMIZER, CPU_CHECKPOINT_SAVE
)
