"""TileLang kernels against the official Mamba-3 kernels on one CUDA GPU: two tables.

    python -m benchmarks.bench_kernels [--shapes siso mimo] [--official PATH|auto] [--repeats 20]

Run from the repository root on the GPU machine. First compiles every kernel the shapes need in parallel
processes (TileLang's disk cache), then per shape (bf16, p=64, n=128, g=1), for the forward and the
forward+backward of whole `mamba3_scan` calls, set up as the official script sets up its own (`scan_call`:
the forward under no_grad; `torch.autograd.grad` of every input and weight from one fixed output gradient, on
leaves made once):
- ms: timed as the official kernels' script times them (`official_method_ms`: triton's `do_bench`, calls
  queued back to back with the L2 cache flushed before each, host time showing only where it exceeds the
  device's); the ratio is ours over theirs, both timed this way;
- latency ms: the median of CUDA-event timings around single calls, synchronised after each (so the host's
  work before the first kernel counts in full);
- GPU ms: the summed duration of the kernels launched, from the profiler;
and the peak device memory of one forward+backward (beside the official SISO's, recorded) and the first
call's time. The official kernels' time on the same shape comes from their timing script
(`bench_official.py`) run in a fresh process per case (`--official PATH`, PATH holding the script, or
`--official auto`, see `resolve_official`) or, without it, from the figures recorded on the same GPU model
(marked "recorded"), else on an H100 (marked "recorded on H100"; `recorded_official_ms`). The second table
splits each shape's forward+backward GPU time by kernel (`kernel_kind`), PyTorch's own kernels in one column.

Accuracy beside speed (`output_errors`): the forward output's relative error max |out − oracle| /
max |oracle| (float64) against the float64 oracle `mamba3_recurrent` run on the very bf16 input values
(upcast) and fp32 weights, for the TileLang kernels and for the bf16 reference (`mamba3_scan(...,
backend="reference")` on the same bf16 inputs: the bf16 error a kernel is measured against, as in
tests/gpu). The oracle runs one token at a time, so it covers only the first ACCURACY_ROWS batch rows
(every head and token), on the GPU. The official kernels run in another process on their own inputs,
so their error is not measured ("-").
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from megatron_mamba3.ops import Mamba3Inputs, Mamba3Weights, mamba3_scan
from megatron_mamba3.ops.oracle import mamba3_recurrent
from megatron_mamba3.testing import make_case, rel_err

SHAPES = {  # (b, l, H)
    "siso": [(8, 2048, 32), (1, 8192, 8), (2, 4096, 16)],
    "mimo": [(8, 2048, 32), (1, 8192, 8), (2, 4096, 16)],
}
RANKS = {"siso": 1, "mimo": 4}  # R of each kind
P, N, G = 64, 128, 1
# Batch rows the float64 oracle covers: it runs one token at a time (on a CPU core about 2 ms per token
# for one row of H32, SISO; 4 ms for MIMO R4), so the accuracy columns take one row, every head and token.
ACCURACY_ROWS = 1
REFERENCE_CHUNK = 16  # the reference's chunk when it measures the bf16 error, as in tests/gpu and tests/conformance
PYTORCH = "PyTorch"  # the per-kernel table's column for device time outside the TileLang kernels
OFFICIAL_SCRIPT = "bench_official.py"
OFFICIAL_COPY = Path(__file__).resolve().parents[2] / "shared" / "official-mamba3"  # ../shared from the repo root


def official_method_ms(fn) -> float:
    """ms per call of `fn` as the official kernels' timing script (`bench_official.py`) measures theirs: triton's
    `do_bench` with the script's arguments (25 ms of warm-up, 100 ms of timed calls)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


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


def kernel_kind(name: str, kernels: frozenset[str]) -> str:
    """The column a profiled device kernel goes to: one of `kernels` (TileLang names a kernel "<prim_func>_kernel"),
    else "PyTorch" (PyTorch's own kernels and copies around the launches)."""
    base = name.split("(")[0].strip().removesuffix("_kernel")
    return base if base in kernels else PYTORCH


def _kernel_ms(fn, kernels: frozenset[str], repeats: int = 5) -> dict[str, float]:
    """Device ms per call of each kernel kind (`kernel_kind`) the call launched: summed kernel durations, no
    host gaps."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    split: dict[str, float] = {}
    for event in prof.key_averages():
        if event.self_device_time_total > 0:
            kind = kernel_kind(event.key, kernels)
            split[kind] = split.get(kind, 0.0) + event.self_device_time_total / repeats / 1e3
    return split


def kernel_table(rows: list[tuple[str, dict[str, float]]], kernels: tuple[str, ...]) -> list[str]:
    """Markdown lines: one row per shape, device ms of each of `kernels` (in that order; "-" where a shape
    launched none), then PyTorch's and the total."""
    lines = [f"| shape | {' | '.join(kernels)} | {PYTORCH} | total |", "|---" * (len(kernels) + 3) + "|"]
    for shape, split in rows:
        cells = [f"{split[name]:.3f}" if name in split else "-" for name in (*kernels, PYTORCH)]
        lines.append(f"| {shape} | {' | '.join(cells)} | {sum(split.values()):.3f} |")
    return lines


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth, bytes read + written per second."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def kernel_config(H, R, p=P, n=N, norm=False, A_floor=None, packed=False):
    """The TileLang `KernelConfig` a case of H heads and rank R runs: S = n / 4 rotated pairs (rope_fraction
    0.5, as `make_case`), chunks of TILE_ROWS / R tokens, G = 1; no norm, prep or packing unless given."""
    from megatron_mamba3.ops.tilelang.function import TILE_ROWS
    from megatron_mamba3.ops.tilelang.kernels import KernelConfig

    return KernelConfig(H, p, n, R, G, n // 4, TILE_ROWS // R, norm, A_floor, packed)


def _case(b, l, H, R):  # noqa: E741
    inputs, weights = make_case(b=b, l=l, H=H, p=P, R=R, G=G, n=N, seed=0, dtype=torch.float32)
    inputs = type(inputs)(*(t.to("cuda", torch.bfloat16) for t in inputs))
    weights = type(weights)(*(None if t is None else t.cuda() for t in weights))
    return inputs, weights


def scan_call(backend, inputs, weights, train):
    """A call of no arguments that runs `mamba3_scan` on one case, set up as the official script sets up its
    own: the forward under no_grad, or (`train`) the forward and `torch.autograd.grad` of every input and
    weight from one fixed random output gradient, on leaves made once here (the call returns the output)."""
    chunk_size = 64 // inputs.B.shape[2]
    if not train:
        def forward():
            with torch.no_grad():
                return mamba3_scan(inputs, weights, backend=backend, chunk_size=chunk_size)[0]

        return forward
    inputs = type(inputs)(*(t.detach().requires_grad_() for t in inputs))
    weights = type(weights)(*(None if t is None else t.detach().requires_grad_() for t in weights))
    leaves = [t for t in (*inputs, *weights) if t is not None]
    generator = torch.Generator(inputs.x.device).manual_seed(1)
    dout = torch.randn(inputs.x.shape, device=inputs.x.device, generator=generator).to(inputs.x.dtype)

    def forward_backward():
        out, _ = mamba3_scan(inputs, weights, backend=backend, chunk_size=chunk_size)
        torch.autograd.grad(out, leaves, dout)
        return out

    return forward_backward


def output_errors(
    inputs: Mamba3Inputs, weights: Mamba3Weights, outputs: dict[str, Tensor], rows: int = ACCURACY_ROWS
) -> dict[str, float]:
    """Relative errors against the float64 oracle: max |out − oracle| / max |oracle| over the first
    `rows` batch rows (every token and head), in float64.

    inputs, weights: one case, (b, l, ...) inputs in the dtype the backends ran on (bf16 here).
    outputs: name -> (b, l, H, p) output some backend computed on exactly these inputs and weights.
    Returns the error of each named output and, under "reference", that of the reference backend run
    here on the same inputs in their dtype (for bf16 inputs, the bf16 reference's own error); the
    oracle `mamba3_recurrent` runs on the same values upcast to float64, on their device.
    """
    if not 1 <= rows <= inputs.x.shape[0]:
        raise ValueError(f"rows={rows} is not within the batch of {inputs.x.shape[0]}")
    inputs = Mamba3Inputs(*(t[:rows] for t in inputs))
    with torch.no_grad():
        oracle, _ = mamba3_recurrent(inputs.to(torch.float64), weights.to(torch.float64))
        reference, _ = mamba3_scan(inputs, weights, backend="reference", variant="chunked", chunk_size=REFERENCE_CHUNK)
    return {name: rel_err(out[:rows], oracle) for name, out in {"reference": reference, **outputs}.items()}


def _peak_mib(fn) -> float:
    """Peak device memory of one call above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# The official kernels (state-spaces/mamba e9594ce) with their own timing script (triton do_bench, host included;
# torch 2.11, triton 3.6), per GPU model, the lowest of the runs recorded; used where --official does not measure
# them. H100: 2026-11-25, and 2026-11-26 for SISO fwd+bwd b8, whose autotuned run took 2.27 ms where the first took
# 3.90 (SISO fwd b8 took 0.71 that day, b1 fwd 1.19 and fwd+bwd 3.08 again). H200: 2026-11-28, one run each (the
# SISO fwd+bwd's first calls autotuned for 262 s at b8 and 146 s at b1).
OFFICIAL_RECORDED = {
    "H100": {
        ("siso", "fwd", 8, 2048, 32): 0.60, ("siso", "fwd", 1, 8192, 8): 1.19,
        ("mimo", "fwd", 8, 2048, 32): 1.08, ("mimo", "fwd", 1, 8192, 8): 3.13,
        ("siso", "fwdbwd", 8, 2048, 32): 2.27, ("siso", "fwdbwd", 1, 8192, 8): 3.08,
    },
    "H200": {
        ("siso", "fwd", 8, 2048, 32): 0.50, ("siso", "fwd", 1, 8192, 8): 1.24,
        ("mimo", "fwd", 8, 2048, 32): 1.07, ("mimo", "fwd", 1, 8192, 8): 3.13,
        ("siso", "fwdbwd", 8, 2048, 32): 2.38, ("siso", "fwdbwd", 1, 8192, 8): 3.14,
    },
}
RECORDED_FALLBACK = "H100"  # the GPU whose figures stand in where the running GPU has none recorded


def recorded_official_ms(device: str, kind: str, mode: str, b: int, l: int,  # noqa: E741
                         H: int) -> tuple[float | None, str]:
    """(ms, source) recorded for the official kernels on one shape: the figure of the GPU model that `device`
    (torch.cuda.get_device_name()) names, else the fallback GPU's, with the GPU named where it is not `device`'s."""
    key = (kind, mode, b, l, H)
    gpu = next((gpu for gpu in OFFICIAL_RECORDED if gpu in device), None)
    if key in OFFICIAL_RECORDED.get(gpu, {}):
        return OFFICIAL_RECORDED[gpu][key], "recorded"
    if key in OFFICIAL_RECORDED[RECORDED_FALLBACK]:
        return OFFICIAL_RECORDED[RECORDED_FALLBACK][key], f"recorded on {RECORDED_FALLBACK}"
    return None, "-"


# Their peak device memory of one fwd+bwd above the inputs, MiB, as `_peak_mib` takes it (H100, 2026-11-26, same runs).
OFFICIAL_PEAK_RECORDED = {("siso", 8, 2048, 32): 1120, ("siso", 1, 8192, 8): 143}


class Official(NamedTuple):
    """Where the official kernels' times come from."""

    script: Path | None  # their timing script, run once per case in a fresh process; None: recorded figures
    installed: bool  # run a copy of the script outside its folder, so that it imports the installed mamba_ssm
    note: str  # what was chosen, or why nothing could be


def resolve_official(spec: str | None, copy: Path = OFFICIAL_COPY) -> Official:
    """The official kernels `--official` names: None (recorded figures), a folder holding their timing
    script, or "auto": an importable `mamba_ssm` with the Mamba-3 kernels (timed by the script beside
    the package, else by the copy's), else the copy at `copy` (../shared/official-mamba3), else the
    recorded figures with the reason. A named folder without the script raises ValueError."""
    if spec is None:
        return Official(None, False, "recorded figures (no --official)")
    if spec != "auto":
        script = Path(spec) / OFFICIAL_SCRIPT
        if not script.is_file():
            raise ValueError(f"--official {spec}: no {OFFICIAL_SCRIPT} in that folder")
        return Official(script, False, f"timing script {script}")
    reasons = []
    found = importlib.util.find_spec("mamba_ssm")
    if found is None:
        reasons.append("mamba_ssm is not importable")
    else:
        package = Path(next(iter(found.submodule_search_locations)))
        if not (package / "ops" / "triton" / "mamba3").is_dir():
            reasons.append(f"mamba_ssm at {package} has no Mamba-3 kernels")
        else:
            for script in (package.parent / OFFICIAL_SCRIPT, copy / OFFICIAL_SCRIPT):
                if script.is_file():
                    return Official(script, True, f"installed mamba_ssm at {package}, timed by {script}")
            reasons.append(f"mamba_ssm at {package} has no {OFFICIAL_SCRIPT} beside it or in {copy}")
    script = copy / OFFICIAL_SCRIPT
    if script.is_file():
        return Official(script, False, f"copy at {copy} ({'; '.join(reasons)})")
    reasons.append(f"no {script}")
    return Official(None, False, f"recorded figures: {'; '.join(reasons)}")


def official_ms(official: Official, device: str, kind: str, mode: str, b: int, l: int, H: int,  # noqa: E741
                timeout: float) -> tuple[float | None, str]:
    """(ms, source) of the official kernels on one shape: measured by their timing script in a fresh
    process (first calls autotune: SISO fwd ~90 s, fwd+bwd ~340 s), else the figure recorded on `device`'s GPU
    model (`recorded_official_ms`)."""
    if official.script is None:
        return recorded_official_ms(device, kind, mode, b, l, H)
    with tempfile.TemporaryDirectory() as folder:
        script = official.script
        if official.installed:  # the script puts its own folder first on sys.path; a bare copy imports the installed package
            script = Path(shutil.copy(script, folder))
        try:
            done = subprocess.run(
                [sys.executable, str(script), f"{kind}:{mode}:{b}:{l}:{H}"], capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return None, f"over {timeout:.0f} s"
    for line in done.stdout.splitlines():
        if line.startswith("RESULT"):
            return float(line.split(": ")[1].split(" ms")[0]), "measured"
    return None, (done.stderr.strip().splitlines() or ["no RESULT"])[-1][:60]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--official", metavar="PATH|auto", help="folder of the official kernels' timing script "
                        "(bench_official.py), or auto: an importable mamba_ssm, else ../shared/official-mamba3; "
                        "without it the recorded official figures are shown")
    parser.add_argument("--official-timeout", type=float, default=120.0, help="seconds per official case")
    parser.add_argument("--repeats", type=int, default=20, help="single calls per latency median")
    args = parser.parse_args()
    try:
        official = resolve_official(args.official)
    except ValueError as error:
        parser.error(str(error))
    from megatron_mamba3.ops.tilelang import backward_kernels, kernels
    from megatron_mamba3.ops.tilelang.build import prebuild

    kernel_names = tuple(make.__name__.lstrip("_") for make in (*kernels.MAKERS, *backward_kernels.MAKERS))
    known = frozenset(kernel_names)

    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"device: {device}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    print(f"official kernels: {official.note}", flush=True)
    configs = {kernel_config(H, RANKS[kind]) for kind in args.shapes for _, _, H in SHAPES[kind]}
    start = time.perf_counter()
    count = prebuild(sorted(configs))
    print(f"compiled {count} kernels in parallel in {time.perf_counter() - start:.0f} s", flush=True)
    rows, splits = [], []
    for kind in args.shapes:
        R = RANKS[kind]
        for b, l, H in SHAPES[kind]:  # noqa: E741
            inputs, weights = _case(b, l, H, R)
            forward, forward_backward = (scan_call("tilelang", inputs, weights, train) for train in (False, True))
            start = time.perf_counter()
            forward_backward()
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            fwd = official_method_ms(forward)
            fwd_latency = _time_ms(forward, args.repeats)
            gpu = sum(_kernel_ms(forward, known).values())
            train = official_method_ms(forward_backward)
            train_latency = _time_ms(forward_backward, max(3, args.repeats // 4))
            split = _kernel_ms(forward_backward, known)
            train_gpu = sum(split.values())
            splits.append((f"{kind} R{R} b{b} l{l} H{H}", split))
            peak = _peak_mib(forward_backward)
            errors = output_errors(inputs, weights, {"tilelang": forward()})
            off_fwd = official_ms(official, device, kind, "fwd", b, l, H, args.official_timeout)
            off_train = official_ms(official, device, kind, "fwdbwd", b, l, H, args.official_timeout)
            rows.append(((kind, b, l, H), f"{kind} R{R} b{b} l{l} H{H}", fwd, fwd_latency, gpu, off_fwd, train,
                         train_latency, train_gpu, off_train, peak, first, errors["tilelang"], errors["reference"]))
            print(rows[-1], flush=True)

    def versus(ours, official):
        ms, source = official
        return (f"{ms:.2f} ({source})", f"{ours / ms:.2f}x") if ms else (source, "-")

    print(f"\n{device}, bf16, p={P}, n={N}, g={G}; ms = whole calls timed as the official script times its own "
          f"(triton do_bench); latency = CUDA events around single calls, synchronised after each; "
          f"fwd error = max |out − oracle| / max |oracle| against the float64 oracle on the same bf16 inputs, "
          f"batch rows 0..{ACCURACY_ROWS - 1}; official: {official.note}")
    print("| shape | fwd ms | fwd latency ms | fwd GPU ms | official fwd ms | ratio | fwd+bwd ms | fwd+bwd latency ms "
          "| fwd+bwd GPU ms | official fwd+bwd ms | ratio | fwd+bwd peak MiB | official peak MiB | first call s "
          "| fwd error | bf16 reference error | official error |")
    print("|---" * 17 + "|")
    for key, shape, fwd, fwd_latency, gpu, off_fwd, train, train_latency, train_gpu, off_train, peak, first, error, \
            reference_error in rows:
        off_peak = OFFICIAL_PEAK_RECORDED.get(key)
        off_peak = "-" if off_peak is None else f"{off_peak} (recorded on H100)"
        print(f"| {shape} | {fwd:.3f} | {fwd_latency:.3f} | {gpu:.3f} | {' | '.join(versus(fwd, off_fwd))} | {train:.3f} "
              f"| {train_latency:.3f} | {train_gpu:.3f} | {' | '.join(versus(train, off_train))} | {peak:.0f} "
              f"| {off_peak} | {first:.1f} | {error:.2e} | {reference_error:.2e} | - |")
    print(f"\nDevice ms of one forward+backward per kernel (profiler, mean of 5 calls; {PYTORCH}: every other kernel)")
    print("\n".join(kernel_table(splits, kernel_names)))


if __name__ == "__main__":
    main()
