"""Compile every TileLang kernel the GPU tests use in parallel processes first (into TileLang's disk
cache), so the tests load them instead of compiling ~35 kernels one after another."""

import importlib.util
import multiprocessing
import time

import pytest
import torch


def _compile(job):
    from megatron_mamba3.ops.tilelang.kernels import compile_kernel

    make, config = job
    compile_kernel(make, config)


@pytest.fixture(scope="session", autouse=True)
def prebuilt_kernels():
    if not torch.cuda.is_available() or importlib.util.find_spec("tilelang") is None:
        return
    from megatron_mamba3.ops.tilelang.backward_kernels import BACKWARD_MAKERS
    from megatron_mamba3.ops.tilelang.function import TILE_ROWS
    from megatron_mamba3.ops.tilelang.kernels import FORWARD_MAKERS, KernelConfig
    from tests.gpu import test_nonfinite, test_tilelang_kernels
    from tests.nonfinite import H as NONFINITE_HEADS

    configs = [
        KernelConfig(test_tilelang_kernels.HEADS, p, n, R, G, n // 4, TILE_ROWS // R, norm)
        for n, p, R, G, norm in test_tilelang_kernels.CONFIGS
    ] + [
        KernelConfig(NONFINITE_HEADS, s.p, s.n, s.R, 1, s.n // 4, TILE_ROWS // s.R, s.norm) for s in test_nonfinite.SIZES
    ]
    jobs = [(make, config) for config in configs for make in (*FORWARD_MAKERS, *BACKWARD_MAKERS)]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(min(len(jobs), multiprocessing.cpu_count()), maxtasksperchild=1) as pool:
        pool.map(_compile, jobs)
    print(f"\ncompiled {len(jobs)} kernels in parallel in {time.perf_counter() - start:.0f} s")
