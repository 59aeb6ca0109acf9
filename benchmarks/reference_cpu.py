"""CPU time and peak memory of the reference scan: chunked form vs the sequential recurrence.

    python -m benchmarks.reference_cpu [--lengths 1 16 64 256 1024 4096] [--repeats 3]

Each measurement runs in a fresh process; peak memory is that process's peak resident set size
above its size just before the timed call. Prints a table, then the lengths where each form wins.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import time

import torch

SHAPES = {  # name: (H, p, R, G, n)
    "SISO H8 p64 n128": (8, 64, 1, 1, 128),
    "MIMO R4 H8 p64 n128": (8, 64, 4, 1, 128),
}
FORMS = ("chunked", "recurrent")
MODES = ("forward", "forward+backward")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(shape: str, length: int, form: str, mode: str, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds and peak MiB of one call, in this (fresh) process."""
    from megatron_mamba3.ops.oracle import mamba3_recurrent
    from megatron_mamba3.ops.reference import mamba3_chunked
    from megatron_mamba3.testing import make_case

    H, p, R, G, n = SHAPES[shape]
    inputs, weights = make_case(b=1, l=length, H=H, p=p, R=R, G=G, n=n, dtype=torch.float32)
    scan = {
        "chunked": lambda i, w: mamba3_chunked(i, w, chunk_size=64 if R == 1 else 16),
        "recurrent": mamba3_recurrent,
    }[form]
    backward = mode == "forward+backward"
    if backward:
        inputs = type(inputs)(*(t.requires_grad_() for t in inputs))
    best = float("inf")
    baseline = _rss_bytes()
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            out, _ = scan(inputs, weights)
            if backward:
                out.square().sum().backward()
        best = min(best, time.perf_counter() - start)
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return best, max(peak, 0) / 2**20


def _run(args, queue):
    queue.put(_measure(*args))


def measure_in_fresh_process(*args) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run, args=(args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"fp32, batch 1, chunk 64 (SISO) / 16 (MIMO)")
    header = f"| {'shape':<20} | {'mode':<16} | {'L':>5} | {'chunked s':>9} | {'recurrent s':>11} | {'chunked MiB':>11} | {'recurrent MiB':>13} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    wins = {}
    for shape in SHAPES:
        for mode in MODES:
            for length in args.lengths:
                started = time.perf_counter()
                (tc, mc), (tr, mr) = (measure_in_fresh_process(shape, length, f, mode, args.repeats) for f in FORMS)
                print(f"| {shape:<20} | {mode:<16} | {length:>5} | {tc:>9.4f} | {tr:>11.4f} | {mc:>11.1f} | {mr:>13.1f} |"
                      f"  ({time.perf_counter() - started:.0f} s)", flush=True)
                row = wins.setdefault((shape, mode), {"time": {f: [] for f in FORMS}, "memory": {f: [] for f in FORMS}})
                row["time"]["chunked" if tc <= tr else "recurrent"].append(length)
                row["memory"]["chunked" if mc <= mr else "recurrent"].append(length)
    print("\nLengths where each form wins:")
    for (shape, mode), row in wins.items():
        for what in ("time", "memory"):
            print(f"  {shape}, {mode}, {what}: " + "; ".join(f"{f} at L={row[what][f] or 'none'}" for f in FORMS))


if __name__ == "__main__":
    main()
