"""`CPU_SEQUENCE_PARALLEL`: Megatron's sequence-parallel collectives on the CPU.

With `sequence_parallel=True` the column-parallel all-gather (forward) / reduce-scatter (backward)
and the row-parallel reduce-scatter allocate their outputs on `torch.cuda.current_device()`. This
patch runs exactly those functions under `cuda_on_cpu.on_cpu`; the collectives themselves
(all_gather_into_tensor, reduce_scatter_tensor) run on gloo unchanged.
"""

from __future__ import annotations

from .cuda_on_cpu import on_cpu
from .patch import Patch, Target


def _targets() -> list[Target]:
    from megatron.core.tensor_parallel import layers, mappings

    linear = layers.LinearWithGradAccumulationAndAsyncCommunication
    return [
        (mappings, "_gather_along_first_dim", on_cpu(mappings._gather_along_first_dim)),
        (mappings, "_reduce_scatter_along_first_dim", on_cpu(mappings._reduce_scatter_along_first_dim)),
        (linear, "forward", staticmethod(on_cpu(linear.forward))),
        (linear, "backward", staticmethod(on_cpu(linear.backward))),
    ]


CPU_SEQUENCE_PARALLEL = Patch(
    "cpu_sequence_parallel",
    "megatron.core.tensor_parallel layers/mappings allocate sequence-parallel outputs on torch.cuda.current_device()",
    _targets,
)
