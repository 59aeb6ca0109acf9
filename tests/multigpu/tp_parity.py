"""Mamba3Mixer tensor-parallel parity over NCCL: TP = 2, 4, 8 against TP = 1, bf16, on GPUs.

    torchrun --nproc-per-node 8 tests/multigpu/tp_parity.py [--tp 1 2 4 8] [--backend auto]

Every TP size in --tp (each must divide the number of processes; data-parallel replicas repeat the
same work) runs SISO and MIMO R=4 mixers with g = 1 and g = 8 (--mimo-ranks, --groups), with and without sequence
parallelism, in bf16 on the chosen backend ("auto" picks TileLang on CUDA). The oracle is the
TP = 1 module in fp32 on the reference backend. Bound, per tensor (output, input gradient, every
parameter gradient gathered to full shape): error <= 2 x the TP = 1 bf16 run's own error against
that oracle. Rank 0 prints a table and exits 1 if any bound fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_mamba3 import receipts  # noqa: E402
from megatron_mamba3.parallel import unshard_mixer_state  # noqa: E402
from tests.distributed.mixers import MixerCase, build_mixer, forward_backward, full_weights, gathered, load_full  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

SIZES = dict(d_model=1024, headdim=64, d_state=128, length=2048, batch=2, chunk_size=None)  # H = 32
BOUND_MULTIPLE = 2.0


def _run(case: MixerCase, tp: int, sequence_parallel: bool, dtype: torch.dtype, backend: str) -> dict:
    mixer = build_mixer(case.config, tp, sequence_parallel, params_dtype=dtype, device="cuda", backend=backend)
    load_full(mixer, full_weights(mixer.mamba3))
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = forward_backward(mixer, case, sequence_parallel, dtype)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--mimo-ranks", type=int, nargs="+", default=[1, 4], help="R of the cases (1 = SISO)")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 8], help="g of the cases")
    args = parser.parse_args()
    cases = [MixerCase(rank, groups, **SIZES) for rank in args.mimo_ranks for groups in args.groups]
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world = dist.get_world_size()
    bad = [tp for tp in args.tp if world % tp]
    if bad or 1 not in args.tp:
        raise SystemExit(f"--tp {args.tp}: needs 1 (the baseline) and sizes dividing the {world} processes; bad: {bad}")
    rows, failed, oracles, baselines = [], False, {}, {}
    for tp in sorted(args.tp):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        for case in cases:
            if tp == 1:
                oracles[case] = _first_tp_group(_run(case, 1, False, torch.float32, "reference"), 1)
            for sequence_parallel in (False, True) if tp > 1 else (False,):
                ranks = _first_tp_group(_run(case, tp, sequence_parallel, torch.bfloat16, args.backend), tp)
                if ranks is None:
                    continue
                errors = _errors(ranks, case, sequence_parallel, oracles[case][0])
                if tp == 1:
                    baselines[case] = errors
                bounds = {k: BOUND_MULTIPLE * baselines[case][k] for k in errors}
                worst = max(errors, key=lambda k: errors[k] / bounds[k])
                ok = all(errors[k] <= bounds[k] for k in errors)
                failed |= not ok
                rows.append((tp, case, sequence_parallel, worst, errors[worst], bounds[worst], ranks[0]["seconds"], ok))
        parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        print(f"device: {torch.cuda.get_device_name()}  processes: {world}  receipts: "
              f"{sorted({(r.backend, r.variant, r.dtype) for r in receipts()})}")
        print("| tp | R | g | seq-parallel | worst tensor | error | bound | fwd+bwd s | ok |")
        print("|---|---|---|---|---|---|---|---|---|")
        for tp, case, sp, worst, error, bound, seconds, ok in rows:
            print(f"| {tp} | {case.mimo_rank} | {case.ngroups} | {sp} | {worst} | {error:.2e} | {bound:.2e} | {seconds:.3f} | {ok} |")
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
