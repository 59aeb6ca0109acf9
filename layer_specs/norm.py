"""`LocalNorm`: the norm of the local (no Transformer Engine) specs.

Megatron's own fallback, `WrappedTorchNorm`, refuses sequence parallelism; this one allows it and
marks its parameters the way Megatron's fused norms do (`param.sequence_parallel`), so that
`finalize_model_grads` sums their gradients over the tensor-parallel group.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig

_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
_UNSUPPORTED_OPTIONS = ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm")


class LocalNorm:
    """A Megatron `LayerNormBuilder`: `LocalNorm(config=..., hidden_size=..., eps=...)` returns a
    `torch.nn.LayerNorm` or `torch.nn.RMSNorm` over the last dimension (hidden_size), chosen by
    `config.normalization`. Input and output (..., hidden_size).

    Raises `ValueError` naming the option for normalizations or TransformerConfig norm options that
    only Transformer Engine or apex implement.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> torch.nn.Module:
        if config.normalization not in _NORMS:
            raise ValueError(
                f"TransformerConfig.normalization={config.normalization!r}: LocalNorm supports "
                f"{sorted(_NORMS)}"
            )
        for option in _UNSUPPORTED_OPTIONS:
            if getattr(config, option):
                raise ValueError(f"TransformerConfig.{option}=True needs Transformer Engine or apex norms")
        norm = _NORMS[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
