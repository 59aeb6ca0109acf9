"""The reference backend: the pure-PyTorch chunked form (`mamba3_chunked`, the default fallback backend)
and its registration, which also offers the oracle (`ops/oracle/`) as the "recurrent" variant and its
step for decode."""

from megatron_mamba3.ops.reference.chunked import mamba3_chunked

__all__ = ["mamba3_chunked"]
