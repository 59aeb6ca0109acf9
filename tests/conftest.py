"""On a machine with CUDA and TileLang: first compile, in parallel processes (into TileLang's disk
cache), every TileLang kernel config that a collected test module lists in `TILELANG_KERNELS`
((H, p, n, R, G, S, Q, norm[, A_floor]) tuples: tests/gpu, tests/conformance), so the tests load ~35 kernels
instead of compiling them one after another. Elsewhere this does nothing."""

import importlib.util
import time

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def prebuilt_kernels(request):
    if not torch.cuda.is_available() or importlib.util.find_spec("tilelang") is None:
        return
    from megatron_mamba3.ops.tilelang.build import prebuild
    from megatron_mamba3.ops.tilelang.kernels import KernelConfig

    modules = {getattr(item, "module", None) for item in request.session.items}
    configs = sorted({KernelConfig(*config) for module in modules for config in getattr(module, "TILELANG_KERNELS", ())}, key=repr)
    if configs:
        start = time.perf_counter()
        count = prebuild(configs)
        print(f"\ncompiled {count} kernels in parallel in {time.perf_counter() - start:.0f} s")
