"""The CPU arithmetic of benchmarks/kernel_resources.py: reading ptxas's report and the kernel's launch bounds,
and the blocks per SM Hopper's limits allow (checked against what ncu reported for the same kernels). The
compile itself needs nvcc and is a benchmark, not a test."""

import pytest

from benchmarks.kernel_resources import Usage, blocks_per_sm, launch_bounds, parse_ptxas

# ptxas --verbose for one kernel, as CUDA 13.0 prints it (spilling, and not).
SPILLING = """ptxas info    : Compiling entry function 'chunk_dqkv_kernel' for 'sm_90a'
ptxas info    : Function properties for chunk_dqkv_kernel
    96 bytes stack frame, 92 bytes spill stores, 88 bytes spill loads
ptxas info    : Used 128 registers, used 3 barriers, 96 bytes cumulative stack size
"""
CLEAN = """ptxas info    : Function properties for state_pass_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 2048 bytes smem
"""


def test_parse_ptxas_reads_registers_spills_and_static_shared_memory():
    assert parse_ptxas(SPILLING) == Usage(128, 92, 88, 0)
    assert parse_ptxas(CLEAN) == Usage(80, 0, 0, 2048)
    with pytest.raises(ValueError, match="no register count"):
        parse_ptxas("ptxas fatal   : Unresolved extern function")


def test_launch_bounds_with_and_without_a_block_minimum():
    assert launch_bounds('extern "C" __global__ void __launch_bounds__(256, 3) chunk_dy_kernel(') == (256, 3)
    assert launch_bounds('extern "C" __global__ void __launch_bounds__(128) state_pass_kernel(') == (128, 1)
    with pytest.raises(ValueError, match="__launch_bounds__"):
        launch_bounds("__global__ void k(")


@pytest.mark.parametrize(
    "threads,registers,shared,expected",
    [
        # MIMO R4 p64 n128 kernels with the registers and shared memory this benchmark found for them
        # (benchmarks/README.md), against the blocks per SM ncu reported on an H100: chunk_dqkv 1 (8 warps),
        # chunk_output 3 (24 warps), chunk_state 4 (32 warps).
        (256, 220, 161 * 1024, {"registers": 1, "shared": 1, "threads": 8, "blocks": 32, "all": 1}),
        (256, 78, 65 * 1024, {"registers": 3, "shared": 3, "threads": 8, "blocks": 32, "all": 3}),
        (256, 62, 41 * 1024, {"registers": 4, "shared": 5, "threads": 8, "blocks": 32, "all": 4}),
        # registers go per warp in units of 256: 33 registers take 40 per thread, 65,536 / (4 · 32 · 40) = 12.8
        (128, 33, 0, {"registers": 12, "shared": 228, "threads": 16, "blocks": 32, "all": 12}),
    ],
)
def test_blocks_per_sm_by_each_limit(threads, registers, shared, expected):
    assert blocks_per_sm(threads, registers, shared) == expected
