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


@pytest.fixture
def assert_kernel_equals_reference():
    """assert(call, out, expected, inputs): a fast path's output ``out = call(*inputs)`` and its
    input gradients equal the reference's (``expected``) to 1e-12 (float64); gradcheck and
    gradgradcheck of ``call`` pass."""

    def check(call, out, expected, inputs) -> None:
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, inputs, grad)
        want = torch.autograd.grad(expected, inputs, grad)
        for g_got, g_want in zip(got, want):
            torch.testing.assert_close(g_got, g_want, atol=1e-12, rtol=1e-12)
        assert torch.autograd.gradcheck(call, inputs)
        assert torch.autograd.gradgradcheck(call, inputs)

    return check


@pytest.fixture
def assert_frozen_equals_trainable():
    """assert(model, frozen, graph): energy, forces and stress of a frozen copy equal the
    trainable model's to 1e-12 (float64), in eval mode and in training mode (derivatives with
    a graph), and so does the gradient of a force loss with respect to positions (double
    backward)."""
    from molnets.models.base import Potential

    def check(model, frozen, graph) -> None:
        for training in (False, True):
            results = []
            for m in (model, frozen):
                potential = Potential(m, compute_stress=True).train(training)
                positions = graph.positions.detach().requires_grad_(True)
                out = potential(graph._replace(positions=positions))
                if training:
                    out["force_loss_gradient"] = torch.autograd.grad(out["forces"].square().sum(), positions)[0]
                results.append(out)
            expected, got = results
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], atol=1e-12, rtol=1e-12)

    return check


@pytest.fixture
def without_native(monkeypatch):
    """The compiled CPU kernels (``molnets._native``) off for one test: the PyTorch kernels they
    replace (chunked pair convolution, chunked product basis) run, as where no compiler is."""
    from molnets import _native

    monkeypatch.setitem(_native._state, "library", None)


@pytest.fixture(params=["torch", "native"])
def kernels(request, monkeypatch) -> str:
    """A test twice: with the PyTorch kernels ("torch", the compiled ones off) and with the
    compiled CPU kernels (``molnets._native``, "native"; skipped where they cannot be built)."""
    from molnets import _native

    if request.param == "torch":
        monkeypatch.setitem(_native._state, "library", None)
    elif not _native.available():
        pytest.skip("no C compiler here: the compiled kernels cannot be built")
    else:  # wherever they can run, also on the tests' small molecules
        monkeypatch.setattr("molnets.models._schnet_kernel.NATIVE_MIN_DENSE_NUMEL", 0)
    return request.param
