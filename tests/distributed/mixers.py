"""Mamba3Mixer cases for the multi-process tests (gloo on CPU, NCCL in tests/multigpu): build a
mixer on the current TP group, load full (tp = 1) weights, run forward and backward, gather."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mamba3 import Mamba3Config
from megatron_mamba3.mixer import SETTINGS, Mamba3Mixer, Mamba3MixerSubmodules
from megatron_mamba3.parallel import shard_mixer_state


@dataclasses.dataclass(frozen=True)
class MixerCase:
    """One mixer setting and its input sizes (small CPU sizes by default). `packed` runs one THD row
    of `length` tokens holding four documents (the last one after the final cu_seqlens offset)."""

    mimo_rank: int
    ngroups: int
    packed: bool = False
    d_model: int = 32
    headdim: int = 8
    d_state: int = 16
    length: int = 24
    batch: int = 2
    chunk_size: int | None = 8

    @property
    def rows(self) -> int:
        return 1 if self.packed else self.batch

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return torch.tensor([0, 5 * self.length // 24, 13 * self.length // 24, 19 * self.length // 24], dtype=torch.int32)

    @property
    def config(self) -> Mamba3Config:
        """The `Mamba3Config` a mixer built for this case has."""
        return Mamba3Config(
            d_model=self.d_model, headdim=self.headdim, d_state=self.d_state, ngroups=self.ngroups,
            mimo_rank=self.mimo_rank, is_outproj_norm=self.mimo_rank > 1, chunk_size=self.chunk_size,
        )


def build_mixer(
    mixer_config: Mamba3Config, tp: int, sequence_parallel: bool = False, *, layer_number: int = 1,
    params_dtype: torch.dtype = torch.float32, device: str = "cpu", backend: str | None = None,
    cpu_initialization: bool = True,
    pg_collection: ProcessGroupCollection | None = None,
) -> Mamba3Mixer:
    """A randomly initialised mixer with `mixer_config` on the current TP group (or the groups of
    `pg_collection`), built the way a spec builds it: sizes through the TransformerConfig, the other
    fields as spec settings. `cpu_initialization`: Megatron's `use_cpu_initialization` (else the
    linears initialise on the current CUDA device, which needs `model_parallel_cuda_manual_seed`);
    then moved to `device`."""
    c = mixer_config
    config = TransformerConfig(
        num_layers=1, hidden_size=c.d_model, num_attention_heads=4, mamba_head_dim=c.headdim,
        mamba_state_dim=c.d_state, mamba_num_groups=c.ngroups, tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel, use_cpu_initialization=cpu_initialization,
        params_dtype=params_dtype,
    )
    mixer = Mamba3Mixer(
        config,
        Mamba3MixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
        c.d_model,
        layer_number=layer_number,
        pg_collection=pg_collection or ProcessGroupCollection.use_mpu_process_groups(),
        backend=backend,
        **{name: getattr(c, name) for name in SETTINGS},
    )
    return mixer.to(device)


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
    """Load full (tp = 1) weights into this rank's mixer, cast to its parameters' dtypes."""
    layout, own = mixer.layout, mixer.state_dict()
    local = shard_mixer_state(full, mixer.mamba3, layout.tp_size, layout.tp_rank)
    mixer.load_state_dict({name: tensor.to(own[name].dtype) for name, tensor in local.items()})


def inputs(case: MixerCase, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, output gradient), both (l, b, d) fp32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    shape = (case.length, case.rows, case.d_model)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def forward_backward(
    mixer: Mamba3Mixer, case: MixerCase, sequence_parallel: bool, dtype: torch.dtype = torch.float32
) -> dict:
    """One forward and backward on this rank's part of the case's input (in `dtype`, on the
    mixer's device) -> output, bias, input gradient and parameter gradients, all on the CPU."""
    device = mixer.in_proj.weight.device
    u, grad_out = (t.to(device, dtype) for t in inputs(case))
    if sequence_parallel:
        tp, rank = mixer.layout.tp_size, mixer.layout.tp_rank
        u, grad_out = u.chunk(tp)[rank], grad_out.chunk(tp)[rank]
    u = u.clone().requires_grad_()
    packed = None
    if case.packed:
        cu_seqlens = case.cu_seqlens.to(device)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)
    out, bias = mixer(u, packed_seq_params=packed)
    out.backward(grad_out)
    cpu = lambda t: t.detach().float().cpu()  # noqa: E731
    return {
        "out": cpu(out), "bias": bias, "u_grad": cpu(u.grad),
        "grads": {name: cpu(param.grad) for name, param in mixer.named_parameters()},
    }


def gathered(ranks: list[dict], key: str, sequence_parallel: bool) -> torch.Tensor:
    """A (l, b, d) result split along l under sequence parallelism, else equal on every rank."""
    if sequence_parallel:
        return torch.cat([r[key] for r in ranks])
    for r in ranks[1:]:
        assert torch.equal(r[key], ranks[0][key]), f"{key} differs across ranks"
    return ranks[0][key]
