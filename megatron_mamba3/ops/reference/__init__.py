"""The pure-PyTorch reference: the float64 oracle (`mamba3_recurrent`), the chunked form
(`mamba3_chunked`, the default fallback backend) and the decode step (`mamba3_step`)."""

from megatron_mamba3.ops.reference.chunked import mamba3_chunked
from megatron_mamba3.ops.reference.recurrent import mamba3_recurrent
from megatron_mamba3.ops.reference.step import mamba3_step

__all__ = ["mamba3_chunked", "mamba3_recurrent", "mamba3_step"]
