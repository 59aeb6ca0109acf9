"""HybridModel built from megatron_mamba3.layer_specs on CPU (gloo, CPU patches applied), SISO and MIMO,
patterns with and without attention.

The TP = 1 model is the oracle for TP = 2: it saves a distributed checkpoint, the TP = 2 model (with
and without sequence parallelism) loads it, and its per-token losses must equal the TP = 1 ones within
1e-5 relative (fp32; only the order of the tensor-parallel sums differs). The TP = 1 run also checks
the stack's structure, that every parameter gets a finite gradient, and the construction errors.
"""

from __future__ import annotations

import os

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayer

from megatron_mamba3 import clear_receipts, receipts
from megatron_mamba3.layer_specs import mamba3_mimo_stack_spec, mamba3_siso_stack_spec
from tests.distributed.harness import run_ranks
from tests.helpers import rel_err

pytestmark = pytest.mark.distributed

FP32_TOL = 1e-5
VOCAB, BATCH, LENGTH = 64, 2, 24
CASES = {  # name: (stack spec, pattern)
    "siso-attention": (mamba3_siso_stack_spec, "M*M-"),
    "siso": (mamba3_siso_stack_spec, "MM-"),
    "mimo-attention": (mamba3_mimo_stack_spec, "M*M-"),
    "mimo": (mamba3_mimo_stack_spec, "MM-"),
}
LAYER_CLASSES = {"M": MambaLayer, "*": TransformerLayer, "-": MLPLayer, "E": MoETransformerLayer}


def _model(spec, pattern: str, tp: int, sequence_parallel: bool = False, **config) -> HybridModel:
    model_parallel_cuda_manual_seed(1)  # Megatron's RNG tracker set-up, which attention forks from
    config = TransformerConfig(
        num_layers=len(pattern), hidden_size=32, num_attention_heads=4, mamba_head_dim=8, mamba_state_dim=16,
        mamba_num_groups=1, tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, **config,
    )
    return HybridModel(
        config, spec, vocab_size=VOCAB, max_sequence_length=LENGTH, hybrid_layer_pattern=pattern,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def _losses(model: HybridModel) -> torch.Tensor:
    """(b, l) per-token losses of fixed tokens (the same on every rank and TP size)."""
    tokens = torch.randint(VOCAB, (BATCH, LENGTH + 1), generator=torch.Generator().manual_seed(0))
    return model(tokens[:, :-1], None, None, labels=tokens[:, 1:])


def _build_and_save(rank: int, folder: str) -> dict:
    results = {}
    for name, (spec, pattern) in CASES.items():
        model = _model(spec, pattern, tp=1)
        layers = model.decoder.layers
        results[name, "layers"] = [type(layer) for layer in layers]
        results[name, "mimo_rank"] = layers[0].mixer.mamba3.mimo_rank
        results[name, "final_norm"] = type(model.decoder.final_norm)
        clear_receipts()
        losses = _losses(model)
        losses.mean().backward()
        results[name, "receipt_layers"] = {r.layer for r in receipts() if r.step_kind == "forward"}
        results[name, "grads_finite"] = {n: p.grad is not None and bool(p.grad.isfinite().all()) for n, p in model.named_parameters()}
        results[name, "losses"] = losses.detach()
        os.makedirs(os.path.join(folder, name))
        dist_checkpointing.save(model.sharded_state_dict(), os.path.join(folder, name))
    results["moe_layers"] = [type(layer) for layer in _model(mamba3_siso_stack_spec, "ME", 1, num_moe_experts=2).decoder.layers]
    try:
        _model(mamba3_siso_stack_spec, "MG", tp=1)
    except ValueError as error:
        results["gdn_error"] = str(error)
    return results


def _load_and_run(rank: int, folder: str) -> dict:
    results = {}
    for sequence_parallel in (False, True):
        for name, (spec, pattern) in CASES.items():
            model = _model(spec, pattern, tp=2, sequence_parallel=sequence_parallel)
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), os.path.join(folder, name)))
            with torch.no_grad():
                results[name, sequence_parallel] = _losses(model)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict]]:
    folder = str(tmp_path_factory.mktemp("hybrid"))
    (tp1,) = run_ranks(_build_and_save, 1, folder)
    return tp1, run_ranks(_load_and_run, 2, folder)


@pytest.mark.parametrize("name", CASES)
def test_stack_structure_and_gradients(runs, name):
    tp1, _ = runs
    spec, pattern = CASES[name]
    assert tp1[name, "layers"] == [LAYER_CLASSES[symbol] for symbol in pattern]
    assert tp1[name, "mimo_rank"] == (4 if spec is mamba3_mimo_stack_spec else 1)
    assert tp1[name, "final_norm"] is torch.nn.RMSNorm
    assert tp1[name, "receipt_layers"] == {f"decoder.layers.{i}.mixer" for i, s in enumerate(pattern) if s == "M"}
    assert all(tp1[name, "grads_finite"].values()), [n for n, ok in tp1[name, "grads_finite"].items() if not ok]


def test_moe_layers_build_and_unknown_symbols_are_refused(runs):
    tp1, _ = runs
    assert tp1["moe_layers"] == [MambaLayer, MoETransformerLayer]
    assert "['G']" in tp1["gdn_error"]


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
@pytest.mark.parametrize("name", CASES)
def test_tp2_loads_tp1_checkpoint_and_matches(runs, name, sequence_parallel):
    tp1, tp2 = runs
    for rank in tp2:
        assert rel_err(rank[name, sequence_parallel], tp1[name, "losses"]) < FP32_TOL
