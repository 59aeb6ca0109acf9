"""The README's Python blocks that promise to run do run: each is read from README.md, so the two
cannot drift apart."""

import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[2] / "README.md"


def readme_block(marker: str) -> str:
    """The fenced block right after the line `<!-- marker -->` in README.md."""
    lines = README.read_text().splitlines()
    start = lines.index(f"<!-- {marker} -->") + 2  # skip the marker and the opening fence
    return "\n".join(lines[start : lines.index("```", start)])


def test_hybrid_model_snippet_runs_as_written():
    # A process of its own: the snippet initializes torch.distributed and Megatron's parallel state.
    result = subprocess.run([sys.executable, "-c", readme_block("hybrid-model-snippet")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loss = float(result.stdout.split("loss ")[-1])
    assert 4.0 < loss < 7.0  # about ln 256 = 5.5 for a freshly initialized model


@pytest.mark.parametrize("flag", ["--length", "--batch"])
def test_demo_refuses_empty_inputs(flag, capsys):
    from megatron_mamba3.demo import main

    with pytest.raises(SystemExit) as exit_info:
        main([flag, "0"])
    assert exit_info.value.code == 2 and f"{flag} must be >= 1, got 0" in capsys.readouterr().err
