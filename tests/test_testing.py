"""The public suite ``molnets.testing`` catches physically broken models.

Each broken model here is a small pair potential that passes every other check of the suite
(rotation, translation, permutation, batching, finite differences of forces and stress) and is
wrong in one way that only one check sees. The molnets models pass every check in
tests/models/test_all_models.py (which runs all of ``testing.CHECKS``), the README's subclass in
tests/models/test_subclass.py and tests/test_readme.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from molnets import AtomicGraph, edge_vectors, testing
from molnets.layers import PolynomialEnvelope, scatter_mean, scatter_sum

SPECIES = (1, 6, 8)
CUTOFF = 3.5


class PairModel(nn.Module):
    """E_i = tanh(Σ_j w[Z_i, Z_j] exp(-r_ij) u(r_ij)) + e0[Z_i] (eV), u a C² envelope: a correct,
    invariant, smooth many-body model (the tanh of a sum over neighbors), which the subclasses
    below break in one place each."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        weights = torch.rand(3, 3, generator=generator) + 0.5
        self.weights = nn.Parameter((weights + weights.T) / 2)                        # [S, S]
        self.atomic_energies = nn.Parameter(torch.randn(3, generator=generator))      # [S]
        self.register_buffer("species_index", torch.full((119,), -1, dtype=torch.long))
        self.species_index[torch.tensor(SPECIES)] = torch.arange(3)
        self.envelope = PolynomialEnvelope(CUTOFF, p=5)

    def edge_vec(self, graph: AtomicGraph) -> Tensor:
        return edge_vectors(graph)                                                    # [E, 3]

    def edge_envelope(self, edge_len: Tensor, receiver_species: Tensor, sender_species: Tensor) -> Tensor:
        return self.envelope(edge_len)                                                # [E]

    def aggregate(self, messages: Tensor, receivers: Tensor, num_atoms: int) -> Tensor:
        return scatter_sum(messages, receivers, num_atoms)                            # [N]

    def forward(self, graph: AtomicGraph) -> Tensor:
        species = self.species_index[graph.atomic_numbers]                            # [N]
        edge_len = self.edge_vec(graph).norm(dim=-1)                                  # [E]
        receiver_species, sender_species = species[graph.receivers], species[graph.senders]
        messages = (self.weights[receiver_species, sender_species] * torch.exp(-edge_len)
                    * self.edge_envelope(edge_len, receiver_species, sender_species))   # [E]
        summed = self.aggregate(messages, graph.receivers, graph.positions.shape[0])  # [N]
        return torch.tanh(summed) + self.atomic_energies[species]                     # [N]


class MeanOverNeighbors(PairModel):
    """Mean instead of sum over neighbors: E jumps when a second neighbor crosses r_c (with one
    neighbor the mean equals the sum, so a lone pair crossing r_c looks smooth)."""

    def aggregate(self, messages: Tensor, receivers: Tensor, num_atoms: int) -> Tensor:
        return scatter_mean(messages, receivers, num_atoms)                           # [N]


class NoCellShifts(PairModel):
    """Edge vectors x_j - x_i without the periodic shift S @ cell: a crystal's energy depends on
    which image of an atom is drawn, and a supercell is not two cells."""

    def edge_vec(self, graph: AtomicGraph) -> Tensor:
        return graph.positions[graph.senders] - graph.positions[graph.receivers]      # [E, 3]


class HardCutoffForCarbonPairs(PairModel):
    """No envelope for C-C pairs: E jumps when two carbons cross r_c, smooth for every other pair."""

    def edge_envelope(self, edge_len: Tensor, receiver_species: Tensor, sender_species: Tensor) -> Tensor:
        carbon_pair = (receiver_species == SPECIES.index(6)) & (sender_species == SPECIES.index(6))
        return torch.where(carbon_pair, torch.ones_like(edge_len), self.envelope(edge_len))  # [E]


NEW_CHECKS = (testing.check_cutoff_smoothness, testing.check_periodic_images)


@pytest.mark.parametrize("check", NEW_CHECKS, ids=lambda c: c.__name__)
def test_correct_pair_model_passes(check):
    check(PairModel(), species=SPECIES, cutoff=CUTOFF)


@pytest.mark.parametrize(
    "broken, check, message",
    [
        pytest.param(MeanOverNeighbors, testing.check_cutoff_smoothness, "not C¹ at the cutoff",
                     id="mean_over_neighbors"),
        pytest.param(HardCutoffForCarbonPairs, testing.check_cutoff_smoothness, "pair 6-6 .*not C¹ at the cutoff",
                     id="hard_cutoff_for_carbon_pairs"),
        pytest.param(NoCellShifts, testing.check_periodic_images, "changed when atoms moved by lattice vectors",
                     id="no_cell_shifts"),
    ],
)
def test_broken_model_fails_its_check(broken, check, message):
    with pytest.raises(AssertionError, match=message):
        check(broken(), species=SPECIES, cutoff=CUTOFF)


def test_no_cell_shifts_fails_the_supercell_alone():
    """Without moving any atom, the 2x1x1 supercell (the second half of ``check_periodic_images``)
    alone shows that ignored cell shifts are wrong: its energy is not twice the cell's."""
    crystal = testing.random_graph(6, cutoff=CUTOFF, species=SPECIES, seed=61, periodic=True,
                                   density=6 / CUTOFF**3)
    potential = testing._potential(NoCellShifts())
    cell = crystal.cell[0].clone()
    supercell = cell.clone()
    supercell[0] *= 2
    doubled = AtomicGraph.from_positions(torch.cat([crystal.positions, crystal.positions + cell[0]]),
                                         crystal.atomic_numbers.repeat(2), CUTOFF, cell=supercell,
                                         pbc=crystal.pbc[0])
    energy_cell = potential(crystal)["energy"].detach()
    energy_supercell = potential(doubled)["energy"].detach()
    assert (energy_supercell - 2 * energy_cell).abs().item() > 1e-6


def test_the_broken_models_pass_the_other_checks():
    """Each broken model is caught by its check only: the rest of the suite cannot see it."""
    others = [c for c in testing.CHECKS if c not in NEW_CHECKS + (testing.check_compile, testing.check_export)]
    for broken in (MeanOverNeighbors, NoCellShifts, HardCutoffForCarbonPairs):
        for check in others:
            check(broken(), species=SPECIES, cutoff=CUTOFF)


def test_periodic_check_structure_has_self_images():
    """``check_periodic_images`` draws a cell about the cutoff wide: atoms see their own images
    (edges i -> i with S != 0), the edges a model without cell shifts gets most wrong."""
    crystal = testing.random_graph(6, cutoff=CUTOFF, species=SPECIES, seed=61, periodic=True,
                                   density=6 / CUTOFF**3)
    assert bool((crystal.senders == crystal.receivers).any())


def test_species_pairs():
    """All unordered pairs for a few species; for many, each species with itself and the next."""
    assert testing._species_pairs((1, 6, 8)) == [(1, 1), (1, 6), (1, 8), (6, 6), (6, 8), (8, 8)]
    many = tuple(range(1, 21))
    pairs = testing._species_pairs(many)
    assert len(pairs) == 40 and set(many) == {a for pair in pairs for a in pair}
    assert all((z, z) in pairs for z in many)
