"""Training-step speed of the XLA scan adapter against the reference backend (one layer), and of
hybrid stacks run as a plain loop or as a scan over repeating units (`--stack`).

    PJRT_DEVICE=CPU python -m benchmarks.bench_xla [--lengths 256 1024] [--steps 20]
    PJRT_DEVICE=TPU python -m benchmarks.bench_xla --batch 4 --lengths 1024 4096 --runs reference@cpu xla
    PJRT_DEVICE=CPU python -m benchmarks.bench_xla --stack [--units 1 6] [--d-model 512] [--length 256]

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

`--stack`: a hybrid model of `--units` repeats of the unit `M*M-` (pre-norm residual Mamba-3 SISO,
attention, Mamba-3, MLP blocks of `megatron_mamba3.testing.blocks`; d_model 512, H 16, p 64, n 128, c 64),
one training step = forward, backward and SGD update on random hidden states with a new document
layout every step (segment ids into the Mamba-3 and attention blocks). `loop` runs the blocks as a
plain loop (every block traced every step); `scan` runs `scan_units` over the units (one unit
traced). Columns as above, plus "trace cpu s", the tracing thread's CPU time (less sensitive to
other load than the wall time), and "MiB saved/unit", what scan keeps per unit for the backward.
Before the table one tiny graph is compiled and run, so the first row carries no runtime start-up.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time

import torch

from megatron_mamba3 import Mamba3Config, segment_ids_from_doc_ids
from megatron_mamba3.ops.xla.stacks import repeating_units, run_hybrid_stack, scan_units
from megatron_mamba3.testing.blocks import Mamba3Block, hybrid_blocks
from megatron_mamba3.testing.xla_memory import saved_bytes_per_iteration

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

    backend, where = run.split("@") if "@" in run else (run, "xla")
    device = torch_xla.device() if where == "xla" else torch.device("cpu")
    config = Mamba3Config(**SHAPES[shape])
    model = Mamba3Block(config, seed).to(device)

    def forward(hidden, segment_ids):
        out, _ = model.mix(hidden, backend=backend, segment_ids=segment_ids)
        return hidden + out

    return time_training(model.parameters(), forward, (batch, length, config.d_model), device, steps, seed)


def measure_stack(units: int, run: str, d_model: int, length: int, batch: int, steps: int, seed: int = 0) -> dict:
    """Time `steps` training steps of `units` x `M*M-` run as a loop or a unit scan (see the module doc)."""
    import torch_xla

    device = torch_xla.device()
    config = Mamba3Config(d_model=d_model, headdim=64, d_state=128, chunk_size=64)
    blocks = [block.to(device) for block in hybrid_blocks("M*M-" * units, config, attention_heads=8, seed=seed)]
    grouped = repeating_units(blocks, 4)  # built once: scan_units keys its traced unit on units[0]
    if run == "loop":
        forward = lambda hidden, segment_ids: run_hybrid_stack(blocks, hidden, segment_ids=segment_ids)  # noqa: E731
    else:
        forward = lambda hidden, segment_ids: scan_units(grouped, hidden, segment_ids=segment_ids)  # noqa: E731
    parameters = [p for block in blocks for p in block.parameters()]
    with saved_bytes_per_iteration() as saved:
        result = time_training(parameters, forward, (batch, length, d_model), device, steps, seed)
    return result | dict(saved_mib=saved[0] / 2**20 if run == "scan" else None)


def time_training(parameters, forward, shape: tuple[int, int, int], device, steps: int, seed: int) -> dict:
    """Time `steps` SGD training steps of `forward(hidden (b, l, d), segment_ids (b, l)) -> (b, l, d)`,
    loss mean(out²), a new random document layout every step: first-step s, steps/s, trace s, compiles."""
    import torch_xla
    import torch_xla.core.xla_model as xm

    optimizer = torch.optim.SGD(parameters, lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    batch, length, _ = shape

    def step() -> tuple[float, float, float]:
        """(s to trace the step, CPU s of this thread for that, s until it finished)"""
        start, start_cpu = time.perf_counter(), time.thread_time()
        hidden = torch.randn(shape, generator=generator).to(device)
        doc_ids = (torch.rand(batch, length, generator=generator) < 4 / length).cumsum(dim=1).to(device)
        forward(hidden, segment_ids_from_doc_ids(doc_ids)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        traced, traced_cpu = time.perf_counter(), time.thread_time()
        if device.type == "xla":
            torch_xla.sync()
            xm.wait_device_ops()
        return traced - start, traced_cpu - start_cpu, time.perf_counter() - start

    count0, seconds0 = _compile_stats()
    *_, first = step()
    count1, seconds1 = _compile_stats()
    trace, trace_cpu, total = zip(*(step() for _ in range(steps - 1)))
    count2, _ = _compile_stats()
    return dict(first=first, rate=1 / statistics.median(total), trace=statistics.median(trace),
                trace_cpu=statistics.median(trace_cpu), compiles=count1 - count0, compile_s=seconds1 - seconds0,
                recompiles=count2 - count1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="steps per row, the first one included")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--stack", action="store_true", help="time hybrid stacks (loop vs unit scan) instead")
    parser.add_argument("--units", type=int, nargs="+", default=[1, 2, 6], help="--stack: repeats of M*M-")
    parser.add_argument("--stack-runs", nargs="+", default=["scan", "loop"], choices=["loop", "scan"])
    parser.add_argument("--d-model", type=int, default=512, help="--stack: hidden size")
    parser.add_argument("--length", type=int, default=256, help="--stack: sequence length")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps={args.steps} must be >= 2 (the first step compiles, the rest are timed)")
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    import torch_xla

    print(f"torch {torch.__version__}, torch_xla {torch_xla.__version__}, PJRT_DEVICE={os.environ['PJRT_DEVICE']}, "
          f"device {torch_xla.device()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, fp32, batch {args.batch}, chunk 64 (SISO) / 16 (MIMO), "
          f"{args.steps} steps per row")
    if args.stack:
        return stack_table(args)
    header = (f"| {'shape':<20} | {'L':>5} | {'run':<13} | {'compiles':>8} | {'compile s':>9} | {'first step s':>12} "
              f"| {'steps/s':>8} | {'trace s':>7} | {'recompiles':>10} | {'vs ref@cpu':>10} | {'load':>4} |")
    print_header(header)
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


def print_header(header: str) -> None:
    """A markdown table's header line and its separator."""
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")


def stack_table(args: argparse.Namespace) -> None:
    import torch_xla

    (torch.ones(2, device=torch_xla.device()) + 1).cpu()  # runtime start-up outside the rows
    print(f"stack: units of M*M-, d_model {args.d_model}, L {args.length}, H {2 * args.d_model // 64} p 64 n 128 c 64, "
          f"attention 8 heads, MLP 2x")
    header = (f"| {'layers':>6} | {'run':<4} | {'compiles':>8} | {'compile s':>9} | {'first step s':>12} | {'steps/s':>7} "
              f"| {'trace s':>7} | {'trace cpu s':>11} | {'recompiles':>10} | {'MiB saved/unit':>14} | {'load':>4} |")
    print_header(header)
    for units, run in itertools.product(args.units, args.stack_runs):
        r = measure_stack(units, run, args.d_model, args.length, args.batch, args.steps)
        saved = "-" if r["saved_mib"] is None else f"{r['saved_mib']:.2f}"
        print(f"| {4 * units:>6} | {run:<4} | {r['compiles']:>8} | {r['compile_s']:>9.2f} | {r['first']:>12.2f} "
              f"| {r['rate']:>7.3f} | {r['trace']:>7.3f} | {r['trace_cpu']:>11.3f} | {r['recompiles']:>10} "
              f"| {saved:>14} | {os.getloadavg()[0]:>4.1f} |", flush=True)


if __name__ == "__main__":
    main()
