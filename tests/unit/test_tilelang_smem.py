"""The TileLang kernels fit Hopper's shared memory at the largest supported sizes (n = p = 128 with every
pair rotated, rope_fraction 1.0, and the layer's prep), for each rank, unpacked and with `cu_seqlens`
documents: lowered on the CPU (no device compile), their dynamic shared memory read from the lowered
kernel. A kernel over the limit would fail at its first launch (and one that does not lower, here)."""

import pytest

tilelang = pytest.importorskip("tilelang")

from tilelang import tvm  # noqa: E402

from megatron_mamba3.ops.tilelang import backward_kernels, kernels  # noqa: E402
from megatron_mamba3.ops.tilelang.build import pass_configs  # noqa: E402
from megatron_mamba3.ops.tilelang.function import TILE_ROWS  # noqa: E402

SHARED_MEMORY_LIMIT = 227 * 1024  # bytes per block an H100 / H200 kernel may opt in to


def _shared_memory(make, config) -> int:
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    with tvm.transform.PassContext(opt_level=3, config=pass_configs()), target:
        lowered = tilelang.lower(make(config), target=target, enable_device_compile=False)
    (function,) = lowered.device_mod.functions.values()
    return int(function.attrs.get("dyn_shared_memory_buf", 0))


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "cu_seqlens"])
@pytest.mark.parametrize("R", [1, 2, 4])
def test_largest_config_fits_shared_memory(R, packed):
    n = p = 128
    config = kernels.KernelConfig(
        H=8, p=p, n=n, R=R, G=1, S=n // 2, Q=TILE_ROWS // R, norm=True, A_floor=1e-4, packed=packed
    )
    used = {make.__name__: _shared_memory(make, config) for make in (*kernels.MAKERS, *backward_kernels.MAKERS)}
    over = {name: size for name, size in used.items() if size > SHARED_MEMORY_LIMIT}
    assert not over, f"{config}: over {SHARED_MEMORY_LIMIT} bytes of shared memory: {over} (all: {used})"
