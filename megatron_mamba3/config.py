"""`Mamba3Config`: the hyper-parameters of one Mamba-3 mixer and the rules they keep
(what the sizes mean: docs/math.md §1).

Each violated rule raises `ValueError` at construction, naming the field and the bad value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from numbers import Integral, Real

from megatron_mamba3.in_proj import InProjLayout, InProjPieces
from megatron_mamba3.psiv import check_psiv_gate

ROPE_FRACTIONS = (0.5, 1.0)
MAX_CHUNK_SIZE = 1024  # scan chunks cost memory quadratic in their size


def _fail(field: str, value: object, rule: str) -> None:
    raise ValueError(f"Mamba3Config.{field}={value!r}: {rule}")


def _require_int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        _fail(field, value, "must be an int")
    if value < minimum:
        _fail(field, value, f"must be >= {minimum}")


def _require_positive_real(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        _fail(field, value, "must be a finite number > 0")


@dataclasses.dataclass(frozen=True)
class Mamba3Config:
    """Hyper-parameters of one Mamba-3 layer (docs/math.md §1).

    `mimo_rank == 1` is SISO (adjacent rotary pairs); `mimo_rank > 1` is MIMO (half-split pairs,
    `mimo_x/z/o` parameters). `chunk_size=None` picks 64 for SISO and 16 for MIMO: the chunk length of
    the reference and XLA scans (the TileLang kernels use their own tile of 64 / R tokens); it never
    changes the math. Derived sizes are properties: `d_inner`, `nheads`,
    `num_rope_angles` (S), `d_in_proj`, `in_proj_sizes`.
    """

    d_model: int
    expand: int | float = 2
    headdim: int = 64
    d_state: int = 128
    ngroups: int = 1
    mimo_rank: int = 1
    rope_fraction: float = 0.5
    chunk_size: int | None = None
    A_floor: float = 1e-4
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_floor: float = 1e-4
    is_outproj_norm: bool = False

    def __post_init__(self) -> None:
        check_psiv_gate()
        _require_int("d_model", self.d_model, 1)
        _require_positive_real("expand", self.expand)
        if float(self.expand * self.d_model) != int(self.expand * self.d_model):
            _fail("expand", self.expand, f"expand * d_model ({self.expand} * {self.d_model}) must be an integer")
        _require_int("headdim", self.headdim, 1)
        if self.d_inner % self.headdim:
            _fail("headdim", self.headdim, f"must divide d_inner = expand * d_model = {self.d_inner}")
        _require_int("d_state", self.d_state, 2)
        if self.d_state % 2:
            _fail("d_state", self.d_state, "must be even")
        _require_int("ngroups", self.ngroups, 1)
        if self.nheads % self.ngroups:
            _fail("ngroups", self.ngroups, f"must divide the number of heads H = {self.nheads}")
        _require_int("mimo_rank", self.mimo_rank, 1)
        if self.rope_fraction not in ROPE_FRACTIONS or isinstance(self.rope_fraction, bool):
            _fail("rope_fraction", self.rope_fraction, f"must be one of {ROPE_FRACTIONS}")
        if self.num_rope_angles < 1:
            _fail("d_state", self.d_state, f"leaves no rotary angle at rope_fraction={self.rope_fraction}")
        if self.chunk_size is not None:
            _require_int("chunk_size", self.chunk_size, 1)
            if self.chunk_size > MAX_CHUNK_SIZE:
                _fail("chunk_size", self.chunk_size, f"must be <= {MAX_CHUNK_SIZE}")
        for field in ("A_floor", "dt_min", "dt_max", "dt_floor"):
            _require_positive_real(field, getattr(self, field))
        if self.dt_max < self.dt_min:
            _fail("dt_max", self.dt_max, f"must be >= dt_min = {self.dt_min}")
        if not isinstance(self.is_outproj_norm, bool):
            _fail("is_outproj_norm", self.is_outproj_norm, "must be a bool")

    @property
    def is_mimo(self) -> bool:
        return self.mimo_rank > 1

    @property
    def d_inner(self) -> int:
        return int(self.expand * self.d_model)

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def num_rope_angles(self) -> int:
        """S: rotated pairs per head, floor_even(d_state * rope_fraction) / 2."""
        rotated = int(self.d_state * self.rope_fraction)
        return (rotated - rotated % 2) // 2

    @property
    def scan_chunk_size(self) -> int:
        """The chunk size in effect: `chunk_size`, or 64 (SISO) / 16 (MIMO) when unset."""
        if self.chunk_size is not None:
            return self.chunk_size
        return 16 if self.is_mimo else 64

    @property
    def in_proj_sizes(self) -> InProjPieces[int]:
        """Column widths of in_proj's pieces, in their order (`in_proj.InProjPieces`)."""
        return InProjLayout(self).sizes

    @property
    def d_in_proj(self) -> int:
        return sum(self.in_proj_sizes)

    def heads_per_rank(self, tensor_parallel_size: int) -> int:
        """H / tp; raises `ValueError` when tp does not divide H (docs/parallelism.md, Tensor parallelism)."""
        _require_int("tensor_parallel_size", tensor_parallel_size, 1)
        if self.nheads % tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size={tensor_parallel_size} must divide the number of heads "
                f"H = {self.nheads} (d_inner={self.d_inner}, headdim={self.headdim})"
            )
        return self.nheads // tensor_parallel_size


def _refuse_unknown_fields(init):
    """Wrap the dataclass `__init__` so that an unknown field raises `ValueError` naming it, as
    every other bad field does (a dataclass alone raises `TypeError`)."""
    fields = frozenset(f.name for f in dataclasses.fields(Mamba3Config))

    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        unknown = sorted(kwargs.keys() - fields)
        if unknown:
            raise ValueError(f"Mamba3Config has no field(s) {unknown}; fields: {sorted(fields)}")
        init(self, *args, **kwargs)

    return checked


Mamba3Config.__init__ = _refuse_unknown_fields(Mamba3Config.__init__)
