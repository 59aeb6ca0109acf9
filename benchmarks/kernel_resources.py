"""Registers, spills and shared memory of every TileLang kernel, and the blocks per SM they leave, without a GPU.

    python -m benchmarks.kernel_resources [--ranks 1 4] [--p 64] [--n 128] [--H 32] [--norm] [--prep] [--packed]

Each kernel of the forward and backward sets is lowered on the CPU for Hopper (sm_90a, the pass configuration
of `build.lower_kernel`) and its CUDA compiled by nvcc with `ptxas --verbose`, as TileLang compiles it (fast
math, C++20): threads and the minimum blocks per SM from its `__launch_bounds__`, dynamic shared memory from
the lowered kernel, registers, spill bytes and static shared memory from ptxas. `blocks_per_sm` then gives
how many blocks of it an SM holds by each of Hopper's limits. Needs TileLang and nvcc;
no GPU. The default configs are `bench_kernels`' shapes (bf16, p = 64, n = 128, g = 1, rope_fraction 0.5):
SISO (R = 1, 64-token chunks) and MIMO R = 4 (16-token chunks).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

# Hopper (H100 / H200) per SM: registers (allocated per warp in units of REGISTER_UNIT), shared memory
# (a block may opt in to 227 KB; each block also reserves SHARED_PER_BLOCK), threads and blocks.
REGISTERS, REGISTER_UNIT = 65536, 256
SHARED_MEMORY, SHARED_PER_BLOCK = 228 * 1024, 1024
THREADS, BLOCKS = 2048, 32


class Usage(NamedTuple):
    """What ptxas reports for one kernel."""

    registers: int
    spill_stores: int
    spill_loads: int
    static_shared: int


class Resources(NamedTuple):
    kernel: str
    threads: int
    min_blocks: int  # from __launch_bounds__ (1 where it names none): registers are capped to fit that many
    shared: int  # bytes, dynamic + static
    usage: Usage


def parse_ptxas(text: str) -> Usage:
    """The `ptxas --verbose` lines of one kernel -> its registers, spill bytes and static shared memory."""
    registers = re.search(r"Used (\d+) registers", text)
    if registers is None:
        raise ValueError(f"no register count in ptxas output: {text!r}")
    number = lambda pattern: int(found.group(1)) if (found := re.search(pattern, text)) else 0  # noqa: E731
    return Usage(int(registers.group(1)), number(r"(\d+) bytes spill stores"), number(r"(\d+) bytes spill loads"),
                 number(r"(\d+) bytes smem"))


def launch_bounds(source: str) -> tuple[int, int]:
    """(threads, minimum blocks per SM) from the kernel's `__launch_bounds__(threads[, blocks])`."""
    found = re.search(r"__launch_bounds__\((\d+)(?:,\s*(\d+))?\)", source)
    if found is None:
        raise ValueError("the kernel source has no __launch_bounds__")
    return int(found.group(1)), int(found.group(2) or 1)


def blocks_per_sm(threads: int, registers: int, shared: int) -> dict[str, int]:
    """Blocks of a kernel one Hopper SM holds by each limit ("registers", "shared", "threads", "blocks") and
    overall ("all", the smallest)."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    limits = {
        "registers": REGISTERS // (warps * per_warp) if registers else BLOCKS,
        "shared": SHARED_MEMORY // (shared + SHARED_PER_BLOCK),
        "threads": THREADS // threads,
        "blocks": BLOCKS,
    }
    return {**limits, "all": min(limits.values())}


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("nvcc is not on PATH: this benchmark compiles the lowered kernels with it")
    return nvcc


def ptxas_usage(source: str) -> Usage:
    """Compile one lowered kernel's CUDA for sm_90a as TileLang does and read ptxas's report."""
    import tilelang
    from tilelang.env import CUTLASS_INCLUDE_DIR, TILELANG_TEMPLATE_PATH

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "kernel.cu")
        path.write_text(source)
        done = subprocess.run(
            [_nvcc(), "-std=c++20", "-w", "-cubin", "-gencode", "arch=compute_90a,code=sm_90a", "--use_fast_math",
             "--ptxas-options=--verbose", f"-I{TILELANG_TEMPLATE_PATH}", f"-I{CUTLASS_INCLUDE_DIR}",
             str(path), "-o", str(path.with_suffix(".cubin"))],
            capture_output=True, text=True, check=False,
        )
    if done.returncode:
        raise RuntimeError(f"nvcc failed (TileLang {tilelang.__version__}):\n{done.stderr[-3000:]}")
    return parse_ptxas(done.stdout + done.stderr)


def kernel_resources(make, config) -> Resources:
    """Lower `make(config)` on the CPU and measure it (`launch_bounds`, dynamic shared memory, `ptxas_usage`)."""
    from megatron_mamba3.ops.tilelang.build import lower_kernel, shared_memory_bytes

    lowered = lower_kernel(make, config)
    threads, min_blocks = launch_bounds(lowered.kernel_source)
    usage = ptxas_usage(lowered.kernel_source)
    shared = shared_memory_bytes(lowered) + usage.static_shared
    return Resources(make.__name__.lstrip("_"), threads, min_blocks, shared, usage)


def table(rows: list[tuple[str, Resources]]) -> list[str]:
    """Markdown lines: one row per (config, kernel)."""
    lines = [
        "| config | kernel | threads (min blocks) | registers | spilled B (st/ld) | shared KB "
        "| blocks/SM by registers, shared, threads | blocks/SM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, found in rows:
        limits = blocks_per_sm(found.threads, found.usage.registers, found.shared)
        lines.append(
            f"| {label} | {found.kernel} | {found.threads} ({found.min_blocks}) | {found.usage.registers} | "
            f"{found.usage.spill_stores}/{found.usage.spill_loads} | {found.shared / 1024:.1f} | "
            f"{limits['registers']}, {limits['shared']}, {limits['threads']} | {limits['all']} |"
        )
    return lines


def main() -> None:
    from benchmarks import bench_kernels  # the bench's sizes and configs are the defaults

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=sorted(set(bench_kernels.RANKS.values())), choices=[1, 2, 4],
                        help="ranks R, a config each")
    parser.add_argument("--H", type=int, default=bench_kernels.SHAPES["siso"][0][2], help="heads")
    parser.add_argument("--p", type=int, default=bench_kernels.P, choices=[64, 128], help="head dim")
    parser.add_argument("--n", type=int, default=bench_kernels.N, choices=[64, 128], help="state size")
    parser.add_argument("--norm", action="store_true", help="with the per-head output norm")
    parser.add_argument("--prep", action="store_true", help="with the layer's prep in the kernels (A floor 1e-4)")
    parser.add_argument("--packed", action="store_true", help="the cu_seqlens kernels")
    args = parser.parse_args()
    _nvcc()

    from megatron_mamba3.ops.tilelang import backward_kernels, kernels

    rows = []
    for R in args.ranks:
        config = bench_kernels.kernel_config(args.H, R, args.p, args.n, args.norm, 1e-4 if args.prep else None, args.packed)
        label = f"R{R} p{args.p} n{args.n}"
        for make in (*kernels.MAKERS, *backward_kernels.MAKERS):
            rows.append((label, kernel_resources(make, config)))
            print(f"{label} {rows[-1][1].kernel}: {rows[-1][1].usage}", flush=True)
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
