"""Official state-spaces Mamba-3 checkpoints <-> this project's Megatron layout.

The official `MambaLMHeadModel` with Mamba-3 mixers (blocks without an MLP) keeps, per block i,
`backbone.layers.{i}.norm.weight` and `backbone.layers.{i}.mixer.{in_proj.weight, dt_bias, B_bias,
C_bias, B_norm.weight, C_norm.weight, D, mimo_x, mimo_z, mimo_o, norm.weight, out_proj.weight}`,
plus `backbone.embedding.weight`, `backbone.norm_f.weight` and `lm_head.weight`.

At tensor parallel size 1 the mixer's parameters keep the official names and layouts (in_proj's
row order included), so conversion renames keys and checks shapes; at tp > 1 each rank's slice
follows `parallel.shard_mixer_state`, and vocabulary-sized tensors are split by rows as Megatron's
vocab-parallel layers hold them (the vocabulary must already be padded to Megatron's size).

Both the current official module (`clamp(-heavy_tail_activation(dd_A), max=-A_floor)`) and this
project compute A = min(-f(dd_A), -A_floor), so converted weights compute the same A (older
official versions used -softplus(dd_A)).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from torch import Tensor

from megatron_mamba3.config import Mamba3Config
from megatron_mamba3.parallel import shard_mixer_state

_GLOBAL_KEYS = {
    "backbone.embedding.weight": "embedding.word_embeddings.weight",
    "backbone.norm_f.weight": "decoder.final_norm.weight",
    "lm_head.weight": "output_layer.weight",
}
_VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")
_BLOCK_KEY = re.compile(r"backbone\.layers\.(\d+)\.(norm\.weight|mixer\.(.+))")


def mixer_shapes(config: Mamba3Config) -> dict[str, tuple[int, ...]]:
    """The official (tp = 1) shape of every parameter of one mixer under `config`."""
    H, R, n, p = config.nheads, config.mimo_rank, config.d_state, config.headdim
    shapes = {
        "in_proj.weight": (config.d_in_proj, config.d_model),
        "dt_bias": (H,),
        "B_bias": (H, R, n),
        "C_bias": (H, R, n),
        "B_norm.weight": (n,),
        "C_norm.weight": (n,),
        "D": (H,),
        "out_proj.weight": (config.d_model, config.d_inner),
    }
    if config.is_mimo:
        shapes.update(mimo_x=(H, R, p), mimo_z=(H, R, p), mimo_o=(H, R, p))
    if config.is_outproj_norm:
        shapes["norm.weight"] = (config.d_inner,)
    return shapes


def check_mixer_state(state: Mapping[str, Tensor], config: Mamba3Config, where: str = "mixer") -> None:
    """`ValueError` naming the first missing, unexpected or wrongly shaped parameter."""
    expected = mixer_shapes(config)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{where}: missing {missing}, unexpected {unexpected} for {config}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{where}.{name} has shape {tuple(state[name].shape)}, expected {shape}")


def official_to_megatron(
    official: Mapping[str, Tensor],
    config: Mamba3Config,
    *,
    layer_numbers: Sequence[int] | None = None,
    tp_size: int = 1,
    tp_rank: int = 0,
) -> dict[str, Tensor]:
    """An official Mamba-3 LM state dict -> the state dict of a Megatron `HybridModel` built with
    `megatron_mamba3.layer_specs` on TP rank `tp_rank`.

    `layer_numbers[i]` is the decoder layer index that official block i becomes (default i), for
    patterns that put attention or MLP layers between the Mamba-3 layers.
    """
    blocks = _blocks(official)
    numbers = list(range(len(blocks))) if layer_numbers is None else list(layer_numbers)
    if sorted(blocks) != list(range(len(numbers))):
        raise ValueError(f"the checkpoint has blocks {sorted(blocks)}, layer_numbers maps {len(numbers)}")
    converted = {}
    for key, ours in _GLOBAL_KEYS.items():
        if key in official:
            tensor = official[key]
            converted[ours] = tensor.chunk(tp_size, dim=0)[tp_rank] if ours in _VOCAB_PARALLEL else tensor
    for index, (norm, mixer) in blocks.items():
        prefix = f"decoder.layers.{numbers[index]}."
        check_mixer_state(mixer, config, where=f"backbone.layers.{index}.mixer")
        if norm is not None:
            converted[prefix + "norm.weight"] = norm
        for name, tensor in shard_mixer_state(mixer, config, tp_size, tp_rank).items():
            converted[prefix + "mixer." + name] = tensor
    return converted


def megatron_to_official(
    megatron: Mapping[str, Tensor], config: Mamba3Config, *, layer_numbers: Sequence[int]
) -> dict[str, Tensor]:
    """The inverse of `official_to_megatron` at tp = 1: decoder layer `layer_numbers[i]` becomes
    official block i; keys of other layers (attention, MLP) are left out."""
    official = {key: megatron[ours] for key, ours in _GLOBAL_KEYS.items() if ours in megatron}
    for index, number in enumerate(layer_numbers):
        prefix = f"decoder.layers.{number}."
        mixer = {k.removeprefix(prefix + "mixer."): v for k, v in megatron.items() if k.startswith(prefix + "mixer.")}
        mixer = {k: v for k, v in mixer.items() if not k.endswith("_extra_state")}
        check_mixer_state(mixer, config, where=prefix + "mixer")
        official.update({f"backbone.layers.{index}.mixer.{k}": v for k, v in mixer.items()})
        if prefix + "norm.weight" in megatron:
            official[f"backbone.layers.{index}.norm.weight"] = megatron[prefix + "norm.weight"]
    return official


def _blocks(official: Mapping[str, Tensor]) -> dict[int, tuple[Tensor | None, dict[str, Tensor]]]:
    """Block index -> (pre-norm weight or None, mixer parameters); `ValueError` on unknown keys."""
    blocks: dict[int, tuple[Tensor | None, dict[str, Tensor]]] = {}
    unknown = []
    for key, tensor in official.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match is None:
            if key not in _GLOBAL_KEYS:
                unknown.append(key)
            continue
        index = int(match.group(1))
        norm, mixer = blocks.get(index, (None, {}))
        if match.group(3) is None:
            norm = tensor
        else:
            mixer[match.group(3)] = tensor
        blocks[index] = (norm, mixer)
    if unknown:
        raise ValueError(f"keys that are not part of an official Mamba-3 LM (MLP blocks are not supported): {unknown}")
    return blocks
