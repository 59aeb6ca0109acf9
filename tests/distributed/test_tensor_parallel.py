"""Tensor-parallel Mamba3Mixer against the TP = 1 module, on 1, 2 and 4 gloo processes
(docs/parallelism.md, "Tensor parallelism").

One spawn per TP size runs every case: forward output, input gradient and every parameter
gradient (gathered to full shape) must equal the TP = 1 module's within 1e-5 relative (fp32; only
the order of the out_proj / input-gradient sums differs), for SISO and MIMO, g = 1 (replicated
B/C), g = 2 and g = 4, with and without sequence parallelism and THD packing. Weights held on
every rank must get bit-identical gradients. Decode through Megatron's static inference context
must equal the forward. A distributed checkpoint saved at TP = 2 loads at TP = 1 and TP = 4.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_mamba3 import receipts
from megatron_mamba3.parallel import REPLICATED, REPLICATED_IN_PROJ, unshard_mixer_state
from tests.distributed.harness import run_ranks
from tests.distributed.mixers import MixerCase, build_mixer, forward_backward, full_weights, gathered, inputs, load_full
from tests.helpers import rel_err

pytestmark = pytest.mark.distributed

FP32_TOL = 1e-5
CASES = [MixerCase(r, g, packed) for r in (1, 4) for g in (1, 2, 4) for packed in (False, True)]
DECODE_CASES = [MixerCase(1, 1), MixerCase(4, 2)]
CHECKPOINT_CASE = MixerCase(4, 2)  # B/C split at TP = 2, replicated at TP = 4
PREFILL = 10


def _parity(case: MixerCase, tp: int, sequence_parallel: bool) -> dict:
    mixer = build_mixer(case.config, tp, sequence_parallel)
    load_full(mixer, full_weights(mixer.mamba3))
    return forward_backward(mixer, case, sequence_parallel)


def _decode(case: MixerCase, tp: int) -> dict:
    mixer = build_mixer(case.config, tp).eval()
    load_full(mixer, full_weights(mixer.mamba3))
    u, _ = inputs(case)
    context = StaticInferenceContext(case.batch, case.length)
    with torch.no_grad():
        forward, _ = mixer(u)
        steps = [mixer(u[:PREFILL], inference_context=context)[0]]
        for t in range(PREFILL, case.length):
            context.sequence_len_offset = t
            steps.append(mixer(u[t : t + 1], inference_context=context)[0])
    kinds = {(r.step_kind, r.backend, r.variant) for r in receipts()}
    return {"forward": forward, "decoded": torch.cat(steps), "receipt_kinds": kinds}


def _checkpoint(tp: int, folder: str) -> dict:
    """TP = 2 saves its weights; other sizes start from other random weights and load them."""
    mixer = build_mixer(CHECKPOINT_CASE.config, tp)
    saved = mixer.sharded_state_dict(prefix="mixer.")
    if tp == 2:
        load_full(mixer, full_weights(mixer.mamba3, seed=5))
        dist_checkpointing.save(saved, folder)
    else:
        loaded = dist_checkpointing.load(saved, folder)
        mixer.load_state_dict({key.removeprefix("mixer."): value for key, value in loaded.items()})
    direct = build_mixer(CHECKPOINT_CASE.config, tp)
    load_full(direct, full_weights(direct.mamba3, seed=5))
    u, _ = inputs(CHECKPOINT_CASE)
    with torch.no_grad():
        state = {name: t for name, t in mixer.state_dict().items() if not name.endswith("_extra_state")}
        return {"state": state, "out": mixer(u)[0], "direct_out": direct(u)[0]}


def _tp_worker(_rank: int, tp: int, folder: str) -> dict:
    results = {}
    for case in CASES:
        for sequence_parallel in (False, True) if tp > 1 else (False,):
            results[case, sequence_parallel] = _parity(case, tp, sequence_parallel)
    results["decode"] = {case: _decode(case, tp) for case in DECODE_CASES}
    results["checkpoint"] = _checkpoint(tp, folder)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    """Results by TP size, then by rank. TP = 2 runs first: it writes the checkpoint the others load."""
    folder = str(tmp_path_factory.mktemp("checkpoint"))
    return {tp: run_ranks(_tp_worker, tp, tp, folder) for tp in (2, 1, 4)}


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"R{c.mimo_rank}-g{c.ngroups}{'-packed' if c.packed else ''}")
@pytest.mark.parametrize("tp", [2, 4])
def test_matches_tp1(runs, tp, case, sequence_parallel):
    expected = runs[1][0][case, False]
    ranks = [r[case, sequence_parallel] for r in runs[tp]]
    assert ranks[0]["bias"] is None
    assert rel_err(gathered(ranks, "out", sequence_parallel), expected["out"]) < FP32_TOL
    assert rel_err(gathered(ranks, "u_grad", sequence_parallel), expected["u_grad"]) < FP32_TOL
    grads = unshard_mixer_state([r["grads"] for r in ranks], case.config)
    assert grads.keys() == expected["grads"].keys()
    for name, grad in grads.items():
        assert rel_err(grad, expected["grads"][name]) < FP32_TOL, name
    for r in ranks[1:]:
        for name in (*REPLICATED, REPLICATED_IN_PROJ):
            assert torch.equal(r["grads"][name], ranks[0]["grads"][name]), name


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"R{c.mimo_rank}-g{c.ngroups}")
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_decode_through_inference_context_equals_forward(runs, tp, case):
    result = runs[tp][0]["decode"][case]
    assert rel_err(result["decoded"], result["forward"]) < FP32_TOL
    assert ("decode", "reference", "step") in result["receipt_kinds"]


@pytest.mark.parametrize("tp", [1, 4])
def test_checkpoint_saved_at_tp2_loads_bit_exact(runs, tp):
    saved = unshard_mixer_state([r["checkpoint"]["state"] for r in runs[2]], CHECKPOINT_CASE.config)
    loaded = unshard_mixer_state([r["checkpoint"]["state"] for r in runs[tp]], CHECKPOINT_CASE.config)
    assert saved.keys() == loaded.keys()
    for name in saved:
        assert torch.equal(loaded[name], saved[name]), name
    result = runs[tp][0]["checkpoint"]
    assert torch.equal(result["out"], result["direct_out"])
    assert rel_err(result["out"], runs[2][0]["checkpoint"]["out"]) < FP32_TOL
