"""The TileLang kernels fit Hopper's shared memory at the largest supported sizes (n = p = 128 with every
pair rotated, rope_fraction 1.0, and the layer's prep), for each rank, unpacked and with `cu_seqlens`
documents: lowered on the CPU (no device compile), their dynamic shared memory read from the lowered
kernel. A kernel over the limit would fail at its first launch (and one that does not lower, here). And
`chunk_walk`, where it runs (p = 64), fits as many blocks per SM as it is compiled for, as do `chunk_output`
and `chunk_dy` there."""

import pytest

tilelang = pytest.importorskip("tilelang")

from megatron_mamba3.ops.tilelang import backward_kernels, kernels  # noqa: E402
from megatron_mamba3.ops.tilelang.build import lower_kernel, shared_memory_bytes  # noqa: E402
from megatron_mamba3.ops.tilelang.function import TILE_ROWS  # noqa: E402

SHARED_MEMORY_LIMIT = 227 * 1024  # bytes per block an H100 / H200 kernel may opt in to
SM_SHARED_MEMORY = 228 * 1024  # bytes per SM, shared by its resident blocks
BLOCK_RESERVED = 1024  # bytes the system keeps per resident block


def assert_blocks_fit(make, config, blocks: int) -> None:
    """`blocks` blocks of the kernel `make(config)` (its lowered shared memory plus what the system keeps per block)
    fit one SM's shared memory."""
    size = shared_memory_bytes(lower_kernel(make, config))
    assert blocks * (size + BLOCK_RESERVED) <= SM_SHARED_MEMORY, f"{config}: {blocks} blocks of {size} bytes"


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "cu_seqlens"])
@pytest.mark.parametrize("R", [1, 2, 4])
def test_largest_config_fits_shared_memory(R, packed):
    n = p = 128
    config = kernels.KernelConfig(
        H=8, p=p, n=n, R=R, G=1, S=n // 2, Q=TILE_ROWS // R, norm=True, A_floor=1e-4, packed=packed
    )
    makers = (*kernels.MAKERS, *backward_kernels.MAKERS)
    used = {make.__name__: shared_memory_bytes(lower_kernel(make, config)) for make in makers}
    over = {name: size for name, size in used.items() if size > SHARED_MEMORY_LIMIT}
    assert not over, f"{config}: over {SHARED_MEMORY_LIMIT} bytes of shared memory: {over} (all: {used})"


@pytest.mark.parametrize("rotated", [0.5, 1.0], ids=["half-rotated", "all-rotated"])
@pytest.mark.parametrize("n", [64, 128])
@pytest.mark.parametrize("R", [1, 2, 4])
def test_walk_fits_the_blocks_per_sm_it_is_compiled_for(R, n, rotated):
    """At p = 64 (where `function.walks` picks chunk_walk) its shared memory, with the next chunk's inputs
    staged, lets `walk_blocks_per_sm` blocks share an SM: otherwise its registers would be capped for
    blocks that never run beside each other."""
    config = kernels.KernelConfig(
        H=8, p=64, n=n, R=R, G=1, S=int(n * rotated) // 2, Q=TILE_ROWS // R, norm=True, A_floor=1e-4
    )
    assert_blocks_fit(kernels._chunk_walk, config, kernels.walk_blocks_per_sm(config))


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "cu_seqlens"])
@pytest.mark.parametrize("rotated", [0.5, 1.0], ids=["half-rotated", "all-rotated"])
@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("make", [kernels._chunk_output, backward_kernels._chunk_dy], ids=["chunk_output", "chunk_dy"])
def test_gate_kernels_fit_the_blocks_per_sm_they_are_compiled_for(make, R, rotated, packed):
    """`chunk_output` and `chunk_dy` (with the output norm, the most they hold) at p = 64: their shared memory
    lets `gate_blocks_per_sm` blocks share an SM, or their registers are capped for blocks that never run
    beside each other. At n = 128, the size the kernels are timed at (TileLang's plan is not monotone in the
    tiles' sizes: at R = 2 the half-rotated config takes more than the fully rotated one)."""
    n = 128
    config = kernels.KernelConfig(
        H=8, p=64, n=n, R=R, G=1, S=int(n * rotated) // 2, Q=TILE_ROWS // R, norm=True, A_floor=None, packed=packed
    )
    assert_blocks_fit(make, config, kernels.gate_blocks_per_sm(config))
