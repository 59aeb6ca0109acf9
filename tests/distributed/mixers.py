"""Small Mamba3Mixer cases for the multi-process tests: configs, full (tp = 1) weights, inputs."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mamba3 import Mamba3Config
from megatron_mamba3.mixer import Mamba3Mixer, Mamba3MixerSubmodules
from megatron_mamba3.parallel import shard_mixer_state

D_MODEL, HEADDIM, D_STATE, LENGTH, BATCH = 32, 8, 16, 24, 2  # H = 8 heads
PACKED_CU_SEQLENS = (0, 5, 13, 19)  # THD documents in one row of LENGTH tokens; 19..23 form one more


@dataclasses.dataclass(frozen=True)
class MixerCase:
    mimo_rank: int
    ngroups: int
    packed: bool = False

    @property
    def settings(self) -> dict:
        return dict(mimo_rank=self.mimo_rank, is_outproj_norm=self.mimo_rank > 1, chunk_size=8)

    @property
    def batch(self) -> int:
        return 1 if self.packed else BATCH


def case_config(case: MixerCase) -> Mamba3Config:
    """The `Mamba3Config` a mixer built for `case` has."""
    return Mamba3Config(d_model=D_MODEL, headdim=HEADDIM, d_state=D_STATE, ngroups=case.ngroups, **case.settings)


def transformer_config(case: MixerCase, tp: int, sequence_parallel: bool = False) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1, hidden_size=D_MODEL, num_attention_heads=4, mamba_head_dim=HEADDIM,
        mamba_state_dim=D_STATE, mamba_num_groups=case.ngroups, tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel, use_cpu_initialization=True, params_dtype=torch.float32,
    )


def build_mixer(case: MixerCase, tp: int, sequence_parallel: bool = False, layer_number: int = 1) -> Mamba3Mixer:
    """A mixer on the current TP group (randomly initialised)."""
    return Mamba3Mixer(
        transformer_config(case, tp, sequence_parallel),
        Mamba3MixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
        D_MODEL,
        layer_number=layer_number,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        **case.settings,
    )


def full_weights(mixer_config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tp = 1 weights under the official names, away from the init values so every
    parameter matters."""
    g = torch.Generator().manual_seed(seed)
    c = mixer_config
    H, R, n, p = c.nheads, c.mimo_rank, c.d_state, c.headdim
    rand = lambda *shape, scale=1.0, shift=0.0: torch.randn(*shape, generator=g) * scale + shift  # noqa: E731
    weights = {
        "in_proj.weight": rand(c.d_in_proj, c.d_model, scale=0.3),
        "out_proj.weight": rand(c.d_model, c.d_inner, scale=0.2),
        "dt_bias": rand(H, scale=0.5, shift=-2.0),
        "B_norm.weight": rand(n, scale=0.1, shift=1.0),
        "C_norm.weight": rand(n, scale=0.1, shift=1.0),
        "B_bias": rand(H, R, n, scale=0.3, shift=1.0),
        "C_bias": rand(H, R, n, scale=0.3, shift=1.0),
        "D": rand(H),
    }
    if c.is_mimo:
        weights.update(mimo_x=rand(H, R, p, scale=0.5), mimo_z=rand(H, R, p, scale=0.5), mimo_o=rand(H, R, p, scale=0.5))
    if c.is_outproj_norm:
        weights["norm.weight"] = rand(c.d_inner, scale=0.1, shift=1.0)
    return weights


def load_full(mixer: Mamba3Mixer, full: dict[str, torch.Tensor]) -> None:
    layout = mixer.layout
    mixer.load_state_dict(shard_mixer_state(full, mixer.mamba3, layout.tp_size, layout.tp_rank))


def inputs(case: MixerCase, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, output gradient), both (l, b, d)."""
    g = torch.Generator().manual_seed(seed)
    shape = (LENGTH, case.batch, D_MODEL)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)
