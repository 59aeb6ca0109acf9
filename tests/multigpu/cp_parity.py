"""Mamba3Mixer context parallelism on GPUs (NCCL): CP = 2 parity with CP = 1 in bf16, and speed.

    torchrun --nproc-per-node 2 tests/multigpu/cp_parity.py parity [--backend auto]
    torchrun --nproc-per-node 2 tests/multigpu/cp_parity.py speed [--lengths 32768 131072]

parity: SISO and MIMO R=4 mixers (d_model 1024, 4k tokens, batches of rows and THD packing whose
documents cross the CP ranks' pieces) at CP = 1 and CP = 2 in bf16 on the chosen backend ("auto"
picks TileLang on CUDA). The oracle is the CP = 1 module in fp32 on the reference backend. Bound,
per tensor (output, input gradient, every parameter gradient summed over CP ranks): error <= 2 x
the CP = 1 bf16 run's own error against that oracle. Exits 1 if any bound fails.

speed: one SISO mixer of the 2048-hidden model (H = 64, p = 64, n = 128, batch 1) at each length:
forward + backward time, tokens/s and peak memory per GPU at CP = 1 (every rank runs the whole
sequence alone; an out-of-memory is recorded) and CP = 2; the bytes the CP collectives moved per
rank (counted from the tensors handed to all_gather / all_reduce) and the share of the second
(correction) scan in the CP = 2 step, timed alone on the same local tokens. Rank 0 prints tables.
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
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_mamba3.context_parallel import local_part, whole_sequence  # noqa: E402
from megatron_mamba3.ops.interface import Mamba3Inputs  # noqa: E402
from megatron_mamba3.ops.layer import scan_inputs, scan_weights  # noqa: E402
from megatron_mamba3.ops.scan import mamba3_scan  # noqa: E402
from megatron_mamba3.parallel import unshard_mixer_state  # noqa: E402
from tests.distributed.mixers import MixerCase, build_mixer, full_weights, inputs, load_full  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

PARITY_SIZES = dict(d_model=1024, headdim=64, d_state=128, length=4096, batch=2, chunk_size=None)
BOUND_MULTIPLE = 2.0
SPEED_CONFIG = dict(d_model=2048, headdim=64, d_state=128, ngroups=1, chunk_size=None)


@dataclasses.dataclass(frozen=True)
class GPUCase(MixerCase):
    """Documents start at 1000 (inside piece 0), 2048 (the piece boundary between the CP ranks'
    halves at CP = 2) and 3000."""

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return torch.tensor([0, 1000, 2048, 3000], dtype=torch.int32)


def _groups(cp: int) -> ProcessGroupCollection:
    """CP = 2: the two ranks; CP = 1: each rank alone (TP = 1 everywhere)."""
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    return ProcessGroupCollection.use_mpu_process_groups()


def _forward_backward(case: GPUCase, cp: int, dtype: torch.dtype, backend: str) -> dict:
    groups = _groups(cp)
    mixer = build_mixer(case.config, 1, params_dtype=dtype, device="cuda", backend=backend, pg_collection=groups)
    load_full(mixer, full_weights(mixer.mamba3))
    u, grad_out = (local_part(t, cp, groups.cp.rank(), dim=0).to("cuda", dtype) for t in inputs(case))
    u.requires_grad_()
    packed = None
    if case.packed:
        cu = case.cu_seqlens.cuda()
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    out, _ = mixer(u, packed_seq_params=packed)
    out.backward(grad_out)
    grads = {name: p.grad.float() for name, p in mixer.named_parameters()}
    for grad in grads.values():  # summed over the CP ranks, as the data / context parallel all-reduce does
        dist.all_reduce(grad, group=groups.cp)
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, {"out": out.detach().float().cpu(), "u_grad": u.grad.float().cpu()})
    parallel_state.destroy_model_parallel()
    whole = lambda key: whole_sequence([part[key] for part in everything[:cp]], dim=0)  # noqa: E731
    return {"out": whole("out"), "u_grad": whole("u_grad"), "grads": {k: v.cpu() for k, v in grads.items()}}


def _errors(result: dict, oracle: dict, case: GPUCase) -> dict[str, float]:
    errors = {key: rel_err(result[key], oracle[key]) for key in ("out", "u_grad")}
    grads = unshard_mixer_state([result["grads"]], case.config)
    errors.update({name: rel_err(grad, oracle["grads"][name]) for name, grad in grads.items()})
    return errors


def parity(backend: str) -> int:
    cases = [GPUCase(r, 1, packed, **PARITY_SIZES) for r in (1, 4) for packed in (False, True)]
    rows, failed = [], False
    for case in cases:
        oracle = _forward_backward(case, 1, torch.float32, "reference")
        baseline = _errors(_forward_backward(case, 1, torch.bfloat16, backend), oracle, case)
        errors = _errors(_forward_backward(case, 2, torch.bfloat16, backend), oracle, case)
        worst = max(errors, key=lambda k: errors[k] / (BOUND_MULTIPLE * baseline[k]))
        ok = all(errors[k] <= BOUND_MULTIPLE * baseline[k] for k in errors)
        failed |= not ok
        rows.append((case, worst, errors[worst], baseline[worst], ok))
    if dist.get_rank() == 0:
        print(f"device: {torch.cuda.get_device_name()}  backend: {backend}")
        print("| R | packed | worst tensor | CP=2 error | CP=1 bf16 error | ok |")
        print("|---|---|---|---|---|---|")
        for case, worst, error, base, ok in rows:
            print(f"| {case.mimo_rank} | {case.packed} | {worst} | {error:.2e} | {base:.2e} | {ok} |")
    return 1 if failed else 0


class CountBytes:
    """Counts the bytes this rank hands to all_gather / all_reduce while active."""

    def __enter__(self):
        self.total, self.saved = 0, (dist.all_gather, dist.all_reduce)

        def all_gather(outputs, tensor, *args, **kwargs):
            self.total += tensor.numel() * tensor.element_size()
            return self.saved[0](outputs, tensor, *args, **kwargs)

        def all_reduce(tensor, *args, **kwargs):
            self.total += tensor.numel() * tensor.element_size()
            return self.saved[1](tensor, *args, **kwargs)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce
        return self

    def __exit__(self, *exc):
        dist.all_gather, dist.all_reduce = self.saved


def _timed(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _speed_one(length: int, cp: int, backend: str) -> dict:
    case = MixerCase(1, **SPEED_CONFIG, length=length, batch=1)
    groups = _groups(cp)
    try:
        mixer = build_mixer(case.config, 1, params_dtype=torch.bfloat16, device="cuda", backend=backend, pg_collection=groups)
        g = torch.Generator(device="cuda").manual_seed(0)
        u = torch.randn(length // cp, 1, case.d_model, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        grad = torch.randn_like(u)

        def step():
            out, _ = mixer(u)
            out.backward(grad)

        torch.cuda.reset_peak_memory_stats()
        seconds = _timed(step)
        result = {"seconds": seconds, "tokens_per_s": length / seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        if cp > 1:
            with CountBytes() as counted:
                step()
            result["bytes"] = counted.total
            result["correction_share"] = _correction_seconds(mixer, u) / seconds
    except torch.OutOfMemoryError:
        result = {"oom": True}
    torch.cuda.empty_cache()
    parallel_state.destroy_model_parallel()
    return result


def _correction_seconds(mixer, u: torch.Tensor) -> float:
    """Forward + backward of the second scan alone: this rank's two pieces from given states."""
    projected = mixer.in_proj(u)[0].transpose(0, 1).detach()
    params = mixer.layer_params()
    local = scan_inputs(projected, params, mixer.layout)
    b, l = local.x.shape[:2]
    rows = Mamba3Inputs(*(t.reshape(2 * b, l // 2, *t.shape[2:]).detach().requires_grad_() for t in local))
    _, zero_start = mamba3_scan(rows, scan_weights(params), backend=mixer.backend)
    state = type(zero_start)(*(t.detach().requires_grad_() for t in zero_start))

    def second():
        out, _ = mamba3_scan(rows, scan_weights(params), initial_state=state, backend=mixer.backend)
        out.backward(torch.ones_like(out))

    return _timed(second)


def speed(lengths: list[int], backend: str) -> int:
    rows = []
    for length in lengths:
        rows.append((length, _speed_one(length, 1, backend), _speed_one(length, 2, backend)))
    if dist.get_rank() == 0:
        print(f"device: {torch.cuda.get_device_name()}  backend: {backend}  model: d_model 2048, SISO, one mixer, batch 1, bf16")
        print("| l | CP=1 tokens/s | CP=1 peak GiB/GPU | CP=2 tokens/s | CP=2 peak GiB/GPU | CP bytes/rank/layer (fwd+bwd) | correction share |")
        print("|---|---|---|---|---|---|---|")
        show = lambda r, k, f: "OOM" if r.get("oom") else format(r[k], f)  # noqa: E731
        for length, one, two in rows:
            print(f"| {length} | {show(one, 'tokens_per_s', '.0f')} | {show(one, 'peak_gib', '.2f')} | "
                  f"{show(two, 'tokens_per_s', '.0f')} | {show(two, 'peak_gib', '.2f')} | {show(two, 'bytes', 'd')} | "
                  f"{show(two, 'correction_share', '.2f')} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("parity", "speed"))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    args = parser.parse_args()
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if dist.get_world_size() != 2:
        raise SystemExit(f"run on 2 processes (CP = 2), got {dist.get_world_size()}")
    try:
        return parity(args.backend) if args.mode == "parity" else speed(args.lengths, args.backend)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
