"""Inputs for the tests and benchmarks, not part of the layer's API: random scan cases and states and
the relative error the tests bound (`cases`), pre-norm blocks to build hybrid stacks from (`blocks`), and the bytes torch_xla's scan
saves per iteration (`xla_memory`, which imports torch_xla)."""

from megatron_mamba3.testing.cases import make_case, make_state, rel_err

__all__ = ["make_case", "make_state", "rel_err"]
