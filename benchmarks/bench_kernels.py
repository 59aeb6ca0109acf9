"""TileLang kernels vs the reference backend on one CUDA GPU: one table.

    python -m benchmarks.bench_kernels [--shapes siso mimo] [--reference] [--repeats 20]

Run from the repository root on the GPU machine. Per shape (bf16, p=64, n=128, g=1): forward ms and
forward+backward ms of the TileLang backend (wall: median of CUDA-event timings around whole calls
after warm-up, host overhead included), the forward's GPU ms (summed duration of the kernels it
launched, from the profiler), and from that GPU time its achieved GB/s over the fewest bytes it must move (inputs read once, output written once),
its TFLOP/s over the chunked matmul work, the ratio of its time to the HBM floor (those bytes over
the measured device-to-device copy bandwidth) and the first-call time (kernel compile or disk-cache
load, then the first run). `--reference` adds the reference backend with its per-chunk step under
torch.compile, in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_mamba3.ops import mamba3_scan
from tests.helpers import make_case

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


def _bytes_and_flops(b, l, H, R):  # noqa: E741
    S = N // 4
    elements = b * l * (3 * H * P + 2 * R * G * N + 3 * H + S)  # x, z, out; B, C; dt, A, trap; angles
    Q = 64 // R
    chunks = b * H * -(-l // Q)
    rows = Q * R
    flops = chunks * (2 * rows * N * P * 2 + 2 * rows * rows * (N + P))
    return 2 * elements, flops


def _run(backend, inputs, weights, train):
    if train:
        leaves = [t.detach().requires_grad_() for t in (inputs.x, inputs.z, inputs.B, inputs.C)]
        inputs = inputs._replace(x=leaves[0], z=leaves[1], B=leaves[2], C=leaves[3])
    out, state = mamba3_scan(inputs, weights, backend=backend, chunk_size=64 // inputs.B.shape[2])
    if train:
        out.float().sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--reference", action="store_true", help="also time the torch.compiled reference")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.reference:
        import megatron_mamba3.ops.reference.chunked as chunked

        chunked.chunk_scan = torch.compile(chunked.chunk_scan)
    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"device: {device}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows = []
    for kind in args.shapes:
        R = 1 if kind == "siso" else 4
        for b, l, H in SHAPES[kind]:
            inputs, weights = _case(b, l, H, R)
            start = time.perf_counter()
            _run("tilelang", inputs, weights, False)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            fwd = _time_ms(lambda: _run("tilelang", inputs, weights, False), args.repeats)
            gpu = _gpu_ms(lambda: _run("tilelang", inputs, weights, False))
            train = _time_ms(lambda: _run("tilelang", inputs, weights, True), max(3, args.repeats // 4))
            nbytes, flops = _bytes_and_flops(b, l, H, R)
            floor_ms = nbytes / bandwidth * 1e3
            ref = "-"
            if args.reference:
                ref = f"{_time_ms(lambda: _run('reference', inputs, weights, False), 3):.2f}"
            shape = f"{kind} R{R} b{b} l{l} H{H}"
            rows.append((shape, fwd, gpu, train, nbytes / gpu / 1e6, flops / gpu / 1e9, gpu / floor_ms, first, ref))
            print(rows[-1], flush=True)
    print(f"\n{device}, bf16, p={P}, n={N}, g={G}")
    print("| shape | fwd ms (wall) | fwd ms (GPU) | fwd+bwd ms (wall) | GB/s (GPU) | TFLOP/s (GPU) "
          "| GPU / HBM floor | first call s | reference fwd ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, fwd, gpu, train, gbs, tflops, ratio, first, ref in rows:
        print(f"| {shape} | {fwd:.3f} | {gpu:.3f} | {train:.2f} | {gbs:.0f} | {tflops:.1f} | {ratio:.1f}x | {first:.1f} | {ref} |")


if __name__ == "__main__":
    main()
