"""Mamba3Mixer tensor parallelism over NCCL on GPUs: parity with TP = 1, replicated weights, and a
distributed checkpoint saved at TP > 1 and loaded at TP = 1.

    torchrun --nproc-per-node 2 tests/multigpu/tp_parity.py [--tp 1 2] [--backend auto]

(`--device cpu` runs the same checks on gloo processes at small sizes, to check the script itself.)

Every TP size in --tp (each must divide the number of processes; data-parallel replicas repeat the
same work) runs three checks; rank 0 prints one table and the script exits 1 if any row fails.

- parity: SISO and MIMO R=4 mixers (--mimo-ranks) with g = 1 and g = the largest TP size
  (--groups), with and without sequence parallelism, in bf16 on the chosen backend ("auto" picks
  TileLang on CUDA). The oracle is the TP = 1 module in fp32 on the reference backend. Bound, per
  tensor (output, input gradient, every parameter gradient gathered to full shape): error <= 2 x
  the TP = 1 bf16 run's own error against that oracle.
- replicas (TP > 1): a mixer initialised by Megatron on the CPU (`use_cpu_initialization`, then
  moved to the GPU) and one initialised on the GPU (the model-parallel CUDA RNG seeded) hold
  bit-identical replicated weights (in_proj's replicated rows, B_norm, C_norm) on every TP rank
  after construction, and bit-identical gradients for them after a backward.
- checkpoint (the smallest TP > 1): a fp32 mixer saves a Megatron distributed checkpoint; at TP = 1
  a freshly built mixer loads it: every tensor equals the saved weights bit for bit, and its output
  equals that of a TP = 1 mixer given the same weights directly, bit for bit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_mamba3 import receipts  # noqa: E402
from megatron_mamba3.parallel import REPLICATED, REPLICATED_IN_PROJ, unshard_mixer_state  # noqa: E402
from tests.distributed.mixers import (  # noqa: E402
    MixerCase,
    build_mixer,
    forward_backward,
    full_weights,
    gathered,
    inputs,
    load_full,
)
from tests.helpers import rel_err  # noqa: E402

SIZES = dict(d_model=1024, headdim=64, d_state=128, length=2048, batch=2, chunk_size=None)  # H = 32
BOUND_MULTIPLE = 2.0
SEED = 1234
SMALL = dict(d_model=64, headdim=8, d_state=16, length=32, batch=2, chunk_size=8)  # --device cpu; H = 16
DEVICE = {"name": "cuda"}  # set by main
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _init_parallel(tp: int) -> None:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(SEED)


def _synchronize() -> None:
    if DEVICE["name"] == "cuda":
        torch.cuda.synchronize()


def _run(case: MixerCase, tp: int, sequence_parallel: bool, dtype: torch.dtype, backend: str) -> dict:
    mixer = build_mixer(case.config, tp, sequence_parallel, params_dtype=dtype, device=DEVICE["name"], backend=backend)
    load_full(mixer, full_weights(mixer.mamba3))
    _synchronize()
    start = time.perf_counter()
    result = forward_backward(mixer, case, sequence_parallel, dtype)
    _synchronize()
    result["seconds"] = time.perf_counter() - start
    return result


def _first_tp_group(result: dict, tp: int) -> list[dict] | None:
    """Every rank's result on rank 0 (global ranks 0..tp-1 form the first TP group)."""
    everything = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(result, everything, dst=0)
    return everything[:tp] if everything is not None else None


def _errors(ranks: list[dict], case: MixerCase, sequence_parallel: bool, oracle: dict) -> dict[str, float]:
    errors = {key: rel_err(gathered(ranks, key, sequence_parallel), oracle[key]) for key in ("out", "u_grad")}
    grads = unshard_mixer_state([r["grads"] for r in ranks], case.config)
    errors.update({name: rel_err(grad, oracle["grads"][name]) for name, grad in grads.items()})
    return errors


def _parity(cases: list[MixerCase], tp: int, backend: str, oracles: dict, baselines: dict) -> list[tuple]:
    """Rows (check, tp, case, seq-parallel, worst tensor, error, bound, seconds, ok) on rank 0."""
    rows = []
    for case in cases:
        if tp == 1:
            oracles[case] = _first_tp_group(_run(case, 1, False, torch.float32, "reference"), 1)
        for sequence_parallel in (False, True) if tp > 1 else (False,):
            ranks = _first_tp_group(_run(case, tp, sequence_parallel, torch.bfloat16, backend), tp)
            if ranks is None:
                continue
            errors = _errors(ranks, case, sequence_parallel, oracles[case][0])
            if tp == 1:
                baselines[case] = errors
            bounds = {k: BOUND_MULTIPLE * baselines[case][k] for k in errors}
            worst = max(errors, key=lambda k: errors[k] / bounds[k])
            ok = all(errors[k] <= bounds[k] for k in errors)
            rows.append(("parity", tp, case, sequence_parallel, worst, errors[worst], bounds[worst], ranks[0]["seconds"], ok))
    return rows


def _replicas(case: MixerCase, tp: int, backend: str) -> list[tuple]:
    """Replicated weights and their gradients, bit-identical across the TP group, for a mixer
    initialised on the CPU and one initialised on the GPU (no weights loaded)."""
    rows = []
    for cpu_initialization in (True, False) if DEVICE["name"] == "cuda" else (True,):
        start = time.perf_counter()
        mixer = build_mixer(case.config, tp, params_dtype=torch.bfloat16, device=DEVICE["name"], backend=backend,
                            cpu_initialization=cpu_initialization)
        params = dict(mixer.named_parameters())
        names = (*REPLICATED, REPLICATED_IN_PROJ)
        weights = {name: params[name].detach().float().cpu() for name in names}
        grads = forward_backward(mixer, case, False, torch.bfloat16)["grads"]
        ranks = _first_tp_group({"weights": weights, "grads": {name: grads[name] for name in names}}, tp)
        if ranks is None:
            continue
        differing = [
            f"{kind} {name}" for kind in ("weights", "grads") for name in names
            if not all(torch.equal(r[kind][name], ranks[0][kind][name]) for r in ranks[1:])
        ]
        where = "cpu-init" if cpu_initialization else "gpu-init"
        rows.append((f"replicas {where}", tp, case, False, ", ".join(differing) or "-", float(len(differing)), 0.0,
                     time.perf_counter() - start, not differing))
    return rows


def _checkpoint(case: MixerCase, tp: int) -> list[tuple]:
    """Save at `tp`, load at TP = 1 (every rank its own TP = 1 replica), compare bit for bit (fp32,
    reference backend)."""
    backend = "reference"
    start = time.perf_counter()
    folder = [tempfile.mkdtemp(prefix="mamba3_tp_ckpt_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    saved_weights = full_weights(case.config, seed=5)
    _init_parallel(tp)
    mixer = build_mixer(case.config, tp, device=DEVICE["name"], backend=backend)
    load_full(mixer, saved_weights)
    dist_checkpointing.save(mixer.sharded_state_dict(prefix="mixer."), folder[0])
    parallel_state.destroy_model_parallel()
    _init_parallel(1)
    loaded = build_mixer(case.config, 1, device=DEVICE["name"], backend=backend)
    state = dist_checkpointing.load(loaded.sharded_state_dict(prefix="mixer."), folder[0])
    loaded.load_state_dict({key.removeprefix("mixer."): value for key, value in state.items()})
    direct = build_mixer(case.config, 1, device=DEVICE["name"], backend=backend)
    load_full(direct, saved_weights)
    own = {name: t for name, t in loaded.state_dict().items() if not name.endswith("_extra_state")}
    differing = [name for name, t in own.items() if not torch.equal(t.cpu(), saved_weights[name])]
    differing += sorted(saved_weights.keys() - own.keys())
    u = inputs(case)[0].to(DEVICE["name"])
    with torch.no_grad():
        if not torch.equal(loaded(u)[0], direct(u)[0]):
            differing.append("output")
    parallel_state.destroy_model_parallel()
    ranks = _first_tp_group(differing, dist.get_world_size())
    if ranks is None:
        return []
    differing = sorted({f"rank {rank}: {name}" for rank, names in enumerate(ranks) for name in names})
    return [("checkpoint", f"{tp}->1", case, False, ", ".join(differing) or "-", float(len(differing)), 0.0,
             time.perf_counter() - start, not differing)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--mimo-ranks", type=int, nargs="+", default=[1, 4], help="R of the cases (1 = SISO)")
    parser.add_argument("--groups", type=int, nargs="+", default=None, help="g of the cases (default: 1 and the largest TP)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    DEVICE["name"] = args.device
    groups = args.groups or sorted({1, max(args.tp)})
    sizes = SIZES if args.device == "cuda" else SMALL
    cases = [MixerCase(rank, g, **sizes) for rank in args.mimo_ranks for g in groups]
    for name, value in NVLS_OFF.items():
        os.environ.setdefault(name, value)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        from megatron_mamba3.patches import apply_cpu_patches

        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        apply_cpu_patches()
    world = dist.get_world_size()
    bad = [tp for tp in args.tp if world % tp]
    if bad or 1 not in args.tp:
        raise SystemExit(f"--tp {args.tp}: needs 1 (the baseline) and sizes dividing the {world} processes; bad: {bad}")
    # B/C are replicated at g = 1: the replicas and checkpoint checks take the largest R with g = 1.
    replicated_case = next((c for c in reversed(cases) if c.ngroups == 1), cases[-1])
    rows, oracles, baselines = [], {}, {}
    for tp in sorted(args.tp):
        _init_parallel(tp)
        rows += _parity(cases, tp, args.backend, oracles, baselines)
        if tp > 1:
            rows += _replicas(replicated_case, tp, args.backend)
        parallel_state.destroy_model_parallel()
    larger = [tp for tp in sorted(args.tp) if tp > 1]
    if larger:
        rows += _checkpoint(replicated_case, larger[0])
    failed = any(not row[-1] for row in rows)
    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        print(f"device: {name}  processes: {world}  receipts: "
              f"{sorted({(r.backend, r.variant, str(r.dtype)) for r in receipts()})}")
        print("| check | tp | R | g | seq-parallel | worst tensor / differing | error | bound | s | ok |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for check, tp, case, sp, worst, error, bound, seconds, ok in rows:
            print(f"| {check} | {tp} | {case.mimo_rank} | {case.ngroups} | {sp} | {worst} | {error:.2e} | {bound:.2e} "
                  f"| {seconds:.3f} | {ok} |")
        print("tp_parity: " + ("FAILED" if failed else "all checks passed"))
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
