"""Fixtures shared by the test suite."""

from __future__ import annotations

import pytest
import torch


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
