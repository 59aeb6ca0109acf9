"""What XLA compiles: steady-state training with a new document layout every step compiles nothing
after the first step (one layer, and a scan over hybrid units), while a new chunk size or sequence length compiles new graphs (both are
static, part of the compile key; segment ids and cu_seqlens offsets are runtime data)."""

import pytest
import torch

from megatron_mamba3 import Mamba3Config, mamba3_scan, segment_ids_from_doc_ids
from megatron_mamba3.ops.registry import load_backend
from tests.helpers import make_case
from megatron_mamba3.ops.xla.stacks import repeating_units, scan_units
from megatron_mamba3.testing.blocks import Mamba3Block, hybrid_blocks

pytestmark = pytest.mark.xla
STEPS, LENGTH = 20, 24


def compile_count() -> int:
    return load_backend("xla").compile_count()


def new_layout(packing: str, seen: set, generator: torch.Generator) -> torch.Tensor:
    """A random document layout not in `seen` (which it joins): doc_ids (2, LENGTH) as a loader
    gives them, or cu_seqlens (5,) of 4 documents in one row (some may be empty)."""
    while True:
        if packing == "doc_ids":
            layout = 7 + (torch.rand(2, LENGTH, generator=generator) < 0.2).cumsum(dim=1)
        else:
            cuts = torch.randint(0, LENGTH + 1, (3,), generator=generator).sort().values
            layout = torch.cat((torch.tensor([0]), cuts, torch.tensor([LENGTH])))
        key = tuple(layout.flatten().tolist())
        if key not in seen:
            seen.add(key)
            return layout


@pytest.mark.parametrize("packing", ["doc_ids", "cu_seqlens"])
def test_new_document_layouts_do_not_recompile(device, sync, packing):
    config = Mamba3Config(d_model=8, headdim=4, d_state=8, chunk_size=8)
    model = Mamba3Block(config, seed=0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    batch = 2 if packing == "doc_ids" else 1
    before, counts, layouts = compile_count(), [], set()
    for _ in range(STEPS):
        layout = new_layout(packing, layouts, generator)
        hidden = torch.randn(batch, LENGTH, config.d_model, generator=generator).to(device)
        if packing == "doc_ids":  # the loader's doc ids become runtime segment ids, explicitly (docs/packing_and_state.md)
            packed = dict(segment_ids=segment_ids_from_doc_ids(layout.to(device)))
        else:
            packed = dict(cu_seqlens=layout)
        out, state = model.mix(hidden, backend="xla", **packed)
        loss = out.square().mean() + state.h.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sync()
        counts.append(compile_count())
    assert torch.isfinite(loss.detach().cpu())
    # Step 1 compiles the whole training step (forward, backward, SGD update) and that graph is the
    # steady state: plain SGD keeps no optimizer state that appears after step 1, and the updated
    # parameters are device data like the uploaded ones. So exact equality from step 1 on.
    assert counts[0] > before
    assert counts == [counts[0]] * STEPS, counts


def test_chunk_size_and_length_are_part_of_the_compile_key(device, sync):
    inputs, weights = make_case(b=1, l=12, H=3, p=4, G=1, n=8, seed=9, dtype=torch.float32)  # H=3: unique shapes

    def train_step(length: int, chunk_size: int, segment_ids: list[int]) -> int:
        rows = type(inputs)(*(t[:, :length].to(device).requires_grad_() for t in inputs))
        on_device = type(weights)(*(None if t is None else t.to(device).requires_grad_() for t in weights))
        segments = torch.tensor([segment_ids[:length]], device=device)
        out, state = mamba3_scan(rows, on_device, segment_ids=segments, chunk_size=chunk_size, backend="xla")
        (out.square().sum() + state.h.sum()).backward()
        sync()
        return compile_count()

    first = train_step(12, 4, [0] * 5 + [1] * 7)
    assert train_step(12, 4, [0] * 2 + [1] * 6 + [2] * 4) == first  # new layout: cached
    new_chunk = train_step(12, 6, [0] * 12)
    assert new_chunk > first
    new_length = train_step(8, 4, [0] * 12)
    assert new_length > new_chunk
    assert train_step(12, 6, [0] * 3 + [1] * 9) == new_length  # back to a seen key: cached


def test_unit_scan_training_compiles_once(device, sync):
    """A scan over units of `M*-` with a new segment-id layout every step: step 1 compiles, then nothing."""
    config = Mamba3Config(d_model=8, headdim=4, d_state=8, chunk_size=8)
    units = repeating_units([block.to(device) for block in hybrid_blocks("M*-" * 2, config)], 3)
    optimizer = torch.optim.SGD([p for unit in units for p in unit.parameters()], lr=0.1)
    generator, layouts, counts = torch.Generator().manual_seed(2), set(), []
    for _ in range(4):
        segment_ids = segment_ids_from_doc_ids(new_layout("doc_ids", layouts, generator).to(device))
        hidden = torch.randn(2, LENGTH, config.d_model, generator=generator).to(device)
        scan_units(units, hidden, segment_ids=segment_ids).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        sync()
        counts.append(compile_count())
    assert counts == [counts[0]] * 4, counts
