"""Mamba3Mixer and the TP layout refuse bad settings at construction, naming the bad value."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mamba3 import Mamba3Config
from megatron_mamba3.in_proj import InProjLayout
from megatron_mamba3.mixer import Mamba3Mixer, Mamba3MixerSubmodules
from megatron_mamba3.psiv import PSIV_GATE


@dataclasses.dataclass
class _Group:
    """Stands in for a TP process group: errors below are raised before any communication."""

    size_: int
    rank_: int = 0

    def size(self) -> int:
        return self.size_

    def rank(self) -> int:
        return self.rank_


def _build(tp: int = 1, config_changes: dict | None = None, **kwargs) -> Mamba3Mixer:
    sizes = dict(num_layers=1, hidden_size=32, num_attention_heads=4, mamba_head_dim=8, mamba_state_dim=16)
    config = TransformerConfig(**{**sizes, "mamba_num_groups": 1, **(config_changes or {})})
    return Mamba3Mixer(config, Mamba3MixerSubmodules(), 32, pg_collection=ProcessGroupCollection(tp=_Group(tp)), **kwargs)


@pytest.mark.parametrize(
    "kwargs, config_changes, message",
    [
        (dict(mimo_rnak=4), None, r"unknown setting\(s\) \['mimo_rnak'\]"),
        (dict(mimo_rank=4, rope_fraction=0.3), None, r"Mamba3Config.rope_fraction=0.3"),
        (dict(backend="triton"), None, r"backend='triton' is not a backend"),
        (dict(), dict(mamba_num_heads=6), r"mamba_num_heads=6 disagrees with the H = .* = 8 heads"),
        (dict(), dict(mamba_state_dim=15), r"Mamba3Config.d_state=15: must be even"),
        (dict(mamba3_config=Mamba3Config(d_model=32), mimo_rank=4), None, r"either mamba3_config or settings \['mimo_rank'\]"),
        (dict(mamba3_config=Mamba3Config(d_model=64)), None, r"mamba3_config.d_model=64 but the layer's d_model is 32"),
        (dict(mamba3_config=Mamba3Config(d_model=32, headdim=16, d_state=16)), None,
         r"mamba3_config.headdim=16 disagrees with TransformerConfig.mamba_head_dim=8"),
        (dict(mamba3_config=Mamba3Config(d_model=32, headdim=8, d_state=32)), None,
         r"mamba3_config.d_state=32 disagrees with TransformerConfig.mamba_state_dim=16"),
    ],
)
def test_bad_settings_raise_at_construction(kwargs, config_changes, message):
    with pytest.raises(ValueError, match=message):
        _build(config_changes=config_changes, **kwargs)


def test_tensor_parallel_rules_raise_at_construction():
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the number of heads H = 8"):
        _build(tp=3)
    with pytest.raises(ValueError, match="gradient_accumulation_fusion=True .* tensor_model_parallel_size > 1"):
        _build(tp=2, config_changes=dict(gradient_accumulation_fusion=True))


def test_psiv_gate_refuses_the_mixer_even_with_a_prebuilt_config(monkeypatch):
    config = Mamba3Config(d_model=32, headdim=8, d_state=16)
    monkeypatch.setenv(PSIV_GATE, "1")
    with pytest.raises(NotImplementedError, match=f"{PSIV_GATE}='1'.*unimplemented scaffold"):
        _build(mamba3_config=config)


def test_in_proj_layout_split_and_replication():
    config = Mamba3Config(d_model=32, headdim=4, d_state=8, ngroups=2, mimo_rank=2)  # H = 16, S = 2
    with pytest.raises(ValueError, match="ngroups=2 with tensor parallel size 3"):
        InProjLayout(Mamba3Config(d_model=24, headdim=4, d_state=8, ngroups=2), 3, 0)
    sharded = InProjLayout(config, 2, 1)
    assert sharded.local_sizes == (32, 32, 16, 16, 8, 8, 8, 2) and sharded.used_groups == slice(None)
    assert sharded.replicated_width == 2  # only the angles, last
    for rank, group in enumerate([0, 0, 1, 1]):  # tp = 4 > g = 2: each rank's heads lie in one group
        replicated = InProjLayout(config, 4, rank)
        assert replicated.used_groups == slice(group, group + 1)
        assert [p.name for p in replicated.local_pieces] == ["z", "x", "dd_dt", "dd_A", "trap", "B", "C", "angles"]
        assert replicated.local_sizes == (16, 16, 4, 4, 4, 32, 32, 2) and replicated.replicated_width == 66
    assert [p.name for p in InProjLayout(config, 1, 0).local_pieces] == [p.name for p in sharded.pieces]  # official
    weight = torch.arange(config.d_in_proj, dtype=torch.float64)[:, None]
    B_rows = sharded.shard(weight)[64:80, 0]  # rank 1's B: rank r of (r g n) keeps group 1 of each r
    assert B_rows.tolist() == [128 + 8 + j for j in range(8)] + [128 + 16 + 8 + j for j in range(8)]


@pytest.mark.parametrize(
    "cu_seqlens, message",
    [
        (torch.tensor([2, 5, 10]), r"cu_seqlens=\[2, 5, 10\] must start at 0"),
        (torch.tensor([0, 6, 3, 10]), "never decrease"),
        (torch.tensor([0, 5, 12]), "end at most at the sequence length 10"),
        (torch.tensor([0.0, 10.0]), "1-D integer tensor"),
    ],
)
def test_bad_thd_offsets_raise_like_the_layer(cu_seqlens, message):
    without_cp = SimpleNamespace(cp_group=SimpleNamespace(size=lambda: 1))  # the mixer state _segment_ids reads
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)
    with pytest.raises(ValueError, match=message):
        Mamba3Mixer._segment_ids(without_cp, packed, torch.Size((1, 10)))
    short = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 4]))  # tokens past 4: one more document
    assert Mamba3Mixer._segment_ids(without_cp, short, torch.Size((1, 10))).tolist() == [[0] * 4 + [1] * 6]
