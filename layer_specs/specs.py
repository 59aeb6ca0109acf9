"""`mamba3_stack_spec`: the ModuleSpec of a hybrid stack whose M layers are Mamba-3.

Layer symbols (Megatron's `--hybrid-layer-pattern`): `M` Megatron's `MambaLayer` around
`Mamba3Mixer`, `*` self-attention, `-` MLP, `E` MoE, each from Megatron. Two variants:

- local (`transformer_engine=False`): `ColumnParallelLinear` / `RowParallelLinear`, Megatron's
  `DotProductAttention`, `LocalNorm`; runs without Transformer Engine or apex (on CPU with the
  patches in `megatron_mamba3.patches`).
- TE (`transformer_engine=True`): TE linears, `TEDotProductAttention`, `TENorm`, norms fused into
  the attention / MLP input projections as in Megatron's own hybrid spec.

Multi-token prediction (`/` in the pattern) and the `G`, `D`, `+` layers are not offered.
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_mamba3.mixer import SETTINGS, Mamba3Mixer, Mamba3MixerSubmodules

from .norm import LocalNorm
from .stack import Mamba3HybridStack, Mamba3HybridStackSubmodules

# get_moe_module_spec only checks that this is set; the expert count comes from the TransformerConfig.
_MOE_SPEC_NUM_EXPERTS = 8


def _layer_classes(transformer_engine: bool) -> dict:
    """The linear, attention and norm classes of one variant; norms fused into a linear are
    `IdentityOp` in the layer and the fused class stands in for the plain linear."""
    if not transformer_engine:
        return dict(
            column=ColumnParallelLinear, row=RowParallelLinear, attention=DotProductAttention,
            norm=LocalNorm, norm_column=ColumnParallelLinear, layer_norm=LocalNorm,
        )
    from megatron.core.extensions.transformer_engine import (
        HAVE_TE,
        TEColumnParallelLinear,
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )

    if not HAVE_TE:
        raise ImportError("the Transformer Engine variant of the Mamba-3 stack spec needs transformer_engine installed")
    return dict(
        column=TEColumnParallelLinear, row=TERowParallelLinear, attention=TEDotProductAttention,
        norm=TENorm, norm_column=TELayerNormColumnParallelLinear, layer_norm=IdentityOp,
    )


def mamba3_stack_spec(*, transformer_engine: bool = False, backend: str | None = None, **settings) -> ModuleSpec:
    """A hybrid stack spec for `HybridModel(hybrid_stack_spec=...)` or Megatron-LM's `--spec`.

    Args:
        transformer_engine: build the TE variant (raises `ImportError` when TE is not installed).
        backend: Mamba-3 scan backend of every M layer ("auto", "reference", "tilelang", "xla");
            None reads `MEGATRON_MAMBA3_BACKEND` at run time.
        **settings: `Mamba3Config` fields for every M layer: mimo_rank, rope_fraction, chunk_size,
            is_outproj_norm, expand, A_floor, dt_min, dt_max, dt_floor. Head size, state size and
            groups come from the TransformerConfig (`mamba_head_dim`, `mamba_state_dim`,
            `mamba_num_groups`).

    Unknown setting names raise `ValueError` here; bad values raise when the model is built.
    Example: `mamba3_stack_spec(mimo_rank=4, chunk_size=16)`.
    """
    unknown = sorted(settings.keys() - SETTINGS)
    if unknown:
        raise ValueError(f"mamba3_stack_spec got unknown Mamba-3 setting(s) {unknown}; allowed: {sorted(SETTINGS)}")
    c = _layer_classes(transformer_engine)
    mixer = ModuleSpec(
        module=Mamba3Mixer,
        params={"backend": backend, **settings},
        # in_proj is Megatron's ColumnParallelLinear in both variants: at TP > 1 the mixer passes it a
        # weight= joined from two parameters (see megatron_mamba3.parallel), which TE linears do not take.
        submodules=Mamba3MixerSubmodules(in_proj=ColumnParallelLinear, out_proj=c["row"]),
    )
    return ModuleSpec(
        module=Mamba3HybridStack,
        submodules=Mamba3HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(norm=c["norm"], mixer=mixer, mamba_bda=get_bias_dropout_add),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=c["layer_norm"],
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=c["norm_column"], core_attention=c["attention"], linear_proj=c["row"]
                        ),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=c["layer_norm"],
                    mlp=partial(
                        MLP.as_mlp_submodule,
                        submodules=MLPSubmodules(linear_fc1=c["norm_column"], linear_fc2=c["row"]),
                    ),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
            moe_layer=ModuleSpec(
                module=MoETransformerLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=c["norm"],
                    mlp=get_moe_module_spec(
                        use_te=transformer_engine, num_experts=_MOE_SPEC_NUM_EXPERTS, moe_grouped_gemm=transformer_engine
                    ),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
            final_norm=c["norm"],
        ),
    )
