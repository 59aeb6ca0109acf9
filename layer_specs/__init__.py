"""Hybrid stack specs with Mamba-3 layers; installed as `megatron_mamba3.layer_specs`.

Ready-made specs, by the names Megatron-LM's `--spec megatron_mamba3.layer_specs NAME` takes:

| name                          | M layers                       | linears, attention, norms     |
|-------------------------------|--------------------------------|-------------------------------|
| `mamba3_siso_stack_spec`      | SISO (mimo_rank 1, chunk 64)   | local (no TE needed)          |
| `mamba3_mimo_stack_spec`      | MIMO (mimo_rank 4, chunk 16)   | local                         |
| `mamba3_siso_te_stack_spec`   | SISO                           | Transformer Engine            |
| `mamba3_mimo_te_stack_spec`   | MIMO                           | Transformer Engine            |

The TE names exist only when Transformer Engine is installed (asking for one without it raises
`ImportError`). Other settings: `mamba3_stack_spec(mimo_rank=4, rope_fraction=1.0, ...)`.
"""

from megatron.core.extensions.transformer_engine import HAVE_TE

from .norm import LocalNorm
from .specs import mamba3_stack_spec
from .stack import Mamba3HybridStack, Mamba3HybridStackSubmodules

MIMO_RANK = 4

mamba3_siso_stack_spec = mamba3_stack_spec()
mamba3_mimo_stack_spec = mamba3_stack_spec(mimo_rank=MIMO_RANK)

_TE_SPECS = ("mamba3_siso_te_stack_spec", "mamba3_mimo_te_stack_spec")
if HAVE_TE:
    mamba3_siso_te_stack_spec = mamba3_stack_spec(transformer_engine=True)
    mamba3_mimo_te_stack_spec = mamba3_stack_spec(transformer_engine=True, mimo_rank=MIMO_RANK)


def __getattr__(name: str):
    if name in _TE_SPECS:
        raise ImportError(f"megatron_mamba3.layer_specs.{name} needs Transformer Engine, which is not installed")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LocalNorm",
    "Mamba3HybridStack",
    "Mamba3HybridStackSubmodules",
    "mamba3_mimo_stack_spec",
    "mamba3_siso_stack_spec",
    "mamba3_stack_spec",
    *(_TE_SPECS if HAVE_TE else ()),
]
