"""The XLA backend (docs/backends.md, XLA): the Mamba-3 scan as a `torch_xla.experimental.scan` over chunks
(`scan_adapter`, registered by `backend`), and runners for layer stacks (`stacks`). Importing this
package never imports torch_xla; its entry points do."""

from megatron_mamba3.ops.xla.stacks import Unit, repeating_units, run_hybrid_stack, scan_units

__all__ = ["Unit", "repeating_units", "run_hybrid_stack", "scan_units"]
