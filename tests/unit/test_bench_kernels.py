"""The CPU parts of benchmarks/bench_kernels.py: its accuracy columns (`output_errors`, errors against
the float64 oracle) and where `--official` finds the official kernels (`resolve_official`,
`official_ms`); and bench_packed.py's cases and table. The timing itself needs a CUDA GPU and is a
benchmark, not a test."""

import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench_kernels import (
    OFFICIAL_RECORDED, OFFICIAL_SCRIPT, Official, kernel_kind, kernel_table, official_ms, output_errors,
    recorded_official_ms, resolve_official, scan_call,
)
from megatron_mamba3.ops import mamba3_scan
from tests.helpers import make_case


def _reference(inputs, weights):
    out, _ = mamba3_scan(inputs, weights, backend="reference", variant="chunked", chunk_size=8)
    return out


@pytest.mark.parametrize("R", [1, 2])
def test_output_errors_hand_checked(R):
    inputs, weights = make_case(b=2, l=37, H=4, p=8, R=R, G=2, n=16, seed=R)  # float64
    out = _reference(inputs, weights)
    exact = output_errors(inputs, weights, {"same": out})
    assert exact["reference"] <= 1e-10 and exact["same"] <= 1e-10, exact

    # One element of row 0 off by a quarter of the output's largest magnitude: error 0.25.
    perturbed = out.clone()
    perturbed[0, 20, 3, 5] += 0.25 * out[0].abs().max()
    assert output_errors(inputs, weights, {"perturbed": perturbed})["perturbed"] == pytest.approx(0.25, abs=1e-10)

    # Only the first `rows` batch rows count.
    broken = out.clone()
    broken[1, 3, 2, 1] += 0.5 * out.abs().max()
    assert output_errors(inputs, weights, {"broken": broken}, rows=1)["broken"] <= 1e-10
    assert output_errors(inputs, weights, {"broken": broken}, rows=2)["broken"] == pytest.approx(0.5, abs=1e-10)


def test_output_errors_of_bf16_inputs_is_the_bf16_reference_error():
    inputs, weights = make_case(b=1, l=37, H=4, p=8, R=1, G=2, n=16, seed=0, dtype=torch.float32)
    errors = output_errors(inputs.to(torch.bfloat16), weights, {})
    assert 1e-4 < errors["reference"] < 1e-2, errors  # bf16 rounding, not the fp32 path's 1e-6
    assert output_errors(inputs, weights, {})["reference"] < 1e-5  # fp32 inputs: the fp32 bound


def test_scan_call_times_what_the_official_script_times(monkeypatch):
    """The forward runs without a graph; the forward+backward returns the forward's output and takes the
    gradients of every input and weight (`torch.autograd.grad`, nothing accumulated into the caller's tensors)
    from one output gradient, the same at every call."""
    inputs, weights = make_case(b=1, l=12, H=2, p=4, R=2, G=1, n=8, seed=3, dtype=torch.float32)
    expected, _ = mamba3_scan(inputs, weights, backend="reference", chunk_size=32)  # the call's chunk: 64 / R
    out = scan_call("reference", inputs, weights, train=False)()
    assert out.grad_fn is None and torch.equal(out, expected)

    taken = []
    grad = torch.autograd.grad
    record = lambda out, leaves, dout: taken.append((leaves, dout)) or grad(out, leaves, dout)  # noqa: E731
    monkeypatch.setattr(torch.autograd, "grad", record)
    forward_backward = scan_call("reference", inputs, weights, train=True)
    for _ in range(2):
        assert torch.equal(forward_backward().detach(), expected)
    present = [t for t in (*inputs, *weights) if t is not None]
    (leaves, dout), (again, dout_again) = taken
    assert [t.shape for t in leaves] == [t.shape for t in present] and all(t.requires_grad for t in leaves)
    assert all(a is b for a, b in zip(again, leaves)) and dout_again is dout and dout.shape == expected.shape
    assert all(not t.requires_grad and t.grad is None for t in present)


def test_output_errors_rejects_rows_outside_the_batch():
    inputs, weights = make_case(b=2, l=5)
    with pytest.raises(ValueError, match="rows=3"):
        output_errors(inputs, weights, {}, rows=3)


def _folder(path: Path, *files: str) -> Path:
    for name in files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("")
    return path


@pytest.fixture
def no_mamba_ssm(monkeypatch):
    """mamba_ssm not importable (a None entry in sys.modules makes find_spec return None)."""
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path where a test may put an importable mamba_ssm."""
    monkeypatch.delitem(sys.modules, "mamba_ssm", raising=False)
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_official_named_folder(tmp_path):
    assert resolve_official(None) == Official(None, False, "recorded figures (no --official)")
    folder = _folder(tmp_path, OFFICIAL_SCRIPT)
    assert resolve_official(str(folder))[:2] == (folder / OFFICIAL_SCRIPT, False)
    with pytest.raises(ValueError, match=f"no {OFFICIAL_SCRIPT}"):
        resolve_official(str(tmp_path / "missing"))


def test_official_auto_prefers_installed_package(tmp_path, site):
    kernels = "mamba_ssm/__init__.py", "mamba_ssm/ops/triton/mamba3/__init__.py"
    copy = _folder(tmp_path / "copy", OFFICIAL_SCRIPT)
    _folder(site, *kernels)
    # The script beside the package (a copy on PYTHONPATH), else the ../shared copy's; run detached either way.
    assert resolve_official("auto", copy)[:2] == (copy / OFFICIAL_SCRIPT, True)
    _folder(site, OFFICIAL_SCRIPT)
    assert resolve_official("auto", copy)[:2] == (site / OFFICIAL_SCRIPT, True)


def test_official_auto_installed_without_script_or_kernels(tmp_path, site):
    _folder(site, "mamba_ssm/__init__.py")
    copy = _folder(tmp_path / "copy", OFFICIAL_SCRIPT)
    chosen = resolve_official("auto", copy)
    assert chosen[:2] == (copy / OFFICIAL_SCRIPT, False) and "has no Mamba-3 kernels" in chosen.note
    _folder(site, "mamba_ssm/ops/triton/mamba3/__init__.py")
    chosen = resolve_official("auto", tmp_path / "absent")
    assert chosen[:2] == (None, False) and f"has no {OFFICIAL_SCRIPT}" in chosen.note


def test_official_auto_copy_then_recorded(tmp_path, no_mamba_ssm):
    copy = _folder(tmp_path / "copy", OFFICIAL_SCRIPT)
    assert resolve_official("auto", copy) == Official(
        copy / OFFICIAL_SCRIPT, False, f"copy at {copy} (mamba_ssm is not importable)"
    )
    chosen = resolve_official("auto", tmp_path / "absent")
    assert chosen.script is None
    assert chosen.note == f"recorded figures: mamba_ssm is not importable; no {tmp_path / 'absent' / OFFICIAL_SCRIPT}"


def test_official_ms_runs_the_script_in_place_or_detached(tmp_path):
    """An installed package's script runs from a folder of its own, so its sys.path entry misses the copy."""
    folder = tmp_path / "official"
    folder.mkdir()
    script = folder / OFFICIAL_SCRIPT
    script.write_text(
        "import sys\nfrom pathlib import Path\n"
        f"here = Path(__file__).resolve().parent == Path({str(folder.resolve())!r})\n"
        "print(f'RESULT {sys.argv[1]}: {1.5 if here else 2.5} ms')\n"
    )
    assert official_ms(Official(script, False, ""), "NVIDIA H200", "siso", "fwd", 1, 64, 2, 60) == (1.5, "measured")
    assert official_ms(Official(script, True, ""), "NVIDIA H200", "siso", "fwd", 1, 64, 2, 60) == (2.5, "measured")
    script.write_text("import sys\nsys.exit('no GPU here')\n")
    assert official_ms(Official(script, False, ""), "NVIDIA H200", "siso", "fwd", 1, 64, 2, 60) == (None, "no GPU here")
    recorded = Official(None, False, "")
    assert official_ms(recorded, "NVIDIA H100 80GB HBM3", "siso", "fwd", 8, 2048, 32, 60) == (0.60, "recorded")


def test_recorded_official_figures_are_the_running_gpu_models_else_the_h100s_named():
    h100, h200 = OFFICIAL_RECORDED["H100"], OFFICIAL_RECORDED["H200"]
    siso8, mimo1 = ("siso", "fwd", 8, 2048, 32), ("mimo", "fwd", 1, 8192, 8)
    siso8_train = ("siso", "fwdbwd", 8, 2048, 32)
    assert h200[siso8] != h100[siso8]
    assert recorded_official_ms("NVIDIA H200", *siso8) == (h200[siso8], "recorded")
    assert recorded_official_ms("NVIDIA H200", *siso8_train) == (h200[siso8_train], "recorded")
    assert recorded_official_ms("NVIDIA H100 80GB HBM3", *siso8_train) == (h100[siso8_train], "recorded")
    assert recorded_official_ms("NVIDIA A100-SXM4-80GB", *mimo1) == (h100[mimo1], "recorded on H100")
    assert recorded_official_ms("NVIDIA H200", "siso", "fwd", 3, 64, 2) == (None, "-")


def test_kernel_split_names_the_tilelang_kernels_and_lumps_the_rest():
    kernels = frozenset({"state_pass", "state_pass_bwd", "chunk_dqkv"})
    assert kernel_kind("state_pass_kernel", kernels) == "state_pass"
    assert kernel_kind("state_pass_bwd_kernel", kernels) == "state_pass_bwd"  # not state_pass's
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, ...>", kernels) == "PyTorch"
    assert kernel_kind("chunk_dqkv", kernels) == "chunk_dqkv"
    assert kernel_kind("chunk_dqkv_kernel(float*, int)", kernels) == "chunk_dqkv"  # a signature in the name
    lines = kernel_table(
        [("siso b8", {"chunk_dqkv": 1.5, "PyTorch": 0.25}), ("mimo b8", {"state_pass": 0.5, "chunk_dqkv": 2.0})],
        ("state_pass", "chunk_dqkv"),
    )
    assert lines == [
        "| shape | state_pass | chunk_dqkv | PyTorch | total |",
        "|---|---|---|---|---|",
        "| siso b8 | - | 1.500 | 0.250 | 1.750 |",
        "| mimo b8 | 0.500 | 2.000 | - | 2.500 |",
    ]


def test_bench_packed_cases_fill_their_rows_and_print_a_row_each():
    """benchmarks/bench_packed.py: every case's documents cover its length exactly (one with an empty document,
    as `cu_seqlens` allows), and the table prints one row per case."""
    from benchmarks.bench_packed import CASES, offsets, table

    for kind, R, length, H, lengths in CASES:
        assert offsets(lengths)[-1] == length and offsets(lengths)[0] == 0, (kind, length, lengths)
    assert any(0 in lengths for *_, lengths in CASES)
    lines = table([("siso", 8192, 8, 6, 1.0, 2.0, 3.0, 4.0, 0.0)])
    assert lines[2] == "| siso l8192 H8 | 6 | 1.000 | 2.000 | 3.000 | 4.000 | 0.00e+00 |"
