"""Bytes one rank sends per Mamba-3 layer (forward + backward) under context parallelism, computed.

    python -m benchmarks.cp_bytes [--cp 2] [--lengths 8192 32768 131072]

Two schemes, batch 1, TP = 1, ring collectives (an all-gather of m bytes per rank sends (cp − 1)·m
per rank; an all-reduce of N bytes sends 2·(cp − 1)/cp · N; an all-to-all of N bytes sends
(cp − 1)/cp · N, plus (cp − 1)·N for columns every rank needs whole):
- states (this project, `megatron_mamba3.context_parallel`): forward all-gathers each rank's two
  piece summaries, fp32: h (H·p·n), k_prev (R·H·n), v_prev (H·p), θ (H·S), Σ AΔ and (1 − λ₀)Δ₀
  (H each); the backward all-reduces the gathered summaries' gradients. Independent of l.
- all-to-all (Megatron-Core 0.19.2's Mamba-2 scheme, `megatron/core/ssm/mamba_context_parallel.py`,
  applied to Mamba-3's in_proj): the in_proj output of the l/cp local tokens goes from a sequence
  split to a head split before the scan and the scan output (d_inner) back after it, bf16; B/C are
  split with the heads when g % cp == 0, else every rank needs them whole, as the shared angles;
  the backward moves the gradients of the same tensors.
"""

from __future__ import annotations

import argparse

from megatron_mamba3.config import Mamba3Config
from megatron_mamba3.in_proj import InProjLayout

MODELS = {
    "hidden 2048 MIMO R4 g8 (benchmarks' 1.05 B model)": Mamba3Config(d_model=2048, headdim=64, d_state=128, ngroups=8, mimo_rank=4),
    "hidden 2048 SISO g1": Mamba3Config(d_model=2048, headdim=64, d_state=128, ngroups=1, mimo_rank=1),
}
FP32, BF16 = 4, 2


def state_bytes(config: Mamba3Config, cp: int) -> int:
    """The state-passing scheme: bytes one rank sends per layer, forward + backward (any l)."""
    H, p, n, R, S = config.nheads, config.headdim, config.d_state, config.mimo_rank, config.num_rope_angles
    summary = H * p * n + R * H * n + H * p + H * S + 2 * H
    local = 2 * summary * FP32  # two pieces per rank
    return (cp - 1) * local + 2 * (cp - 1) * local


def all_to_all_bytes(config: Mamba3Config, cp: int, length: int) -> int:
    """The all-to-all scheme: bytes one rank sends per layer, forward + backward, at length l."""
    layout = InProjLayout(config, cp)  # in_proj's columns go to the head split as under TP = cp
    whole = sum(size for piece, size in zip(layout.pieces, layout.sizes) if layout.is_replicated(piece))
    split = config.d_in_proj - whole + config.d_inner  # + the scan output
    per_token = (cp - 1) / cp * split + (cp - 1) * whole
    return int(2 * (length // cp) * per_token * BF16)


def table(cp: int, lengths: list[int]) -> str:
    rows = [
        "| model | l | states MB | all-to-all MB | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, config in MODELS.items():
        for length in lengths:
            ours, theirs = state_bytes(config, cp), all_to_all_bytes(config, cp, length)
            rows.append(f"| {name} | {length} | {ours / 1e6:.1f} | {theirs / 1e6:.1f} | {theirs / ours:.1f}x |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    args = parser.parse_args()
    print(f"CP = {args.cp}, batch 1, TP = 1; bytes one rank sends per layer, forward + backward")
    print(table(args.cp, args.lengths))


if __name__ == "__main__":
    main()
