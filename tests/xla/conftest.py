"""tests/xla: the XLA backend on torch_xla's CPU PJRT client, started by `tests.xla_runtime`.
Without torch_xla every test in this folder is skipped, saying why; the test modules reach torch_xla
only through the fixtures below, so they still import."""

from pathlib import Path

import pytest

from tests import xla_runtime


def pytest_collection_modifyitems(items):
    if xla_runtime.UNAVAILABLE is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.skip(reason=xla_runtime.UNAVAILABLE))


@pytest.fixture
def device():
    """The XLA device (CPU PJRT in CI)."""
    return xla_runtime.DEVICE


@pytest.fixture
def sync():
    """`torch_xla.sync`: compile (first time) and run every pending operation as one graph."""
    return xla_runtime.sync
