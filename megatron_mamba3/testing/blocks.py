"""Pre-norm residual blocks for the XLA tests and benchmarks, hidden + f(RMSNorm(hidden)): a Mamba-3
block around `megatron_mamba3.Mamba3`, and small attention and MLP blocks to build hybrid stacks
(`M`, `*`, `-` as in Megatron patterns)."""

import torch
import torch.nn.functional as F
from torch import nn

from megatron_mamba3 import Mamba3, Mamba3Config


class Mamba3Block(nn.Module):
    """hidden (b, l, d_model) -> hidden + Mamba3(norm(hidden)), same shape; packing keywords go to the layer.

    Seeded: the linears are drawn N(0, 1/fan_in) and the per-head weights moved off their constant
    init (+ 0.1 N(0, 1)) so that their gradients are informative."""

    def __init__(self, config: Mamba3Config, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.config = config
        self.norm = nn.RMSNorm(config.d_model, eps=1e-5)
        self.mixer = Mamba3(config, generator=generator)
        for linear in (self.mixer.in_proj, self.mixer.out_proj):
            nn.init.normal_(linear.weight, std=linear.in_features**-0.5, generator=generator)
        with torch.no_grad():
            for name, value in self.mixer.layer_params().items():
                value.add_(0.1 * torch.randn(value.shape, generator=generator))

    def mix(self, hidden, backend=None, **packing):
        """(mixer output (b, l, d_model), final state) of the layer alone."""
        self.mixer.backend = backend
        return self.mixer(hidden, **packing)

    def forward(self, hidden, **packing):
        return hidden + self.mixer(self.norm(hidden), **packing)[0]


class AttentionBlock(nn.Module):
    """hidden (b, l, d) -> hidden + causal self-attention(norm(hidden)), attending within a document when
    `segment_ids` (b, l) is given."""

    def __init__(self, d_model: int, heads: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.heads = heads
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        for linear in (self.qkv, self.proj):
            nn.init.normal_(linear.weight, std=linear.in_features**-0.5, generator=generator)

    def forward(self, hidden, segment_ids=None):
        b, l, d = hidden.shape
        q, k, v = self.qkv(self.norm(hidden)).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = torch.ones(l, l, dtype=torch.bool, device=hidden.device).tril()
        if segment_ids is not None:
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return hidden + self.proj(out.transpose(1, 2).reshape(b, l, d))


class MLPBlock(nn.Module):
    """hidden (b, l, d) -> hidden + W2 silu(W1 norm(hidden)) (SiLU: torch_xla's float64 GELU is off by 5e-9)."""

    def __init__(self, d_model: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.up = nn.Linear(d_model, 2 * d_model, bias=False)
        self.down = nn.Linear(2 * d_model, d_model, bias=False)
        for linear in (self.up, self.down):
            nn.init.normal_(linear.weight, std=linear.in_features**-0.5, generator=generator)

    def forward(self, hidden, segment_ids=None):
        return hidden + self.down(F.silu(self.up(self.norm(hidden))))


def hybrid_blocks(pattern: str, config: Mamba3Config, attention_heads: int = 2, seed: int = 0) -> list[nn.Module]:
    """One block per character of `pattern`: M Mamba-3, * attention, - MLP; block i seeded seed + i."""
    make = {
        "M": lambda s: Mamba3Block(config, s),
        "*": lambda s: AttentionBlock(config.d_model, attention_heads, s),
        "-": lambda s: MLPBlock(config.d_model, s),
    }
    unknown = sorted(set(pattern) - make.keys())
    if unknown:
        raise ValueError(f"pattern {pattern!r} has unknown block symbols {unknown}; use M, * and -")
    return [make[symbol](seed + index) for index, symbol in enumerate(pattern)]
