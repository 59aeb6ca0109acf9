"""Where a tensor-parallel training step's time goes: Mamba-3 layers, other layers, TP communication.

    torchrun --standalone --nproc-per-node 2 benchmarks/tp_profile.py [--warmup 3] [--steps 2] \\
        [--output FILE] <launch/train.py flags, e.g. --device cuda --bf16 --sequence-parallel ...>

Builds the model, optimizer and data with launch/train.py's own functions, runs --warmup steps
(TileLang compiles there), then --steps steps under torch.profiler. Each kernel (on the CPU: each
op's own CPU time) is attributed to the layer whose forward launched it, or whose forward op's
backward launched it (autograd sequence numbers): "mamba3" (Megatron's MambaLayer around the
Mamba-3 mixer), "attention+mlp" (the other decoder layers), "rest" (embedding, output layer, loss,
gradient finalization, optimizer). NCCL kernels count as "tp-comm" wherever they were launched.
Rank 0 prints one line "split: ..." (ms per step and share of the summed kernel time), writes it with
the 15 longest kernels to --output, and reports the wall time of a profiled step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))

import train  # noqa: E402  (launch/train.py)

RANGE = "tp_profile:"


def label_layers(model) -> None:
    """Wrap every decoder layer's forward in a profiler range named after its kind."""
    from megatron.core.ssm.mamba_layer import MambaLayer
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    def enter(module, _inputs):
        module._tp_profile_range = record_function(module._tp_profile_name)
        module._tp_profile_range.__enter__()

    def leave(module, _inputs, _output):
        module._tp_profile_range.__exit__(None, None, None)

    for module in model.modules():
        if isinstance(module, (MambaLayer, TransformerLayer, MLPLayer)):
            module._tp_profile_name = RANGE + ("mamba3" if isinstance(module, MambaLayer) else "attention+mlp")
            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave)


def _ancestors(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def split(events, on_cuda: bool) -> tuple[dict[str, float], dict[str, float]]:
    """(microseconds per category, microseconds per kernel name) over `events` (profiler FunctionEvents)."""
    forward_kind = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::engine"):
            kind = next((a.name[len(RANGE):] for a in _ancestors(event) if a.name.startswith(RANGE)), None)
            if kind is not None:
                forward_kind[event.sequence_nr] = kind
    categories, kernels = defaultdict(float), defaultdict(float)
    for event in events:
        own = [(k.name, k.duration) for k in event.kernels] if on_cuda else [(event.name, event.self_cpu_time_total)]
        if not own:
            continue
        kind = "rest"
        for ancestor in _ancestors(event):
            if ancestor.name.startswith(RANGE):
                kind = ancestor.name[len(RANGE):]
                break
            if ancestor.name.startswith("autograd::engine::evaluate_function") and ancestor.sequence_nr in forward_kind:
                kind = forward_kind[ancestor.sequence_nr]
                break
        for name, duration in own:
            categories["tp-comm" if "nccl" in name.lower() else kind] += duration
            kernels[name] += duration
    return dict(categories), dict(kernels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--output", default=None, help="file for the split and the longest kernels (rank 0)")
    own, rest = parser.parse_known_args()
    args = train.parse_args(rest)
    train.preflight.check_up_front(args)  # sets the TP size from the process count, as train.run does
    train.init_distributed(args)
    model = train.build_model(args)
    wrapped, optimizer, _ = train.build_optimizer(args, model)
    data = train.build_data(args)
    label_layers(model)
    device, on_cuda = torch.device(args.device), args.device == "cuda"

    def step(index: int) -> None:
        train.train_step(wrapped, optimizer, data.batch(index).tokens.to(device), None)
        if on_cuda:
            torch.cuda.synchronize()

    for index in range(own.warmup):
        step(index)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        for index in range(own.warmup, own.warmup + own.steps):
            step(index)
        wall_ms = (time.perf_counter() - began) * 1e3 / own.steps
    categories, kernels = split(prof.events(), on_cuda)
    if dist.get_rank() == 0:
        total = sum(categories.values())
        line = "split: " + " | ".join(
            f"{kind} {us / 1e3 / own.steps:.1f} ms ({100 * us / total:.0f}%)" for kind, us in sorted(categories.items())
        ) + f" | summed {'kernels' if on_cuda else 'CPU ops'} {total / 1e3 / own.steps:.1f} ms, wall {wall_ms:.1f} ms per step"
        longest = sorted(kernels.items(), key=lambda item: -item[1])[:15]
        table = "\n".join(f"{us / 1e3 / own.steps:9.2f} ms  {name[:150]}" for name, us in longest)
        print(line, flush=True)
        if own.output:
            with open(own.output, "w") as file:
                file.write(f"{' '.join(sys.argv)}\n{line}\n\nlongest, ms per step:\n{table}\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
