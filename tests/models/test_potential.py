"""Potential (energy-only mode, double backward, molecule stress), SchNet parameter count, describe/compare."""

from __future__ import annotations

import pytest
import torch

from molnets import batch_graphs
from molnets.describe import compare, describe
from molnets.layers.embedding import SpeciesIndex
from molnets.models import Potential, SchNet, SchNetConfig, model_class
from molnets.testing import random_graph

SPECIES = (1, 6, 8)


def _schnet(**kwargs) -> SchNet:
    torch.manual_seed(0)
    config = dict(species=SPECIES, cutoff=3.5, num_channels=8, num_basis=6, num_layers=2)
    return SchNet(SchNetConfig(**{**config, **kwargs})).double()


def test_energy_only_mode_builds_no_force_graph():
    model = _schnet()
    graph = random_graph(6, cutoff=3.5, species=SPECIES, seed=1)
    full = Potential(model).eval()(graph)
    energy_only = Potential(model, compute_forces=False).eval()
    with torch.no_grad():
        out = energy_only(graph)
    assert set(out) == {"energy", "energies"} and out["energy"].grad_fn is None
    torch.testing.assert_close(out["energy"], full["energy"].detach())
    assert not graph.positions.requires_grad  # the caller's tensors are not touched


@pytest.mark.parametrize("frozen", [False, True])
def test_inference_mode_gives_the_same_forces(frozen):
    """Under torch.inference_mode(), and with a graph built under it and used outside: the same
    energy, forces and stress as in normal mode (autograd is off in inference mode, and its
    tensors cannot be saved for a backward)."""
    model = _schnet().requires_grad_(not frozen)
    potential = Potential(model, compute_stress=True).eval()
    reference = potential(random_graph(6, cutoff=3.5, species=SPECIES, periodic=True, seed=4))
    with torch.inference_mode():
        inside = potential(random_graph(6, cutoff=3.5, species=SPECIES, periodic=True, seed=4))
        graph = random_graph(6, cutoff=3.5, species=SPECIES, periodic=True, seed=4)
    assert graph.positions.is_inference()
    for out in (inside, potential(graph)):
        for key in ("energy", "forces", "stress"):
            torch.testing.assert_close(out[key], reference[key], rtol=1e-12, atol=1e-12)
    energy_only = Potential(model, compute_forces=False).train()  # a graph to the weights
    torch.testing.assert_close(energy_only(graph)["energy"], reference["energy"], rtol=1e-12, atol=1e-12)


def test_force_loss_double_backward_matches_finite_difference():
    """d(Σ F²)/dθ from create_graph=True equals a central difference in one weight."""
    model = _schnet()
    potential = Potential(model).train()
    graph = random_graph(6, cutoff=3.5, species=SPECIES, seed=2)
    weight = model.interactions[0].filter[0].weight
    loss = potential(graph)["forces"].pow(2).sum()
    (grad,) = torch.autograd.grad(loss, [weight])
    step = 1e-5
    with torch.no_grad():
        weight[1, 2] += step
        plus = potential(graph)["forces"].pow(2).sum().detach()
        weight[1, 2] -= 2 * step
        minus = potential(graph)["forces"].pow(2).sum().detach()
    torch.testing.assert_close(grad[1, 2], (plus - minus) / (2 * step), rtol=1e-5, atol=1e-8)
    assert grad.abs().max() > 0


def test_molecules_get_zero_stress_in_a_mixed_batch():
    potential = Potential(_schnet(), compute_stress=True).eval()
    molecule = random_graph(5, cutoff=3.5, species=SPECIES, seed=3)
    crystal = random_graph(6, cutoff=3.5, species=SPECIES, seed=4, periodic=True, density=0.06)
    stress = potential(batch_graphs([molecule, crystal]))["stress"]
    assert torch.equal(stress[0], torch.zeros(3, 3, dtype=torch.float64))
    assert stress[1].abs().max() > 0 and torch.isfinite(stress).all()
    with pytest.raises(ValueError):
        Potential(_schnet(), compute_forces=False, compute_stress=True)


def test_unknown_element_and_config_validation():
    with pytest.raises(ValueError, match="unknown Z = \\[9\\]"):
        SpeciesIndex(SPECIES)(torch.tensor([1, 9, 6]))
    with pytest.raises(ValueError):
        SchNetConfig(species=(1, 1))
    with pytest.raises(ValueError):
        SchNetConfig(species=(1,), cutoff=-1.0)
    with pytest.raises(ValueError):
        model_class("painn")
    assert model_class("schnet") is SchNet


def test_model_and_graph_of_different_dtypes_or_devices_is_a_clear_error():
    """A float32 model on a float64 graph (or the other way round) names both dtypes; a graph on
    another device than the model names both devices (a meta-device graph stands in for a GPU)."""
    graph = random_graph(5, cutoff=3.5, species=SPECIES, seed=6)                   # float64
    for compute_forces in (True, False):
        with pytest.raises(ValueError, match="positions are torch.float64 but the model's parameters are torch.float32"):
            Potential(_schnet().float(), compute_forces=compute_forces)(graph)
    with pytest.raises(ValueError, match="positions are torch.float32 but the model's parameters are torch.float64"):
        Potential(_schnet())(graph.to(dtype=torch.float32))
    with pytest.raises(ValueError, match="the graph is on meta but the model is on cpu"):
        Potential(_schnet())(graph.to("meta"))


def test_schnet_parameter_count_and_design_space():
    """PEERS.md hyper-parameters: the count of PyG's SchNet (238,465 with its 100-row
    embedding) minus its embedding plus ours (S rows), counted by hand per layer."""
    model = SchNet(SchNetConfig(species=(1, 6, 7, 8), cutoff=5.0, num_channels=128, num_basis=50, num_layers=3))
    C, K, T, S = 128, 50, 3, 4
    interaction = (K * C + C) + (C * C + C) + C * C + 2 * (C * C + C)   # filter, W_in, update
    head = C * (C // 2) + C // 2 + C // 2 + 1
    assert 238_465 - 100 * C == T * interaction + head
    space = model.design_space()
    assert space.num_parameters == S * C + T * interaction + head
    assert (space.body_order, space.num_layers, space.receptive_field) == (2, 3, 15.0)
    table = describe(model, print_table=False)
    assert "| schnet" in table and "15" in table and f"{space.num_parameters:,}" in table
    assert model.requires_grad_(False).design_space().num_parameters == space.num_parameters  # frozen: same size
    rows = compare([model, Potential(_schnet())], print_table=False).splitlines()
    cells = [c.strip() for c in rows[3].split("|")[1:-1]]
    assert len(rows) == 4 and cells[3:6] == ["2", "3.5", "7"]  # 2 layers x 3.5 Å
