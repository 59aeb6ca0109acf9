"""SPMD over heads (docs/parallelism.md: "the scan itself communicates nothing"): the XLA scan with every per-head
input and weight sharded over a mesh of 4 CPU PJRT devices equals the reference on the host (output,
final state and every gradient, fp32 1e-5), and the compiled HLO has no all-gather inside the forward
or backward scan loop, whose carried state holds 3 of the 12 heads per device.

The sharded run needs its own process (4 devices, SPMD mode): `tests/xla/spmd_heads.py`.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_mamba3 import mamba3_scan
from tests.helpers import angle_err, make_case, rel_err

pytestmark = pytest.mark.xla
TOL = 1e-5
CHUNK = 8
ROOT = Path(__file__).parents[2]
B, H, P, N = 2, 12, 6, 8
HEAD_AXES = {"x": 2, "z": 2, "dt": 2, "A": 2, "trap": 2, "B_bias": 0, "C_bias": 0, "D": 0}  # B, C, angles: replicated


def CASE():
    return make_case(b=B, l=21, H=H, p=P, R=1, G=1, n=N, seed=11, dtype=torch.float32)


MISSING = [name for name in ("jax", "flax") if importlib.util.find_spec(name) is None]
NEEDS_JAX = (
    f"{' and '.join(MISSING)} not installed: torch_xla 2.9's scan backward under SPMD calls shard_as -> "
    "xla_builder.call_jax, which raises 'AssertionError: Jax is required for this feature' (install "
    "torch_xla[pallas]==2.9.0 and flax==0.12.0)"
)


def forward_backward(device, sync, backend, inputs, weights, place=lambda name, tensor: tensor):
    """Run `mamba3_scan` on `device` (then `sync`), each input leaf passed through `place(name, tensor)`
    once on `device`, and backpropagate fixed random cotangents of the output and of every final-state
    field; returns {name: CPU tensor} for outputs and all gradients."""
    leaves = {**inputs._asdict(), **{k: v for k, v in weights._asdict().items() if v is not None}}
    leaves = {k: place(k, v.detach().to(device)).requires_grad_() for k, v in leaves.items()}
    out, final = mamba3_scan(
        type(inputs)(*(leaves[k] for k in inputs._fields)), type(weights)(*(leaves.get(k) for k in weights._fields)),
        chunk_size=CHUNK, backend=backend,
    )
    results = {"out": out, **{f"final_{k}": v for k, v in final._asdict().items()}}
    generator = torch.Generator().manual_seed(0)
    loss = sum((t * torch.randn(t.shape, generator=generator).to(device)).sum() for t in results.values())
    loss.backward()
    results |= {f"grad_{k}": v.grad for k, v in leaves.items()}
    sync()
    return {k: v.detach().cpu() for k, v in results.items()}


def computations(hlo: str) -> dict[str, str]:
    """HLO module text -> {computation name: its body text}."""
    found = re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo, flags=re.M | re.S)
    return {match.group(1): match.group(2) for match in found}


def loop_bodies(hlo: str) -> dict[str, str]:
    """{while body name: the text of the body and of every computation it calls}."""
    comps = computations(hlo)

    def closure(name, seen):
        if name in seen or name not in comps:
            return ""
        seen.add(name)
        called = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", comps[name])
        return comps[name] + "".join(closure(c, seen) for c in called)

    bodies = re.findall(r" while\(.*?body=%?([\w.\-]+)", hlo)
    return {body: closure(body, set()) for body in bodies}


@pytest.mark.skipif(bool(MISSING), reason=NEEDS_JAX)
def test_heads_sharded_over_4_devices_match_and_scan_has_no_all_gather(tmp_path):
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_backend_optimization_level=0 --xla_dump_to={tmp_path}/hlo --xla_dump_hlo_as_text")
    run = subprocess.run([sys.executable, "-m", "tests.xla.spmd_heads", str(tmp_path)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = torch.load(tmp_path / "results.pt")
    assert saved["specs"]["dt"].startswith("{devices=[1,1,4]") and saved["specs"]["B"] == "", saved["specs"]  # B: no annotation

    expected = forward_backward(torch.device("cpu"), lambda: None, "reference", *CASE())
    got = saved["results"]
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if name == "final_theta":
            assert angle_err(got[name], value) < TOL
        else:
            assert value.abs().max() > 0, name
            assert rel_err(got[name], value) < TOL, name

    (step,) = (tmp_path / "hlo").glob("*SyncTensorsGraph*cpu_after_optimizations.txt")
    bodies = loop_bodies(step.read_text())
    assert len(bodies) == 2, list(bodies)  # the forward scan and the backward scan
    for name, text in bodies.items():
        assert "all-gather" not in text, name
        assert f"f32[{B},{H // 4},{P},{N}]" in text and f"f32[{B},{H},{P},{N}]" not in text, name  # h: 3 heads each
