"""SchNet-style model: its frozen kernel (the whole model, positions and cell to per-atom energies,
as one autograd node) against the differentiable reference (float64)."""

import copy

import pytest
import torch

from molnets import testing
from molnets.graph import edge_vectors, half_edge_graph
from molnets.layers.mlp import MLP
from molnets.layers.radial import CosineEnvelope
from molnets.layers.readout import EnergyHead
from molnets.models import _schnet_kernel
from molnets.models.base import Potential
from molnets.models.schnet import SchNet, SchNetConfig

DTYPE = torch.float64
CUTOFF = 3.5


def small_model(**overrides) -> SchNet:
    torch.manual_seed(0)
    config = dict(species=(1, 6, 8), cutoff=CUTOFF, num_channels=8, num_basis=6, num_layers=3)
    config.update(overrides)
    return SchNet(SchNetConfig(**config)).to(DTYPE).eval()


def dense_graph(periodic: bool = False):
    """A random molecule or crystal whose pairs fill the kernel's dense arrays enough
    (``_schnet_kernel.dense_enough``)."""
    graph = testing.random_graph(num_atoms=8 if not periodic else 9, cutoff=CUTOFF, seed=1 if not periodic else 5,
                                 periodic=periodic, dtype=DTYPE)
    assert _schnet_kernel.dense_enough(graph.num_atoms, graph.num_edges // 2, 8, 8)
    return graph


@pytest.fixture
def kernel_calls(monkeypatch):
    """The list of FrozenSchNet forward calls (one entry each) while the test runs."""
    calls = []
    monkeypatch.setattr(_schnet_kernel.FrozenSchNet, "forward", staticmethod(
        lambda *args, forward=_schnet_kernel.FrozenSchNet.forward: calls.append(1) or forward(*args)))
    return calls


def _kernel_call(model: SchNet, seed: int, periodic: bool = False):
    """(call, reference, positions, cell): the frozen kernel and the model's differentiable
    energies as functions of positions and cell, on a random graph."""
    graph = testing.random_graph(num_atoms=8, cutoff=CUTOFF, seed=seed, periodic=periodic, dtype=DTYPE)
    pair_graph, species = half_edge_graph(graph), model.species_index(graph.atomic_numbers)
    weights = _schnet_kernel.arranged_weights(model)

    def call(positions, cell):
        return _schnet_kernel.FrozenSchNet.apply(positions, cell, pair_graph, species, model, weights)

    def reference(positions, cell):
        return model._energies(pair_graph._replace(positions=positions, cell=cell), species)

    return call, reference, graph.positions.clone().requires_grad_(True), graph.cell.clone().requires_grad_(True)


def _uses_kernel(out: torch.Tensor) -> bool:
    return type(out.grad_fn).__name__ == "FrozenSchNetBackward"


@pytest.mark.parametrize("periodic", [False, True], ids=["molecule", "crystal"])
def test_frozen_kernel_equals_the_reference(assert_kernel_equals_reference, periodic, kernels):
    """FrozenSchNet (one autograd node, hand-written backward) against ``SchNet._energies``:
    per-atom energies and their gradients with respect to positions and cell to 1e-12, gradcheck
    and gradgradcheck (the double backward goes through the reference); with an envelope of
    power 2 and with a scale, shift and reference energies set too; the messages as dense pair
    arrays (PyTorch) and by the compiled convolution (``kernels``)."""
    from molnets.layers.readout import set_energy_normalization

    for envelope_power in (1, 2):
        model = small_model().requires_grad_(False)
        model.envelope = CosineEnvelope(CUTOFF, power=envelope_power)
        if envelope_power == 2:
            set_energy_normalization(model, scale=1.7, shift=-0.3, atomic_energies={1: -13.6, 8: -2041.0})
        call, reference, positions, cell = _kernel_call(model, seed=envelope_power, periodic=periodic)
        out, expected = call(positions, cell), reference(positions, cell)
        assert _uses_kernel(out) and not _uses_kernel(expected)
        assert_kernel_equals_reference(call, out, expected, (positions, cell))


def test_frozen_model_takes_the_kernel_only_where_it_reads_every_module(monkeypatch, kernel_calls):
    """The model runs the kernel when frozen, on the CPU, eager, with the modules the kernel
    reads, on a molecule within a few cutoffs; a trainable model, a swapped filter network or
    head (a user's own), a sparse graph (N^2 > 4P), a dense array above DENSE_MAX_BYTES or more
    pairs than one chunk of ``layers._message_kernels`` run the reference."""
    from molnets.layers import _message_kernels

    def runs_kernel(model, graph=dense_graph()) -> bool:
        kernel_calls.clear()
        Potential(model).eval()(graph)
        return bool(kernel_calls)

    assert runs_kernel(small_model().requires_grad_(False))
    assert not runs_kernel(small_model())                                    # trainable
    swapped = small_model()
    swapped.interactions[1].filter = MLP([6, 8, 8], activation="silu").to(DTYPE)
    assert not runs_kernel(swapped.requires_grad_(False))                    # a user's filter network
    swapped = small_model()
    swapped.head = EnergyHead([8, 1], activation="ssp").to(DTYPE)
    assert not runs_kernel(swapped.requires_grad_(False))                    # a user's head
    sparse = testing.random_graph(num_atoms=9, cutoff=CUTOFF, seed=5, dtype=DTYPE)
    assert not _schnet_kernel.dense_enough(sparse.num_atoms, sparse.num_edges // 2, 8, 8)
    assert not runs_kernel(small_model().requires_grad_(False), sparse)      # sparse: the reference
    largest = _schnet_kernel.DENSE_MAX_BYTES
    monkeypatch.setattr(_schnet_kernel, "DENSE_MAX_BYTES", 8 * 8 * 8 * 8 - 1)  # N^2 C bytes of dense_graph - 1
    assert not runs_kernel(small_model().requires_grad_(False))              # a dense array too large
    monkeypatch.setattr(_schnet_kernel, "DENSE_MAX_BYTES", largest)
    assert runs_kernel(small_model().requires_grad_(False))
    monkeypatch.setattr(_message_kernels, "CHUNK_NUMEL", 8)
    assert not runs_kernel(small_model().requires_grad_(False))              # messages beyond one chunk


def test_frozen_model_equals_the_trainable_model_with_derivative_graphs(assert_frozen_equals_trainable, kernel_calls):
    """Through the kernel, also in training mode: energy, forces, stress and the double backward
    of a force loss equal the trainable model's (molecule and crystal)."""
    model = small_model()
    frozen = copy.deepcopy(model).requires_grad_(False)
    for periodic in (False, True):
        kernel_calls.clear()
        assert_frozen_equals_trainable(model, frozen, dense_graph(periodic))
        assert kernel_calls


def test_frozen_model_follows_weights_changed_in_place(kernel_calls):
    """The kernel's arranged weights (stacked filter layers, folded biases and energy scale,
    shift and reference energies) are kept while the weights are frozen and rebuilt when one
    changes in place: the frozen model gives the trainable model's energies and forces before
    and after."""
    from molnets.layers.readout import set_energy_normalization

    model = small_model()
    trainable, frozen = Potential(model).eval(), Potential(copy.deepcopy(model).requires_grad_(False)).eval()
    graph = dense_graph()
    for step in range(4):
        expected, got = trainable(graph), frozen(graph)
        torch.testing.assert_close(got["energy"], expected["energy"], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got["forces"], expected["forces"], atol=1e-12, rtol=1e-12)
        assert frozen.model._frozen and kernel_calls  # the arranged weights were kept; the kernel ran
        with torch.no_grad():
            for potential in (trainable, frozen):
                if step < 3:
                    potential.model.interactions[step].filter[2].bias.add_(0.5)   # a folded bias
                    potential.model.interactions[2 - step].filter[0].weight.mul_(1.5)  # a stacked weight
                    potential.model.head.mlp[2].bias.sub_(0.25)                   # the head's folded bias
                else:
                    set_energy_normalization(potential.model, scale=2.0, shift=0.1, atomic_energies={6: -1.5})


def test_frozen_model_passes_the_model_suite(kernel_calls):
    """The frozen model (the kernel's path) through molnets.testing: O(3), translation and
    permutation invariance, batching, finite-difference forces and stress, cutoff smoothness."""
    testing.check_model(small_model().requires_grad_(False), skip=("check_compile", "check_export"))
    assert kernel_calls  # the checks ran through the kernel


@pytest.mark.parametrize("periodic", [False, True], ids=["molecule", "crystal"])
def test_frozen_kernel_at_overlapping_atoms_gives_finite_forces(periodic, kernel_calls, kernels):
    """Two atoms at one point (a zero edge vector; the reference's norm backward gives a zero
    gradient along it): the kernel's forces and stress are finite and equal the trainable
    model's."""
    model = small_model()
    graph = dense_graph(periodic)
    e = int(torch.nonzero((graph.receivers != graph.senders) & (graph.shifts == 0).all(1))[0])
    positions = graph.positions.clone()
    positions[graph.senders[e]] = positions[graph.receivers[e]]  # edge e: a zero vector
    graph = graph._replace(positions=positions)
    assert (edge_vectors(graph).norm(dim=1) == 0).any()  # a pair at zero distance
    frozen = copy.deepcopy(model).requires_grad_(False)
    expected, got = (Potential(m, compute_stress=periodic).eval()(graph) for m in (model, frozen))
    assert kernel_calls
    for key in expected:
        assert torch.isfinite(got[key]).all()
        torch.testing.assert_close(got[key], expected[key], atol=1e-12, rtol=1e-12)


def test_frozen_kernel_in_float32_matches_the_reference(kernel_calls, kernels):
    """In float32 (the default dtype) the kernel's energies and forces equal the reference's to
    float32 rounding (the two sum in different orders)."""
    model = small_model().float()
    frozen = copy.deepcopy(model).requires_grad_(False)
    graph = dense_graph().to(dtype=torch.float32)
    expected, got = Potential(model).eval()(graph), Potential(frozen).eval()(graph)
    assert kernel_calls
    for key in ("energy", "forces"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
