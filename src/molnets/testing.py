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
``check_cutoff_smoothness``               an atom crossing the cutoff: E continuous with zero
                                          slope (C¹), forces continuous and equal to -dE/dr
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


def check_cutoff_smoothness(model: nn.Module, *, species=None, cutoff=None) -> None:
    """One atom moves away from another across the cutoff r_c, the graph rebuilt at each step:

    - beyond r_c the energy is exactly that of the separated atoms;
    - E(r_c - δ) - E(∞) vanishes faster than δ (continuous energy with zero slope, so forces
      are continuous): the ratio over δ falls at least 5x from δ = 1e-2 to 1e-3 Å;
    - the force along the path equals -dE/dr by central differences on both sides of r_c.
    """
    species, cutoff = _species_and_cutoff(model, species, cutoff)
    potential = _potential(model, stress=False)
    device = _device(model)
    numbers = torch.tensor([species[0], species[-1]], device=device)
    direction = torch.tensor([0.48, 0.6, 0.64], dtype=DTYPE, device=device)  # unit vector

    def run(distance: float) -> Dict[str, Tensor]:
        positions = torch.stack([torch.zeros(3, dtype=DTYPE, device=device), distance * direction])
        return potential(AtomicGraph.from_positions(positions, numbers, cutoff))

    far = run(cutoff + 1.0)["energy"].sum().detach()
    for distance in (cutoff + 1e-6, cutoff + 1e-3, cutoff + 0.1):
        _close(run(distance)["energy"].sum(), far, f"energy beyond the cutoff (r = {distance} Å) depends on r")
    gap = {d: abs(float(run(cutoff - d)["energy"].sum().detach() - far)) for d in (0.5, 1e-2, 1e-3)}
    assert gap[0.5] > 1e-9, f"the pair interaction is invisible at r_c - 0.5 Å ({gap}): check cannot run"
    assert gap[1e-3] / 1e-3 <= 0.2 * gap[1e-2] / 1e-2 + 1e-12, (
        f"energy is not C¹ at the cutoff: |E(r_c - δ) - E(∞)| = {gap} does not vanish faster than δ"
    )
    h = 1e-5
    for distance in (cutoff - 0.3, cutoff - 0.01, cutoff - 1e-4, cutoff + 1e-4):
        force = (run(distance)["forces"][1] @ direction).detach()
        numeric = -(run(distance + h)["energy"].sum() - run(distance - h)["energy"].sum()) / (2 * h)
        # Central differences of a total energy |E| carry rounding of ~ 1e-16 |E| / h.
        roundoff = 1e-15 * (abs(float(far)) + 1.0) / h
        _close(force, numeric.detach(), f"force along the path at r = {distance} Å", rtol=1e-5, atol=1e-8 + roundoff)


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
