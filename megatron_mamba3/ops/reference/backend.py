"""The reference backend: pure PyTorch, runs on any device and dtype; its step decodes for every device."""

from megatron_mamba3.ops.oracle.recurrent import mamba3_recurrent
from megatron_mamba3.ops.oracle.step import mamba3_step
from megatron_mamba3.ops.reference.chunked import mamba3_chunked
from megatron_mamba3.ops.registry import Backend, ScanVariant


def _recurrent(inputs, weights, *, chunk_size, **packing):
    """The oracle has no chunks: `chunk_size` is accepted for the common signature and unused."""
    del chunk_size
    return mamba3_recurrent(inputs, weights, **packing)


BACKEND = Backend(
    name="reference",
    variants={
        "chunked": ScanVariant("reference", "chunked", mamba3_chunked),
        "recurrent": ScanVariant("reference", "recurrent", _recurrent),
    },
    default_variant="chunked",
    why_not=lambda inputs: None,
    decode=mamba3_step,
)
