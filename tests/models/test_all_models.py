"""Every molnets model through the public suite ``molnets.testing`` (float64, small sizes)."""

from __future__ import annotations

import pytest
import torch

from molnets import testing
from molnets.layers.readout import set_energy_normalization
from molnets.models import SchNet, SchNetConfig
from molnets.models.mace import MACE, MACEConfig
from molnets.models.tensornet import TensorNet, TensorNetConfig

SPECIES = (1, 6, 8)
CUTOFF = 3.5

# name -> factory of a small model with random weights; every model of molnets is listed here.
MODELS = {
    "schnet": lambda: SchNet(SchNetConfig(species=SPECIES, cutoff=CUTOFF, num_channels=16, num_basis=12, num_layers=2)),
    "tensornet": lambda: TensorNet(TensorNetConfig(species=SPECIES, cutoff=CUTOFF, num_channels=16, num_rbf=12)),
    "mace": lambda: MACE(MACEConfig(species=SPECIES, cutoff=CUTOFF, num_channels=8, lmax=2, correlation=3,
                                    num_bessel=6, avg_num_neighbors=4.0, radial_mlp=(16,))),
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    # Non-trivial scale, shift and E0, so that the readout's normalisation is exercised too.
    set_energy_normalization(model, scale=1.7, shift=-0.3, atomic_energies={1: -13.6, 6: -1029.8, 8: -2041.3})
    return model


@pytest.mark.parametrize("check", testing.CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_suite(name, check, device):
    """Runs on ``pytest --device`` (default cpu): the checks follow the model's device."""
    if check is testing.check_compile and device.type == "cpu":
        # Inductor's C++ code generation takes minutes on the 2 shared CPU cores (and
        # "aot_eager" ~45 s per model); the "eager" backend still runs dynamo's full-graph
        # capture with dynamic shapes, which is what fails on a graph break. The inductor
        # path runs in benchmarks/models.py (compiled rows, checked against eager).
        check(_model(name).to(device), backend="eager")
    else:
        check(_model(name).to(device))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_message_kernels_equal_plain_operations(name, kernels, monkeypatch):
    """The chunked CPU kernels (layers/_message_kernels.py, layers/_scatter_outer_kernels.py,
    layers/_atomic_basis_kernels.py) only run on systems larger than one chunk of messages; with
    tiny chunks they run here, and energy, forces, stress and the gradient of a force loss (double
    backward) must equal those of the plain operations. The pair convolution's chunks are the
    compiled kernels' one pass where they are built (``kernels``), PyTorch's chunks otherwise."""
    from molnets.layers import _atomic_basis_kernels, _message_kernels, _scatter_outer_kernels
    from molnets.models import Potential


    graph = testing.random_graph(12, cutoff=CUTOFF, periodic=True, seed=3)
    calls = []
    for module, kernel in ((_message_kernels, "forward_chunked"), (_scatter_outer_kernels, "scatter_outer_chunked"),
                           (_atomic_basis_kernels, "atomic_basis_chunked")):
        original = getattr(module, kernel)
        monkeypatch.setattr(module, kernel,
                            lambda *args, _original=original, **kwargs: calls.append(1) or _original(*args, **kwargs))
    results = []
    for chunk_numel in (1 << 30, 8):  # everything in one chunk (plain operations), then tiny chunks
        monkeypatch.setattr(_message_kernels, "CHUNK_NUMEL", chunk_numel)
        potential = Potential(_model(name).double(), compute_stress=True).train()
        out = potential(graph)
        loss = out["energy"].square().sum() + out["forces"].square().sum() + out["stress"].square().sum()
        params = [p for p in potential.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((out, grads))
    (plain, plain_grads), (fused, fused_grads) = results
    assert calls  # the kernels ran (with the tiny chunks only)
    for key in ("energy", "forces", "stress"):
        assert torch.allclose(fused[key], plain[key], atol=1e-10, rtol=1e-10), key
    for a, b in zip(fused_grads, plain_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("periodic", [False, True], ids=["molecule", "crystal"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_frozen_model_after_inference_mode(name, periodic):
    """A frozen model (as calculators run one) keeps tensors between calls (``molnets._frozen``
    caches, the TensorNet kernels' reused buffers). A first call under
    ``torch.inference_mode()`` must not leave inference tensors there: later calls with forces
    (which record a graph) run and give the numbers of a model that never saw inference mode;
    and inference mode after a call with forces works too."""
    from molnets.models import Potential

    graph = testing.random_graph(10, cutoff=CUTOFF, periodic=periodic, seed=5)
    expected = Potential(_model(name).double().requires_grad_(False))(graph)
    potential = Potential(_model(name).double().requires_grad_(False))
    with torch.inference_mode():
        energy_first = Potential(potential.model, compute_forces=False)(graph)["energy"]
    out = potential(graph)                                      # records a graph for the forces
    with torch.inference_mode():
        energy_again = Potential(potential.model, compute_forces=False)(graph)["energy"]
    again = potential(graph)
    for energy in (energy_first, energy_again, out["energy"], again["energy"]):
        assert torch.allclose(energy, expected["energy"], rtol=1e-12, atol=1e-12)
    for forces in (out["forces"], again["forces"]):
        assert torch.allclose(forces, expected["forces"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_frozen_model_compiles_and_exports(name):
    """A frozen model (parameters without gradients, as calculators run one) through
    ``check_compile`` (energies, forces, stress; no parameter gradients to compare) and
    ``check_export``; dynamo's "eager" backend, as in the suite above."""
    model = _model(name).requires_grad_(False)
    testing.check_compile(model, backend="eager")
    testing.check_export(model)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_frozen_model_chunked_kernels_equal_plain_operations(name, monkeypatch):
    """A frozen model (as calculators run one) with tiny chunks runs the chunked kernels, the
    filter networks chunk by chunk included (layers._message_kernels.FrozenFilter; MACE's radial
    weights too): energy, forces and stress equal those with everything in one chunk."""
    from molnets.layers import _message_kernels
    from molnets.models import Potential

    graph = testing.random_graph(12, cutoff=CUTOFF, periodic=True, seed=3)
    calls = []
    monkeypatch.setattr(_message_kernels.FrozenFilter, "forward", staticmethod(
        lambda *args, _forward=_message_kernels.FrozenFilter.forward: calls.append(1) or _forward(*args)))
    monkeypatch.setattr(_message_kernels, "freed_memory_is_reused", lambda: False)  # (`molnets md` in this process)
    results = []
    for chunk_numel, fresh_bytes in ((1 << 30, 1 << 62), (8, 0)):  # plain operations, then tiny chunks
        monkeypatch.setattr(_message_kernels, "CHUNK_NUMEL", chunk_numel)
        monkeypatch.setattr(_message_kernels, "FRESH_MAPPING_BYTES", fresh_bytes)
        results.append(Potential(_model(name).double().requires_grad_(False), compute_stress=True)(graph))
    plain, chunked = results
    assert calls  # the filter networks ran chunk by chunk
    for key in ("energy", "forces", "stress"):
        assert torch.allclose(chunked[key], plain[key], atol=1e-11, rtol=1e-11), key


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_func_hessian_equals_autograd_hessian(name, frozen):
    """torch.func transforms (here jacrev of grad: the Hessian of the energy in the positions)
    work on every model, trainable or frozen (the frozen kernels and the spherical harmonics'
    autograd.Function step aside for them), and give autograd's double-backward Hessian."""
    model = _model(name).double().requires_grad_(not frozen)
    graph = testing.random_graph(6, cutoff=CUTOFF, seed=1)

    def energy(positions):
        return model(graph._replace(positions=positions)).sum()

    expected = torch.autograd.functional.hessian(energy, graph.positions)             # [6, 3, 6, 3]
    got = torch.func.jacrev(torch.func.grad(energy))(graph.positions)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
