"""The TileLang build helpers: the compile job's command line and the parallel prebuild's handling of a
process that fails (logged; the in-process build then raises), without TileLang; the target the kernels are
compiled for (TileLang's target type); the marker of a config prebuilt into the cache, which a later prebuild
skips."""

import ast
import logging
import sys
from pathlib import Path

import pytest

from megatron_mamba3.ops.tilelang import build

CONFIG = (32, 64, 128, 4, 1, 32, 16, True, 1e-4)  # H, p, n, R, G, S, Q, norm, A_floor as a KernelConfig holds them


def test_job_command_line_round_trips():
    argv = build.job_argv("megatron_mamba3.ops.tilelang.kernels", "_chunk_state", CONFIG)
    assert argv[1:3] == ["-m", "megatron_mamba3.ops.tilelang.build"]
    assert build.parse_job(argv[3:]) == ("megatron_mamba3.ops.tilelang.kernels", "_chunk_state", CONFIG)


@pytest.mark.parametrize(
    "argv",
    [
        ["os", "_chunk_state", repr(CONFIG)],
        ["megatron_mamba3.ops.tilelang.kernels", "x", "1"],
        ["megatron_mamba3.ops.tilelang.kernels", "x", "(1,"],
        ["megatron_mamba3.ops.tilelang.kernels", "x", *map(str, CONFIG)],
    ],
)
def test_job_rejects_what_is_not_a_kernel_job(argv):
    with pytest.raises(ValueError, match="not a kernel job"):
        build.parse_job(argv)


def make():
    pass


@pytest.fixture
def cache_dir(monkeypatch, tmp_path):
    """TileLang's cache folder in tmp_path, and one stand-in kernel maker."""
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "_makers", lambda: [("not.a.kernel.module", make)])
    monkeypatch.setattr(build, "_prebuilt", set())
    return tmp_path


def test_failed_compile_process_is_logged_not_raised(cache_dir, caplog):
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert build.prebuild([CONFIG]) == 1
    assert "parallel compile of ['not.a.kernel.module', 'make'" in caplog.text
    assert "not a kernel job" in caplog.text
    assert CONFIG in build._prebuilt


def test_a_failed_config_is_not_marked_prebuilt(cache_dir):
    pytest.importorskip("tilelang")
    assert build.prebuild([CONFIG]) == 1
    assert not build.prebuilt_marker(CONFIG).exists()
    assert build.prebuild([CONFIG]) == 1  # tried again


def test_a_config_prebuilt_into_the_cache_is_not_compiled_again(cache_dir, monkeypatch):
    pytest.importorskip("tilelang")
    monkeypatch.setattr(build, "job_argv", lambda module, maker, config: [sys.executable, "-c", "pass"])
    other = CONFIG[:-1] + (None,)
    assert build.prebuild([CONFIG]) == 1
    marker = build.prebuilt_marker(CONFIG)
    assert marker.exists() and marker.parent.parent == cache_dir
    assert build.prebuild([CONFIG, other]) == 1  # only the config not prebuilt before
    assert build.prebuild([other, CONFIG]) == 0
    monkeypatch.setattr(build, "_sources_digest", lambda: "other kernel sources")
    assert build.prebuilt_marker(CONFIG) != marker
    assert build.prebuild([CONFIG]) == 1


def test_prebuild_markers_hash_the_kernel_sources_alone():
    """A host-side edit (function.py, the PyTorch forms) leaves the markers of unchanged kernels valid."""
    here = Path(build.__file__).parent
    sources = build.kernel_sources()
    assert sources == sorted(here / name for name in ("backward_kernels.py", "build.py", "kernels.py"))
    # ...which is all of the package the kernels are made of: their modules import nothing else of it
    imported = {
        node.module for path in sources for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_mamba3")
    }
    assert imported <= {f"megatron_mamba3.ops.tilelang.{path.stem}" for path in sources}, imported


@pytest.mark.parametrize("cuda, capability, hopper", [(False, None, True), (True, (9, 0), True), (True, (8, 0), False)])
def test_kernels_are_compiled_for_hopper_by_name_unless_the_gpu_is_another(monkeypatch, cuda, capability, hopper):
    """Named in full without a GPU too, so that kernels compiled ahead on a CPU machine have the cache keys an
    H100 / H200 looks up (benchmarks/precompile.py)."""
    pytest.importorskip("tilelang")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: capability)
    target = build.kernel_target()
    if hopper:
        assert target.kind.name == "cuda" and str(target.attrs["arch"]) == "sm_90a"
    else:
        assert target == "cuda"
