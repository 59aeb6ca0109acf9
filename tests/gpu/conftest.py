"""Compile every TileLang kernel the GPU tests use in parallel processes first (into TileLang's disk
cache), so the tests load them instead of compiling ~35 kernels one after another."""

import importlib.util
import time

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def prebuilt_kernels():
    if not torch.cuda.is_available() or importlib.util.find_spec("tilelang") is None:
        return
    from megatron_mamba3.ops.tilelang.build import prebuild
    from megatron_mamba3.ops.tilelang.function import TILE_ROWS
    from megatron_mamba3.ops.tilelang.kernels import KernelConfig
    from tests.gpu import test_nonfinite, test_tilelang_kernels
    from tests.nonfinite import H as NONFINITE_HEADS

    configs = [
        KernelConfig(test_tilelang_kernels.HEADS, p, n, R, G, n // 4, TILE_ROWS // R, norm)
        for n, p, R, G, norm in test_tilelang_kernels.CONFIGS
    ] + [
        KernelConfig(NONFINITE_HEADS, s.p, s.n, s.R, 1, s.n // 4, TILE_ROWS // s.R, s.norm) for s in test_nonfinite.SIZES
    ]
    start = time.perf_counter()
    count = prebuild(configs)
    print(f"\ncompiled {count} kernels in parallel in {time.perf_counter() - start:.0f} s")
