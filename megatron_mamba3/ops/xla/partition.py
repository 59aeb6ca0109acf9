"""What torch_xla's scan keeps per iteration for the backward (docs/backends.md, XLA: activation memory).

`torch_xla.experimental.scan` traces its body with AOTAutograd and splits the joint graph with a
partition function. The default partition saves every intermediate the backward reads (for the
Mamba-3 chunk body, SISO H8 p64 n128, c = 64: 4.1 MiB per chunk); `min_cut_rematerialization_partition`
saves less but gave wrong Δ and A gradients with torch 2.9 / torch_xla 2.9 (up to 100% off;
`tests/conformance/test_packing.py` catches it). `recompute_body` checkpoints the whole body instead.
"""

from __future__ import annotations

from torch import fx
from torch._functorch.partitioners import _extract_fwd_bwd_modules, _is_primal


def recompute_body(joint_module: fx.GraphModule, _joint_inputs, *, num_fwd_outputs: int, **_) -> tuple:
    """Partition that saves only the body's inputs (carry and this iteration's slice of xs) and
    recomputes the forward inside the backward: activation checkpointing of one scan iteration.

    The xs slices alias scanned inputs that scan keeps anyway, so the memory saved per iteration is
    the carry (for the chunk body: the state h, k_prev, θ and the weights riding along)."""
    primals = [node for node in joint_module.graph.find_nodes(op="placeholder") if _is_primal(node)]
    return _extract_fwd_bwd_modules(joint_module, primals, [], num_fwd_outputs=num_fwd_outputs)
