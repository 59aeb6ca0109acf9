"""The plain-torch `Mamba3` layer against the float64 golden cases (official weights loaded by name):
output, packed output, mid and final states, continuing from a state, and token-by-token decode,
all within 1e-10 relative (angles modulo 2π); its state dict is what the converter serves."""

import pytest
import torch

from megatron_mamba3 import Mamba3, clear_receipts, receipts
from megatron_mamba3.convert import check_mixer_state, megatron_to_official, official_to_megatron
from megatron_mamba3.ops import Mamba3State
from tests.golden import CASES, golden_array, golden_config, official_mixer_state
from tests.helpers import assert_states_close, rel_err

TOL = 1e-10


def golden_layer(name: str) -> Mamba3:
    layer = Mamba3(golden_config(name), backend="reference", layer=name).to(torch.float64)
    layer.load_state_dict(official_mixer_state(name))  # strict: the official names, nothing else
    return layer


def golden_state(name: str, prefix: str) -> Mamba3State:
    return Mamba3State(*(golden_array(name, f"{prefix}.{field}") for field in Mamba3State._fields))


@pytest.mark.parametrize("name", sorted(CASES))
def test_module_matches_golden_forward_states_and_decode(name):
    layer, get = golden_layer(name), lambda key: golden_array(name, key)
    u, expected = get("u"), get("out")
    with torch.no_grad():
        out, final = layer(u)
        assert rel_err(out, expected) < TOL
        assert_states_close(final, golden_state(name, "final"), TOL)
        packed, _ = layer(u, segment_ids=get("segment_ids"))
        assert rel_err(packed, get("out_packed")) < TOL

        split = int(get("split_at"))
        _, middle = layer(u[:, :split])
        assert_states_close(middle, golden_state(name, "mid"), TOL)
        rest, rest_final = layer(u[:, split:], initial_state=golden_state(name, "mid"))
        assert rel_err(rest, expected[:, split:]) < TOL
        assert_states_close(rest_final, golden_state(name, "final"), TOL)

        clear_receipts()
        state, steps = golden_state(name, "mid"), []
        for t in range(split, u.shape[1]):
            y, state = layer.step(u[:, t], state)
            steps.append(y)
        assert rel_err(torch.stack(steps, dim=1), expected[:, split:]) < TOL
        assert_states_close(state, golden_state(name, "final"), TOL)
        assert {(r.layer, r.step_kind) for r in receipts()} == {(name, "decode")}


def test_decode_from_zero_state_equals_forward():
    name = "mimo_r4_g2"
    layer, u = golden_layer(name), golden_array(name, "u")
    with torch.no_grad():
        state, steps = layer.zero_state(u.shape[0]), []
        for t in range(u.shape[1]):
            y, state = layer.step(u[:, t], state)
            steps.append(y)
    assert all(t.dtype == torch.float64 for t in state)
    assert rel_err(torch.stack(steps, dim=1), golden_array(name, "out")) < TOL


def test_state_dict_is_the_official_mixer_layout_the_converter_serves():
    name = "mimo_r4_norm_rope1"
    config, layer = golden_config(name), golden_layer(name)
    check_mixer_state(layer.state_dict(), config)
    official = {f"backbone.layers.0.mixer.{k}": v for k, v in official_mixer_state(name).items()}
    megatron = official_to_megatron(official, config)
    back = megatron_to_official(megatron, config, layer_numbers=[0])
    fresh = Mamba3(config).to(torch.float64)
    fresh.load_state_dict({k.removeprefix("backbone.layers.0.mixer."): v for k, v in back.items()})
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in layer.state_dict().items())
    assert sorted(Mamba3(golden_config("siso_g1")).state_dict()) == sorted(
        ["in_proj.weight", "dt_bias", "B_bias", "C_bias", "D", "B_norm.weight", "C_norm.weight", "out_proj.weight"]
    )
