"""`cu_seqlens` documents on the TileLang kernels: one call for all of them against one call per document.

    python -m benchmarks.bench_packed [--repeats 10]

Run from the repository root on the GPU machine. "one call" is `mamba3_scan(..., cu_seqlens=...)`, whose
kernels lay the documents out with `ops/tilelang/chunk_layout.py`; "per document" runs the same kernels
once per document (`toolkit.packing.run_packed`, what the reference and XLA backends do with cu_seqlens).
Per case (bf16, p=64, n=128, g=1, zero initial states): forward and forward+backward wall ms (median of
CUDA-event timings around whole calls after a warm-up, host included; the backward takes the gradients of
every input and weight from out.backward(ones)) and the largest relative difference between the two
ways' outputs and final states.
"""

from __future__ import annotations

import argparse
import functools

import torch

from benchmarks.bench_kernels import RANKS, G, N, P, _case, _time_ms
from megatron_mamba3.ops import mamba3_scan
from megatron_mamba3.ops.interface import read_dims
from megatron_mamba3.ops.tilelang import function
from megatron_mamba3.ops.toolkit.packing import run_packed
from megatron_mamba3.testing import rel_err

CASES = [  # (kind, R, l, H, document lengths: a tensor-parallel slice and a full row of heads)
    (kind, R, l, H, lengths)
    for kind, R in RANKS.items()
    for l, H, lengths in (  # noqa: E741
        (8192, 8, (1000, 3000, 7, 1500, 0, 2685)),
        (8192, 8, (512,) * 16),
        (2048, 32, (300, 700, 48, 1000)),
    )
]


def offsets(lengths: tuple[int, ...]) -> list[int]:
    """Document lengths -> cu_seqlens offsets (N + 1,)."""
    found = [0]
    for length in lengths:
        found.append(found[-1] + length)
    return found


def table(rows: list[tuple]) -> list[str]:
    """Markdown rows of (kind, l, H, documents, fwd one call, fwd per document, fwd+bwd one call, fwd+bwd per
    document, difference)."""
    lines = [
        "| case | documents | fwd ms, one call | fwd ms, per document | fwd+bwd ms, one call | fwd+bwd ms, per document "
        "| max relative difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, l, H, documents, *times, difference in rows:  # noqa: E741
        cells = " | ".join(f"{t:.3f}" for t in times)
        lines.append(f"| {kind} l{l} H{H} | {documents} | {cells} | {difference:.2e} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for kind, R, l, H, lengths in CASES:  # noqa: E741
        inputs, weights = _case(1, l, H, R)  # bench_kernels' inputs, as leaves with gradients
        inputs = type(inputs)(*(t.requires_grad_() for t in inputs))
        weights = type(weights)(*(None if t is None else t.requires_grad_() for t in weights))
        cu_seqlens = torch.tensor(offsets(lengths), dtype=torch.int32, device="cuda")
        one_call = functools.partial(mamba3_scan, inputs, weights, cu_seqlens=cu_seqlens, backend="tilelang")
        per_document = functools.partial(
            run_packed, functools.partial(function._rows, prep=None), inputs, weights, read_dims(inputs),
            segment_ids=None, cu_seqlens=cu_seqlens, initial_state=None,
        )
        (out, final), (out_alone, final_alone) = one_call(), per_document()
        difference = max(rel_err(out.float(), out_alone.float()), *(rel_err(a, b) for a, b in zip(final, final_alone)))

        def trained(run):
            def step():
                out, _ = run()
                out.backward(torch.ones_like(out))
            return step

        times = [_time_ms(run, args.repeats) for run in (one_call, per_document, trained(one_call), trained(per_document))]
        rows.append((kind, l, H, len(lengths), *times, difference))
        print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}, bf16, p={P}, n={N}, g={G}; wall = CUDA events around whole calls")
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
