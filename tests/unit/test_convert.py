"""The official-checkpoint converter: key mapping, exact round trip, TP slices, and clear errors."""

import pytest
import torch

from megatron_mamba3.convert import megatron_to_official, official_to_megatron
from megatron_mamba3.parallel import unshard_mixer_state
from tests.golden import golden_config, official_mixer_state

CASE = "mimo_r4_norm_rope1"
VOCAB = 64


def _official_lm(tmp_path) -> dict[str, torch.Tensor]:
    """A two-block official Mamba-3 LM checkpoint written to disk and read back."""
    g = torch.Generator().manual_seed(0)
    d = golden_config(CASE).d_model
    state = {"backbone.embedding.weight": torch.randn(VOCAB, d, generator=g),
             "backbone.norm_f.weight": torch.randn(d, generator=g),
             "lm_head.weight": torch.randn(VOCAB, d, generator=g)}
    for block in range(2):
        state[f"backbone.layers.{block}.norm.weight"] = torch.randn(d, generator=g)
        for name, tensor in official_mixer_state(CASE).items():
            state[f"backbone.layers.{block}.mixer.{name}"] = tensor + block
    torch.save(state, tmp_path / "official.pt")
    return torch.load(tmp_path / "official.pt")


def test_round_trip_is_exact_and_keys_follow_megatron(tmp_path):
    official = _official_lm(tmp_path)
    config = golden_config(CASE)
    converted = official_to_megatron(official, config, layer_numbers=[0, 2])
    for ours, theirs in [
        ("decoder.layers.2.mixer.in_proj.weight", "backbone.layers.1.mixer.in_proj.weight"),
        ("decoder.layers.2.norm.weight", "backbone.layers.1.norm.weight"),
        ("decoder.final_norm.weight", "backbone.norm_f.weight"),
        ("embedding.word_embeddings.weight", "backbone.embedding.weight"),
        ("output_layer.weight", "lm_head.weight"),
    ]:
        assert torch.equal(converted[ours], official[theirs]), ours
    assert not any(key.startswith("decoder.layers.1.") for key in converted)
    back = megatron_to_official(converted, config, layer_numbers=[0, 2])
    assert back.keys() == official.keys()
    assert all(torch.equal(back[key], official[key]) for key in official)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_slices_reassemble_to_the_tp1_layout(tmp_path, tp):
    official, config = _official_lm(tmp_path), golden_config(CASE)
    full = official_to_megatron(official, config)
    ranks = [official_to_megatron(official, config, tp_size=tp, tp_rank=rank) for rank in range(tp)]
    prefix = "decoder.layers.1.mixer."
    mixers = [{k.removeprefix(prefix): v for k, v in r.items() if k.startswith(prefix)} for r in ranks]
    for name, tensor in unshard_mixer_state(mixers, config).items():
        assert torch.equal(tensor, full[prefix + name]), name
    vocab = torch.cat([r["output_layer.weight"] for r in ranks])
    assert torch.equal(vocab, full["output_layer.weight"]) and ranks[0]["output_layer.weight"].shape[0] == VOCAB // tp


def test_bad_checkpoints_raise_naming_the_key(tmp_path):
    official, config = _official_lm(tmp_path), golden_config(CASE)
    wrong = dict(official, **{"backbone.layers.1.mixer.D": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"backbone.layers.1.mixer.D has shape \(3,\), expected \(8,\)"):
        official_to_megatron(wrong, config)
    with pytest.raises(ValueError, match=r"MLP blocks are not supported\): \['backbone.layers.0.mlp.fc1.weight'\]"):
        official_to_megatron(dict(official, **{"backbone.layers.0.mlp.fc1.weight": torch.zeros(1)}), config)
    missing = {k: v for k, v in official.items() if k != "backbone.layers.0.mixer.mimo_z"}
    with pytest.raises(ValueError, match=r"backbone.layers.0.mixer: missing \['mimo_z'\]"):
        official_to_megatron(missing, config)
    with pytest.raises(ValueError, match="layer_numbers maps 3"):
        official_to_megatron(official, config, layer_numbers=[0, 1, 2])
