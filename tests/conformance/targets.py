"""Every registered backend and variant as the conformance suite runs it, and its bound against the oracle.

A `Target` says where a backend runs in these tests (device, input dtype, sizes its kernels take)
and how close it must come to the oracle, `mamba3_recurrent` in float64 on the very values the
backend saw: float64 1e-10 relative, float32 1e-5, bfloat16 `bf16_bound` (ERROR_MULTIPLE times the
bf16 reference's own error). `cases()` parametrises a test over every registered backend, variant
and layer variant (`MODELS`), skipping with the backend's own `why_not` where it cannot run here;
that is computed at collection, on a probe of the case's sizes on the target's device when this
machine has it (torch_xla on its CPU client, see tests/xla_runtime.py; CUDA), else on the CPU.

Tensors travel as one dict by name ("x", ..., "B_bias", ..., "initial_h", ...), cast to the
target's dtypes on the CPU; results as a dict "out", "final_h", ..., "grad_<name>".
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch
from torch import Tensor

from megatron_mamba3 import receipts
from megatron_mamba3.ops import Mamba3Inputs, Mamba3State, Mamba3Weights, mamba3_scan
from megatron_mamba3.ops.interface import compute_dtype
from megatron_mamba3.ops.oracle import mamba3_recurrent
from megatron_mamba3.ops.registry import BACKEND_NAMES, load_backend
from megatron_mamba3.ops.tilelang.function import TILE_ROWS
from tests import xla_runtime
from tests.helpers import angle_err, bf16_bound, make_case, make_state, rel_err

Named = dict[str, Tensor]
STATE_FIELDS = tuple(f"initial_{name}" for name in Mamba3State._fields)


@dataclasses.dataclass(frozen=True)
class Model:
    """The layer variant: MIMO rank R (1: SISO), B/C groups G, per-head output norm."""

    R: int
    G: int
    norm: bool


MODELS = {"SISO": Model(R=1, G=2, norm=False), "MIMO-norm": Model(R=4, G=1, norm=True)}


@dataclasses.dataclass(frozen=True)
class Target:
    """One registered backend variant in the tests: H heads, head dim p and state n of its cases,
    `length` of the packed rows, the `chunk_size` it is called with, `split` = (length, positions)
    of the state-split case, and the packings it refuses as (packing, ValueError message) pairs.
    `plain_backward`: its backward multiplies zero output gradients by non-finite values (0 · NaN),
    so a bad input of another document reaches the weight gradients (tests/conformance/nonfinite.py)."""

    backend: str
    variant: str
    device_type: str
    dtype: torch.dtype
    H: int
    p: int
    n: int
    length: int
    chunk: int
    split: tuple[int, tuple[int, ...]]
    refuses: tuple[tuple[str, str], ...] = ()
    plain_backward: bool = False

    @property
    def weight_dtype(self) -> torch.dtype:
        """Weights stay fp32 beside bf16 inputs (as the mixer keeps them)."""
        return torch.float32 if self.dtype == torch.bfloat16 else self.dtype

    def device(self) -> torch.device:
        """The target's device when this machine has it, else the CPU (where `why_not` says why not)."""
        if self.device_type == "xla" and xla_runtime.DEVICE is not None:
            return xla_runtime.DEVICE
        if self.device_type == "cuda" and torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")

    def sync(self) -> None:
        if self.device_type == "xla":
            xla_runtime.sync()

    def case(self, model: Model, b: int, l: int, *, seed: int, states: int = 0, **sizes) -> Named:  # noqa: E741
        """Inputs (b, l, ...), weights and `states` initial states (none when 0), drawn in float64
        and cast to the target's dtypes; `sizes` overrides H, p or n."""
        H, p, n = sizes.get("H", self.H), sizes.get("p", self.p), sizes.get("n", self.n)
        inputs, weights = make_case(b=b, l=l, H=H, p=p, R=model.R, G=model.G, n=n, norm=model.norm, seed=seed)
        initial = make_state(states, H, p, model.R, n, n // 4, seed=seed + 1) if states else None
        return self.cast(named(inputs, weights, initial))

    def cast(self, tensors: Named) -> Named:
        """Inputs to the target's dtype, weights to its weight dtype, states to the compute dtype."""
        def dtype(name):
            if name in Mamba3Inputs._fields:
                return self.dtype
            return compute_dtype(self.dtype) if name in STATE_FIELDS else self.weight_dtype

        return {name: t.to(dtype(name)) if t.is_floating_point() else t for name, t in tensors.items()}

    def probe(self, model: Model) -> Mamba3Inputs:
        """One token of the case's sizes on the target's device, for `why_not`."""
        inputs, _, _ = unnamed(self.case(model, 1, 1, seed=0))
        return Mamba3Inputs(*(t.to(self.device()) for t in inputs))

    def scan(self, leaves: Named, **packing) -> Named:
        """`mamba3_scan` on this backend variant (tensors already on the device)."""
        inputs, weights, state = unnamed(leaves)
        out, final = mamba3_scan(
            inputs, weights, initial_state=state, chunk_size=self.chunk, backend=self.backend, variant=self.variant,
            **{key: value.to(self.device()) for key, value in packing.items()},
        )
        return results(out, final)

    def forward(self, scan: Callable[[Named], Named], tensors: Named) -> Named:
        """`scan(tensors on the device)` without gradients -> CPU results."""
        with torch.no_grad():
            got = scan({name: t.to(self.device()) for name, t in tensors.items()})
        self.sync()
        return {name: t.cpu() for name, t in got.items()}

    def run(self, tensors: Named, **packing) -> Named:
        """The forward of `scan` on CPU tensors, without gradients -> CPU results."""
        return self.forward(lambda leaves: self.scan(leaves, **packing), tensors)

    def forward_backward(self, scan: Callable[[Named], Named], tensors: Named, cotangents: Named) -> Named:
        """`scan(leaves)` on the device, then the backward of Σ result · cotangent over the results
        `cotangents` names -> CPU results and "grad_<name>" of every tensor (zeros where none flows)."""
        device = self.device()
        leaves = {name: t.detach().to(device).requires_grad_() for name, t in tensors.items()}
        got = scan(leaves)
        loss = sum((got[name] * cotangent.to(device, got[name].dtype)).sum() for name, cotangent in cotangents.items())
        loss.backward()
        self.sync()
        grads = {f"grad_{name}": torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for name, leaf in leaves.items()}
        return {name: t.detach().cpu() for name, t in {**got, **grads}.items()}

    def cotangents(self, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> Named:
        """float64 cotangents of the results `shapes` names, holding values of the result's dtype
        (the output's dtype, the state's compute dtype), so the oracle sees what the backend sees."""
        generator = torch.Generator().manual_seed(seed)
        dtypes = {"out": self.dtype}
        return {
            name: torch.randn(shape, generator=generator, dtype=torch.float64)
            .to(dtypes.get(name, compute_dtype(self.dtype)))
            .double()
            for name, shape in shapes.items()
        }

    def bound(self, own_error: Callable[[], float]) -> float:
        """The relative error allowed against the oracle; `own_error` measures the bf16 reference's."""
        if self.dtype == torch.float64:
            return 1e-10
        if self.dtype == torch.float32:
            return 1e-5
        return bf16_bound(own_error())

    def own_error(self, tensors: Named, expected_out: Tensor, **packing) -> float:
        """Relative error of the reference's chunked form against `expected_out` (the oracle's), run
        on the target's device and dtypes: the bf16 reference's own error."""
        reference = dataclasses.replace(self, backend="reference", variant="chunked", chunk=16)
        return rel_err(reference.run(tensors, **packing)["out"], expected_out)

    def assert_ran(self) -> None:
        """The receipts since `clear_receipts()` name this backend variant and no other."""
        assert {(r.backend, r.variant) for r in receipts()} == {(self.backend, self.variant)}


TARGETS = {
    ("reference", "chunked"): Target(
        "reference", "chunked", "cpu", torch.float64, H=4, p=8, n=16, length=30, chunk=8, split=(29, tuple(range(30)))
    ),
    ("reference", "recurrent"): Target(
        "reference", "recurrent", "cpu", torch.float64, H=4, p=8, n=16, length=30, chunk=8, split=(29, (0, 1, 13, 29)),
        plain_backward=True,
    ),
    # XLA compiles a graph per shape: every case has the packed rows' length 3c + 7 (tests/conformance/nonfinite.py),
    # the split two halves of it.
    ("xla", "scan"): Target(
        "xla", "scan", "xla", torch.float32, H=2, p=4, n=8, length=31, chunk=8, split=(62, (31,)),
        refuses=(("cu_seqlens+initial_state", "per-document initial states are not supported"),),
    ),
    ("tilelang", "chunked"): Target(
        "tilelang", "chunked", "cuda", torch.bfloat16, H=4, p=64, n=128, length=199, chunk=64, split=(199, (64, 101))
    ),
}
ORACLE = TARGETS["reference", "recurrent"]
# The TileLang kernel configs (H, p, n, R, G, S, Q, norm, A_floor, packed, deterministic) of these cases, compiled
# first (tests/conftest.py); deterministic for nonfinite.check's bit-for-bit runs.
TILELANG_KERNELS = [
    (target.H, target.p, target.n, model.R, model.G, target.n // 4, TILE_ROWS // model.R, model.norm, None, False,
     deterministic)
    for target in (TARGETS["tilelang", "chunked"],)
    for model in MODELS.values()
    for deterministic in (False, True)
]


def registered() -> list:
    """pytest params (backend name, variant name) of every registered variant; an unimportable
    backend is one param skipped with its reason."""
    params = []
    for name in BACKEND_NAMES:
        backend = load_backend(name)
        if isinstance(backend, str):
            params.append(pytest.param(name, None, id=name, marks=pytest.mark.skip(reason=f"backend {name}: {backend}")))
        else:
            params += [pytest.param(name, variant, id=f"{name}-{variant}") for variant in backend.variants]
    return params


def cases(models: dict[str, Model] = MODELS, where: Callable[[Target], bool] = lambda target: True) -> list:
    """pytest params (target, model) for every registered variant (`where` it applies) and model,
    skipped with the backend's own reason where it cannot run here."""
    params = []
    for param in registered():
        name, variant = param.values
        if variant is None:
            params.append(pytest.param(None, None, id=param.id, marks=param.marks))
            continue
        if (name, variant) not in TARGETS:
            raise LookupError(f"backend {name!r} registers variant {variant!r}, which tests/conformance/targets.py lacks")
        target = TARGETS[name, variant]
        if not where(target):
            continue
        marks = {"xla": [pytest.mark.xla], "cuda": [pytest.mark.gpu]}.get(target.device_type, [])
        for model_name, model in models.items():
            reason = load_backend(name).why_not(target.probe(model))
            skip = [pytest.mark.skip(reason=f"backend {name}: {reason}")] if reason else []
            params.append(pytest.param(target, model, id=f"{name}-{variant}-{model_name}", marks=marks + skip))
    return params


def named(inputs: Mamba3Inputs, weights: Mamba3Weights, state: Mamba3State | None = None) -> Named:
    tensors = {**inputs._asdict(), **{name: w for name, w in weights._asdict().items() if w is not None}}
    if state is not None:
        tensors |= dict(zip(STATE_FIELDS, state))
    return tensors


def unnamed(tensors: Named) -> tuple[Mamba3Inputs, Mamba3Weights, Mamba3State | None]:
    state = Mamba3State(*(tensors[name] for name in STATE_FIELDS)) if STATE_FIELDS[0] in tensors else None
    weights = Mamba3Weights(*(tensors.get(name) for name in Mamba3Weights._fields))
    return Mamba3Inputs(*(tensors[name] for name in Mamba3Inputs._fields)), weights, state


def results(out: Tensor, final: Mamba3State) -> Named:
    return {"out": out, **{f"final_{name}": t for name, t in final._asdict().items()}}


def float64(tensors: Named) -> Named:
    return {name: t.double() for name, t in tensors.items()}


def oracle_scan(leaves: Named, **packing) -> Named:
    """The oracle, `mamba3_recurrent`, called directly (give it float64 leaves)."""
    inputs, weights, state = unnamed(leaves)
    return results(*mamba3_recurrent(inputs, weights, initial_state=state, **packing))


def result_shapes(b: int, l: int, states: int, target: Target, model: Model) -> dict[str, tuple[int, ...]]:  # noqa: E741
    """Shapes of "out" (b, l, H, p) and the final state fields (`states`, ...) of a target's case."""
    H, p, n = target.H, target.p, target.n
    shapes = (states, H, p, n), (states, model.R, H, n), (states, H, p), (states, H, n // 4)
    return {"out": (b, l, H, p), **{f"final_{name}": shape for name, shape in zip(Mamba3State._fields, shapes)}}


def assert_close(got: Named, expected: Named, tol: float) -> None:
    """Every result and gradient within `tol` relative (θ within `tol` modulo 2π); every expected
    tensor carries signal, so no comparison is empty."""
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if name == "final_theta":
            assert angle_err(got[name], value) < tol, name
        else:
            assert value.abs().max() > 0, name
            error = rel_err(got[name], value)
            assert error < tol, f"{name}: {error:.3g} >= {tol:.3g}"

