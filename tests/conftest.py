"""Fixtures shared by the test suite."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--device", default="cpu",
        help="device that the model suite (tests/models/test_all_models.py) and tests/models/test_device.py run on, "
             "e.g. cuda (default cpu)",
    )


def pytest_ignore_collect(collection_path, config):
    """tests/models/test_device.py compares a device with the CPU: collected with ``--device``
    other than cpu only (on the CPU it would compare the CPU with itself)."""
    if collection_path.name == "test_device.py" and torch.device(config.getoption("--device")).type == "cpu":
        return True
    return None


@pytest.fixture
def device(request) -> torch.device:
    """The device of ``pytest --device`` (default cpu); a device that is not there is an error."""
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"pytest --device {device}: torch sees no CUDA device")
    return device


@pytest.fixture(autouse=True)
def seeded_torch():
    """Every test starts from the same global torch seed: a test that draws random inputs
    without its own generator sees the same numbers on every run (no flaky tolerances)."""
    torch.manual_seed(20261125)


@pytest.fixture
def float64_default():
    """Make float64 the default dtype for one test (restored afterwards).

    e3nn builds its Wigner-D matrices (``Irreps.D_from_matrix``), spherical-harmonic and
    tensor-product constants in the default dtype; in float32 they are ~1e-7 off, too coarse
    for the 1e-12 equivariance checks. A file opts in for all its tests with
    ``pytestmark = pytest.mark.usefixtures("float64_default")``.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
