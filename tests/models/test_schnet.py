"""SchNet-style model: its frozen kernel (one autograd node for the interaction blocks and the
energy head) against the differentiable reference (float64)."""

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


def _kernel_inputs(model: SchNet, seed: int, periodic: bool = False):
    graph = testing.random_graph(num_atoms=8, cutoff=CUTOFF, seed=seed, periodic=periodic, dtype=DTYPE)
    pair_graph = half_edge_graph(graph)
    edge_vec = edge_vectors(pair_graph).detach().requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(graph.num_atoms, model.config.num_channels, generator=g, dtype=DTYPE, requires_grad=True)
    return edge_vec, h, pair_graph.receivers, pair_graph.senders


def _uses_kernel(out: torch.Tensor) -> bool:
    return type(out.grad_fn).__name__ == "FrozenSchNetBackward"


def test_frozen_interactions_kernel_equals_the_reference(assert_kernel_equals_reference):
    """FrozenSchNet (one autograd node, hand-written backward) against the model's
    ``head(_interactions(...))``: values and gradients with respect to the edge vectors and the
    node features to 1e-12, gradcheck and gradgradcheck (the double backward goes through the
    reference); with an envelope of power 2 too."""
    for envelope_power in (1, 2):
        model = small_model().requires_grad_(False)
        model.envelope = CosineEnvelope(CUTOFF, power=envelope_power)
        edge_vec, h, pair_i, pair_j = _kernel_inputs(model, seed=envelope_power)
        weights = _schnet_kernel.arranged_weights(model)

        def call(edge_vec, h):
            return _schnet_kernel.FrozenSchNet.apply(edge_vec, h, pair_i, pair_j, model, weights)

        out, expected = call(edge_vec, h), model.head(model._interactions(edge_vec, h, pair_i, pair_j))
        assert _uses_kernel(out) and not _uses_kernel(expected)
        assert_kernel_equals_reference(call, out, expected, (edge_vec, h))


def test_frozen_model_takes_the_kernel_only_where_it_reads_every_module(monkeypatch):
    """The model runs the kernel when frozen, on the CPU, eager, with the modules the kernel
    reads; a trainable model, a swapped filter network (a user's own) or more pairs than one
    chunk of ``layers._message_kernels`` run the reference."""
    from molnets.layers import _message_kernels

    graph = testing.random_graph(num_atoms=8, cutoff=CUTOFF, seed=1, dtype=DTYPE)
    calls = []
    monkeypatch.setattr(_schnet_kernel.FrozenSchNet, "forward", staticmethod(
        lambda *args, forward=_schnet_kernel.FrozenSchNet.forward: calls.append(1) or forward(*args)))

    def runs_kernel(model) -> bool:
        calls.clear()
        Potential(model).eval()(graph)
        return bool(calls)

    assert runs_kernel(small_model().requires_grad_(False))
    assert not runs_kernel(small_model())                                    # trainable
    swapped = small_model()
    swapped.interactions[1].filter = MLP([6, 8, 8], activation="silu").to(DTYPE)
    assert not runs_kernel(swapped.requires_grad_(False))                    # a user's filter network
    swapped = small_model()
    swapped.head = EnergyHead([8, 1], activation="ssp").to(DTYPE)
    assert not runs_kernel(swapped.requires_grad_(False))                    # a user's head
    monkeypatch.setattr(_message_kernels, "CHUNK_NUMEL", 8)
    assert not runs_kernel(small_model().requires_grad_(False))              # messages beyond one chunk


def test_frozen_model_equals_the_trainable_model_with_derivative_graphs(assert_frozen_equals_trainable):
    """Through the kernel, also in training mode: energy, forces, stress and the double backward
    of a force loss equal the trainable model's (molecule and crystal)."""
    model = small_model()
    frozen = copy.deepcopy(model).requires_grad_(False)
    for periodic in (False, True):
        graph = testing.random_graph(num_atoms=9, cutoff=CUTOFF, seed=5, periodic=periodic, dtype=DTYPE)
        assert_frozen_equals_trainable(model, frozen, graph)


def test_frozen_model_follows_weights_changed_in_place():
    """The kernel's arranged weights (stacked first layers, folded biases) are kept while the
    weights are frozen and rebuilt when one changes in place: the frozen model gives the
    trainable model's energies and forces before and after."""
    model = small_model()
    trainable, frozen = Potential(model).eval(), Potential(copy.deepcopy(model).requires_grad_(False)).eval()
    graph = testing.random_graph(num_atoms=9, cutoff=CUTOFF, seed=2, dtype=DTYPE)
    for step in range(3):
        expected, got = trainable(graph), frozen(graph)
        torch.testing.assert_close(got["energy"], expected["energy"], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got["forces"], expected["forces"], atol=1e-12, rtol=1e-12)
        assert frozen.model._frozen  # the arranged weights were kept
        with torch.no_grad():
            for potential in (trainable, frozen):
                potential.model.interactions[step].filter[2].bias.add_(0.5)   # a folded bias
                potential.model.interactions[2 - step].filter[0].weight.mul_(1.5)  # a stacked weight
                potential.model.head.mlp[2].bias.sub_(0.25)                        # the head's folded bias


def test_frozen_model_passes_the_model_suite(monkeypatch):
    """The frozen model (the kernel's path) through molnets.testing: O(3), translation and
    permutation invariance, batching, finite-difference forces and stress, cutoff smoothness."""
    calls = []
    monkeypatch.setattr(_schnet_kernel.FrozenSchNet, "forward", staticmethod(
        lambda *args, forward=_schnet_kernel.FrozenSchNet.forward: calls.append(1) or forward(*args)))
    testing.check_model(small_model().requires_grad_(False), skip=("check_compile", "check_export"))
    assert calls  # the checks ran through the kernel


@pytest.mark.parametrize("periodic", [False, True], ids=["molecule", "crystal"])
def test_frozen_kernel_at_overlapping_atoms_gives_finite_forces(periodic):
    """Two atoms at one point (a zero edge vector, as the reference's norm backward: zero
    gradient along it): the kernel's forces are finite and equal the trainable model's."""
    model = small_model()
    edge_vec, h, pair_i, pair_j = _kernel_inputs(model, seed=4, periodic=periodic)
    edge_vec = torch.cat([edge_vec.detach(), torch.zeros(1, 3, dtype=DTYPE)]).requires_grad_(True)
    pair_i, pair_j = torch.cat([pair_i, pair_i[:1]]), torch.cat([pair_j, pair_i[:1]])
    frozen = copy.deepcopy(model).requires_grad_(False)
    out = _schnet_kernel.FrozenSchNet.apply(edge_vec, h, pair_i, pair_j, frozen, _schnet_kernel.arranged_weights(frozen))
    expected = model.head(model._interactions(edge_vec, h, pair_i, pair_j))
    got_grad, = torch.autograd.grad(out.sum(), edge_vec)
    want_grad, = torch.autograd.grad(expected.sum(), edge_vec)
    assert torch.isfinite(got_grad).all()
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-12)
