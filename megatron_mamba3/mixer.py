"""`Mamba3Mixer`: the Mamba-3 mixer as a Megatron-Core module (in_proj -> scan -> out_proj).

Built from a ModuleSpec by Megatron's `MambaLayer` (which passes `d_model`, `layer_number`,
`pg_collection`, `pp_layer_offset` and `name`); the Mamba-3 settings come from the spec's `params`
(or a whole `Mamba3Config`), and the head size, state size and groups from the TransformerConfig's
`mamba_head_dim`, `mamba_state_dim` and `mamba_num_groups`. Tensor parallelism follows docs/parallelism.md
(see `parallel`); checkpoints follow `checkpoint`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Union

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import BaseInferenceContext
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import deprecate_inference_params
from torch import Tensor, nn

from megatron_mamba3 import inference
from megatron_mamba3.checkpoint import mixer_sharded_state_dict
from megatron_mamba3.config import Mamba3Config
from megatron_mamba3.context_parallel import local_segment_ids, sequence_scan
from megatron_mamba3.in_proj import InProjLayout
from megatron_mamba3.ops.interface import Mamba3State, compute_dtype
from megatron_mamba3.ops.layer import mamba3_layer, scan_inputs, scan_weights
from megatron_mamba3.ops.registry import check_backend_name
from megatron_mamba3.ops.scan import mamba3_decode
from megatron_mamba3.ops.segments import check_cu_seqlens, segment_ids_from_cu_seqlens
from megatron_mamba3.parameters import init_layer_params
from megatron_mamba3.psiv import check_psiv_gate
from megatron_mamba3.parallel import HEAD_AXES, detach_replicated_rows, joined_weight, make_replicas_identical

# Mamba3Config fields a spec may set; the sizes shared with Megatron come from the TransformerConfig.
FROM_TRANSFORMER_CONFIG = {"headdim": "mamba_head_dim", "d_state": "mamba_state_dim", "ngroups": "mamba_num_groups"}
SETTINGS = frozenset(f.name for f in dataclasses.fields(Mamba3Config)) - {"d_model", *FROM_TRANSFORMER_CONFIG}


@dataclasses.dataclass
class Mamba3MixerSubmodules:
    """The two linears: `in_proj` column-parallel, `out_proj` row-parallel (local or TE classes)."""

    in_proj: Union[ModuleSpec, type] = None
    out_proj: Union[ModuleSpec, type] = None


def mixer_config(config: TransformerConfig, d_model: int, settings: dict) -> Mamba3Config:
    """The `Mamba3Config` of a mixer: sizes from `config`, Mamba-3 settings from `settings`."""
    unknown = sorted(settings.keys() - SETTINGS)
    if unknown:
        raise ValueError(f"Mamba3Mixer got unknown setting(s) {unknown}; allowed: {sorted(SETTINGS)}")
    sizes = {field: getattr(config, name) for field, name in FROM_TRANSFORMER_CONFIG.items()}
    mamba3 = Mamba3Config(d_model=d_model, **sizes, **settings)
    if config.mamba_num_heads is not None and config.mamba_num_heads != mamba3.nheads:
        raise ValueError(
            f"TransformerConfig.mamba_num_heads={config.mamba_num_heads} disagrees with the "
            f"H = expand * d_model / mamba_head_dim = {mamba3.nheads} heads of the Mamba-3 mixer"
        )
    return mamba3


def check_sizes_match(config: TransformerConfig, mamba3: Mamba3Config) -> None:
    """`ValueError` naming both values where a whole `mamba3_config` disagrees with the sizes the
    TransformerConfig gives every Mamba layer (`mamba_head_dim`, `mamba_state_dim`, `mamba_num_groups`)."""
    for field, name in FROM_TRANSFORMER_CONFIG.items():
        if getattr(mamba3, field) != getattr(config, name):
            raise ValueError(
                f"mamba3_config.{field}={getattr(mamba3, field)} disagrees with TransformerConfig.{name}={getattr(config, name)}"
            )


class Mamba3Mixer(MegatronModule):
    """Mamba-3 mixer: (l, b, d) hidden states -> ((l, b, d) output, bias None).

    Args:
        config: the TransformerConfig (sizes `mamba_head_dim`, `mamba_state_dim`, `mamba_num_groups`).
        submodules: `Mamba3MixerSubmodules` with the in_proj / out_proj linear classes.
        d_model: hidden size. layer_number, pg_collection, pp_layer_offset, name: as MambaLayer passes.
        backend: scan backend ("auto", "reference", "tilelang", "xla"; None reads
            `MEGATRON_MAMBA3_BACKEND`).
        mamba3_config: a whole `Mamba3Config` instead of `settings` (its d_model, headdim, d_state
            and ngroups must match the layer's and the TransformerConfig's).
        **settings: Mamba3Config fields such as mimo_rank, rope_fraction, chunk_size, is_outproj_norm.
    Every bad value raises `ValueError` here, naming it; a set PsiV gate (`psiv.py`) raises
    `NotImplementedError` naming `MEGATRON_MAMBA3_PSIV_CACHE`.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Mamba3MixerSubmodules,
        d_model: int,
        layer_number: int | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        pp_layer_offset: int = 0,
        name: str | None = None,
        *,
        backend: str | None = None,
        mamba3_config: Mamba3Config | None = None,
        **settings,
    ):
        super().__init__(config)
        check_psiv_gate()
        if mamba3_config is not None and settings:
            raise ValueError(f"give either mamba3_config or settings {sorted(settings)}, not both")
        if mamba3_config is not None and mamba3_config.d_model != d_model:
            raise ValueError(f"mamba3_config.d_model={mamba3_config.d_model} but the layer's d_model is {d_model}")
        if backend is not None:
            check_backend_name(backend)
        if mamba3_config is not None:
            check_sizes_match(config, mamba3_config)
        self.mamba3 = mamba3_config or mixer_config(config, d_model, settings)
        self.backend = backend
        self.layer_number = layer_number
        self.pp_layer_offset = pp_layer_offset
        self.receipt_name = name or f"layer{layer_number}"
        self.tp_group = pg_collection.tp if pg_collection is not None else parallel_state.get_tensor_model_parallel_group()
        tp_size = self.tp_group.size()
        # Context parallelism passes states between the CP ranks' sequence pieces (`context_parallel`).
        self.cp_group = pg_collection.cp if pg_collection is not None else parallel_state.get_context_parallel_group()
        self.layout = InProjLayout(self.mamba3, tp_size, self.tp_group.rank())
        if tp_size > 1 and config.gradient_accumulation_fusion:
            raise ValueError(
                "gradient_accumulation_fusion=True writes in_proj's weight gradient straight into main_grad, "
                "past the sum of its replicated B/C/angle rows; set it False for tensor_model_parallel_size > 1"
            )

        m = self.mamba3
        self.in_proj = build_module(
            submodules.in_proj, d_model, self.layout.width * tp_size,
            config=config, init_method=config.init_method, gather_output=False, bias=False, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="fc1", tp_group=self.tp_group,
            name=f"{name}.in_proj" if name else None,
        )
        self.out_proj = build_module(
            submodules.out_proj, m.d_inner, d_model,
            config=config, init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc2", tp_group=self.tp_group,
            name=f"{name}.out_proj" if name else None,
        )
        # The small per-head and norm parameters stay fp32 under bf16 / fp16 params (fp64 under fp64).
        factory = dict(device=self.in_proj.weight.device, dtype=compute_dtype(config.params_dtype))
        self.B_norm = nn.RMSNorm(m.d_state, eps=1e-5, **factory)
        self.C_norm = nn.RMSNorm(m.d_state, eps=1e-5, **factory)
        if m.is_outproj_norm:
            self.norm = nn.RMSNorm(m.d_inner // tp_size, eps=1e-5, **factory)
            set_tensor_model_parallel_attributes(self.norm.weight, True, 0, 1)
        heads = slice(self.layout.tp_rank * self.layout.heads, (self.layout.tp_rank + 1) * self.layout.heads)
        for param_name, value in init_layer_params(m).items():  # dt_bias, D, B/C_bias, mimo_*: this rank's heads
            if param_name in HEAD_AXES:  # (the norms above are modules; their keys end in ".weight")
                param = nn.Parameter(value[heads].to(**factory))
                set_tensor_model_parallel_attributes(param, True, 0, 1)
                self.register_parameter(param_name, param)
        if tp_size > 1:
            self._make_replicas_identical()

    def _make_replicas_identical(self) -> None:
        """Move in_proj's replicated rows into `in_proj.replicated_weight` (`parallel`), copy TP rank
        0's replicated weights (those rows, B_norm, C_norm) to every rank and sum their gradients
        from now on. The forward passes the joined weight to in_proj, whose class must take `weight=`
        (Megatron's ColumnParallelLinear does)."""
        if "weight" not in inspect.signature(self.in_proj.forward).parameters:
            raise ValueError(
                f"in_proj {type(self.in_proj).__name__} takes no weight= in forward; at tensor_model_parallel_size > 1 "
                f"the Mamba-3 mixer needs one that does (megatron.core.tensor_parallel.ColumnParallelLinear)"
            )
        detach_replicated_rows(self.in_proj, self.layout)
        make_replicas_identical(self.in_proj.replicated_weight, self.tp_group)
        make_replicas_identical(self.B_norm.weight, self.tp_group)
        make_replicas_identical(self.C_norm.weight, self.tp_group)

    def layer_params(self) -> dict[str, Tensor]:
        """This rank's parameters by their official names, as `ops.layer` takes them."""
        params = {"B_norm": self.B_norm.weight, "C_norm": self.C_norm.weight}
        params.update((name, param) for name, param in self.named_parameters(recurse=False))
        if self.mamba3.is_outproj_norm:
            params["norm"] = self.norm.weight
        return params

    def forward(
        self,
        hidden_states: Tensor,
        inference_context: BaseInferenceContext | None = None,
        *,
        packed_seq_params: PackedSeqParams | None = None,
        inference_params: BaseInferenceContext | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(l, b, d) hidden states (l / tp under sequence parallelism) -> ((l, b, d) output, bias).

        packed_seq_params: THD packing with b = 1; documents from `cu_seqlens_q_padded` (else
        `cu_seqlens_q`), tokens past the last offset form one more document; offsets that do not
        start at 0, decrease or pass the sequence raise `ValueError` (on the device only with
        MEGATRON_MAMBA3_DEBUG=1, see `check_cu_seqlens`).
        inference_context: a static context; its first call (sequence_len_offset 0) is the prefill,
        later calls decode token by token from the stored state.
        Under context parallelism (the CP group of `pg_collection`) l is this rank's two pieces of
        the sequence in Megatron's layout and cu_seqlens count over the whole row (`context_parallel`).
        """
        inference_context = deprecate_inference_params(inference_context, inference_params)
        projected = self._project(hidden_states).transpose(0, 1)  # (b, l, width)
        segment_ids = self._segment_ids(packed_seq_params, projected.shape)
        if inference_context is None:
            y, _ = self._scan(projected, segment_ids)
        else:
            y = self._infer(projected, segment_ids, inference_context)
        return self.out_proj(y.transpose(0, 1).contiguous())

    def _project(self, hidden_states: Tensor) -> Tensor:
        """in_proj: (l, b, d) (l / tp under sequence parallelism) -> (l, b, layout.width)."""
        if self.layout.replicated_width:
            return self.in_proj(hidden_states, weight=joined_weight(self.in_proj))[0]
        return self.in_proj(hidden_states)[0]

    def _scan(self, projected: Tensor, segment_ids: Tensor | None) -> tuple[Tensor, Mamba3State]:
        """(b, l, layout.width) in_proj output -> ((b, l, d_inner / tp) gated output, final state)."""
        return mamba3_layer(
            projected, self.layer_params(), self.mamba3,
            layout=self.layout, scan=functools.partial(sequence_scan, self.cp_group),
            segment_ids=segment_ids, backend=self.backend, layer=self.receipt_name,
        )

    def _infer(self, projected: Tensor, segment_ids: Tensor | None, context: BaseInferenceContext) -> Tensor:
        inference.check_context(context, self.config.sequence_parallel)
        if self.cp_group.size() > 1:
            raise ValueError(f"Mamba3Mixer inference runs without context parallelism; got CP size {self.cp_group.size()}")
        if segment_ids is not None:
            raise ValueError("Mamba3Mixer inference does not take packed sequences")
        if self.layer_number is None:
            raise ValueError("Mamba3Mixer needs a layer_number to keep its decode state in the inference context")
        if inference.is_prefill(context):
            y, state = self._scan(projected, None)
        else:
            params = self.layer_params()
            weights, state = scan_weights(params), inference.load_state(context, self.layer_number, projected.shape[0])
            inputs = scan_inputs(projected, params, self.layout)
            outs = []
            for t in range(projected.shape[1]):
                out, state = mamba3_decode(inputs.tokens(t), weights, state, layer=self.receipt_name)
                outs.append(out.flatten(-2))
            y = torch.stack(outs, dim=1)
        inference.store_state(context, self.layer_number, state)
        return y

    def _segment_ids(self, packed: PackedSeqParams | None, shape: torch.Size) -> Tensor | None:
        if packed is None:
            return None
        if packed.qkv_format not in (None, "thd") or shape[0] != 1:
            raise ValueError(
                f"packed_seq_params must describe THD packing with batch 1; got qkv_format={packed.qkv_format!r}, "
                f"batch {shape[0]}"
            )
        cu_seqlens = packed.cu_seqlens_q_padded if packed.cu_seqlens_q_padded is not None else packed.cu_seqlens_q
        if self.cp_group.size() > 1:  # offsets over the whole row, of which this rank holds two pieces
            check_cu_seqlens(cu_seqlens, shape[1] * self.cp_group.size(), to_the_end=False)
            return local_segment_ids(cu_seqlens, shape[1], self.cp_group)
        check_cu_seqlens(cu_seqlens, shape[1], to_the_end=False)
        return segment_ids_from_cu_seqlens(cu_seqlens, shape[1])

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Distributed-checkpoint entries that reshard across TP sizes (see `checkpoint`)."""
        return mixer_sharded_state_dict(self, self.layout, self.tp_group, prefix, sharded_offsets, metadata)
