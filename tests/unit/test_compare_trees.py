"""The CPU parts of benchmarks/compare_trees.py: the timing processes' command line and environment, the
table of the trees' medians against the base's, and that table from a stopped run's log. The timing itself needs a CUDA GPU and is a benchmark, not a test."""

import json
import os

import pytest

from benchmarks.compare_trees import (
    HOST,
    PEAK,
    TOTAL,
    child_argv,
    child_environment,
    comparison_table,
    main,
    parse_args,
    runs_from_log,
    tree_labels,
)


def test_a_timing_process_parses_its_own_command_line_and_finds_the_tree_first(tmp_path, monkeypatch):
    argv = child_argv(["siso8", "mimo1"], repeats=7)
    args = parse_args(argv[2:])  # without the interpreter and the script
    assert args.child == ["siso8", "mimo1"] and args.repeats == 7 and args.trees == []
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    assert child_environment(tmp_path)["PYTHONPATH"] == os.pathsep.join([str(tmp_path), "/somewhere"])


def test_the_trees_must_hold_the_package(tmp_path):
    (tmp_path / "a" / "megatron_mamba3").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    with pytest.raises(SystemExit):
        parse_args([str(tmp_path / "a"), str(tmp_path / "b")])
    (tmp_path / "b" / "megatron_mamba3").mkdir()
    assert len(parse_args([str(tmp_path / "a"), str(tmp_path / "b")]).trees) == 2


def _result(dqkv, dy, peak):
    split = {"chunk_dqkv": dqkv, "chunk_dy": dy}
    return {"siso8": {**split, TOTAL: dqkv + dy, PEAK: peak}}


def test_comparison_table_takes_each_trees_median_and_the_difference():
    runs = {
        "main": [_result(1.8, 0.5, 1098), _result(1.9, 0.6, 1098), _result(2.5, 0.5, 1098)],
        "branch": [_result(1.6, 0.55, 1034), _result(1.7, 0.55, 1034), _result(1.7, 0.9, 1034)],
    }
    lines = comparison_table(runs, ["siso8"])
    assert lines[0] == "| shape | kernel | main | branch | branch − main |"
    assert lines[2:] == [
        "| siso8 | chunk_dqkv | 1.900 | 1.700 | -0.200 |",  # medians: 1.9 and 1.7; the kernels by main's time
        "| siso8 | chunk_dy | 0.500 | 0.550 | +0.050 |",
        "| siso8 | total | 2.500 | 2.250 | -0.250 |",
        "| siso8 | peak MiB | 1098 | 1034 | -64 |",
    ]


def test_the_host_time_has_its_row_where_the_runs_have_it():
    with_host = lambda dqkv, host: {"siso8": {**_result(dqkv, 0.5, 1098)["siso8"], HOST: host}}  # noqa: E731
    runs = {"main": [with_host(1.8, 2.0), with_host(1.8, 3.0)], "branch": [with_host(1.7, 1.5), with_host(1.7, 1.6)]}
    lines = comparison_table(runs, ["siso8"])
    assert lines[-3:] == [
        "| siso8 | total | 2.300 | 2.200 | -0.100 |",  # the host's time is not a kernel: not in the total
        "| siso8 | host ms | 2.500 | 1.550 | -0.950 |",
        "| siso8 | peak MiB | 1098 | 1098 | +0 |",
    ]
    older = {"main": [_result(1.8, 0.5, 1098)], "b": [_result(1.7, 0.5, 1098)]}  # a log from before the host rows
    assert not any(HOST in line for line in comparison_table(older, ["siso8"]))


def test_every_other_tree_is_compared_with_the_base():
    runs = {"main": [_result(1.8, 0.5, 1098)], "a": [_result(1.6, 0.5, 1034)], "b": [_result(2.0, 0.4, 1098)]}
    lines = comparison_table(runs, ["siso8"])
    assert lines[:2] == ["| shape | kernel | main | a | a − main | b | b − main |", "|---|---|---|---|---|---|---|"]
    assert lines[2] == "| siso8 | chunk_dqkv | 1.800 | 1.600 | -0.200 | 2.000 | +0.200 |"
    assert lines[-1] == "| siso8 | peak MiB | 1098 | 1034 | -64 | 1098 | +0 |"


def test_labels_are_the_folder_names_unless_two_are_the_same(tmp_path):
    assert tree_labels([tmp_path / "main", tmp_path / "x" / "comb"]) == ["main", "comb"]
    assert tree_labels([tmp_path / "a" / "src", tmp_path / "b" / "src", tmp_path / "c"]) == ["T0", "T1", "T2"]


def test_the_table_of_a_stopped_run_comes_from_its_printed_rounds(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text("\n".join([
        "compiling ...",
        f"round 1: main {json.dumps(_result(1.8, 0.5, 1098))}",
        f"round 1: branch {json.dumps(_result(1.6, 0.5, 1034))}",
        f"round 2: main {json.dumps(_result(2.0, 0.5, 1098))}",  # the run stopped before branch's second round
    ]))
    assert runs_from_log(log.read_text().splitlines()) == {
        "main": [_result(1.8, 0.5, 1098), _result(2.0, 0.5, 1098)], "branch": [_result(1.6, 0.5, 1034)]
    }
    main(["--table", str(log)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "| shape | kernel | main | branch | branch − main |"
    assert printed[2] == "| siso8 | chunk_dqkv | 1.900 | 1.600 | -0.300 |"  # main's median of 1.8 and 2.0
    with pytest.raises(SystemExit, match="rounds of 1 tree"):
        log.write_text(f"round 1: main {json.dumps(_result(1.8, 0.5, 1098))}")
        main(["--table", str(log)])
