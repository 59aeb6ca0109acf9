"""TileLang kernels against the official Mamba-3 kernels on one CUDA GPU: one table.

    python -m benchmarks.bench_kernels [--shapes siso mimo] [--official PATH] [--repeats 20]

Run from the repository root on the GPU machine. First compiles every kernel the shapes need in parallel
processes (TileLang's disk cache), then per shape (bf16, p=64, n=128, g=1): forward and forward+backward
wall time (median of CUDA-event timings around whole `mamba3_scan` calls after warm-up, host included;
the backward takes the gradients of every input and weight), their GPU time (summed duration of the
kernels launched, from the profiler), the peak device memory of one forward+backward and the first
call's time. The official kernels' time on the same shape comes from their timing script run in a
fresh process (`--official PATH`, PATH holding `bench_official.py`) or, without it, from the figures
recorded on an H100 (marked "recorded"); the ratio is ours over theirs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_mamba3.ops import mamba3_scan
from megatron_mamba3.testing import make_case

SHAPES = {  # (b, l, H)
    "siso": [(8, 2048, 32), (1, 8192, 8), (2, 4096, 16)],
    "mimo": [(8, 2048, 32), (1, 8192, 8), (2, 4096, 16)],
}
P, N, G = 64, 128, 1


def _time_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _gpu_ms(fn, repeats: int = 5) -> float:
    """Device time per call: the summed duration of every kernel the call launched (no host gaps)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / repeats / 1e3


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth, bytes read + written per second."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def _case(b, l, H, R):  # noqa: E741
    inputs, weights = make_case(b=b, l=l, H=H, p=P, R=R, G=G, n=N, seed=0, dtype=torch.float32)
    inputs = type(inputs)(*(t.to("cuda", torch.bfloat16) for t in inputs))
    weights = type(weights)(*(None if t is None else t.cuda() for t in weights))
    return inputs, weights


def _run(backend, inputs, weights, train):
    if train:  # gradients of every input and weight, as the official fwd+bwd timing takes them
        inputs = type(inputs)(*(t.detach().requires_grad_() for t in inputs))
        weights = type(weights)(*(None if t is None else t.detach().requires_grad_() for t in weights))
    out, state = mamba3_scan(inputs, weights, backend=backend, chunk_size=64 // inputs.B.shape[2])
    if train:
        out.backward(torch.ones_like(out))


def _peak_mib(fn) -> float:
    """Peak device memory of one call above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# The official kernels (state-spaces/mamba e9594ce) on one H100, recorded 2026-11-25 with their own timing
# script (triton do_bench, host included); used where --official does not measure them.
OFFICIAL_RECORDED = {
    ("siso", "fwd", 8, 2048, 32): 0.60, ("siso", "fwd", 1, 8192, 8): 1.19,
    ("mimo", "fwd", 8, 2048, 32): 1.08, ("mimo", "fwd", 1, 8192, 8): 3.13,
    ("siso", "fwdbwd", 8, 2048, 32): 3.90,
}


def official_ms(path: str | None, kind: str, mode: str, b: int, l: int, H: int, timeout: float) -> tuple[float | None, str]:  # noqa: E741
    """(ms, source) of the official kernels on one shape: measured by their timing script under `path`
    in a fresh process (first calls autotune: SISO fwd ~90 s, fwd+bwd ~340 s), else the recorded figure."""
    import subprocess
    import sys

    if path is not None:
        try:
            done = subprocess.run(
                [sys.executable, f"{path}/bench_official.py", f"{kind}:{mode}:{b}:{l}:{H}"],
                capture_output=True, text=True, timeout=timeout,
            )
            for line in done.stdout.splitlines():
                if line.startswith("RESULT"):
                    return float(line.split(": ")[1].split(" ms")[0]), "measured"
            return None, (done.stderr.strip().splitlines() or ["no RESULT"])[-1][:60]
        except subprocess.TimeoutExpired:
            return None, f"over {timeout:.0f} s"
    recorded = OFFICIAL_RECORDED.get((kind, mode, b, l, H))
    return recorded, "recorded" if recorded is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--official", metavar="PATH", help="folder of the official kernels' timing script "
                        "(bench_official.py); without it the recorded official figures are shown")
    parser.add_argument("--official-timeout", type=float, default=120.0, help="seconds per official case")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from megatron_mamba3.ops.tilelang.build import prebuild
    from megatron_mamba3.ops.tilelang.function import TILE_ROWS
    from megatron_mamba3.ops.tilelang.kernels import KernelConfig

    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"device: {device}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    configs = {KernelConfig(H, P, N, R, G, N // 4, TILE_ROWS // R, False) for kind in args.shapes
               for R in [1 if kind == "siso" else 4] for _, _, H in SHAPES[kind]}
    start = time.perf_counter()
    count = prebuild(sorted(configs))
    print(f"compiled {count} kernels in parallel in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for kind in args.shapes:
        R = 1 if kind == "siso" else 4
        for b, l, H in SHAPES[kind]:  # noqa: E741
            inputs, weights = _case(b, l, H, R)
            start = time.perf_counter()
            _run("tilelang", inputs, weights, True)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            fwd = _time_ms(lambda: _run("tilelang", inputs, weights, False), args.repeats)
            gpu = _gpu_ms(lambda: _run("tilelang", inputs, weights, False))
            train = _time_ms(lambda: _run("tilelang", inputs, weights, True), max(3, args.repeats // 4))
            train_gpu = _gpu_ms(lambda: _run("tilelang", inputs, weights, True), 3)
            peak = _peak_mib(lambda: _run("tilelang", inputs, weights, True))
            off_fwd = official_ms(args.official, kind, "fwd", b, l, H, args.official_timeout)
            off_train = official_ms(args.official, kind, "fwdbwd", b, l, H, args.official_timeout)
            rows.append((f"{kind} R{R} b{b} l{l} H{H}", fwd, gpu, off_fwd, train, train_gpu, off_train, peak, first))
            print(rows[-1], flush=True)

    def versus(ours, official):
        ms, source = official
        return (f"{ms:.2f} ({source})", f"{ours / ms:.2f}x") if ms else (source, "-")

    print(f"\n{device}, bf16, p={P}, n={N}, g={G}; wall = CUDA events around whole calls (host included)")
    print("| shape | fwd ms | fwd GPU ms | official fwd ms | ratio | fwd+bwd ms | fwd+bwd GPU ms | official fwd+bwd ms "
          "| ratio | fwd+bwd peak MiB | first call s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, fwd, gpu, off_fwd, train, train_gpu, off_train, peak, first in rows:
        print(f"| {shape} | {fwd:.3f} | {gpu:.3f} | {' | '.join(versus(fwd, off_fwd))} | {train:.3f} | {train_gpu:.3f} "
              f"| {' | '.join(versus(train, off_train))} | {peak:.0f} | {first:.1f} |")


if __name__ == "__main__":
    main()
