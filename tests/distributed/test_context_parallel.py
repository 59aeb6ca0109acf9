"""Context parallelism (`megatron_mamba3.context_parallel`) against the CP = 1 run, float64, 1e-10.

One spawn per grid: CP = 2, CP = 4 and TP = 2 x CP = 2 (gloo). Each rank holds pieces r and
2·cp − 1 − r of a 24-token sequence (Megatron's layout) and the pieces are reassembled here.
- The mixer: output, input gradient and every parameter gradient (summed over CP ranks, as the data
  and context parallel gradient all-reduce does; unsharded over TP) equal a TP = 1, CP = 1 mixer's,
  SISO and MIMO (with the output norm), batches of rows and THD packing whose documents cross
  piece and rank boundaries, one starting exactly at a piece boundary; TP x CP with and without
  sequence parallelism.
- The scan: given an initial state, the output, the final state (the same on every rank) and the
  gradients of the inputs, weights and initial state equal the reference scan's over the whole
  sequence.
- Inference (decode from a stored state) refuses CP > 1, saying so.
- Mutation check: with the incoming states dropped (`compose` returning zeros for them) the same
  comparisons fail by far more than the tolerance, so these tests can fail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_mamba3 import context_parallel
from megatron_mamba3.context_parallel import context_parallel_scan, local_part, whole_sequence
from megatron_mamba3.ops.interface import Mamba3State
from megatron_mamba3.ops.scan import mamba3_scan
from megatron_mamba3.parallel import unshard_mixer_state
from tests.distributed.harness import run_ranks
from tests.distributed.mixers import MixerCase, build_mixer, full_weights, inputs, load_full
from tests.helpers import assert_states_close, make_case, make_state, rel_err

pytestmark = pytest.mark.distributed

TOL = 1e-10
GRIDS = {"cp2": (2, 2), "cp4": (4, 4), "tp2xcp2": (4, 2)}  # name: (processes, CP size)


@dataclasses.dataclass(frozen=True)
class CPCase(MixerCase):
    """A `MixerCase` whose THD documents start at 5 (inside a piece), 12 (a piece boundary at
    CP = 2 and 4) and 19; chunks of 2 tokens so pieces hold several."""

    chunk_size: int | None = 2

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return torch.tensor([0, 5, 12, 19], dtype=torch.int32)


CASES = [CPCase(1, 1), CPCase(1, 2, packed=True), CPCase(4, 2), CPCase(4, 1, packed=True)]
SCAN = dict(R=(1, 4))  # scan-level cases: SISO and MIMO
SEGMENTS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 12, [0] * 24])


def _packed(case: CPCase) -> PackedSeqParams | None:
    if not case.packed:
        return None
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=case.cu_seqlens, cu_seqlens_kv=case.cu_seqlens)


def _mixer_run(mixer, u: torch.Tensor, grad_out: torch.Tensor, case: CPCase) -> dict:
    u = u.clone().requires_grad_()
    out, _ = mixer(u, packed_seq_params=_packed(case))
    out.backward(grad_out)
    return {"out": out.detach(), "u_grad": u.grad, "grads": {n: p.grad for n, p in mixer.named_parameters()}}


def _mixer_parity(case: CPCase, sequence_parallel: bool) -> dict:
    tp, cp = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_context_parallel_world_size()
    tp_rank, cp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_context_parallel_rank()
    mixer = build_mixer(case.config, tp, sequence_parallel, params_dtype=torch.float64)
    load_full(mixer, full_weights(mixer.mamba3))
    u, grad_out = (local_part(t.double(), cp, cp_rank, dim=0) for t in inputs(case))
    if sequence_parallel:
        u, grad_out = u.chunk(tp)[tp_rank], grad_out.chunk(tp)[tp_rank]
    return _mixer_run(mixer, u, grad_out, case)


def _oracle(case: CPCase, alone: dist.ProcessGroup) -> dict:
    """The TP = 1, CP = 1 mixer over the whole sequence, on this rank alone."""
    mixer = build_mixer(case.config, 1, params_dtype=torch.float64, pg_collection=ProcessGroupCollection(tp=alone, cp=alone))
    load_full(mixer, full_weights(mixer.mamba3))
    u, grad_out = (t.double() for t in inputs(case))
    return _mixer_run(mixer, u, grad_out, case)


def _scan_run(R: int) -> dict:
    """The CP scan of a float64 case with an initial state; the loss adds the final state on CP rank 0."""
    group = parallel_state.get_context_parallel_group()
    cp, cp_rank = group.size(), group.rank()
    full, weights = make_case(l=24, R=R, G=2, norm=R > 1)
    full_out_grad, _ = make_case(l=24, R=R, G=2, seed=3)
    initial = make_state(2, 4, 8, R, 16, 4)
    leaves = [t.requires_grad_() for t in (*weights, *initial) if t is not None]
    local = type(full)(*(local_part(t, cp, cp_rank, dim=1).requires_grad_() for t in full))
    out, final = context_parallel_scan(
        local, weights, group, segment_ids=local_part(SEGMENTS, cp, cp_rank, dim=1), initial_state=initial,
        chunk_size=2, backend="reference",
    )
    loss = (out * local_part(full_out_grad.x, cp, cp_rank, dim=1)).sum()
    if cp_rank == 0:
        loss = loss + sum((field * (i + 1)).sum() for i, field in enumerate(final))
    grads = torch.autograd.grad(loss, [*local, *leaves])
    return {"out": out.detach(), "final": Mamba3State(*(t.detach() for t in final)), "grads": grads}


def _cp_results(alone: dist.ProcessGroup | None) -> dict:
    """Every mixer case (and the oracle where `alone` is given) and, without TP, the scan cases."""
    results = {"tp_rank": parallel_state.get_tensor_model_parallel_rank(), "cp_rank": parallel_state.get_context_parallel_rank()}
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for case in CASES:
        for sequence_parallel in (False, True) if tp > 1 else (False,):
            results[case, sequence_parallel] = _mixer_parity(case, sequence_parallel)
        if alone is not None:
            results[case, "oracle"] = _oracle(case, alone)
    if tp == 1:
        results["scan"] = {R: _scan_run(R) for R in SCAN["R"]}
    return results


def _inference_refusal() -> str:
    mixer = build_mixer(CASES[0].config, parallel_state.get_tensor_model_parallel_world_size(), params_dtype=torch.float64)
    u, _ = inputs(CASES[0])
    try:
        mixer(u.double(), inference_context=StaticInferenceContext(CASES[0].batch, CASES[0].length))
    except ValueError as error:
        return str(error)
    return "no error"


def _worker(rank: int, with_mutant: bool) -> dict:
    alone = [dist.new_group([r]) for r in range(dist.get_world_size())][rank]
    results = _cp_results(alone if rank == 0 else None)
    results["inference"] = _inference_refusal()
    if with_mutant:  # the incoming states dropped (times zero, so the backward's collectives still run)
        compose = context_parallel.compose

        def dropped(*args):
            incoming, final = compose(*args)
            return [Mamba3State(*(0 * field for field in state)) for state in incoming], final

        context_parallel.compose = dropped
        results["mutant"] = _cp_results(None)
        context_parallel.compose = compose
    return results


@pytest.fixture(scope="module")
def runs() -> dict[str, list[dict]]:
    """Results by grid, then by rank; "mutant" holds the CP = 2 ranks' mutated runs (with the oracle)."""
    results = {name: run_ranks(_worker, world, name == "cp2", context_parallel=cp) for name, (world, cp) in GRIDS.items()}
    results["mutant"] = [{**r, **r["mutant"]} for r in results["cp2"]]
    return results


def _mixer_errors(ranks: list[dict], case: CPCase, sequence_parallel: bool) -> dict[str, float]:
    expected = ranks[0][case, "oracle"]
    tp = 1 + max(r["tp_rank"] for r in ranks)
    cp = 1 + max(r["cp_rank"] for r in ranks)
    grid = {(r["cp_rank"], r["tp_rank"]): r[case, sequence_parallel] for r in ranks}

    def whole(key: str) -> torch.Tensor:
        per_cp = []
        for c in range(cp):
            if sequence_parallel:
                per_cp.append(torch.cat([grid[c, t][key] for t in range(tp)]))
            else:
                per_cp.append(grid[c, 0][key])
        return whole_sequence(per_cp, dim=0)

    errors = {"out": rel_err(whole("out"), expected["out"]), "u_grad": rel_err(whole("u_grad"), expected["u_grad"])}
    summed = [{n: sum(grid[c, t]["grads"][n] for c in range(cp)) for n in grid[0, t]["grads"]} for t in range(tp)]
    grads = unshard_mixer_state(summed, case.config)
    assert grads.keys() == expected["grads"].keys()
    errors.update({name: rel_err(grad, expected["grads"][name]) for name, grad in grads.items()})
    return errors


def _scan_errors(ranks: list[dict], R: int) -> tuple[dict[str, float], list[Mamba3State]]:
    full, weights = make_case(l=24, R=R, G=2, norm=R > 1)
    full_out_grad, _ = make_case(l=24, R=R, G=2, seed=3)
    initial = make_state(2, 4, 8, R, 16, 4)
    leaves = [t.requires_grad_() for t in (*full, *weights, *initial) if t is not None]
    out, final = mamba3_scan(full, weights, segment_ids=SEGMENTS, initial_state=initial, backend="reference")
    loss = (out * full_out_grad.x).sum() + sum((field * (i + 1)).sum() for i, field in enumerate(final))
    expected = torch.autograd.grad(loss, leaves)
    results = sorted((r["cp_rank"], r["scan"][R]) for r in ranks)
    errors = {"out": rel_err(whole_sequence([res["out"] for _, res in results], dim=1), out.detach())}
    n_inputs = len(full)
    for i, name in enumerate(full._fields):
        errors[name + "_grad"] = rel_err(whole_sequence([res["grads"][i] for _, res in results], dim=1), expected[i])
    for i in range(n_inputs, len(expected)):
        errors[f"leaf{i}_grad"] = rel_err(sum(res["grads"][i] for _, res in results), expected[i])
    return errors, [Mamba3State(*(t.detach() for t in final))] + [res["final"] for _, res in results]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"R{c.mimo_rank}-g{c.ngroups}{'-packed' if c.packed else ''}")
@pytest.mark.parametrize("grid,sequence_parallel", [("cp2", False), ("cp4", False), ("tp2xcp2", False), ("tp2xcp2", True)])
def test_mixer_matches_cp1(runs, grid, sequence_parallel, case):
    errors = _mixer_errors(runs[grid], case, sequence_parallel)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("R", SCAN["R"])
@pytest.mark.parametrize("grid", ["cp2", "cp4"])
def test_scan_with_states_matches_whole_sequence(runs, grid, R):
    errors, (expected, *finals) = _scan_errors(runs[grid], R)
    assert max(errors.values()) < TOL, errors
    for final in finals:
        assert_states_close(final, expected, TOL)


def test_dropping_the_incoming_state_fails(runs):
    worst = [max(_mixer_errors(runs["mutant"], case, False).values()) for case in CASES]
    assert min(worst) > 1e-3, worst
    for R in SCAN["R"]:
        errors, _ = _scan_errors(runs["mutant"], R)
        assert errors["out"] > 1e-3, errors


@pytest.mark.parametrize("grid", list(GRIDS))
def test_inference_refuses_context_parallelism(runs, grid):
    cp = GRIDS[grid][1]
    for r in runs[grid]:
        assert r["inference"] == f"Mamba3Mixer inference runs without context parallelism; got CP size {cp}"


def test_cu_seqlens_is_refused_naming_segment_ids():
    inputs, weights = make_case(b=1, l=8, seed=3)
    with pytest.raises(ValueError, match="segment_ids numbered over the whole sequence .* not cu_seqlens"):
        context_parallel_scan(inputs, weights, None, cu_seqlens=torch.tensor([0, 3, 8]))
