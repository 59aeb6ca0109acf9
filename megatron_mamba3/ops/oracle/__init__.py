"""The oracle: the Mamba-3 recurrence as docs/math.md §2 states it, one token at a time. `mamba3_step`
advances the state by one token (the decode step of every device); `mamba3_recurrent` runs it over
packed sequences and, in float64, is what every backend is tested against."""

from megatron_mamba3.ops.oracle.recurrent import mamba3_recurrent
from megatron_mamba3.ops.oracle.step import mamba3_step

__all__ = ["mamba3_recurrent", "mamba3_step"]
