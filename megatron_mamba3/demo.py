"""A tiny CPU run of one Mamba-3 layer: `python -m megatron_mamba3.demo`.

Builds a SISO and a MIMO layer (in_proj -> layer math -> out_proj) with fixed seeds, runs one
forward and backward pass on CPU, and prints the backend that ran, the output checksum and timings.
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_mamba3 import Mamba3Config, clear_receipts, init_layer_params, mamba3_layer, receipts


def run_layer(config: Mamba3Config, batch: int, length: int, seed: int) -> None:
    torch.manual_seed(seed)
    in_proj = torch.nn.Linear(config.d_model, config.d_in_proj, bias=False)
    out_proj = torch.nn.Linear(config.d_inner, config.d_model, bias=False)
    params = {name: value.requires_grad_() for name, value in init_layer_params(config).items()}
    u = torch.randn(batch, length, config.d_model)

    clear_receipts()
    start = time.perf_counter()
    y, state = mamba3_layer(in_proj(u), params, config, layer="demo")
    out = out_proj(y)
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    out.square().mean().backward()
    backward_s = time.perf_counter() - start

    (receipt,) = receipts()
    kind = f"MIMO R={config.mimo_rank}" if config.is_mimo else "SISO"
    print(f"[{kind}] d_model={config.d_model} H={config.nheads} p={config.headdim} n={config.d_state} "
          f"chunk={config.scan_chunk_size} input=({batch}, {length}, {config.d_model})")
    print(f"  backend={receipt.backend} variant={receipt.variant} dtype={receipt.dtype}")
    print(f"  output checksum: sum={out.sum().item():.6f} abs_sum={out.abs().sum().item():.6f}")
    print(f"  final state |h| sum={state.h.abs().sum().item():.6f}  dt_bias grad norm="
          f"{params['dt_bias'].grad.norm().item():.6f}")
    print(f"  forward {forward_s * 1e3:.1f} ms, backward {backward_s * 1e3:.1f} ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("batch", "length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for mimo_rank in (1, 4):
        config = Mamba3Config(d_model=64, headdim=16, d_state=32, mimo_rank=mimo_rank)
        run_layer(config, args.batch, args.length, args.seed)


if __name__ == "__main__":
    main()
