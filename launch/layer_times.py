"""Each layer kind's share of a training step: `launch/train.py --layer-times`.

Every layer of the model's hybrid stack (Megatron's `HybridStack`, one symbol of
--hybrid-layer-pattern each) gets four timestamps per step: its forward starts and ends (module
forward pre-hook and hook), the gradient of its output is complete, which is when its backward
starts, and the gradient of its input is complete, which is when its backward ends (hooks on those
two tensors, the `hidden_states` of shape (l, b, hidden); `nn.Module`'s full backward hooks see only
positional inputs, and the stack passes its layers keyword arguments). On CUDA the timestamps are
CUDA events on the current stream, read after train.py's end-of-step synchronize (no host
synchronization per layer); on the CPU they are `time.perf_counter()`. The first `WARMUP` steps of a
run are left out (TileLang compiles, allocator and caches warm up). At the end rank 0 prints:

    layer times over steps 3-12 (10 steps, mean step 120.3 ms)
    kind             layers  forward ms  backward ms  total ms  share %
    Mamba-3 (M)           4       10.21        30.12     40.33     33.5
    ...
    rest                  -           -            -     20.00     16.6

in ms per step; "rest" is train.py's step time (host wall clock up to that synchronize) minus the
layers: batch, embedding, output layer and loss, gradient finalization, optimizer. A layer whose
timestamp is taken other than exactly once in a step (a forward recomputed in backward, a layer
skipped) stops the run naming it, instead of printing wrong figures.
"""

from __future__ import annotations

import time

import torch

WARMUP = 2  # steps of each run left out
KINDS = {"M": "Mamba-3", "*": "attention", "-": "MLP", "E": "MoE"}  # pattern symbol -> name, in table order
PHASES = ("forward start", "forward end", "backward start", "backward end")
FORWARD_START, FORWARD_END, BACKWARD_START, BACKWARD_END = range(len(PHASES))


def hybrid_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(pattern symbol, layer module) of each layer of `model`'s hybrid stack, in order."""
    from megatron.core.models.hybrid.hybrid_block import HybridStack

    (stack,) = [module for module in model.modules() if isinstance(module, HybridStack)]
    return list(zip(stack.layer_type_list, stack.layers))


class LayerTimes:
    """Forward and backward time of each layer in `layers` ((symbol, module) pairs whose forward takes
    `hidden_states=` and returns it, or a tuple starting with it), over the 1-based training steps
    `steps` but their first `WARMUP`. Call `end_step` after each step (after a CUDA synchronize), then
    `table`."""

    def __init__(self, layers: list[tuple[str, torch.nn.Module]], on_cuda: bool, steps: range):
        if len(steps) <= WARMUP:
            raise SystemExit(f"--layer-times leaves out the first {WARMUP} steps of a run and this run has "
                             f"{len(steps)} (steps {steps.start}-{steps.stop - 1}): raise --train-iters")
        self.symbols = [symbol for symbol, _ in layers]
        self.on_cuda = on_cuda
        self.steps = steps
        self.stamps = [[torch.cuda.Event(enable_timing=True) if on_cuda else 0.0 for _ in PHASES] for _ in layers]
        self.taken = [[0] * len(PHASES) for _ in layers]
        self.ended = 0  # steps ended so far
        self.layer_ms = [[0.0, 0.0] for _ in layers]  # forward, backward: summed over the measured steps
        self.step_ms = 0.0
        for index, (_, layer) in enumerate(layers):
            layer.register_forward_pre_hook(self._forward_start_hook(index), with_kwargs=True)
            layer.register_forward_hook(self._forward_end_hook(index))

    def _stamp(self, index: int, phase: int) -> None:
        self.taken[index][phase] += 1
        if self.on_cuda:
            self.stamps[index][phase].record()
        else:
            self.stamps[index][phase] = time.perf_counter()

    def _forward_start_hook(self, index: int):
        def hook(_module, _args, kwargs):
            self._stamp(index, FORWARD_START)
            hidden = kwargs["hidden_states"]
            if hidden.requires_grad:  # otherwise no backward end: end_step says so
                hidden.register_hook(lambda _grad: self._stamp(index, BACKWARD_END))

        return hook

    def _forward_end_hook(self, index: int):
        def hook(_module, _args, output):
            self._stamp(index, FORWARD_END)
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.requires_grad:
                hidden.register_hook(lambda _grad: self._stamp(index, BACKWARD_START))

        return hook

    def _ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.on_cuda else (end - start) * 1e3

    def end_step(self, step_seconds: float) -> None:
        """Close a step that took `step_seconds` (wall clock): add its layer times unless it is a warm-up
        step. RuntimeError naming the layer when a timestamp was not taken exactly once."""
        taken, self.taken = self.taken, [[0] * len(PHASES) for _ in self.symbols]
        for index, counts in enumerate(taken):
            for phase, count in enumerate(counts):
                if count != 1:
                    raise RuntimeError(
                        f"--layer-times: layer {index + 1} ({KINDS[self.symbols[index]]}) took its {PHASES[phase]} "
                        f"timestamp {count} times in step {self.steps[self.ended]}, not once (recomputed or skipped), "
                        f"so its times would be wrong")
        self.ended += 1
        if self.ended <= WARMUP:
            return
        self.step_ms += step_seconds * 1e3
        for sums, stamps in zip(self.layer_ms, self.stamps):
            sums[0] += self._ms(stamps[FORWARD_START], stamps[FORWARD_END])
            sums[1] += self._ms(stamps[BACKWARD_START], stamps[BACKWARD_END])

    def table(self) -> list[str]:
        """The lines of the table (ms per measured step; see the module docstring)."""
        measured = self.ended - WARMUP
        step = self.step_ms / measured
        lines = [f"layer times over steps {self.steps[WARMUP]}-{self.steps[self.ended - 1]} ({measured} steps, "
                 f"mean step {step:.1f} ms)",
                 f"{'kind':<15} {'layers':>7} {'forward ms':>11} {'backward ms':>12} {'total ms':>9} {'share %':>8}"]
        rest = step
        for symbol, name in KINDS.items():
            members = [self.layer_ms[i] for i, s in enumerate(self.symbols) if s == symbol]
            if members:
                forward, backward = (sum(sums[k] for sums in members) / measured for k in (0, 1))
                rest -= forward + backward
                lines.append(f"{f'{name} ({symbol})':<15} {len(members):>7} {forward:>11.2f} {backward:>12.2f} "
                             f"{forward + backward:>9.2f} {100 * (forward + backward) / step:>8.1f}")
        lines.append(f"{'rest':<15} {'-':>7} {'-':>11} {'-':>12} {rest:>9.2f} {100 * rest / step:>8.1f}")
        return lines
