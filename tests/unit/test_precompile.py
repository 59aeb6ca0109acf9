"""benchmarks/precompile.py's CPU parts: which kernel configs it compiles, its command line and the tarball.
The compile itself needs TileLang and nvcc (run by hand; a device call's compile log shows the cache hits)."""

import tarfile

import pytest

from benchmarks import precompile
from benchmarks.precompile import module_configs, pack, parse_args, shape_configs

pytest.importorskip("tilelang")


def test_shape_configs_are_the_ones_the_bench_shapes_run():
    # (H, p, n, R, G, S, Q, norm, A_floor, packed, deterministic): bench_kernels' p = 64, n = 128, g = 1,
    # rope_fraction 0.5
    assert shape_configs(["siso8", "mimo8", "siso1"]) == [
        (32, 64, 128, 1, 1, 32, 64, False, None, False, False),
        (32, 64, 128, 4, 1, 32, 16, False, None, False, False),
        (8, 64, 128, 1, 1, 32, 64, False, None, False, False),
    ]


def test_test_configs_are_read_from_the_modules(tmp_path):
    module = tmp_path / "test_some_kernels.py"
    module.write_text(  # a dataclass, as tests/conformance/targets.py has, needs the module registered
        "from __future__ import annotations\nimport dataclasses\n@dataclasses.dataclass\nclass Case:\n    b: int\n"
        "TILELANG_KERNELS = [(4, 64, 128, 1, 1, 32, 64, False, None), (4, 64, 64, 4, 1, 16, 16, True, 0.5)]\n"
    )
    (tmp_path / "test_none.py").write_text("X = 1\n")
    assert module_configs([module, tmp_path / "test_none.py"]) == [
        (4, 64, 128, 1, 1, 32, 64, False, None), (4, 64, 64, 4, 1, 16, 16, True, 0.5)
    ]


def test_the_tarball_holds_the_cache_folders_contents(tmp_path):
    cache = tmp_path / "cache"
    (cache / "0.1.15" / "linux-x86_64" / "kernels" / "abc").mkdir(parents=True)
    (cache / "0.1.15" / "linux-x86_64" / "kernels" / "abc" / "executable.so").write_bytes(b"\x7fELF")
    out = tmp_path / "out" / "tlcache.tar.xz"
    assert pack(cache, out) == out.stat().st_size
    with tarfile.open(out) as tar:
        assert "0.1.15/linux-x86_64/kernels/abc/executable.so" in tar.getnames()


def test_a_kept_cache_folder_is_compiled_into_again_and_packed_whole(tmp_path, monkeypatch):
    compiled = []

    def compile_tree(tree, configs, cache):  # stands in for the tree's compile process: one file per run
        compiled.append((tree, configs, cache))
        (cache / f"kernel{len(compiled)}").write_bytes(b"\x7fELF")
        return 0.0

    monkeypatch.setattr(precompile, "compile_tree", compile_tree)
    cache, out = tmp_path / "cache", tmp_path / "tlcache.tar.xz"
    for _ in range(2):
        precompile.main(["--shapes", "siso1", "--cache", str(cache), "--out", str(out)])
    assert [entry[2] for entry in compiled] == [cache, cache]
    with tarfile.open(out) as tar:  # the second tarball holds the first run's kernel too
        assert sorted(tar.getnames()) == ["kernel1", "kernel2"]
    precompile.main(["--shapes", "siso1", "--out", str(out)])  # without --cache: a fresh folder, gone after
    assert compiled[-1][2] != cache and not compiled[-1][2].exists()
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["kernel3"]


def test_command_line_errors_name_what_is_missing(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--shapes", "--tests"])  # nothing to compile
    with pytest.raises(SystemExit):
        parse_args(["--trees", str(tmp_path)])  # no megatron_mamba3 there
    with pytest.raises(SystemExit):
        parse_args(["--shapes", "siso9"])  # not one of compare_trees' shapes
    (tmp_path / "megatron_mamba3").mkdir()
    assert parse_args(["--trees", str(tmp_path), "--shapes", "mimo1"]).trees == [tmp_path]
