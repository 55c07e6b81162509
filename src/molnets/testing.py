"""Public test suite for any molnets energy model, including a user's own subclass.

A model is any ``nn.Module`` whose ``forward(graph: AtomicGraph) -> Tensor`` returns per-atom
energies [N] in eV. Every check builds a ``Potential`` around a float64 copy of the model
(the model passed in is not changed) and raises ``AssertionError`` with a message when the
physics is broken:

========================================  ===================================================
``check_o3_equivariance``                 E, E_i invariant; F -> F Rᵀ, σ -> R σ Rᵀ under a random
                                          rotation and a random improper rotation (inversion)
``check_translation_invariance``          E, F unchanged by a translation
``check_permutation_invariance``          atoms and edges shuffled: E_i, F follow the atoms
``check_batching``                        a batch of structures == each one on its own
``check_forces_finite_difference``        F = -∂E/∂x by central differences
``check_stress_finite_difference``        σ = (1/V) ∂E/∂ε by central differences of the strain
                                          (ASE's ``calculate_numerical_stress`` formula)
``check_cutoff_smoothness``               an atom crossing the cutoff of an atom that has
                                          another neighbor, for every pair of species (a
                                          subset beyond 12 species): E continuous with zero
                                          slope (C¹), F = -dE/dr
``check_periodic_images``                 a crystal: atoms moved by lattice vectors change
                                          nothing; 2x1x1 and 1x2x1 supercells have 2 E, the
                                          same E_i, F and σ
``check_distinguishes_isomers``           decalin and bicyclopentyl (both C10H18, same bond
                                          degrees) get different energies
``check_compile``                         eager == ``torch.compile(Potential(model),
                                          fullgraph=True)`` (zero graph breaks), forces,
                                          stress and their parameter gradients
``check_export``                          ``torch.export`` round trip (export, save, load):
                                          energies, forces and stress equal eager
========================================  ===================================================

Every check runs on the device of the model passed in (its first parameter or buffer; CPU for
a model without any): a CUDA model is checked on CUDA, structures and all.

Use ``check_model(model)`` to run them all, or parametrize pytest over ``CHECKS``::

    @pytest.mark.parametrize("check", molnets.testing.CHECKS)
    def test_my_model(check):
        check(MyModel(config))

Compiled code: ``check_compile`` compiles the whole ``Potential`` (energy, forces and stress
in one graph: ``Potential`` takes its derivatives with ``torch.func.grad`` when traced).
``check_export`` exports the energy model, and a ``Potential`` around the loaded program
differentiates it.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import os
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .graph import AtomicGraph, batch_graphs
from .models.base import Potential

__all__ = [
    "random_graph",
    "random_orthogonal",
    "transform",
    "permute",
    "strain",
    "decalin_and_bicyclopentyl",
    "check_o3_equivariance",
    "check_translation_invariance",
    "check_permutation_invariance",
    "check_batching",
    "check_forces_finite_difference",
    "check_stress_finite_difference",
    "check_cutoff_smoothness",
    "check_periodic_images",
    "check_distinguishes_isomers",
    "check_compile",
    "check_export",
    "check_model",
    "CHECKS",
]

DTYPE = torch.float64


# ----------------------------------------------------------------------------- helpers


def random_graph(
    num_atoms: int,
    *,
    cutoff: float,
    species: Sequence[int] = (1, 6, 8),
    seed: int = 0,
    periodic: bool = False,
    density: float = 0.08,
    min_distance: float = 0.9,
    dtype: torch.dtype = DTYPE,
) -> AtomicGraph:
    """One random structure: ``num_atoms`` atoms of random ``species`` at least ``min_distance``
    Å apart, ``density`` atoms/Å³; ``periodic`` gives a random triclinic cell with full pbc.

    Shapes:
        -> AtomicGraph with N = num_atoms, B = 1
    """
    rng = np.random.default_rng(seed)
    side = (num_atoms / density) ** (1.0 / 3.0)                           # Å
    cell = side * (np.eye(3) + 0.15 * rng.uniform(-1, 1, (3, 3))) if periodic else np.eye(3) * side
    positions: List[np.ndarray] = []
    while len(positions) < num_atoms:
        x = rng.uniform(0, 1, 3) @ cell                                    # [3]
        if all(_min_image_distance(x - y, cell, periodic) >= min_distance for y in positions):
            positions.append(x)
    numbers = rng.choice(np.asarray(species), num_atoms)
    return AtomicGraph.from_positions(
        torch.tensor(np.array(positions), dtype=torch.float64),
        torch.tensor(numbers, dtype=torch.long),
        cutoff,
        cell=torch.tensor(cell if periodic else np.zeros((3, 3))),
        pbc=torch.tensor([periodic] * 3),
    ).to(dtype=dtype)


def _min_image_distance(d: np.ndarray, cell: np.ndarray, periodic: bool) -> float:
    if periodic:
        frac = np.linalg.solve(cell.T, d)
        d = (frac - np.round(frac)) @ cell
    return float(np.linalg.norm(d))


def random_orthogonal(seed: int, *, inversion: bool = False, dtype: torch.dtype = DTYPE) -> Tensor:
    """A random 3x3 orthogonal matrix: a rotation (det +1), or with ``inversion`` a rotation
    times -1 (det -1, an improper rotation).

    Shapes:
        -> [3, 3]
    """
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))                                  # Haar-distributed
    q = q * torch.sign(torch.linalg.det(q))                                # det +1
    return (-q if inversion else q).to(dtype)


def transform(graph: AtomicGraph, rotation: Tensor, translation: Optional[Tensor] = None) -> AtomicGraph:
    """Apply x -> R x + t to positions and R to the cell's lattice vectors (shifts unchanged).

    Shapes:
        graph, rotation [3, 3], translation [3]  ->  graph
    """
    rotation = rotation.to(graph.positions)
    positions = graph.positions @ rotation.T                               # [N, 3]
    if translation is not None:
        positions = positions + translation.to(positions)
    return graph._replace(positions=positions, cell=graph.cell @ rotation.T)


def permute(graph: AtomicGraph, seed: int) -> Tuple[AtomicGraph, Tensor]:
    """Shuffle the atoms and the edges of ``graph``; returns the new graph and ``perm`` with
    new atom k = old atom perm[k].

    Shapes:
        graph  ->  graph, perm [N]
    """
    generator = torch.Generator().manual_seed(seed)
    device = graph.positions.device
    perm = torch.randperm(graph.num_atoms, generator=generator).to(device)     # [N]
    new_index = torch.empty_like(perm)
    new_index[perm] = torch.arange(graph.num_atoms, device=device)           # old -> new
    edges = torch.randperm(graph.num_edges, generator=generator).to(device)    # [E]
    shuffled = AtomicGraph(
        positions=graph.positions[perm],
        atomic_numbers=graph.atomic_numbers[perm],
        cell=graph.cell,
        pbc=graph.pbc,
        batch=graph.batch[perm],
        receivers=new_index[graph.receivers[edges]],
        senders=new_index[graph.senders[edges]],
        shifts=graph.shifts[edges],
    )
    return shuffled, perm


def strain(graph: AtomicGraph, epsilon: Tensor) -> AtomicGraph:
    """Deform positions and cell by 1 + ε (rows: x -> x (1 + ε)), keeping the edges.

    Shapes:
        graph (B = 1), epsilon [3, 3]  ->  graph
    """
    deformation = torch.eye(3, dtype=graph.positions.dtype, device=graph.positions.device) + epsilon.to(graph.positions)
    return graph._replace(positions=graph.positions @ deformation, cell=graph.cell @ deformation)


def decalin_and_bicyclopentyl() -> Tuple["ase.Atoms", "ase.Atoms"]:  # noqa: F821
    """3D geometries of decalin and bicyclopentyl (both C10H18).

    Their bond graphs have the same atoms and the same degree of every atom (two CH with
    three carbon neighbors, eight CH2), so 1-WL message passing on bonds alone cannot tell
    them apart. Built from the bond topology by minimising a small valence force field (C-C
    1.53 Å, C-H 1.09 Å, tetrahedral angles, soft non-bonded repulsion) from a fixed start.
    """
    decalin = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 0), (5, 6), (6, 7), (7, 8), (8, 9), (9, 4)]
    bicyclopentyl = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0), (5, 6), (6, 7), (7, 8), (8, 9), (9, 5), (0, 5)]
    return _build_molecule(tuple(decalin)).copy(), _build_molecule(tuple(bicyclopentyl)).copy()


@functools.lru_cache(maxsize=4)
def _build_molecule(carbon_bonds: Sequence[Tuple[int, int]]) -> "ase.Atoms":  # noqa: F821
    import ase

    num_carbons = 10
    degree = [sum(c in b for b in carbon_bonds) for c in range(num_carbons)]
    bonds = list(carbon_bonds)
    numbers = [6] * num_carbons
    for c in range(num_carbons):
        for _ in range(4 - degree[c]):
            bonds.append((c, len(numbers)))
            numbers.append(1)
    num_atoms = len(numbers)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_atoms, 3, generator=generator, dtype=torch.float64) * 2.0
    x = x.requires_grad_(True)
    i, j = torch.tensor(bonds).T                                               # [bonds]
    r0 = torch.where(torch.tensor(numbers)[j] == 1, 1.09, 1.53).to(torch.float64)
    neighbors = [[b for a, b in bonds if a == k] + [a for a, b in bonds if b == k] for k in range(num_atoms)]
    angles = torch.tensor([(a, k, b) for k in range(num_atoms) for a in neighbors[k] for b in neighbors[k] if a < b])
    close = {tuple(sorted(b)) for b in bonds} | {tuple(sorted((a, b))) for a, _, b in angles.tolist()}
    far = torch.tensor([(a, b) for a in range(num_atoms) for b in range(a + 1, num_atoms) if (a, b) not in close])
    optimizer = torch.optim.LBFGS([x], max_iter=2000, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def energy() -> Tensor:
        optimizer.zero_grad()
        bond = ((x[j] - x[i]).norm(dim=-1) - r0).pow(2).sum()
        u, v = x[angles[:, 0]] - x[angles[:, 1]], x[angles[:, 2]] - x[angles[:, 1]]
        cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))
        angle = (cos - math.cos(math.radians(109.47))).pow(2).sum()
        repulsion = torch.relu(2.5 - (x[far[:, 0]] - x[far[:, 1]]).norm(dim=-1)).pow(2).sum()
        total = 10 * bond + angle + 0.1 * repulsion
        total.backward()
        return total

    for _ in range(5):
        optimizer.step(energy)
    positions = x.detach().numpy()
    return ase.Atoms(numbers=numbers, positions=positions - positions.mean(0))


def _potential(model: nn.Module, *, stress: bool = True) -> Potential:
    """A float64, eval-mode ``Potential`` around a copy of ``model``, on the model's device."""
    return Potential(copy.deepcopy(model).to(DTYPE), compute_stress=stress).eval()


def _device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without any)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _species_and_cutoff(model: nn.Module, species: Optional[Sequence[int]], cutoff: Optional[float]):
    species = tuple(species) if species is not None else tuple(model.config.species)
    return species, float(cutoff if cutoff is not None else model.config.cutoff)


def _test_structures(species: Sequence[int], cutoff: float, device: torch.device) -> AtomicGraph:
    """A molecule and a periodic crystal in one batch."""
    return batch_graphs(
        [
            random_graph(7, cutoff=cutoff, species=species, seed=11),
            random_graph(6, cutoff=cutoff, species=species, seed=12, periodic=True, density=0.06),
        ]
    ).to(device)


def _close(actual: Tensor, expected: Tensor, what: str, *, rtol: float = 1e-7, atol: float = 1e-7) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------ checks


def check_o3_equivariance(model: nn.Module, *, species=None, cutoff=None, seed: int = 0) -> None:
    """E and E_i invariant, F -> F Rᵀ, σ -> R σ Rᵀ for a random rotation and a random
    rotation-inversion, on a molecule and a triclinic crystal (float64)."""
    species, cutoff = _species_and_cutoff(model, species, cutoff)
    potential = _potential(model)
    graph = _test_structures(species, cutoff, _device(model))
    ref = potential(graph)
    for inversion in (False, True):
        rotation = random_orthogonal(seed, inversion=inversion).to(graph.positions.device)
        out = potential(transform(graph, rotation))
        name = f"det R = {-1 if inversion else 1}, R = {rotation.tolist()}"
        _close(out["energy"], ref["energy"], f"energy not invariant ({name})")
        _close(out["energies"], ref["energies"], f"per-atom energies not invariant ({name})")
        _close(out["forces"], ref["forces"] @ rotation.T, f"forces not equivariant ({name})")
        _close(out["stress"], rotation @ ref["stress"] @ rotation.T, f"stress not equivariant ({name})")


def check_translation_invariance(model: nn.Module, *, species=None, cutoff=None, seed: int = 0) -> None:
    """E and F unchanged when every atom moves by the same random vector."""
    species, cutoff = _species_and_cutoff(model, species, cutoff)
    potential = _potential(model)
    graph = _test_structures(species, cutoff, _device(model))
    shift = torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=DTYPE) * 3.0
    ref, out = potential(graph), potential(transform(graph, torch.eye(3, dtype=DTYPE), shift))
    for key in ("energy", "energies", "forces", "stress"):
        _close(out[key], ref[key], f"{key} changed under the translation {shift.tolist()}")


def check_permutation_invariance(model: nn.Module, *, species=None, cutoff=None, seed: int = 0) -> None:
    """Shuffling atoms and edges permutes E_i and F the same way and leaves E, σ unchanged."""
    species, cutoff = _species_and_cutoff(model, species, cutoff)
    potential = _potential(model)
    graph = random_graph(9, cutoff=cutoff, species=species, seed=13, periodic=True, density=0.06).to(_device(model))
    shuffled, perm = permute(graph, seed)
    ref, out = potential(graph), potential(shuffled)
    _close(out["energy"], ref["energy"], "energy not permutation invariant")
    _close(out["energies"], ref["energies"][perm], "per-atom energies do not follow the atoms")
    _close(out["forces"], ref["forces"][perm], "forces do not follow the atoms")
    _close(out["stress"], ref["stress"], "stress not permutation invariant")


def check_batching(model: nn.Module, *, species=None, cutoff=None) -> None:
    """A batch of three structures (molecule, crystal, molecule) gives each structure's own
    energy, per-atom energies, forces and stress."""
    species, cutoff = _species_and_cutoff(model, species, cutoff)
    potential = _potential(model)
    graphs = [
        random_graph(5, cutoff=cutoff, species=species, seed=21),
        random_graph(6, cutoff=cutoff, species=species, seed=22, periodic=True, density=0.06),
        random_graph(8, cutoff=cutoff, species=species, seed=23),
    ]
    device = _device(model)
    both = potential(batch_graphs(graphs).to(device))
    alone = [potential(g.to(device)) for g in graphs]
    for key in ("energy", "energies", "forces", "stress"):
        _close(both[key], torch.cat([o[key] for o in alone]), f"batched {key} differs from one by one")


def check_forces_finite_difference(
    model: nn.Module, *, species=None, cutoff=None, step: float = 1e-4, num_coordinates: int = 12
) -> None:
    """F_ia = -(E(x + h e_ia) - E(x - h e_ia)) / 2h for ``num_coordinates`` random (i, a)
    of a molecule and a crystal batched together (float64)."""
    species, cutoff = _species_and_cutoff(model, species, cutoff)
    potential = _potential(model, stress=False)
    graph = _test_structures(species, cutoff, _device(model))
    forces = potential(graph)["forces"]
    picks = torch.randperm(forces.numel(), generator=torch.Generator().manual_seed(0))[:num_coordinates]
    numeric = torch.zeros(len(picks), dtype=DTYPE, device=forces.device)
    for k, flat in enumerate(picks.tolist()):
        displaced = []
        for sign in (1.0, -1.0):
            positions = graph.positions.clone()
            positions.view(-1)[flat] += sign * step
            displaced.append(potential(graph._replace(positions=positions))["energy"].sum().detach())
        numeric[k] = -(displaced[0] - displaced[1]) / (2 * step)
    _close(forces.reshape(-1)[picks.to(forces.device)].detach(), numeric, "forces differ from central finite differences", rtol=1e-5, atol=1e-6)


def check_stress_finite_difference(model: nn.Module, *, species=None, cutoff=None, step: float = 1e-5) -> None:
    """σ_ab = (E(ε) - E(-ε)) / (2 h V) for a symmetric strain ε with ε_ab = ε_ba = h
    (ASE's ``calculate_numerical_stress``), on a triclinic crystal (float64)."""
    species, cutoff = _species_and_cutoff(model, species, cutoff)
    potential = _potential(model)
    graph = random_graph(8, cutoff=cutoff, species=species, seed=31, periodic=True, density=0.06).to(_device(model))
    stress = potential(graph)["stress"][0]
    volume = torch.linalg.det(graph.cell[0]).abs()
    numeric = torch.zeros(3, 3, dtype=DTYPE, device=stress.device)
    for a in range(3):
        for b in range(a, 3):
            epsilon = torch.zeros(3, 3, dtype=DTYPE)
            epsilon[a, b] = epsilon[b, a] = step
            plus = potential(strain(graph, epsilon))["energy"].sum()
            minus = potential(strain(graph, -epsilon))["energy"].sum()
            numeric[a, b] = numeric[b, a] = (plus - minus) / (2 * step * volume) / (1 if a == b else 2)
    _close(stress, numeric, "stress differs from finite differences of the strain", rtol=1e-5, atol=1e-7)


def _species_pairs(species: Sequence[int]) -> List[Tuple[int, int]]:
    """The species pairs that ``check_cutoff_smoothness`` moves across the cutoff: every
    unordered pair for up to 12 species (at most 78 pairs); for more, each species with itself
    and with the next one in ``species`` (cyclically), 2 S pairs, so that every species crosses
    the cutoff both from a like and from an unlike atom."""
    species = list(dict.fromkeys(species))
    if len(species) <= 12:
        return [(a, b) for k, a in enumerate(species) for b in species[k:]]
    return [(a, a) for a in species] + [(a, species[(k + 1) % len(species)]) for k, a in enumerate(species)]


def check_cutoff_smoothness(model: nn.Module, *, species=None, cutoff=None) -> None:
    """An atom leaving the cutoff sphere r_c (Å) of an atom that keeps another neighbor: the
    energy (eV) is continuous with zero slope and the forces (eV/Å) are -dE/dr.

    Physics: molecular dynamics conserves energy and geometry optimisers converge only if E is
    continuously differentiable (C¹) in the positions, while the neighbor list, and with it the
    graph, changes discontinuously when a pair crosses r_c. Every term of a pair must therefore
    vanish with zero slope at r_c, for every pair of species, whatever else the atoms see. A
    lone pair is not enough to show this: with one neighbor a mean over neighbors equals their
    sum, so a mean (or softmax, or a normalisation by the neighbor count) that jumps when a
    second neighbor enters passes it. Here each structure is three atoms: A at the origin, B
    moving away from A along a fixed direction across r_c, and a third atom C 1.2 Å from A (at
    120° from B's path, so that C stays out of B's range along the path and only the pair A-B
    crosses r_c). A and B run over the pairs of ``_species_pairs(species)`` (all pairs for up to
    12 species), all of them batched into one graph per distance (each structure its own graph),
    the neighbor list rebuilt at each distance:

    - beyond r_c (r_c + 1e-6, + 1e-3, + 0.1 Å) each energy is exactly that at r_c + 1 Å (B
      separated from A and C);
    - E(r_c - δ) - E(r_c + 1 Å) vanishes faster than δ (continuous energy with zero slope, so
      that forces are continuous): its ratio over δ at δ = 1e-4 Å is at most a fifth of the
      larger ratio at δ = 1e-2 and 1e-3 Å (a C¹ energy gives a tenth or less, a kink the same
      ratio, a jump ten times more);
    - the force on B along its path equals -dE/dr by central differences (h = 1e-5 Å) at
      r_c - 0.3, - 0.01, - 1e-4 and + 1e-4 Å.

    Args:
        species: atomic numbers whose pairs cross the cutoff (default ``model.config.species``).
        cutoff: r_c in Å (default ``model.config.cutoff``), more than 1.2 Å so that C is a
            neighbor of A (C never comes within r_c of B on B's path, whatever r_c).
    """
    species, cutoff = _species_and_cutoff(model, species, cutoff)
    potential = _potential(model, stress=False)
    device = _device(model)
    pairs = _species_pairs(species)
    unique = list(dict.fromkeys(species))
    third = [unique[(unique.index(a) + unique.index(b) + 1) % len(unique)] for a, b in pairs]
    numbers = torch.tensor([[a, b, c] for (a, b), c in zip(pairs, third)], device=device).reshape(-1)  # [3P]
    batch = torch.arange(len(pairs), device=device).repeat_interleave(3)                               # [3P]
    direction = torch.tensor([0.48, 0.6, 0.64], dtype=DTYPE, device=device)                           # unit vector
    normal = torch.linalg.cross(direction, torch.tensor([0.0, 0.0, 1.0], dtype=DTYPE, device=device))
    normal = normal / normal.norm()                                                                    # ⟂ direction
    neighbor = 1.2 * (math.cos(2 * math.pi / 3) * direction + math.sin(2 * math.pi / 3) * normal)      # [3], Å
    names = [f"{a}-{b} (third atom {c})" for (a, b), c in zip(pairs, third)]

    def run(distance: float) -> Dict[str, Tensor]:
        one = torch.stack([torch.zeros_like(direction), distance * direction, neighbor])               # [3, 3]
        positions = one.repeat(len(pairs), 1)                                                          # [3P, 3]
        return potential(AtomicGraph.from_positions(positions, numbers, cutoff, batch=batch))

    def energy(distance: float) -> Tensor:
        return run(distance)["energy"].detach()                                                        # [P]

    far = energy(cutoff + 1.0)                                                                         # [P]
    for distance in (cutoff + 1e-6, cutoff + 1e-3, cutoff + 0.1):
        _close(energy(distance), far, f"energy beyond the cutoff (r = {distance} Å) depends on r, pairs {names}")
    gap = {d: (energy(cutoff - d) - far).abs() for d in (0.5, 1e-2, 1e-3, 1e-4)}                       # [P] each
    for k, name in enumerate(names):
        gaps = {d: float(g[k]) for d, g in gap.items()}
        assert gaps[0.5] > 1e-9, f"pair {name}: the pair is invisible at r_c - 0.5 Å ({gaps}): check cannot run"
        # |E(r_c - δ) - E(∞)| / δ ~ δ for a C¹ energy, constant for a kink, 1/δ for a jump. The larger of
        # two probes, as a smooth difference may cross zero near one of them; rounding of ~ 1e-16 |E|.
        roundoff = 1e-15 * (abs(float(far[k])) + 1.0) / 1e-4
        assert gaps[1e-4] / 1e-4 <= 0.2 * max(gaps[1e-2] / 1e-2, gaps[1e-3] / 1e-3) + roundoff, (
            f"pair {name}: energy is not C¹ at the cutoff: |E(r_c - δ) - E(r_c + 1 Å)| = {gaps} eV does not "
            "vanish faster than δ"
        )
    h = 1e-5
    moving = torch.arange(1, 3 * len(pairs), 3, device=device)                                         # [P]: atoms B
    for distance in (cutoff - 0.3, cutoff - 0.01, cutoff - 1e-4, cutoff + 1e-4):
        force = (run(distance)["forces"][moving] @ direction).detach()                                 # [P]
        numeric = -(energy(distance + h) - energy(distance - h)) / (2 * h)                             # [P]
        # Central differences of a total energy |E| carry rounding of ~ 1e-16 |E| / h.
        roundoff = 1e-15 * (float(far.abs().max()) + 1.0) / h
        _close(force, numeric, f"force along the path at r = {distance} Å, pairs {names}", rtol=1e-5,
               atol=1e-8 + roundoff)


def check_periodic_images(model: nn.Module, *, species=None, cutoff=None, seed: int = 0) -> None:
    """A crystal is the same crystal however its atoms are drawn and however large a cell
    describes it: energy E (eV), per-atom energies E_i (eV), forces F (eV/Å) and stress σ
    (eV/Å³) follow, to 1e-10 (float64).

    Physics: a periodic structure is an infinite lattice of copies of the cell; the model sees
    the copies only through the edges' cell shifts S (r_ij = x_j - x_i + S @ cell). A model that
    ignores or misuses the shifts still passes rotation, translation, strain and finite-difference
    checks, which are self-consistent with whatever edge vectors it uses, so this check changes
    the description of the crystal, not the crystal. On a random triclinic cell of 6 atoms whose
    side is about the cutoff r_c (so that atoms see their own periodic images), graphs rebuilt
    from positions each time:

    - moving atom 0 by the lattice vector a₁ and the last atom by a₂ - a₃ (the same crystal)
      leaves E, E_i, F and σ unchanged;
    - the 2x1x1 and the 1x2x1 supercells (cell a₁ or a₂ doubled, atoms x and x + a₁ or x + a₂)
      have twice the energy (E is extensive), the cell's E_i and F on both copies of each atom,
      and the same σ (intensive: E and the volume both double).

    Args:
        species: atomic numbers to draw the atoms from (default ``model.config.species``).
        cutoff: Å (default ``model.config.cutoff``).
        seed: seed of the random structure.
    """
    species, cutoff = _species_and_cutoff(model, species, cutoff)
    potential = _potential(model)
    device = _device(model)
    num_atoms = 6
    crystal = random_graph(num_atoms, cutoff=cutoff, species=species, seed=61 + seed, periodic=True,
                           density=num_atoms / cutoff**3).to(device)
    cell = crystal.cell[0]                                                                 # [3, 3], rows a₁ a₂ a₃

    def run(positions: Tensor, numbers: Tensor, cell: Tensor) -> Dict[str, Tensor]:
        graph = AtomicGraph.from_positions(positions, numbers, cutoff, cell=cell, pbc=crystal.pbc[0])
        return {key: value.detach() for key, value in potential(graph).items()}

    ref = run(crystal.positions, crystal.atomic_numbers, cell)
    moved = crystal.positions.clone()                                                      # [N, 3]
    moved[0] += cell[0]
    moved[-1] += cell[1] - cell[2]
    out = run(moved, crystal.atomic_numbers, cell)
    for key in ("energy", "energies", "forces", "stress"):
        _close(out[key], ref[key], f"{key} changed when atoms moved by lattice vectors (the same crystal)",
               rtol=1e-10, atol=1e-10)
    for axis in (0, 1):
        name = ["2x1x1", "1x2x1"][axis]
        supercell = cell.clone()
        supercell[axis] *= 2
        positions = torch.cat([crystal.positions, crystal.positions + cell[axis]])       # [2N, 3]
        out = run(positions, crystal.atomic_numbers.repeat(2), supercell)
        _close(out["energy"], 2 * ref["energy"], f"{name} supercell: energy is not twice the cell's",
               rtol=1e-10, atol=1e-10)
        for key in ("energies", "forces"):
            _close(out[key], ref[key].repeat(2, *[1] * (ref[key].dim() - 1)),
                   f"{name} supercell: {key} differ from the cell's", rtol=1e-10, atol=1e-10)
        _close(out["stress"], ref["stress"], f"{name} supercell: stress differs from the cell's",
               rtol=1e-10, atol=1e-10)


def check_distinguishes_isomers(model: nn.Module, *, species=None, cutoff=None) -> None:
    """Decalin and bicyclopentyl (C10H18, same bond degrees) get different energies."""
    species, cutoff = _species_and_cutoff(model, species, cutoff)
    potential = _potential(model, stress=False)
    decalin, bicyclopentyl = decalin_and_bicyclopentyl()
    device = _device(model)
    e1 = potential(AtomicGraph.from_ase(decalin, cutoff, dtype=DTYPE).to(device))["energy"].sum().detach()
    e2 = potential(AtomicGraph.from_ase(bicyclopentyl, cutoff, dtype=DTYPE).to(device))["energy"].sum().detach()
    assert abs(float(e1 - e2)) > 1e-6 * max(1.0, abs(float(e1))), (
        f"decalin and bicyclopentyl get the same energy: {float(e1)} vs {float(e2)} eV"
    )


def check_compile(model: nn.Module, *, species=None, cutoff=None, backend: str = "inductor") -> None:
    """``torch.compile(Potential(model), fullgraph=True, dynamic=True)`` traces energy, forces
    and stress as one graph (``fullgraph=True`` raises on any graph break, so a pass means zero
    breaks) and gives the eager energies, forces and stress on two structures of different
    sizes; in training mode the gradient of a force and stress loss with respect to the
    parameters (double backward through the compiled graph) equals the eager one (not for a
    frozen model, whose parameters need no gradient).

    Args:
        backend: ``torch.compile`` backend; "inductor" generates kernels (slow to compile on
            CPU), "aot_eager" traces forward and backward graphs without code generation.
    """
    species, cutoff = _species_and_cutoff(model, species, cutoff)
    eager = _potential(model)
    graph = _test_structures(species, cutoff, _device(model))
    other = random_graph(11, cutoff=cutoff, species=species, seed=41, periodic=True, density=0.06)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = torch.compile(eager, fullgraph=True, dynamic=True, backend=backend)
        for g in (graph, other.to(graph.positions.device)):
            ref, out = eager(g), compiled(g)
            for key in ("energy", "energies", "forces", "stress"):
                _close(out[key], ref[key], f"compiled {key} differs from eager", rtol=1e-9, atol=1e-9)

        params = [p for p in eager.parameters() if p.requires_grad]
        if params:  # a frozen model (as calculators run one) has no parameter gradients to compare
            _check_compiled_parameter_gradients(eager, params, graph, backend)
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        assert not breaks, f"graph breaks: {breaks}"
    finally:
        torch._dynamo.reset()


def _check_compiled_parameter_gradients(eager: nn.Module, params: Sequence[Tensor], graph: AtomicGraph,
                                        backend: str) -> None:
    """``check_compile`` in training mode: the force-and-stress loss's parameter gradients."""
    eager.train()
    compiled = torch.compile(eager, fullgraph=True, dynamic=True, backend=backend)
    grads = []
    for potential in (eager, compiled):
        out = potential(graph)
        loss = out["forces"].square().sum() + out["stress"].square().sum()
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    names = [name for name, p in eager.named_parameters() if p.requires_grad]
    for name, param, ref, got in zip(names, params, *grads):
        # A parameter the forces do not depend on (a last bias) may be unused on one side.
        ref = torch.zeros_like(param) if ref is None else ref
        got = torch.zeros_like(param) if got is None else got
        _close(got, ref, f"compiled force-loss gradient of {name} differs from eager", rtol=1e-9, atol=1e-9)


class _FlatInputs(nn.Module):
    """``model`` with the graph's tensors as separate arguments: what ``torch.export`` saves."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, positions: Tensor, atomic_numbers: Tensor, cell: Tensor, pbc: Tensor,
        batch: Tensor, receivers: Tensor, senders: Tensor, shifts: Tensor,
    ) -> Tensor:
        return self.model(AtomicGraph(positions, atomic_numbers, cell, pbc, batch, receivers, senders, shifts))


def check_export(model: nn.Module, *, species=None, cutoff=None) -> None:
    """``torch.export`` with dynamic N, E, B; the exported program saved and loaded again gives
    the eager per-atom energies, and a ``Potential`` around it the eager forces and stress."""
    species, cutoff = _species_and_cutoff(model, species, cutoff)
    eager = _potential(model)
    example = _test_structures(species, cutoff, _device(model))
    dims = tuple({0: torch.export.Dim.DYNAMIC} for _ in example)
    exported = torch.export.export(_FlatInputs(eager.model), tuple(example), dynamic_shapes=dims)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.pt2")
        torch.export.save(exported, path)
        module = torch.export.load(path).module()
    reloaded = Potential(_GraphInputs(module), compute_stress=True)
    reloaded.training = False  # an exported module cannot be switched with .train()/.eval()
    other = batch_graphs(
        [random_graph(n, cutoff=cutoff, species=species, seed=50 + n, periodic=n % 2 == 1, density=0.06) for n in (5, 9, 4)]
    ).to(example.positions.device)
    for g in (example, other):
        ref, out = eager(g), reloaded(g)
        for key in ("energy", "energies", "forces", "stress"):
            _close(out[key], ref[key], f"exported {key} differs from eager", rtol=1e-9, atol=1e-9)


class _GraphInputs(nn.Module):
    """An exported flat-argument module called with an ``AtomicGraph``."""

    def __init__(self, module: Callable[..., Tensor]) -> None:
        super().__init__()
        self.module = module

    def forward(self, graph: AtomicGraph) -> Tensor:
        return self.module(*graph)


CHECKS: Tuple[Callable[..., None], ...] = (
    check_o3_equivariance,
    check_translation_invariance,
    check_permutation_invariance,
    check_batching,
    check_forces_finite_difference,
    check_stress_finite_difference,
    check_cutoff_smoothness,
    check_periodic_images,
    check_distinguishes_isomers,
    check_compile,
    check_export,
)


def check_model(model: nn.Module, *, species=None, cutoff=None, skip: Sequence[str] = ()) -> None:
    """Run every check of ``CHECKS`` (except those whose name is in ``skip``) on ``model``.

    Args:
        model: per-atom energy model (not modified: each check uses a float64 copy).
        species: atomic numbers to draw structures from (default ``model.config.species``;
            must include H and C for ``check_distinguishes_isomers``).
        cutoff: Å (default ``model.config.cutoff``).
        skip: names of checks to leave out, e.g. ``("check_compile", "check_export")``.
    """
    for check in CHECKS:
        if check.__name__ not in skip:
            check(model, species=species, cutoff=cutoff)
