"""Compiling the TileLang kernels, always through TileLang's disk cache (`~/.tilelang/cache`).

    pass_configs    the TileLang pass configuration of every kernel
    kernel_target   the target they are compiled for: Hopper's sm_90a, spelled out (no GPU needed to name it)
    compile_kernel  one kernel: `make(config)` compiled (or loaded from the cache)
    lower_kernel    one kernel lowered for Hopper on any machine (no GPU, no device compile), and
                    `shared_memory_bytes` of it
    build           a config's forward or backward set in this process; the first time a config is
                    asked for, every kernel of it (forward and backward) is compiled first in parallel
                    fresh processes (`prebuild`), so the set loads instead of compiling one after another
    prebuild        many configs at once, one process per kernel (up to the CPU count at a time); a config
                    whose every kernel a process has compiled into the cache before is skipped (`prebuilt_marker`)

The processes are `python -m megatron_mamba3.ops.tilelang.build MODULE MAKER '(H, p, n, R, G, S, Q, norm, A_floor)'`, so
no caller needs an `if __name__ == "__main__"` guard (as multiprocessing's spawn would). A failed
process is logged and the kernel is compiled in this process instead, where its error is raised.
Importing this module needs neither TileLang nor CUDA.
"""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import hashlib
import importlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

_MAKER_MODULES = ("megatron_mamba3.ops.tilelang.kernels", "megatron_mamba3.ops.tilelang.backward_kernels")
_compiled = 0
_prebuilt: set = set()


def compile_count() -> int:
    """TileLang kernels compiled (or loaded from the disk cache) in this process."""
    return _compiled


def pass_configs() -> dict:
    """The TileLang pass configuration every kernel is compiled with."""
    import tilelang

    return {  # bulk copies (TMA) and warp specialisation stay off: the kernels' tiles are not laid out for them
        tilelang.PassConfigKey.TL_DISABLE_TMA_LOWER: True,
        tilelang.PassConfigKey.TL_DISABLE_WARP_SPECIALIZED: True,
        # nvcc --use_fast_math: exp, sin and cos as the hardware's approximations (CUDA's bounds: exp within
        # 2 + 1.17·|x| ulp; sin and cos within 2⁻²¹·⁴ absolute on [−π, π], where `chunk_prologue`'s rotation
        # reduces θ), fp32 division approximate, denormals flushed to zero. 0.3 ms less GPU time per SISO
        # forward+backward at b8 l2048 H32, with the same test bounds (benchmarks/README.md)
        tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: True,
    }


HOPPER = {"kind": "cuda", "arch": "sm_90a"}  # H100 / H200: the kernels' warpgroup gemms need the "a" features


def kernel_target():
    """The target the kernels are compiled for: `HOPPER` where the GPU is one (compute capability 9.0) or where
    there is none (compiling ahead on a machine without one: the target is spelled out, so TileLang's cache key
    is the same as on the GPU and the GPU loads what was compiled ahead); any other GPU, TileLang's own
    detection ("cuda")."""
    import torch
    from tilelang import tvm

    if torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0):
        return "cuda"
    return tvm.target.Target(HOPPER)


def compile_kernel(make, config):
    """Compile (or load from TileLang's disk cache) the kernel `make(config)` for `kernel_target()`."""
    import tilelang

    return tilelang.compile(make(config), out_idx=[], target=kernel_target(), pass_configs=pass_configs())


def lower_kernel(make, config):
    """`make(config)` lowered for sm_90a with the kernels' pass configuration and no device compile: TileLang's
    lowered artifact (its `kernel_source` is the CUDA, its `device_mod` holds the one device function)."""
    import tilelang
    from tilelang import tvm

    target = tvm.target.Target(HOPPER)
    with target, tvm.transform.PassContext(opt_level=3, config=pass_configs()):
        return tilelang.lower(make(config), target=target, enable_device_compile=False)


def shared_memory_bytes(lowered) -> int:
    """The dynamic shared memory a `lower_kernel` result's kernel asks for per block."""
    (function,) = lowered.device_mod.functions.values()
    return int(function.attrs.get("dyn_shared_memory_buf", 0))


def _makers():
    """(module name, maker) for every forward and backward kernel maker."""
    return [(name, make) for name in _MAKER_MODULES for make in importlib.import_module(name).MAKERS]


def job_argv(module: str, maker: str, config) -> list[str]:
    """The command line of the process that compiles `maker` of `module` for `config` (a KernelConfig)."""
    return [sys.executable, "-m", __name__, module, maker, repr(tuple(config))]


def parse_job(argv: list[str]):
    """Inverse of `job_argv` (without the interpreter and `-m`): (module, maker name, config fields)."""
    module, maker, *fields = argv
    config = None
    if module in _MAKER_MODULES and len(fields) == 1:
        try:
            config = ast.literal_eval(fields[0])
        except (ValueError, SyntaxError):
            pass
    if not isinstance(config, tuple):
        raise ValueError(f"not a kernel job: {argv}")
    return module, maker, config


def kernel_sources() -> list[Path]:
    """The files the compiled kernels come from: the kernel modules (`_MAKER_MODULES`, which import nothing else
    of this package) and this build (pass configuration, target). The host side (function.py and the PyTorch
    forms) is not among them."""
    here = Path(__file__)
    return sorted([here, *(here.with_name(f"{module.rpartition('.')[2]}.py") for module in _MAKER_MODULES)])


@functools.cache
def _sources_digest() -> str:
    """A hash of `kernel_sources`, TileLang's version and the kernels' target."""
    import tilelang

    digest = hashlib.sha256(f"{tilelang.__version__} {kernel_target()}".encode())
    for path in kernel_sources():
        digest.update(path.read_bytes())
    return digest.hexdigest()


def prebuilt_marker(config) -> Path | None:
    """The empty file, in TileLang's cache folder, that says a `prebuild` compiled every kernel of `config` into
    that cache with these `kernel_sources`, TileLang version and target (its name hashes them all); None where
    TileLang is absent or its cache is off. A later process finds the kernels there and loads them without a prebuild
    (were they deleted since, `build` compiles them in its own process, one after another)."""
    try:
        from tilelang import env
    except ImportError:
        return None
    if not env.is_cache_enabled():
        return None
    key = hashlib.sha256(f"{_sources_digest()} {tuple(config)!r}".encode()).hexdigest()
    return Path(env.TILELANG_CACHE_DIR) / "megatron_mamba3_prebuilt" / key


def prebuild(configs) -> int:
    """Compile every forward and backward kernel of `configs` in parallel processes into the disk cache,
    except those of the configs prebuilt there before (`prebuilt_marker`). Returns the number of kernels
    compiled; failures are logged (the in-process build then reports them)."""
    configs = list(configs)
    markers = {config: prebuilt_marker(config) for config in configs}
    todo = [config for config in configs if markers[config] is None or not markers[config].exists()]
    jobs = [(config, job_argv(module, make.__name__, config)) for config in todo for module, make in _makers()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    start = time.perf_counter()

    def run(job) -> bool:
        done = subprocess.run(job[1], check=False, env=env, capture_output=True, text=True)
        if done.returncode:
            logger.warning("mamba3 tilelang: parallel compile of %s failed:\n%s", job[1][3:], done.stderr[-2000:])
        return done.returncode == 0

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1) or 1) as pool:
        succeeded = list(pool.map(run, jobs))
    failed = {config for (config, _), ok in zip(jobs, succeeded) if not ok}
    for config in todo:
        if markers[config] is not None and config not in failed:
            markers[config].parent.mkdir(parents=True, exist_ok=True)
            markers[config].touch()
    _prebuilt.update(configs)
    logger.info("mamba3 tilelang: %d kernels of %d configs compiled (or found in the cache) in parallel in %.1f s; "
                "%d configs prebuilt before", len(jobs), len(todo), time.perf_counter() - start, len(configs) - len(todo))
    return len(jobs)


def build(config, makers, names: str):
    """`compile_kernel` each maker for `config` in this process (after a parallel `prebuild` of the
    whole config the first time); counts and logs the time taken."""
    global _compiled
    if config not in _prebuilt:
        prebuild([config])
    start = time.perf_counter()
    built = [compile_kernel(make, config) for make in makers]
    _compiled += len(built)
    logger.info("mamba3 tilelang: loaded %s kernels for %s in %.1f s", names, config, time.perf_counter() - start)
    return built


if __name__ == "__main__":
    module_name, maker_name, fields = parse_job(sys.argv[1:])
    module = importlib.import_module(module_name)
    compile_kernel(getattr(module, maker_name), module.KernelConfig(*fields))
