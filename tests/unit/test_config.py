"""`Mamba3Config`: defaults, derived sizes, and a `ValueError` naming field and value for every rule."""

import pytest

from megatron_mamba3 import Mamba3Config
from megatron_mamba3.psiv import PSIV_GATE


def test_defaults_and_derived_sizes():
    config = Mamba3Config(d_model=256)
    assert (config.expand, config.headdim, config.d_state, config.ngroups, config.mimo_rank) == (2, 64, 128, 1, 1)
    assert (config.A_floor, config.dt_min, config.dt_max, config.dt_floor) == (1e-4, 1e-3, 0.1, 1e-4)
    assert config.rope_fraction == 0.5 and config.is_outproj_norm is False and not config.is_mimo
    assert (config.d_inner, config.nheads, config.num_rope_angles, config.scan_chunk_size) == (512, 8, 32, 64)
    assert config.in_proj_sizes == (512, 512, 128, 128, 8, 8, 8, 32)
    assert config.d_in_proj == 2 * 512 + 2 * 128 + 3 * 8 + 32


def test_mimo_and_rope_sizes():
    config = Mamba3Config(d_model=64, headdim=16, d_state=32, ngroups=2, mimo_rank=4, rope_fraction=1.0)
    assert config.is_mimo and config.scan_chunk_size == 16 and config.num_rope_angles == 16
    assert config.in_proj_sizes == (128, 128, 256, 256, 8, 8, 8, 16)
    assert Mamba3Config(d_model=8, headdim=4, d_state=6).num_rope_angles == 1  # floor_even(3) / 2
    assert Mamba3Config(d_model=8, headdim=4, d_state=16, chunk_size=5).scan_chunk_size == 5


def test_heads_per_rank():
    config = Mamba3Config(d_model=256)  # H = 8
    assert config.heads_per_rank(1) == 8 and config.heads_per_rank(4) == 2
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the number of heads H = 8"):
        config.heads_per_rank(3)
    with pytest.raises(ValueError, match="tensor_parallel_size=0"):
        config.heads_per_rank(0)


@pytest.mark.parametrize(
    "overrides, field, value",
    [
        (dict(d_model=0), "d_model", "0"),
        (dict(d_model=-4), "d_model", "-4"),
        (dict(d_model=32.0), "d_model", "32.0"),
        (dict(d_model=True), "d_model", "True"),
        (dict(expand=0), "expand", "0"),
        (dict(expand=-1), "expand", "-1"),
        (dict(expand=1.3), "expand", "1.3"),
        (dict(expand=float("nan")), "expand", "nan"),
        (dict(headdim=0), "headdim", "0"),
        (dict(headdim=48), "headdim", "48"),
        (dict(d_state=0), "d_state", "0"),
        (dict(d_state=15), "d_state", "15"),
        (dict(d_state=2), "d_state", "2"),
        (dict(ngroups=0), "ngroups", "0"),
        (dict(ngroups=3), "ngroups", "3"),
        (dict(mimo_rank=0), "mimo_rank", "0"),
        (dict(mimo_rank=2.0), "mimo_rank", "2.0"),
        (dict(rope_fraction=0.25), "rope_fraction", "0.25"),
        (dict(rope_fraction=True), "rope_fraction", "True"),
        (dict(chunk_size=0), "chunk_size", "0"),
        (dict(chunk_size=8.0), "chunk_size", "8.0"),
        (dict(A_floor=0.0), "A_floor", "0.0"),
        (dict(A_floor=-1e-4), "A_floor", "-0.0001"),
        (dict(dt_min=0.0), "dt_min", "0.0"),
        (dict(dt_max=float("inf")), "dt_max", "inf"),
        (dict(dt_min=0.2, dt_max=0.1), "dt_max", "0.1"),
        (dict(dt_floor=0), "dt_floor", "0"),
        (dict(is_outproj_norm=1), "is_outproj_norm", "1"),
    ],
)
def test_every_rule_raises_naming_field_and_value(overrides, field, value):
    arguments = dict(d_model=64, headdim=16, d_state=16) | overrides
    with pytest.raises(ValueError, match=rf"Mamba3Config\.{field}={value}\b"):
        Mamba3Config(**arguments)


def test_config_is_frozen():
    config = Mamba3Config(d_model=64)
    with pytest.raises(AttributeError):
        config.d_model = 32


@pytest.mark.parametrize("value", ["1", "yes", "true"])
def test_psiv_gate_refuses_construction(monkeypatch, value):
    monkeypatch.setenv(PSIV_GATE, value)
    with pytest.raises(NotImplementedError, match=rf"{PSIV_GATE}='{value}'.*unimplemented scaffold"):
        Mamba3Config(d_model=64)


@pytest.mark.parametrize("value", [None, "0"])
def test_psiv_gate_off_builds(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(PSIV_GATE, raising=False)
    else:
        monkeypatch.setenv(PSIV_GATE, value)
    assert Mamba3Config(d_model=64).d_model == 64


def test_unknown_field_and_oversized_chunk_raise_value_error():
    with pytest.raises(ValueError, match=r"Mamba3Config has no field\(s\) \['mimo_rnak'\]"):
        Mamba3Config(d_model=32, mimo_rnak=4)
    with pytest.raises(ValueError, match="Mamba3Config.chunk_size=4096: must be <= 1024"):
        Mamba3Config(d_model=32, chunk_size=4096)
