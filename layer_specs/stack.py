"""`Mamba3HybridStack`: Megatron's `HybridStack` with two changes that need no patch.

- The final norm comes from the spec (`Mamba3HybridStackSubmodules.final_norm`): megatron-core
  0.19.2 builds it as `TENorm` unconditionally, which refuses to build without Transformer Engine
  (on CPU, and on GPU machines without TE). A subclass is cleaner than a patch here: HybridStack
  already has a switch for its final norm (`post_layer_norm`), so the subclass builds the stack
  without it and adds the spec's norm under the same name; forward and checkpoints are unchanged.
- A pattern symbol whose layer the spec leaves empty is refused: HybridStack would silently build
  an `IdentityOp` there.
"""

from __future__ import annotations

import dataclasses

from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.torch_norm import LayerNormBuilder

from .norm import LocalNorm

_FIELD_OF_SYMBOL = {
    Symbols.MAMBA: "mamba_layer",
    Symbols.ATTENTION: "attention_layer",
    Symbols.MLP: "mlp_layer",
    Symbols.MOE: "moe_layer",
    Symbols.GDN: "gdn_layer",
    Symbols.DS_ATTENTION: "dsa_layer",
    Symbols.MLA: "mla_layer",
}


@dataclasses.dataclass
class Mamba3HybridStackSubmodules(HybridStackSubmodules):
    """`HybridStackSubmodules` plus `final_norm`, the norm builder applied after the last layer."""

    final_norm: LayerNormBuilder = LocalNorm


class Mamba3HybridStack(HybridStack):
    """A `HybridStack` (input and output (l, b, hidden_size)) whose final norm is
    `submodules.final_norm`. Takes HybridStack's arguments; raises `ValueError` at construction
    when the layer pattern uses a symbol the spec has no layer for."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Mamba3HybridStackSubmodules,
        *args,
        post_layer_norm: bool = True,
        **kwargs,
    ) -> None:
        layer_types = kwargs.get("layer_type_list") or ()
        missing = sorted({s for s in layer_types if getattr(submodules, _FIELD_OF_SYMBOL[s]) is IdentityOp})
        if missing:
            offered = sorted(s for s, field in _FIELD_OF_SYMBOL.items() if getattr(submodules, field) is not IdentityOp)
            raise ValueError(
                f"hybrid layer pattern uses {missing}, which this Mamba-3 stack spec does not build; "
                f"it offers {offered}"
            )
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = submodules.final_norm(
                config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )
