"""megatron_mamba3.layer_specs: importable the way Megatron-LM's `--spec MODULE NAME` imports, with
the Mamba-3 settings in the mixer spec's params, and the TE variant only where TE is installed.
Building and running the specs is tested in tests/distributed/test_hybrid_model.py."""

from __future__ import annotations

import pytest
from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import import_module

from megatron_mamba3 import layer_specs
from megatron_mamba3.mixer import Mamba3Mixer


def _mixer_spec(stack_spec):
    return stack_spec.submodules.mamba_layer.submodules.mixer


@pytest.mark.parametrize("name, mimo_rank", [("mamba3_siso_stack_spec", None), ("mamba3_mimo_stack_spec", 4)])
def test_ready_made_specs_by_module_and_name(name, mimo_rank):
    spec = import_module(("megatron_mamba3.layer_specs", name))  # what --spec megatron_mamba3.layer_specs NAME does
    assert spec is getattr(layer_specs, name)
    assert spec.module is layer_specs.Mamba3HybridStack
    assert spec.submodules.mamba_layer.module is MambaLayer
    mixer = _mixer_spec(spec)
    assert mixer.module is Mamba3Mixer
    assert mixer.params.get("mimo_rank") == mimo_rank
    assert (mixer.submodules.in_proj, mixer.submodules.out_proj) == (ColumnParallelLinear, RowParallelLinear)
    assert spec.submodules.final_norm is layer_specs.LocalNorm


def test_builder_puts_settings_in_mixer_params():
    spec = layer_specs.mamba3_stack_spec(mimo_rank=4, rope_fraction=1.0, chunk_size=16, is_outproj_norm=True, backend="reference")
    assert _mixer_spec(spec).params == dict(
        mimo_rank=4, rope_fraction=1.0, chunk_size=16, is_outproj_norm=True, backend="reference"
    )


def test_builder_refuses_unknown_settings():
    with pytest.raises(ValueError, match=r"\['mimo'\]"):
        layer_specs.mamba3_stack_spec(mimo=4)
    with pytest.raises(ValueError, match="d_state"):  # sizes come from the TransformerConfig
        layer_specs.mamba3_stack_spec(d_state=64)


@pytest.mark.skipif(HAVE_TE, reason="checks the behaviour without Transformer Engine, which is installed here")
@pytest.mark.parametrize("name", ["mamba3_siso_te_stack_spec", "mamba3_mimo_te_stack_spec"])
def test_te_variant_needs_transformer_engine(name):
    with pytest.raises(ImportError, match="Transformer Engine"):
        getattr(layer_specs, name)
    with pytest.raises(ImportError, match="transformer_engine"):
        layer_specs.mamba3_stack_spec(transformer_engine=True)
    assert name not in layer_specs.__all__


@pytest.mark.skipif(not HAVE_TE, reason="Transformer Engine is not installed")
def test_te_variant_uses_te_classes():
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm, TERowParallelLinear

    spec = layer_specs.mamba3_mimo_te_stack_spec
    mixer = _mixer_spec(spec)
    assert (mixer.submodules.in_proj, mixer.submodules.out_proj) == (TEColumnParallelLinear, TERowParallelLinear)
    assert mixer.params["mimo_rank"] == 4 and spec.submodules.final_norm is TENorm
