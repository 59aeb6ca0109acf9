"""The XLA backend (SPEC 6): the Mamba-3 scan as a `torch_xla.experimental.scan` over chunks
(`scan_adapter`, registered by `backend`), and runners for layer stacks (`stacks`). Importing this
package never imports torch_xla; its entry points do."""

from megatron_mamba3.ops.xla.stacks import run_hybrid_stack, scan_identical_blocks

__all__ = ["run_hybrid_stack", "scan_identical_blocks"]
