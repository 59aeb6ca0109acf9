"""Mamba3Mixer at TP = 1 and TP = 2, float64, loaded through the official-checkpoint converter,
against the golden cases of an independent implementation: output, THD-packed output and decode
through Megatron's static inference context, all within 1e-10 relative."""

from __future__ import annotations

import pytest
import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_mamba3.convert import official_to_megatron
from megatron_mamba3.mixer import Mamba3Mixer
from tests.distributed.harness import run_ranks
from tests.distributed.mixers import build_mixer
from tests.golden import CASES, golden_array, golden_config, official_mixer_state
from tests.helpers import rel_err

pytestmark = pytest.mark.distributed
TOL = 1e-10
PREFIX = "decoder.layers.0.mixer."


def _mixer(name: str, tp: int, rank: int) -> Mamba3Mixer:
    """The golden case's mixer in float64, loaded through the official-checkpoint converter."""
    c = golden_config(name)
    mixer = build_mixer(c, tp, params_dtype=torch.float64).eval()
    official = {f"backbone.layers.0.mixer.{k}": v for k, v in official_mixer_state(name).items()}
    converted = official_to_megatron(official, c, tp_size=tp, tp_rank=rank)
    mixer.load_state_dict({k.removeprefix(PREFIX): v for k, v in converted.items()})
    return mixer


def _thd(segment_ids: torch.Tensor) -> PackedSeqParams:
    """One row's segment ids -> THD packing parameters."""
    starts = torch.nonzero(segment_ids[1:] != segment_ids[:-1]).flatten() + 1
    cu_seqlens = torch.cat([torch.tensor([0]), starts, torch.tensor([segment_ids.numel()])]).to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)


def _golden_worker(rank: int, tp: int) -> dict:
    results = {}
    for name in CASES:
        mixer = _mixer(name, tp, rank)
        u = golden_array(name, "u").transpose(0, 1)  # (l, b, d)
        split = int(golden_array(name, "split_at"))
        segment_ids = golden_array(name, "segment_ids")
        context = StaticInferenceContext(u.shape[1], u.shape[0])
        with torch.no_grad():
            out = mixer(u)[0]
            packed = torch.cat([mixer(u[:, row : row + 1], packed_seq_params=_thd(segment_ids[row]))[0]
                                for row in range(u.shape[1])], dim=1)
            steps = [mixer(u[:split], inference_context=context)[0]]
            for t in range(split, u.shape[0]):
                context.sequence_len_offset = t
                steps.append(mixer(u[t : t + 1], inference_context=context)[0])
        results[name] = {"out": out, "packed": packed, "decoded": torch.cat(steps)}
    return results


@pytest.fixture(scope="module")
def golden_runs() -> dict[int, dict]:
    return {tp: run_ranks(_golden_worker, tp, tp)[0] for tp in (1, 2)}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("tp", [1, 2])
def test_mixer_matches_golden(golden_runs, tp, name):
    result = golden_runs[tp][name]
    expected = golden_array(name, "out").transpose(0, 1)
    assert result["out"].dtype == torch.float64
    assert rel_err(result["out"], expected) < TOL
    assert rel_err(result["packed"], golden_array(name, "out_packed").transpose(0, 1)) < TOL
    assert rel_err(result["decoded"], expected) < TOL
