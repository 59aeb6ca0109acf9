"""Per-kernel device time and host time of source trees side by side, on one GPU in one run: A/Bs of kernel
and host-side changes.

    python -m benchmarks.compare_trees BASE TREE [TREE ...] [--shapes siso8 mimo8 siso1 mimo1] [--rounds 2] [--repeats 10]
    python -m benchmarks.compare_trees --table LOG [--shapes ...]   # the table from a run's printed rounds

BASE and each TREE are folders that each hold a `megatron_mamba3` package, e.g. this checkout and git worktrees
of branches (`git worktree add /tmp/b BRANCH`); each TREE is compared with BASE, so one run (and one compile
of BASE's kernels) serves several candidate changes. Each round runs every tree once, in turn, in a fresh
process whose working directory is the tree (so the parallel kernel compiles of `ops.tilelang.build`, which run
`python -m`, import that tree's kernels too); the process times one forward+backward per shape with
`bench_kernels`' inputs and profiler split (device ms per kernel, PyTorch's kernels in one column), the host's
time to issue it from an idle GPU (`host_ms`) and its peak memory. The table gives each tree's median over the rounds and its difference from BASE. The first round of a tree also compiles
its kernels (TileLang's disk cache makes the later rounds load them). Each tree's result is printed as it
comes (`round N: LABEL {json}`), so a run stopped by a time limit still gives the table of the rounds it
finished (`--table LOG`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _load_bench_kernels():
    """benchmarks/bench_kernels.py from this file's folder, whatever a tree holds (loaded by path: a timing
    process runs this file as a script, with a tree's `megatron_mamba3`, which bench_kernels imports, first)."""
    spec = importlib.util.spec_from_file_location("_bench_kernels", Path(__file__).with_name("bench_kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _load_bench_kernels()
SHAPES = {  # name -> (b, l, H, R): bench_kernels' shapes, e.g. "siso8" for SISO at b8
    f"{kind}{b}": (b, l, H, BENCH.RANKS[kind]) for kind, shapes in BENCH.SHAPES.items() for b, l, H in shapes  # noqa: E741
}
PEAK = "peak MiB"  # the row of each shape's peak memory of one forward+backward
TOTAL = "total"
HOST = "host ms"  # the row of the host's time to issue one forward+backward (`host_ms`)


def child_argv(shapes: list[str], repeats: int) -> list[str]:
    """The command line of one tree's timing process (run with the tree as its working directory)."""
    return [sys.executable, str(Path(__file__).resolve()), "--repeats", str(repeats), "--child", *shapes]


def child_environment(tree: Path) -> dict[str, str]:
    """The timing process's environment: the tree first on PYTHONPATH (its `megatron_mamba3`)."""
    kept = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *([kept] if kept else [])])}


def shape_step(shape: str):
    """One forward+backward of `shape` with `bench_kernels`' inputs on the GPU, as a function of no arguments
    (the inputs are made once, here)."""
    b, l, H, R = SHAPES[shape]  # noqa: E741
    inputs, weights = BENCH._case(b, l, H, R)
    return BENCH.scan_call("tilelang", inputs, weights, True)


def host_ms(step, repeats: int) -> float:
    """The median host time of `repeats` calls of `step`, each from an idle GPU (synchronised before it, not
    after): what the host takes to issue the call's kernels, which bounds the call where it exceeds their device
    time."""
    import torch

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _time_tree(shapes: list[str], repeats: int) -> None:
    """In the timing process: one JSON line per shape, {"shape", "split": {kernel: ms}, "peak", "host"}."""
    import torch

    from megatron_mamba3.ops.tilelang import backward_kernels, kernels

    known = frozenset(make.__name__.lstrip("_") for make in (*kernels.MAKERS, *backward_kernels.MAKERS))
    for shape in shapes:
        step = shape_step(shape)
        step()
        torch.cuda.synchronize()
        split = BENCH._kernel_ms(step, known, repeats)
        row = {"shape": shape, "split": split, "peak": BENCH._peak_mib(step), "host": host_ms(step, repeats)}
        print(json.dumps(row), flush=True)


def run_tree(tree: Path, shapes: list[str], repeats: int) -> dict[str, dict[str, float]]:
    """One timing process for `tree`: shape -> {kernel: ms, TOTAL: ms, HOST: ms, PEAK: MiB}."""
    done = subprocess.run(child_argv(shapes, repeats), cwd=tree, env=child_environment(tree),
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"timing {tree} failed:\n{done.stderr[-4000:]}")
    found = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            split = row["split"]
            found[row["shape"]] = {**split, TOTAL: sum(split.values()), HOST: row["host"], PEAK: row["peak"]}
    return found


def comparison_table(runs: dict[str, list[dict[str, dict[str, float]]]], shapes: list[str]) -> list[str]:
    """Markdown lines from each tree's runs (tree label -> one result per round, as `run_tree` gives; the first
    tree is the base): per shape and kernel, the median over the rounds of the base, then of each other tree
    and its difference from the base; the kernels in order of the base's time, then the total, the host's
    time (where the runs have it: older logs do not) and the peak."""
    (base, base_runs), *others = runs.items()
    median = lambda results, shape, name: statistics.median(r[shape].get(name, 0.0) for r in results)  # noqa: E731
    header = "".join(f" {label} | {label} − {base} |" for label, _ in others)
    lines = [f"| shape | kernel | {base} |{header}", "|---|---|---|" + "---|---|" * len(others)]
    for shape in shapes:
        found = {name for results in runs.values() for result in results for name in result[shape]}
        names = found - {TOTAL, HOST, PEAK}
        order = sorted(names, key=lambda name: -median(base_runs, shape, name))
        for name in (*order, TOTAL, *([HOST] if HOST in found else []), PEAK):
            digits = 0 if name == PEAK else 3
            a = median(base_runs, shape, name)
            cells = "".join(f" {b:.{digits}f} | {b - a:+.{digits}f} |" for b in (median(r, shape, name) for _, r in others))
            lines.append(f"| {shape} | {name} | {a:.{digits}f} |{cells}")
    return lines


ROUND = re.compile(r"^round \d+: (\S+) (\{.*\})$")


def runs_from_log(lines: list[str]) -> dict[str, list[dict[str, dict[str, float]]]]:
    """The runs of `main`'s printed rounds (tree label -> results, in the order the labels first appear)."""
    runs = {}
    for line in lines:
        found = ROUND.match(line.strip())
        if found:
            runs.setdefault(found[1], []).append(json.loads(found[2]))
    return runs


def tree_labels(trees: list[Path]) -> list[str]:
    """Each tree's folder name, or T0, T1, ... (T0 the base) where two names are the same."""
    names = [tree.resolve().name for tree in trees]
    return names if len(set(names)) == len(names) else [f"T{i}" for i in range(len(trees))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", type=Path, help="the base and one or more other folders, each holding a "
                        "megatron_mamba3 package")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES),
                        help="default: siso8 mimo8; with --table, every shape the log has for every tree")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="calls per profiled split")
    parser.add_argument("--table", type=Path, help="print the table of a run's printed rounds (its log) and stop")
    parser.add_argument("--child", nargs="+", choices=list(SHAPES), help=argparse.SUPPRESS)  # a timing process
    args = parser.parse_args(argv)
    if args.table is not None and not args.table.is_file():
        parser.error(f"--table: no such log file {args.table}")
    if args.shapes is None and args.table is None:
        args.shapes = ["siso8", "mimo8"]
    if args.child is None and args.table is None and (len(args.trees) < 2 or not all((t / "megatron_mamba3").is_dir() for t in args.trees)):
        parser.error(f"give two or more folders that each hold a megatron_mamba3 package, not {args.trees}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        _time_tree(args.child, args.repeats)
        return
    if args.table is not None:
        runs = runs_from_log(args.table.read_text().splitlines())
        if len(runs) < 2:
            raise SystemExit(f"{args.table}: rounds of {len(runs)} tree(s) found, the table needs two or more")
        shapes = args.shapes or [s for s in SHAPES if all(s in result for results in runs.values() for result in results)]
        print("\n".join(comparison_table(runs, shapes)))
        return
    labels = tree_labels(args.trees)
    runs = {label: [] for label in labels}
    for round_ in range(args.rounds):
        for label, tree in zip(labels, args.trees):
            runs[label].append(run_tree(tree.resolve(), args.shapes, args.repeats))
            print(f"round {round_ + 1}: {label} {json.dumps(runs[label][-1])}", flush=True)
    print("\nDevice ms of one forward+backward per kernel, host ms to issue it (medians of the rounds), peak MiB")
    print("\n".join(comparison_table(runs, args.shapes)))


if __name__ == "__main__":
    main()
