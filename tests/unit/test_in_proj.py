"""Every view of in_proj's columns agrees with the docs: the config sizes, the split, each TP rank's
rows as the converter makes them, and the checkpoint's tensor per piece.

The oracle is not `megatron_mamba3.in_proj` but the docs: the order and widths are read from
docs/math.md §1 (`[z | x | ...]` with widths `[H·p, ...]`, each piece read with the shape its width
spells, e.g. H·p as (H, p)); the TP rule of docs/parallelism.md is written out below (heads' pieces
split by head, B and C by group when g % tp == 0 and else the one group g(h) = h // (H/G) that the
rank's heads read, docs/math.md §2; the angles whole).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from megatron_mamba3 import Mamba3Config, init_layer_params, mamba3_layer
from megatron_mamba3.checkpoint import mixer_sharded_state_dict
from megatron_mamba3.convert import mixer_shapes, official_to_megatron
from megatron_mamba3.in_proj import InProjLayout, InProjPieces, unshard
from megatron_mamba3.parallel import REPLICATED_IN_PROJ, detach_replicated_rows

MATH = Path(__file__).resolve().parents[2] / "docs" / "math.md"
CONFIGS = {  # H = 8 heads each
    "siso-g1": Mamba3Config(d_model=16, headdim=4, d_state=8),
    "mimo-r2-g2": Mamba3Config(d_model=16, headdim=4, d_state=8, ngroups=2, mimo_rank=2, rope_fraction=1.0),
    "mimo-r4-g4": Mamba3Config(d_model=16, headdim=4, d_state=8, ngroups=4, mimo_rank=4),
}
GRID = [(name, tp, rank) for name in CONFIGS for tp in (1, 2, 4) for rank in range(tp)]
BY_HEAD = ("z", "x", "dd_dt", "dd_A", "trap")


def documented_columns(config: Mamba3Config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, read shape) of each piece in column order, as docs/math.md §1 states them."""
    found = re.search(r"in_proj maps `d_model` to `\[(.+?)\]` with widths\s+`\[(.+?)\]`", MATH.read_text())
    assert found, f"{MATH} no longer states in_proj's columns in the form this test reads"
    names = [name.strip() for name in found.group(1).split("|")]
    symbols = dict(H=config.nheads, p=config.headdim, R=config.mimo_rank, G=config.ngroups, n=config.d_state,
                   S=config.num_rope_angles)
    shapes = [tuple(symbols[s] for s in width.strip().split("·")) for width in found.group(2).split(",")]
    assert len(names) == len(shapes) == 8
    return list(zip(names, shapes))


def documented_split(columns: torch.Tensor, config: Mamba3Config) -> dict[str, torch.Tensor]:
    """(..., d_in_proj) -> each piece, cut and shaped by the docs."""
    pieces, start = {}, 0
    for name, shape in documented_columns(config):
        width = math.prod(shape)
        pieces[name] = columns[..., start : start + width].reshape(*columns.shape[:-1], *shape)
        start += width
    assert start == columns.shape[-1]
    return pieces


def documented_rank_part(name: str, piece: torch.Tensor, read_shape: tuple[int, ...], config: Mamba3Config,
                         tp: int, rank: int) -> torch.Tensor:
    """What TP rank `rank` of `tp` reads of a whole piece (..., *read_shape), by docs/parallelism.md."""
    H, g = config.nheads, config.ngroups
    first = piece.dim() - len(read_shape)
    if name in BY_HEAD:  # heads are the first axis of the read shape
        return piece.narrow(first, rank * H // tp, H // tp)
    if name in ("B", "C"):  # (R, G, n): groups are the second
        group = rank * g // tp if g % tp == 0 else (rank * H // tp) // (H // g)
        return piece.narrow(first + 1, group, max(g // tp, 1))
    return piece  # the angles


def converted_rows(config: Mamba3Config, weight: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """TP rank `rank`'s in_proj rows (split ones, then replicated ones) as the converter makes them
    from an official checkpoint whose in_proj weight is `weight`."""
    g = torch.Generator().manual_seed(1)
    official = {f"backbone.layers.0.mixer.{name}": torch.randn(shape, generator=g, dtype=torch.float64)
                for name, shape in mixer_shapes(config).items()}
    official["backbone.layers.0.mixer.in_proj.weight"] = weight
    converted = official_to_megatron(official, config, tp_size=tp, tp_rank=rank)
    rows = [converted["decoder.layers.0.mixer.in_proj.weight"]]
    if tp > 1:
        rows.append(converted[f"decoder.layers.0.mixer.{REPLICATED_IN_PROJ}"])
    return torch.cat(rows)


def _weight(config: Mamba3Config) -> torch.Tensor:
    """A full in_proj weight whose every entry is distinct."""
    return torch.arange(config.d_in_proj * config.d_model, dtype=torch.float64).reshape(config.d_in_proj, -1)


@pytest.mark.parametrize("name", CONFIGS)
def test_order_and_sizes_are_the_documented_ones(name):
    config = CONFIGS[name]
    columns = documented_columns(config)
    assert InProjPieces._fields == tuple(piece for piece, _ in columns)
    assert config.in_proj_sizes == tuple(math.prod(shape) for _, shape in columns)
    assert config.in_proj_sizes._fields == InProjPieces._fields
    assert mixer_shapes(config)["in_proj.weight"] == (sum(math.prod(shape) for _, shape in columns), config.d_model)


@pytest.mark.parametrize("name, tp, rank", GRID)
def test_each_rank_splits_its_converted_rows_as_the_docs_say(name, tp, rank):
    config = CONFIGS[name]
    weight = _weight(config)
    rows = converted_rows(config, weight, tp, rank)
    layout = InProjLayout(config, tp, rank)
    assert rows.shape[0] == layout.width
    # A (d_model, width) projection whose columns are the weight's rows: each column is one row.
    got = layout.split(rows.T)
    expected, read_shapes = documented_split(weight.T, config), dict(documented_columns(config))
    assert got._fields == tuple(expected)
    for piece, tensor in zip(got._fields, got):
        assert torch.equal(tensor, documented_rank_part(piece, expected[piece], read_shapes[piece], config, tp, rank)), piece


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("tp", [2, 4])
def test_rank_rows_gather_back_to_the_full_weight(name, tp):
    config = CONFIGS[name]
    weight = _weight(config)
    assert torch.equal(unshard([converted_rows(config, weight, tp, rank) for rank in range(tp)], config), weight)


ONE_RANK = SimpleNamespace(rank=lambda: 0, size=lambda: 1)  # a process group for Megatron's replica ids


class _Mixer(nn.Module):
    """A mixer as the checkpoint sees it: only in_proj, its replicated rows detached at tp > 1."""

    def __init__(self, rows: torch.Tensor, layout: InProjLayout):
        super().__init__()
        self.in_proj = nn.Linear(rows.shape[1], rows.shape[0], bias=False, dtype=rows.dtype)
        self.in_proj.weight.data.copy_(rows)
        if layout.tp_size > 1:
            detach_replicated_rows(self.in_proj, layout)


@pytest.mark.parametrize("name", CONFIGS)
def test_checkpoint_pieces_hold_the_documented_rows_at_every_tp(name):
    config = CONFIGS[name]
    weight = _weight(config)
    expected = {piece: columns.flatten(1).T for piece, columns in documented_split(weight.T, config).items()}  # (w, d)
    global_shapes = {}
    for tp in (1, 2, 4):
        assembled = {piece: torch.full_like(rows, float("nan")) for piece, rows in expected.items()}
        for rank in range(tp):
            layout = InProjLayout(config, tp, rank)
            mixer = _Mixer(converted_rows(config, weight, tp, rank), layout)
            sharded = mixer_sharded_state_dict(mixer, layout, ONE_RANK, "mixer.", (), {"dp_cp_group": ONE_RANK})
            for factory in sharded.values():
                assert factory.key == "mixer.in_proj.weight"
                for key, tensor in factory.build().items():
                    assert tensor.key == f"mixer.in_proj.weight.{key}"
                    shapes = global_shapes.setdefault(key, tensor.global_shape)
                    assert tensor.global_shape == shapes, (key, tp)  # TP-independent
                    full = assembled[key].view(*tensor.global_shape)
                    index = tuple(slice(o, o + s) for o, s in zip(tensor.global_offset, tensor.local_shape))
                    full[index] = tensor.data
        for piece, rows in assembled.items():
            assert torch.equal(rows, expected[piece]), (piece, tp)
    assert set(global_shapes) == set(expected)


def test_a_layout_of_another_config_or_width_is_refused_naming_it():
    config = CONFIGS["siso-g1"]
    projected = torch.zeros(1, 2, config.d_in_proj)
    other = InProjLayout(CONFIGS["mimo-r2-g2"])
    with pytest.raises(ValueError, match=r"layout is that of Mamba3Config\(.*mimo_rank=2.*not of the layer's"):
        mamba3_layer(projected, init_layer_params(config), config, layout=other)
    layout = InProjLayout(config, 2, 1)
    message = f"width {config.d_in_proj}, expected {layout.width}: in_proj's columns on tensor parallel rank 1 of 2"
    with pytest.raises(ValueError, match=message):
        layout.split(projected)
