"""Pinned, explicit, fail-closed changes to Megatron-Core; installed as `megatron_mamba3.patches`.

Importing this package changes nothing. On a machine without CUDA, call

    from megatron_mamba3.patches import apply_cpu_patches
    apply_cpu_patches()            # ... build, train ...;  undo_cpu_patches() restores Megatron

On a CUDA machine, `apply_cuda_patches()` applies `FOREACH_MULTI_TENSOR` (`multi_tensor.py`) where
megatron-core fell back to its Python-loop multi-tensor functions (no Transformer Engine, no apex):
the optimizer's gradient norm and parameter copies as `torch._foreach_*` calls, without the fallback's
host synchronisation per tensor. It returns the patches it applied (none elsewhere).

Every patch checks that megatron-core is `SUPPORTED_MEGATRON_CORE` (0.19.2) and raises
`MegatronVersionError` otherwise; a CPU seam refuses when CUDA is available unless `allow_cuda=True`;
applying twice is a no-op and `undo()` restores the original attributes. See `cpu.py` for what each
CPU patch redirects and what stays CUDA-only.
"""

from .cpu import (
    CPU_CAUSAL_MASK,
    CPU_CHECKPOINT_SAVE,
    CPU_MEMORY_BUFFER,
    CPU_OPTIMIZER,
    CPU_PATCHES,
    CPU_RNG_TRACKER,
    CPU_SEQUENCE_PARALLEL,
)
from .multi_tensor import FOREACH_MULTI_TENSOR, megatron_uses_local_multi_tensor
from .patch import (
    SUPPORTED_MEGATRON_CORE,
    MegatronVersionError,
    Patch,
    check_megatron_core_version,
    installed_megatron_core_version,
)


def apply_cpu_patches(*, allow_cuda: bool = False) -> tuple[Patch, ...]:
    """Apply every patch in `CPU_PATCHES` (all or none: a refusal undoes those applied first)."""
    applied = []
    try:
        for patch in CPU_PATCHES:
            if not patch.applied:
                patch.apply(allow_cuda=allow_cuda)
                applied.append(patch)
    except BaseException:
        for patch in reversed(applied):
            patch.undo()
        raise
    return CPU_PATCHES


def undo_cpu_patches() -> None:
    """Undo every applied patch in `CPU_PATCHES`."""
    for patch in reversed(CPU_PATCHES):
        patch.undo()


def apply_cuda_patches() -> tuple[Patch, ...]:
    """Apply `FOREACH_MULTI_TENSOR` where megatron-core uses its local multi-tensor fallbacks; return
    the patches applied (undo each with `patch.undo()`)."""
    if not (FOREACH_MULTI_TENSOR.applied or megatron_uses_local_multi_tensor()):
        return ()
    FOREACH_MULTI_TENSOR.apply()
    return (FOREACH_MULTI_TENSOR,)


__all__ = [
    "CPU_CAUSAL_MASK",
    "CPU_CHECKPOINT_SAVE",
    "CPU_MEMORY_BUFFER",
    "CPU_OPTIMIZER",
    "CPU_PATCHES",
    "CPU_RNG_TRACKER",
    "CPU_SEQUENCE_PARALLEL",
    "FOREACH_MULTI_TENSOR",
    "SUPPORTED_MEGATRON_CORE",
    "MegatronVersionError",
    "Patch",
    "apply_cpu_patches",
    "apply_cuda_patches",
    "check_megatron_core_version",
    "installed_megatron_core_version",
    "undo_cpu_patches",
]
