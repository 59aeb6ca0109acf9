"""A small residual Mamba-3 block (in_proj -> `mamba3_layer` -> out_proj) for the XLA tests."""

import torch
from torch import nn

from megatron_mamba3 import Mamba3Config, init_layer_params, mamba3_layer


class Mamba3Block(nn.Module):
    """hidden (b, l, d_model) -> hidden + out_proj(mamba3_layer(in_proj(hidden))), same shape."""

    def __init__(self, config: Mamba3Config, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.config = config
        self.in_proj = nn.Linear(config.d_model, config.d_in_proj, bias=False)
        self.out_proj = nn.Linear(config.d_inner, config.d_model, bias=False)
        for linear in (self.in_proj, self.out_proj):
            nn.init.normal_(linear.weight, std=linear.in_features**-0.5, generator=generator)
        params = init_layer_params(config, generator)
        # Move the per-head weights off their constant init so their gradients are informative.
        params = {name: value + 0.1 * torch.randn(value.shape, generator=generator) for name, value in params.items()}
        self.params = nn.ParameterDict({name: nn.Parameter(value) for name, value in params.items()})

    def mix(self, hidden, backend=None, **packing):
        """(out_proj output (b, l, d_model), final state) of the mixer alone."""
        y, state = mamba3_layer(self.in_proj(hidden), dict(self.params), self.config, backend=backend, **packing)
        return self.out_proj(y), state

    def forward(self, hidden):
        return hidden + self.mix(hidden)[0]
