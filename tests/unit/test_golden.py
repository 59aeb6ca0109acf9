"""The reference layer against float64 golden cases from an independent implementation (official
weight layout; tests/data, copied from shared/golden). Tolerance 1e-10 relative; angles modulo 2π."""

import numpy as np
import pytest

from megatron_mamba3.ops import Mamba3State, mamba3_layer
from tests.golden import ARRAYS, CASES, golden_array, golden_config, golden_weights
from tests.helpers import assert_states_close, rel_err

TOL = 1e-10


def _case(name):
    return golden_config(name), golden_weights(name), lambda key: golden_array(name, key)


def _state(get, prefix):
    return Mamba3State(*(get(f"{prefix}.{field}") for field in ("h", "k_prev", "v_prev", "theta")))


def _layer(u, weights, config, variant, **options):
    params = {k: v for k, v in weights.items() if k not in ("in_proj", "out_proj")}
    y, state = mamba3_layer(u @ weights["in_proj"].T, params, config, backend="reference", variant=variant, **options)
    return y @ weights["out_proj"].T, state


@pytest.mark.parametrize("variant", ["chunked", "recurrent"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_layer(name, variant):
    config, weights, get = _case(name)
    u = get("u")
    out, final = _layer(u, weights, config, variant)
    assert rel_err(out, get("out")) < TOL
    assert_states_close(final, _state(get, "final"), TOL)

    packed, _ = _layer(u, weights, config, variant, segment_ids=get("segment_ids"))
    assert rel_err(packed, get("out_packed")) < TOL

    split = int(get("split_at"))
    _, middle = _layer(u[:, :split], weights, config, variant)
    assert_states_close(middle, _state(get, "mid"), TOL)
    rest, rest_final = _layer(u[:, split:], weights, config, variant, initial_state=_state(get, "mid"))
    assert rel_err(rest, get("out")[:, split:]) < TOL
    assert_states_close(rest_final, _state(get, "final"), TOL)


def test_golden_cases_cover_packing_and_every_layout():
    assert {(c["mimo_rank"], c["ngroups"], c["rope_fraction"], c["is_outproj_norm"]) for c in CASES.values()} >= {
        (1, 1, 0.5, False), (1, 2, 0.5, False), (4, 2, 0.5, False), (4, 1, 1.0, True)
    }
    for name in CASES:
        segment_ids = ARRAYS[f"{name}.segment_ids"]
        assert (np.diff(segment_ids, axis=1) != 0).any(), name  # the packed case really has boundaries
