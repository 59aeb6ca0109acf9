"""Where inside one TileLang kernel the time goes: ncu's warp-stall samples per range of the generated CUDA.

On the GPU machine (the generated source must outlive its compile, hence the variable; the first `run`
compiles, the profiled one loads the kernels from TileLang's cache):

    export TILELANG_CLEANUP_TEMP_FILES=0
    python -m benchmarks.ncu_lines run mimo8
    ncu --clock-control none -k regex:dqkv -c 1 --set full --import-source yes -o dqkv \
        python -m benchmarks.ncu_lines run mimo8
    ncu -i dqkv.ncu-rep --page source --csv --print-source cuda,sass > dqkv.csv
    python -m benchmarks.ncu_lines table dqkv.csv [--lines 60]

`run SHAPE` is one forward+backward of a `bench_kernels` shape (`compare_trees`' names: siso8, mimo8, ...).
`table` reads ncu's source page: the SASS instructions listed under each line of each source file, with
their stall samples. An instruction inlined from a header (a gemm, a reduction, an atomic) is counted
with the kernel line before it in address order, the call site it was inlined into. The table sums the
samples over ranges of `--lines` generated lines and names the buffers and tensors each range touches
(its tensor parameters, shared tiles and fragments), which is how a range is told apart: TileLang's
CUDA carries no Python line numbers.
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
from pathlib import Path
from typing import NamedTuple

KERNEL_FILE = "tvm_kernels.cu"  # the generated CUDA's file name in TileLang's temporary folder
SAMPLES = "Warp Stall Sampling (All Samples)"
TEMPORARY = re.compile(r"_local_cast|^v__|^__|^condval|^broadcast_var|^buf_dyn")  # TileLang's own locals


class Instruction(NamedTuple):
    address: int
    line: int  # the kernel source line it counts with (0 before the first)
    samples: int
    stalls: dict[str, int]  # reason (ncu's stall_* without the prefix) -> samples


def _count(text: str) -> int:
    return int(text) if text.isdigit() else 0


def read_source_page(path: Path) -> tuple[list[Instruction], str | None]:
    """The SASS instructions of a `--print-source cuda,sass` CSV, each with its kernel line, and the path of
    the kernel's generated CUDA as ncu recorded it (None where no file is KERNEL_FILE)."""
    placed, unplaced = {}, {}  # address -> (line in its file, samples, stalls): kernel file, headers
    current, header, line, kernel_path = None, None, 0, None
    for row in csv.reader(path.open()):
        if not row:
            continue
        if row[0] == "File Path":
            current = row[1]
            kernel_path = current if current.endswith(KERNEL_FILE) else kernel_path
        elif row[0] == "Line No":
            header = row
        elif header is not None and len(row) == len(header):
            if row[0]:
                line = int(row[0])
                continue
            if not row[2].startswith("0x"):  # "..." marks elided instructions
                continue
            fields = dict(zip(header, row))
            stalls = {name[len("stall_"):]: _count(value) for name, value in fields.items()
                      if name.startswith("stall_") and "Not Issued" not in name}
            entry = (_count(fields[SAMPLES]), stalls)
            (placed if current.endswith(KERNEL_FILE) else unplaced)[int(row[2], 16)] = (line, *entry)
    instructions, last = [], 0
    for address in sorted({**unplaced, **placed}):
        if address in placed:
            last = placed[address][0]
        samples, stalls = (placed.get(address) or unplaced[address])[1:]
        instructions.append(Instruction(address, last, samples, stalls))
    return instructions, kernel_path


def line_ranges(instructions: list[Instruction], lines: int) -> list[tuple[int, int, int, dict[str, int]]]:
    """(first line, end line, samples, stall reason -> samples) per range of `lines` kernel lines, in order,
    ranges with no samples left out."""
    totals = collections.defaultdict(lambda: [0, collections.Counter()])
    for inst in instructions:
        entry = totals[inst.line // lines]
        entry[0] += inst.samples
        entry[1].update(inst.stalls)
    return [(k * lines, (k + 1) * lines, s, dict(c)) for k, (s, c) in sorted(totals.items()) if s]


def kernel_names(source: list[str]) -> set[str]:
    """The names in a generated kernel that are the Python kernel's: its tensor parameters, shared tiles
    (used as `((type*)name)`) and fragments (local arrays), without TileLang's temporaries."""
    text = "\n".join(source)
    found = {*re.findall(r"__restrict__ (\w+)", text), *re.findall(r"\(\(\w+\*\)(\w+)\)", text),
             *re.findall(r"^\s*(?:float|double|int|bool|bfloat16_t|half_t)\s+(\w+)\[", text, re.M)}
    return {name for name in found if not TEMPORARY.search(name)}


def table(instructions: list[Instruction], source: list[str] | None, lines: int, floor: float = 0.01) -> list[str]:
    """Markdown rows: each range's share of the samples (those at or above `floor`), its three main stall
    reasons and, with the kernel's source lines, the names it touches."""
    total = sum(inst.samples for inst in instructions) or 1
    known = kernel_names(source) if source else set()
    rows = [f"{total} samples; ranges of {lines} lines of {KERNEL_FILE} with at least {floor:.0%}",
            "| lines | share | main stalls (share of all samples) | names |", "|---|---|---|---|"]
    for first, end, samples, stalls in line_ranges(instructions, lines):
        if samples < floor * total:
            continue
        main = ", ".join(f"{name} {count / total:.1%}" for name, count in
                         sorted(stalls.items(), key=lambda kv: -kv[1])[:3] if count)
        words = set(re.findall(r"\w+", "\n".join(source[max(first - 1, 0):end - 1]))) if source else set()
        names = " ".join(sorted(known & words))
        rows.append(f"| {first}-{end - 1} | {samples / total:.1%} | {main} | {names} |")
    return rows


def _run(shape: str) -> None:
    """One forward+backward of `shape` on the GPU (compare_trees' shapes and bench_kernels' inputs)."""
    import torch

    from benchmarks.compare_trees import SHAPES, shape_step

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    shape_step(shape)()
    torch.cuda.synchronize()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="one forward+backward of a bench shape, for ncu to profile")
    run.add_argument("shape")
    report = commands.add_parser("table", help="stall samples per range of generated lines")
    report.add_argument("csv", type=Path, help="ncu --page source --csv --print-source cuda,sass output")
    report.add_argument("--source", type=Path, help="the generated CUDA (default: the path ncu recorded)")
    report.add_argument("--lines", type=int, default=60, help="generated lines per range")
    args = parser.parse_args(argv)
    if args.command == "table" and args.lines < 1:
        parser.error(f"--lines must be at least 1, not {args.lines}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "run":
        _run(args.shape)
        return
    instructions, recorded = read_source_page(args.csv)
    source_path = args.source or (Path(recorded) if recorded else None)
    source = source_path.read_text().splitlines() if source_path and source_path.exists() else None
    print("\n".join(table(instructions, source, args.lines)))


if __name__ == "__main__":
    main()
