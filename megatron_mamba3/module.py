"""`Mamba3`: one Mamba-3 layer as a plain `torch.nn.Module` (in_proj -> `mamba3_layer` -> out_proj),
for models that do not run Megatron-Core (torch_xla on TPU, plain PyTorch on CPU / CUDA).

Its state dict uses the official names and layouts (`in_proj.weight`, `dt_bias`, `B_bias`,
`B_norm.weight`, ..., `out_proj.weight`), the ones `convert.mixer_shapes` lists, so an official
mixer state loads as is and `convert` maps it to and from Megatron checkpoints. The math is
`ops.layer` (shared with the Megatron `Mamba3Mixer`), the scan any registered backend.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megatron_mamba3.config import Mamba3Config
from megatron_mamba3.ops.interface import Mamba3State, ScanDims, compute_dtype
from megatron_mamba3.in_proj import InProjLayout
from megatron_mamba3.ops.layer import mamba3_layer, scan_inputs, scan_weights
from megatron_mamba3.ops.scan import mamba3_decode
from megatron_mamba3.parameters import init_layer_params
from megatron_mamba3.psiv import check_psiv_gate

_NORMS = ("B_norm", "C_norm", "norm")  # RMSNorm modules: their weights are "<name>.weight"


class Mamba3(nn.Module):
    """Mamba-3 layer: hidden (b, l, d_model) -> (output (b, l, d_model), final state).

    Args:
        config: the layer's `Mamba3Config`.
        backend: scan backend ("auto", "reference", "tilelang", "xla"; None reads
            `MEGATRON_MAMBA3_BACKEND`, default "auto": picked by the tensors' device).
        layer: the name receipts record for this layer.
        generator: seeds the `dt_bias` initialisation (in_proj / out_proj use torch's default
            `nn.Linear` init and global RNG).
    The per-head parameters and norms are created in fp32, the linears in torch's default dtype;
    `.to(dtype)` moves all of them.
    """

    def __init__(
        self,
        config: Mamba3Config,
        *,
        backend: str | None = None,
        layer: str | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        check_psiv_gate()
        self.config, self.backend, self.layer = config, backend, layer
        self.in_proj = nn.Linear(config.d_model, config.d_in_proj, bias=False)
        for name, value in init_layer_params(config, generator).items():
            if name in _NORMS:
                norm = nn.RMSNorm(value.shape[0], eps=1e-5, dtype=value.dtype)
                self.add_module(name, norm)
            else:
                self.register_parameter(name, nn.Parameter(value))
        self.out_proj = nn.Linear(config.d_inner, config.d_model, bias=False)

    def layer_params(self) -> dict[str, Tensor]:
        """The parameters `ops.layer` takes, by official name (norm weights without ".weight")."""
        params = dict(self.named_parameters(recurse=False))
        params.update((name, getattr(self, name).weight) for name in _NORMS if hasattr(self, name))
        return params

    def forward(
        self,
        hidden: Tensor,
        *,
        segment_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        initial_state: Mamba3State | None = None,
    ) -> tuple[Tensor, Mamba3State]:
        """hidden (b, l, d_model) -> (output (b, l, d_model), final state).

        Packing and states as `mamba3_scan`: `segment_ids` (b, l) with per-row states, or
        `cu_seqlens` (N + 1,) with b = 1 and per-document final states (N, ...); `initial_state`
        continues each row from a previous call's final state.
        """
        y, state = mamba3_layer(
            self.in_proj(hidden), self.layer_params(), self.config,
            segment_ids=segment_ids, cu_seqlens=cu_seqlens, initial_state=initial_state,
            backend=self.backend, layer=self.layer,
        )
        return self.out_proj(y), state

    def step(self, hidden: Tensor, state: Mamba3State) -> tuple[Tensor, Mamba3State]:
        """One decode step: hidden (b, d_model) of one token and the running state -> (output
        (b, d_model), new state), through `mamba3_decode` (equal to `forward` token by token)."""
        params = self.layer_params()
        inputs = scan_inputs(self.in_proj(hidden), params, InProjLayout(self.config))
        y, state = mamba3_decode(inputs, scan_weights(params), state, layer=self.layer)
        return self.out_proj(y.flatten(-2)), state

    def zero_state(self, batch: int) -> Mamba3State:
        """The state of `batch` fresh sequences (decode from scratch), on this layer's device, fp32
        (fp64 for an fp64 layer)."""
        c = self.config
        dims = ScanDims(batch, 0, c.nheads, c.headdim, c.mimo_rank, c.ngroups, c.d_state, c.num_rope_angles)
        weight = self.in_proj.weight
        return Mamba3State.zeros(batch, dims, compute_dtype(weight.dtype), weight.device)
