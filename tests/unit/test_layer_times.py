"""launch/layer_times.py (`train.py --layer-times`): each layer kind's forward and backward time per step.

- Oracle: a stack of layers that sleep known times in their forward and in their backward (inside a
  residual branch, as Megatron's layers are built, so the input's gradient is complete only after the
  whole layer), with known sleeps outside the layers ("rest"). Each kind's measured forward and
  backward ms per step lie within [slept, slept + SLACK_MS per layer]; rest likewise.
- A layer run twice in a step (as activation recomputation would) and a step without backward are
  refused, naming the layer; a run too short for the warm-up is refused naming --train-iters.
- launch/train.py on the CPU (one process, `MM*-M-`, 4 steps): the table lists every kind with its
  count, positive times and shares summing to 100 within rounding; the losses equal a run without
  the flag bit for bit, and its other output lines are the same but for the figures.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import LAUNCH, launch_module

layer_times = launch_module("layer_times")

SLEEPS_MS = {"M": (20, 50), "*": (40, 10), "-": (5, 30)}  # kind: (forward, backward) per layer
REST_MS = (10, 15)  # before the stack, in the loss's backward
PATTERN = "M*M-"
SLACK_MS = 10  # sleep overshoot and the layers' own work, per layer and step (a loaded 2-core machine)
ROW = re.compile(r"^(\S+(?: \S+)?) +(\d+|-) +(-?[\d.]+|-) +(-?[\d.]+|-) +(-?[\d.]+) +(-?[\d.]+)$")


class SleepInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, milliseconds):
        ctx.milliseconds = milliseconds
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.milliseconds / 1e3)
        return grad, None


class SleepyLayer(torch.nn.Module):
    """hidden + f(hidden), sleeping `forward_ms` in forward and `backward_ms` in f's backward."""

    def __init__(self, forward_ms: float, backward_ms: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.forward_ms, self.backward_ms = forward_ms, backward_ms

    def forward(self, hidden_states):
        time.sleep(self.forward_ms / 1e3)
        return hidden_states + SleepInBackward.apply(hidden_states * self.weight, self.backward_ms)


def toy_stack():
    return [(symbol, SleepyLayer(*SLEEPS_MS[symbol])) for symbol in PATTERN]


def toy_step(layers, leaf) -> float:
    began = time.perf_counter()
    hidden = leaf * 2
    time.sleep(REST_MS[0] / 1e3)
    for _, layer in layers:
        hidden = layer(hidden_states=hidden)
    SleepInBackward.apply(hidden, REST_MS[1]).sum().backward()
    return time.perf_counter() - began


def rows(lines: list[str]) -> dict[str, tuple]:
    """Table lines -> {kind: (layers, forward, backward, total, share)} (floats; None for '-')."""
    parsed = {}
    for line in lines[2:]:
        kind, *fields = ROW.match(line).groups()
        parsed[kind] = tuple(None if field == "-" else float(field) for field in fields)
    return parsed


def test_times_match_the_sleeps():
    layers, leaf = toy_stack(), torch.ones(8, requires_grad=True)
    timer = layer_times.LayerTimes(layers, on_cuda=False, steps=range(1, 5))
    for _ in range(4):
        timer.end_step(toy_step(layers, leaf))
    lines = timer.table()
    assert re.fullmatch(r"layer times over steps 3-4 \(2 steps, mean step [\d.]+ ms\)", lines[0]), lines[0]
    table = rows(lines)
    assert list(table) == ["Mamba-3 (M)", "attention (*)", "MLP (-)", "rest"], lines
    for kind, symbol in (("Mamba-3 (M)", "M"), ("attention (*)", "*"), ("MLP (-)", "-")):
        count, forward, backward, total, _ = table[kind]
        assert count == PATTERN.count(symbol)
        for measured, slept in ((forward, SLEEPS_MS[symbol][0]), (backward, SLEEPS_MS[symbol][1])):
            assert count * slept <= measured <= count * (slept + SLACK_MS), (kind, lines)
        assert total == pytest.approx(forward + backward, abs=0.011)
    rest = table["rest"][3]
    assert sum(REST_MS) <= rest <= sum(REST_MS) + SLACK_MS, lines
    assert sum(row[4] for row in table.values()) == pytest.approx(100, abs=0.25)


def test_a_layer_run_twice_or_without_backward_is_refused():
    layers, leaf = toy_stack(), torch.ones(8, requires_grad=True)
    timer = layer_times.LayerTimes(layers, on_cuda=False, steps=range(1, 5))
    layers[1][1](hidden_states=leaf * 2)  # an extra forward of layer 2, as a recomputation would run
    toy_step(layers, leaf)
    with pytest.raises(RuntimeError, match=r"layer 2 \(attention\) took its forward start timestamp 2 times in step 1"):
        timer.end_step(1.0)
    with torch.no_grad():
        for _, layer in layers:
            layer(hidden_states=leaf)
    with pytest.raises(RuntimeError, match=r"layer 1 \(Mamba-3\) took its backward start timestamp 0 times in step 1"):
        timer.end_step(1.0)


def test_a_run_shorter_than_the_warm_up_is_refused():
    with pytest.raises(SystemExit, match=r"leaves out the first 2 steps of a run and this run has 2 \(steps 7-8\): "
                                         r"raise --train-iters"):
        layer_times.LayerTimes(toy_stack(), on_cuda=False, steps=range(7, 9))


def train_py(tmp_path: Path, name: str, *flags: str) -> tuple[list[str], dict[int, float]]:
    metrics = tmp_path / f"{name}.jsonl"
    run = subprocess.run(
        [sys.executable, str(LAUNCH / "train.py"), "--device", "cpu", "--hybrid-layer-pattern", "MM*-M-",
         "--hidden-size", "32", "--seq-length", "32", "--train-iters", "4", "--metrics-file", str(metrics), *flags],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.splitlines(), {row["step"]: row["loss"] for row in map(json.loads, metrics.read_text().splitlines())}


@pytest.mark.distributed
def test_train_py_prints_the_table_and_trains_alike(tmp_path):
    lines, losses = train_py(tmp_path, "timed", "--layer-times")
    plain_lines, plain_losses = train_py(tmp_path, "plain")
    assert losses == plain_losses and sorted(losses) == [1, 2, 3, 4]
    start = next(i for i, line in enumerate(lines) if line.startswith("[train] layer times"))
    table = [line.removeprefix("[train] ") for line in lines[start:]]
    assert re.fullmatch(r"layer times over steps 3-4 \(2 steps, mean step ([\d.]+) ms\)", table[0]), table
    parsed = rows(table)
    assert [(kind, row[0]) for kind, row in parsed.items()] == [
        ("Mamba-3 (M)", 3), ("attention (*)", 1), ("MLP (-)", 2), ("rest", None)], table
    for kind, (_, forward, backward, total, share) in parsed.items():
        assert total > 0 and share > 0 and (kind == "rest" or forward > 0 and backward > 0), table
    assert sum(row[4] for row in parsed.values()) == pytest.approx(100, abs=0.25)
    figures = lambda text: re.sub(r"\d+(\.\d+)?(e[+-]\d+)?", "#", text)  # noqa: E731
    assert list(map(figures, lines[:start])) == list(map(figures, plain_lines))
    assert not any("layer times" in line for line in plain_lines)
