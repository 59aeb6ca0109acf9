"""Training-step speed of the XLA scan adapter against the reference backend.

    PJRT_DEVICE=CPU python -m benchmarks.bench_xla [--lengths 256 1024] [--steps 20]
    PJRT_DEVICE=TPU python -m benchmarks.bench_xla --batch 4 --lengths 1024 4096 --runs reference@cpu xla

(the second on a TPU VM; add reference@xla only for short lengths: its compile grows with l / c).

One training step is one Mamba-3 layer (in_proj -> mamba3_layer -> out_proj, residual) forward,
backward and SGD update, with a new random document layout every step (loader doc ids turned into
segment ids on the device), fp32. Three ways to run it:
  xla              backend "xla" on the XLA device: torch_xla scan over chunks
  reference@xla    backend "reference" on the XLA device: its Python chunk loop, unrolled into the graph
  reference@cpu    backend "reference" in eager PyTorch on the host CPU
Each step is timed to completion (XLA: `wait_device_ops`, so no overlap of tracing and running);
steps/s is 1 / the median time of steps 2 on, which shrugs off other load on a shared machine.
"trace s" is the median host time of an XLA step before `torch_xla.sync()`: lazy tracing of forward,
backward and update, including torch_xla scan re-lowering its body on every call. A faster device
does not shrink it (graph hashing inside sync adds to it; CPU PJRT also runs the graph inside sync).
For the XLA runs, compile s (torch_xla's CompileTime metric) and first-step s (trace + compile +
run) come from step 1, and "recompiles" counts compilations after step 1 (0 is the goal: document
layouts are runtime data). "vs ref@cpu" is steps/s relative to reference@cpu, and "load" the
machine's 1-minute load average after the row: above the core count, other work was competing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from megatron_mamba3 import Mamba3Config, segment_ids_from_doc_ids
from tests.xla.blocks import Mamba3Block

SHAPES = {  # name: Mamba3Config arguments (d_model 256, expand 2 -> H = 8 heads of p = 64)
    "SISO H8 p64 n128": dict(d_model=256, headdim=64, d_state=128),
    "MIMO R4 H8 p64 n128": dict(d_model=256, headdim=64, d_state=128, mimo_rank=4),
}
RUNS = ("xla", "reference@xla", "reference@cpu")


def _compile_stats() -> tuple[int, float]:
    from torch_xla.debug import metrics

    data = metrics.metric_data("CompileTime")
    return (0, 0.0) if data is None else (int(data[0]), data[1] / 1e9)


def measure(shape: str, length: int, run: str, batch: int, steps: int, seed: int = 0) -> dict:
    """Time `steps` training steps of one layer: first-step s, steps/s, trace s and compile stats."""
    import torch_xla
    import torch_xla.core.xla_model as xm

    backend, where = run.split("@") if "@" in run else (run, "xla")
    device = torch_xla.device() if where == "xla" else torch.device("cpu")
    config = Mamba3Config(**SHAPES[shape])
    model = Mamba3Block(config, seed).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)

    def step() -> tuple[float, float]:
        """(s to trace the step, s until it finished)"""
        start = time.perf_counter()
        hidden = torch.randn(batch, length, config.d_model, generator=generator).to(device)
        doc_ids = (torch.rand(batch, length, generator=generator) < 4 / length).cumsum(dim=1).to(device)
        out, _ = model.mix(hidden, backend=backend, segment_ids=segment_ids_from_doc_ids(doc_ids))
        (hidden + out).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        traced = time.perf_counter()
        if where == "xla":
            torch_xla.sync()
            xm.wait_device_ops()
        return traced - start, time.perf_counter() - start

    count0, seconds0 = _compile_stats()
    _, first = step()
    count1, seconds1 = _compile_stats()
    trace, total = zip(*(step() for _ in range(steps - 1)))
    count2, _ = _compile_stats()
    return dict(first=first, rate=1 / statistics.median(total), trace=statistics.median(trace),
                compiles=count1 - count0, compile_s=seconds1 - seconds0, recompiles=count2 - count1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="steps per row, the first one included")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps={args.steps} must be >= 2 (the first step compiles, the rest are timed)")
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    import torch_xla

    print(f"torch {torch.__version__}, torch_xla {torch_xla.__version__}, PJRT_DEVICE={os.environ['PJRT_DEVICE']}, "
          f"device {torch_xla.device()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, fp32, batch {args.batch}, chunk 64 (SISO) / 16 (MIMO), "
          f"{args.steps} steps per row")
    header = (f"| {'shape':<20} | {'L':>5} | {'run':<13} | {'compiles':>8} | {'compile s':>9} | {'first step s':>12} "
              f"| {'steps/s':>8} | {'trace s':>7} | {'recompiles':>10} | {'vs ref@cpu':>10} | {'load':>4} |")
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for shape in args.shapes:
        for length in args.lengths:
            baseline = None
            for run in sorted(args.runs, key=lambda r: r != "reference@cpu"):  # the baseline first
                result = measure(shape, length, run, args.batch, args.steps)
                baseline = result["rate"] if run == "reference@cpu" else baseline
                on_cpu = run == "reference@cpu"
                ratio = f"{result['rate'] / baseline:.2f}x" if baseline else "-"
                print(f"| {shape:<20} | {length:>5} | {run:<13} | {'-' if on_cpu else result['compiles']:>8} "
                      f"| {'-' if on_cpu else format(result['compile_s'], '.2f'):>9} | {result['first']:>12.2f} "
                      f"| {result['rate']:>8.2f} | {'-' if on_cpu else format(result['trace'], '.3f'):>7} "
                      f"| {'-' if on_cpu else result['recompiles']:>10} | {ratio:>10} | {os.getloadavg()[0]:>4.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
