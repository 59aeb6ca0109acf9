"""Compile TileLang kernels ahead on a machine without a GPU, into a tarball of TileLang's cache for a device
call to unpack first: the call's kernels then load instead of compiling (minutes of device time each call).

    python -m benchmarks.precompile [--shapes siso8 mimo8] [--tests tests/gpu/test_tilelang_kernels.py ...]
                                    [--trees . /tmp/branch ...] [--cache DIR] [--out .dev/tlcache.tar.xz]
    # first in the device command:
    mkdir -p ~/.tilelang/cache && tar -C ~/.tilelang/cache -xJf .dev/tlcache.tar.xz

The kernels are those of the kernel configs that `compare_trees`' shapes run (`--shapes`) and that test modules
list in `TILELANG_KERNELS` (`--tests`, as tests/conftest.py collects them), for each source tree (`--trees`:
each tree's own kernels, compiled by a process started in the tree, as `compare_trees` times them). They are
compiled with `build.prebuild` into a fresh cache folder (`TILELANG_CACHE_DIR`), which the tarball holds; with
`--cache DIR`, into DIR, kept between runs: what an earlier run (or an unpacked tarball) left there loads instead
of compiling (a base tree's kernels, the unchanged kernels of a candidate tree), and the tarball holds all of DIR.
This works because `build.kernel_target` names Hopper's sm_90a in full and TileLang's cache key holds only
the kernel, that target, the pass configuration and TileLang's version and libraries, which the device's
bundle shares with this machine's install (the same wheels; check with a device call's compile log). The
tarball also holds `build.prebuilt_marker`'s files, so the device's processes skip their parallel prebuild.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def shape_configs(shapes: list[str]) -> list[tuple]:
    """The kernel configs (as tuples) that `compare_trees`' shapes run: bench_kernels' cases, no prep."""
    from benchmarks import bench_kernels
    from benchmarks.compare_trees import SHAPES

    return [tuple(bench_kernels.kernel_config(SHAPES[shape][2], SHAPES[shape][3])) for shape in shapes]


def module_configs(modules: list[Path]) -> list[tuple]:
    """The `TILELANG_KERNELS` that test modules (files) list."""
    import importlib.util

    configs = []
    for path in modules:
        spec = importlib.util.spec_from_file_location(f"_precompile_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # where a dataclass's fields are resolved
        spec.loader.exec_module(module)
        configs += [tuple(config) for config in getattr(module, "TILELANG_KERNELS", ())]
    return configs


def _compile_here(configs: list[tuple]) -> None:
    """In a tree's process: every kernel of `configs` compiled into the cache (`build.prebuild`), then loaded
    in this process, which raises where a compile failed."""
    from megatron_mamba3.ops.tilelang import backward_kernels, build, kernels

    configs = [kernels.KernelConfig(*config) for config in configs]
    build.prebuild(configs)
    for config in configs:
        build.build(config, [*kernels.MAKERS, *backward_kernels.MAKERS], "all")


def compile_tree(tree: Path, configs: list[tuple], cache: Path) -> float:
    """Compile `configs` with `tree`'s kernels into `cache`; returns the seconds taken."""
    from benchmarks.compare_trees import child_environment  # the tree first on PYTHONPATH, as its timing runs

    start = time.perf_counter()
    env = {**child_environment(tree), "TILELANG_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, str(HERE), "--child", json.dumps(configs)], cwd=tree, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"compiling {tree}'s kernels failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def pack(cache: Path, out: Path) -> int:
    """`cache`'s contents as the xz tarball `out` (members relative to the cache folder); returns its bytes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz") as tar:
        for entry in sorted(cache.iterdir()):
            tar.add(entry, arcname=entry.name)
    return out.stat().st_size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.compare_trees import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", default=["siso8", "mimo8"], choices=list(SHAPES),
                        help="compare_trees' shape names")
    parser.add_argument("--tests", nargs="*", type=Path, default=[], help="test modules with TILELANG_KERNELS")
    parser.add_argument("--trees", nargs="+", type=Path, default=[Path(".")], help="folders holding megatron_mamba3")
    parser.add_argument("--cache", type=Path, help="compile into (and pack) this folder, kept between runs "
                        "(default: a fresh temporary folder)")
    parser.add_argument("--out", type=Path, default=Path(".dev/tlcache.tar.xz"))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a tree's compile process: the configs as JSON
    args = parser.parse_args(argv)
    if args.child is None:
        if not args.shapes and not args.tests:
            parser.error("nothing to compile: give --shapes or --tests")
        missing = [str(t) for t in args.tests if not t.is_file()] + [
            str(t) for t in args.trees if not (t / "megatron_mamba3").is_dir()]
        if missing:
            parser.error(f"not found: {', '.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        _compile_here([tuple(config) for config in json.loads(args.child)])
        return
    configs = list(dict.fromkeys(shape_configs(args.shapes) + module_configs(args.tests)))
    with contextlib.ExitStack() as stack:
        cache = args.cache.resolve() if args.cache else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cache.mkdir(parents=True, exist_ok=True)
        for tree in args.trees:
            seconds = compile_tree(tree.resolve(), configs, cache)
            print(f"{tree}: {len(configs)} configs compiled in {seconds:.0f} s", flush=True)
        size = pack(cache, args.out)
    print(f"{args.out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
