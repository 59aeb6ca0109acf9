"""The float64 golden cases (tests/data, copied from shared/golden): one full layer from an
independent implementation, weights in the official layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from megatron_mamba3 import Mamba3Config

DATA = Path(__file__).parent / "data"
CASES = json.loads((DATA / "mamba3_layer_cases.json").read_text())
ARRAYS = np.load(DATA / "mamba3_layer_cases.npz")
# Golden weight names -> official state-dict names of one mixer.
OFFICIAL_NAMES = {"in_proj": "in_proj.weight", "out_proj": "out_proj.weight", "B_norm": "B_norm.weight",
                  "C_norm": "C_norm.weight", "norm": "norm.weight"}


def golden_config(name: str) -> Mamba3Config:
    spec = CASES[name]
    assert spec["is_mimo"] == (spec["mimo_rank"] > 1)
    return Mamba3Config(**{k: v for k, v in spec.items() if k != "is_mimo"})


def golden_weights(name: str) -> dict[str, torch.Tensor]:
    """The case's weights by their golden names (in_proj, dt_bias, B_norm, ...)."""
    prefix = f"{name}.W."
    return {key.removeprefix(prefix): torch.from_numpy(ARRAYS[key]) for key in ARRAYS.files if key.startswith(prefix)}


def official_mixer_state(name: str) -> dict[str, torch.Tensor]:
    """The case's weights as an official Mamba-3 mixer state dict."""
    return {OFFICIAL_NAMES.get(key, key): tensor for key, tensor in golden_weights(name).items()}


def golden_array(name: str, key: str) -> torch.Tensor:
    return torch.from_numpy(ARRAYS[f"{name}.{key}"])
