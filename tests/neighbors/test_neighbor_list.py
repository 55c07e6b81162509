"""Every neighbor-list backend against ASE's ``neighbor_list("ijS")`` and the brute-force reference.

Random structures come from hypothesis (the discrete choices and a seed; the floats from numpy, so
that no two atoms coincide by shrinking): triclinic, strongly skewed and smaller-than-cutoff
cells, unwrapped atoms, mixed pbc with tilted or zero non-periodic vectors, molecules 1e4 Å from
the origin, one atom, no atom, each under a random rotation (det ±1) and translation.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from molnets.neighbors import _resolve, neighbor_list
from molnets.neighbors._geometry import reduce_cell, validate

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
CELL_KINDS = ("triclinic", "skewed", "small")


def make_structure(seed: int, num_atoms: int, pbc: Tuple[bool, bool, bool], kind: str,
                   zero_free: bool, unwrapped: bool, far: bool):
    """Positions [n, 3], cell [3, 3], pbc [3] and a description of the transform applied."""
    rng = np.random.default_rng(seed)
    pbc_a = np.array(pbc, dtype=bool)
    for _ in range(100):
        if kind == "triclinic":
            cell = rng.uniform(2.5, 7.0) * np.eye(3) + rng.normal(scale=1.5, size=(3, 3))
        elif kind == "skewed":  # lower triangular with large tilts: vectors far from orthogonal
            cell = np.diag(rng.uniform(2.0, 5.0, size=3)) + np.tril(rng.uniform(-12, 12, size=(3, 3)), -1)
        else:  # smaller than any cutoff drawn: many images of every pair
            cell = rng.uniform(0.9, 2.0) * np.eye(3) + rng.normal(scale=0.3, size=(3, 3))
        spacing = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)
        if spacing.min() > (0.25 if kind == "skewed" else 0.6):
            break
    frac = rng.uniform(-1.5, 2.5, size=(num_atoms, 3)) if unwrapped else rng.uniform(0, 1, size=(num_atoms, 3))
    positions = frac @ cell
    if not pbc_a.all():
        positions = positions + rng.normal(scale=3.0, size=(num_atoms, 3))
    if zero_free:
        cell[~pbc_a] = 0.0
    # Random rotation or rotoinversion and translation, applied to positions and cell alike.
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    translation = rng.normal(size=3)
    translation *= (1e4 if far and not pbc_a.any() else rng.uniform(0, 20)) / np.linalg.norm(translation)
    positions = positions @ rotation.T + translation
    cell = cell @ rotation.T
    transform = f"rotation={rotation.tolist()}, translation={translation.tolist()}, seed={seed}"
    return positions, cell, pbc_a, transform


@st.composite
def structures(draw, periodic: bool = True):
    seed = draw(st.integers(0, 2**32 - 1))
    num_atoms = draw(st.one_of(st.integers(0, 1), st.integers(2, 9)))
    pbc = draw(st.tuples(st.booleans(), st.booleans(), st.booleans())) if periodic else (False,) * 3
    kind = draw(st.sampled_from(CELL_KINDS))
    cutoff = draw(st.floats(0.5, 4.0 if kind == "small" else 5.0))
    flags = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    return make_structure(seed, num_atoms, pbc, kind, *flags), cutoff


def ase_pairs(positions, cell, pbc, cutoff) -> Dict[Tuple[int, int, Tuple[int, int, int]], float]:
    i, j, S, d = ase_neighbor_list("ijSd", Atoms(positions=positions, cell=cell, pbc=pbc), cutoff)
    return {(a, b, tuple(s)): dist for a, b, s, dist in zip(i.tolist(), j.tolist(), S.tolist(), d.tolist())}


def molnets_pairs(receivers, senders, shifts, positions, cell) -> Dict:
    """Pair set of a backend, with distances recomputed as |x[j] - x[i] + S @ cell| (float64)."""
    vectors = positions[senders] - positions[receivers] + shifts.to(positions.dtype) @ cell
    pairs = {}
    for a, b, s, dist in zip(receivers.tolist(), senders.tolist(), shifts.tolist(), vectors.norm(dim=1).tolist()):
        key = (a, b, tuple(s))
        assert key not in pairs, f"duplicate pair {key}"
        pairs[key] = dist
    return pairs


def assert_same_pairs(expected: Dict, actual: Dict, context: str) -> None:
    missing = sorted(set(expected) - set(actual))[:5]
    extra = sorted(set(actual) - set(expected))[:5]
    assert not missing and not extra, (
        f"{context}: {len(expected)} pairs expected, {len(actual)} found; missing {missing} "
        f"(d={[expected[k] for k in missing]}), extra {extra} (d={[actual[k] for k in extra]})"
    )
    for key, dist in expected.items():
        assert abs(actual[key] - dist) <= 1e-10, f"{context}: pair {key} at {actual[key]!r} Å, ASE says {dist!r} Å"


def check_against_ase(structure, cutoff: float, backends: List[str]) -> None:
    positions, cell, pbc, transform = structure
    expected = ase_pairs(positions, cell, pbc, cutoff)
    assume(all(d > 1e-3 for d in expected.values()))  # overlapping atoms are a ValueError, tested below
    x, c = torch.tensor(positions, dtype=torch.float64).reshape(-1, 3), torch.tensor(cell)
    for backend in backends:
        result = neighbor_list(x, cutoff, c, torch.tensor(pbc), backend=backend)
        context = f"backend={backend}, pbc={pbc.tolist()}, cutoff={cutoff}, N={len(x)}, {transform}"
        assert_same_pairs(expected, molnets_pairs(*result, x, c), context)


@settings(max_examples=250, **SETTINGS)
@given(structures())
def test_backends_equal_ase_and_reference(case):
    structure, cutoff = case
    check_against_ase(structure, cutoff, ["reference", "torch", "vesin"])


@settings(max_examples=120, **SETTINGS)
@given(structures(periodic=False))
def test_non_periodic_backends_equal_ase(case):
    structure, cutoff = case
    check_against_ase(structure, cutoff, ["cluster", "torch", "vesin", "auto"])


@settings(max_examples=30, **SETTINGS)
@given(st.lists(structures(), min_size=1, max_size=6), st.floats(0.5, 4.0))
def test_batched_equals_per_structure(cases, cutoff):
    """A batch mixing every kind of structure gives the union of the per-structure lists."""
    parts = [case[0] for case in cases]
    expected = {}
    offset = 0
    for positions, cell, pbc, _ in parts:
        single = ase_pairs(positions, cell, pbc, cutoff)
        assume(all(d > 1e-3 for d in single.values()))
        expected.update({(i + offset, j + offset, s): d for (i, j, s), d in single.items()})
        offset += len(positions)
    x = torch.tensor(np.concatenate([p[0].reshape(-1, 3) for p in parts]))
    cells = torch.tensor(np.stack([p[1] for p in parts]))
    pbc = torch.tensor(np.stack([p[2] for p in parts]))
    batch = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor([len(p[0]) for p in parts]))
    for backend in ("torch", "reference", "vesin"):
        receivers, senders, shifts = neighbor_list(x, cutoff, cells, pbc, batch, backend=backend)
        assert bool((batch[receivers] == batch[senders]).all()), "pair across structures"
        vectors = x[senders] - x[receivers] + torch.einsum("ex,exy->ey", shifts.double(), cells[batch[receivers]])
        actual = {}
        for a, b, s, d in zip(receivers.tolist(), senders.tolist(), shifts.tolist(), vectors.norm(dim=1).tolist()):
            actual[(a, b, tuple(s))] = d
        assert len(actual) == len(receivers), "duplicate pairs"
        context = f"backend={backend}, batch of {len(parts)}: " + "; ".join(p[3] for p in parts)
        assert_same_pairs(expected, actual, context)


@pytest.mark.parametrize("pbc", [False, True])
def test_auto_on_many_small_structures(pbc):
    """The batched choices of "auto" (torch-cluster, torch cell list) equal the reference."""
    rng = np.random.default_rng(11)
    num_graphs, per_graph = 40, 5
    x = torch.tensor(rng.uniform(0, 6, size=(num_graphs * per_graph, 3)) + 1e3 * (not pbc))
    cells = torch.tensor(np.eye(3) * 6.0 + rng.normal(scale=0.5, size=(num_graphs, 3, 3)))
    batch = torch.arange(num_graphs).repeat_interleave(per_graph)
    expected, actual = (
        neighbor_list(x, 3.5, cells, torch.tensor(pbc).expand(num_graphs, 3), batch, backend=backend)
        for backend in ("reference", "auto")
    )
    key = lambda r: set(zip(r[0].tolist(), r[1].tolist(), map(tuple, r[2].tolist())))  # noqa: E731
    assert len(key(expected)) > num_graphs and key(actual) == key(expected)


def test_strongly_skewed_cell_against_ase():
    """A cell whose vectors are nearly parallel (plane spacing 0.1 of the vector lengths)."""
    rng = np.random.default_rng(7)
    cell = np.array([[3.0, 0.0, 0.0], [8.7, 0.4, 0.0], [5.9, 1.1, 0.45]]) * 2.2
    positions = rng.uniform(0, 1, size=(5, 3)) @ cell
    for pbc in ([True, True, True], [True, True, False], [False, True, True]):
        expected = ase_pairs(positions, cell, np.array(pbc), 2.5)
        x, c = torch.tensor(positions), torch.tensor(cell)
        for backend in ("reference", "torch", "vesin"):
            result = neighbor_list(x, 2.5, c, torch.tensor(pbc), backend=backend)
            assert_same_pairs(expected, molnets_pairs(*result, x, c), f"{backend}, pbc={pbc}")


def test_reduce_cell_keeps_the_lattice():
    cell = torch.tensor([[[3.0, 0.0, 0.0], [8.7, 0.4, 0.0], [5.9, 1.1, 0.45]]], dtype=torch.float64)
    for pbc in ([True, True, True], [True, False, True]):
        reduced, transform = reduce_cell(cell, torch.tensor([pbc]))
        assert abs(int(round(float(torch.det(transform[0].double()))))) == 1
        torch.testing.assert_close(reduced, transform.double() @ cell)
        periodic = torch.tensor(pbc)
        assert float(reduced[0, periodic].norm(dim=1).max()) < 0.7 * float(cell[0, periodic].norm(dim=1).max())
        for k in range(3):
            if not pbc[k]:
                assert transform[0, k].tolist() == [int(k == m) for m in range(3)]


def test_simple_cubic_counts():
    """Hand-counted: simple cubic a = 1, cutoff 1.5: 6 + 12 neighbors (distances 1 and sqrt 2)."""
    for backend in ("reference", "torch", "vesin", "auto"):
        receivers, senders, shifts = neighbor_list(
            torch.zeros(1, 3, dtype=torch.float64), 1.5, torch.eye(3, dtype=torch.float64), True, backend=backend
        )
        lengths = shifts.double().norm(dim=1)
        assert (receivers == 0).all() and (senders == 0).all()
        assert int((lengths == 1).sum()) == 6 and int((lengths - math.sqrt(2)).abs().lt(1e-12).sum()) == 12
        assert len(receivers) == 18


@pytest.mark.parametrize("backend", ["reference", "torch", "vesin", "cluster"])
def test_zero_and_one_atom(backend):
    for num_atoms in (0, 1):
        receivers, senders, shifts = neighbor_list(torch.zeros(num_atoms, 3), 3.0, backend=backend)
        assert receivers.shape == senders.shape == (0,) and shifts.shape == (0, 3)
        assert shifts.dtype == receivers.dtype == torch.long


@pytest.mark.parametrize("backend", ["torch", "vesin", "reference"])
def test_float32_matches_float64(backend):
    positions, cell, pbc, _ = make_structure(3, 9, (True, False, True), "triclinic", False, True, False)
    x, c = torch.tensor(positions), torch.tensor(cell)
    result64 = molnets_pairs(*neighbor_list(x, 3.0, c, torch.tensor(pbc), backend=backend), x, c)
    result32 = neighbor_list(x.float(), 3.0, c.float(), torch.tensor(pbc), backend=backend)
    assert set(molnets_pairs(*result32, x, c)) == set(result64)


# ----------------------------------------------------------------------------- bad input


def x3(n=4):
    return torch.rand(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(positions=torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0]])), "NaN"),
        (dict(positions=torch.tensor([[0.0, 0, 0], [float("inf"), 0, 0]])), "infinite"),
        (dict(cutoff=0.0), "cutoff"),
        (dict(cutoff=-1.0), "cutoff"),
        (dict(cutoff=float("nan")), "cutoff"),
        (dict(cell=torch.zeros(3, 3, dtype=torch.float64), pbc=True), "singular"),
        (dict(cell=torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1]], dtype=torch.float64), pbc=True), "singular"),
        (dict(cell=torch.full((3, 3), float("nan"), dtype=torch.float64), pbc=True), "NaN"),
        (dict(pbc=True), "no cell"),
        (dict(pbc=[True, False, True]), "no cell"),
        (dict(positions=torch.zeros(4, 2)), "shape"),
        (dict(positions=torch.zeros(4)), "shape"),
        (dict(cell=torch.eye(2, dtype=torch.float64), pbc=True), "cell must have shape"),
        (dict(cell=torch.eye(3, dtype=torch.float64), pbc=[True, True]), "pbc must have shape"),
        (dict(batch=torch.zeros(3, dtype=torch.long)), "batch must have shape"),
        (dict(batch=torch.tensor([0, -1, 0, 0])), "negative"),
        (dict(batch=torch.tensor([0, 0, 1, 1]), cell=torch.eye(3, dtype=torch.float64) * 9, pbc=True), "batch refers"),
        (dict(positions=torch.tensor([[0.0, 0, 0], [0, 0, 1e-9]], dtype=torch.float64)), "on top of each other"),
        (dict(positions=torch.tensor([[0.0, 0, 0], [2.0, 0, 0]], dtype=torch.float64),
              cell=torch.eye(3, dtype=torch.float64) * 2, pbc=True), "on top of each other"),
        (dict(backend="cluster", cell=torch.eye(3, dtype=torch.float64) * 9, pbc=[False, True, False]), "periodic"),
        (dict(backend="nope"), "unknown"),
    ],
)
@pytest.mark.parametrize("default_backend", ["torch", "vesin", "reference"])
def test_bad_input_raises_value_error(kwargs, message, default_backend):
    args = dict(positions=x3(), cutoff=3.0, cell=None, pbc=None, batch=None, backend=default_backend)
    args.update(kwargs)
    for _ in range(2):  # the cell checks remember their answers; errors must come every time
        with pytest.raises(ValueError, match=message):
            neighbor_list(**args)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's, on the sum
def test_huge_finite_positions_are_not_taken_for_inf():
    """The finite check sums the positions; a sum that overflows is no NaN/inf in the input."""
    positions = torch.tensor([[1e308, 0.0, 0.0], [1e308, 5.0, 0.0]], dtype=torch.float64)
    system = validate(positions, 3.0, None, None, None)
    assert system.positions is positions
    positions[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"atoms \[1\]"):
        validate(positions, 3.0, None, None, None)


# ----------------------------------------------------------------------------- far atoms
# An atom that flies away during molecular dynamics: vesin's cell grid follows the atoms' extent
# and divides by zero (SIGFPE, the process dies) or searches for minutes; the torch cell list
# must stay exact and small. "auto" is checked to route away from vesin *before* it is called,
# so that a regression fails the test instead of killing the test process.

FAR_CUTOFF = 5.0
FAR_DISTANCES = (1e6, 1e15, 1e30)


def far_atom_system(kind: str, distance: float, rotated: bool):
    """Positions [n, 3], cell [3, 3], pbc [3] (tensors), the far atoms' indices and a description.

    ``molecule``: ethanol with one H moved ``distance`` Å along x; ``fragment``: two H moved
    together (a pair far from the rest); ``slab``: Cu(111) 2x2x3, pbc [T, T, F], its top atom
    moved ``distance`` Å up (along the non-periodic direction); ``drifting``: the same atom also
    moved sideways, 0.3 and 0.2 x ``distance`` along x and y (at 1e30 Å, 1e28 cells along the
    periodic vectors: it must stay unwrapped, and pairs only with its own images).
    """
    if kind in ("slab", "drifting"):
        atoms = fcc111("Cu", (2, 2, 3), vacuum=5.0)
        atoms.pbc = [True, True, False]
        far = [len(atoms) - 1]
        atoms.positions[far[0]] += distance * np.array([0.3, 0.2, 1.0] if kind == "drifting" else [0.0, 0.0, 1.0])
    else:
        atoms = molecule("CH3CH2OH")
        far = [len(atoms) - 2, len(atoms) - 1] if kind == "fragment" else [len(atoms) - 1]
        atoms.positions[far, 0] += distance
    positions, cell = atoms.positions, atoms.cell[:]
    rotation = np.eye(3)
    if rotated:
        rotation, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(3, 3)))
        positions, cell = positions @ rotation.T, cell @ rotation.T
    context = f"{kind}, far atoms {far} moved {distance:g} Å, rotation={rotation.tolist()}"
    return torch.tensor(positions), torch.tensor(cell), torch.tensor(atoms.pbc), far, context


def assert_far_atoms_isolated(pairs: Dict, far: List[int], context: str) -> None:
    """No pair between a far atom and the rest (pairs among the far atoms are fine)."""
    crossing = [key for key in pairs if (key[0] in far) != (key[1] in far)]
    assert not crossing, f"{context}: pairs across the gap {crossing[:5]}"


@pytest.mark.parametrize("backend, kind, distance, rotated", [
    (backend, kind, distance, rotated)
    for backend in ("auto", "torch") for kind in ("molecule", "fragment", "slab", "drifting")
    for distance in FAR_DISTANCES for rotated in (False, True)
    # (not: the fragment rotated at 1e30 Å, whose two far atoms round to the same point there,
    # float64's spacing being 1e14 Å: no neighbor list can tell them apart)
    if not (kind == "fragment" and rotated and distance > 1e15)
])
def test_far_atom_equals_reference(backend, kind, distance, rotated):
    x, c, pbc, far, context = far_atom_system(kind, distance, rotated)
    if backend == "auto":
        assert _resolve("auto", validate(x, FAR_CUTOFF, c, pbc, None), FAR_CUTOFF) == "torch", context
    expected = molnets_pairs(*neighbor_list(x, FAR_CUTOFF, c, pbc, backend="reference"), x, c)
    actual = molnets_pairs(*neighbor_list(x, FAR_CUTOFF, c, pbc, backend=backend), x, c)
    assert_same_pairs(expected, actual, f"backend={backend}, {context}")
    assert_far_atoms_isolated(actual, far, context)
    if kind == "fragment":  # the far pair itself is found (H-H 1.8 Å apart)
        assert (far[0], far[1], (0, 0, 0)) in actual, context


@pytest.mark.parametrize("rotated", [False, True])
def test_far_atom_keeps_its_self_images(rotated):
    """At 1e30 Å up and 3e29 Å sideways the atom is 6e28 cells along the periodic vectors
    (unwrappable in float64) but far from every other atom along the normal: it keeps exactly its
    six images closer than a 6 Å cutoff (Cu(111), |a| = 5.1 Å), at zero cost of precision."""
    x, c, pbc, far, context = far_atom_system("drifting", 1e30, rotated)
    expected = molnets_pairs(*neighbor_list(x, 6.0, c, pbc, backend="reference"), x, c)
    for backend in ("torch", "auto"):
        actual = molnets_pairs(*neighbor_list(x, 6.0, c, pbc, backend=backend), x, c)
        assert_same_pairs(expected, actual, f"backend={backend}, {context}")
        images = {key: d for key, d in actual.items() if far[0] in key[:2]}
        assert all(i == j for i, j, _ in images) and len(images) == 6, images
        assert all(abs(d - 5.105) < 1e-2 for d in images.values()), images


@pytest.mark.parametrize("distance", [1e154, 1e300])
@pytest.mark.parametrize("kind, rotated", [("molecule", False), ("drifting", True)])
def test_far_atom_beyond_squared_overflow(kind, rotated, distance):
    """Past 1e154 Å squared distances overflow float64 (to inf: still not a pair) and vesin's grid
    would be degenerate or infinite: the right list from auto and torch, a ValueError from vesin."""
    x, c, pbc, far, context = far_atom_system(kind, distance, rotated=rotated)
    expected = molnets_pairs(*neighbor_list(x, FAR_CUTOFF, c, pbc, backend="reference"), x, c)
    for backend in ("auto", "torch"):
        assert_same_pairs(expected, molnets_pairs(*neighbor_list(x, FAR_CUTOFF, c, pbc, backend=backend), x, c), context)
    with pytest.raises(ValueError, match="backend='torch'"):
        neighbor_list(x, FAR_CUTOFF, c, pbc, backend="vesin")


@pytest.mark.parametrize("kind, distance", [("slab", 1e5)] + [(kind, d) for kind in ("molecule", "slab")
                                                               for d in FAR_DISTANCES])
def test_explicit_vesin_on_far_atom_raises(kind, distance):
    """vesin would die with SIGFPE (or, for the slab at 1e5 Å, search for minutes): a ValueError
    that names backend="torch" instead (a molecule with an atom 1e5 Å away vesin still handles,
    in 10 ms). The routing is asserted first, so that vesin is never called on such a system by
    this test."""
    x, c, pbc, _, context = far_atom_system(kind, distance, rotated=False)
    with pytest.raises(ValueError, match="backend='torch'"):
        _resolve("vesin", validate(x, FAR_CUTOFF, c, pbc, None), FAR_CUTOFF)
    with pytest.raises(ValueError, match="backend='torch'"):
        neighbor_list(x, FAR_CUTOFF, c, pbc, backend="vesin")


@pytest.mark.parametrize(
    "case, works, fails",
    [("ethanol, one H moved along x", 3e5, 5e5), ("periodic cell L x L x 3 Å, two atoms", 1e3, 2e3)],
)
def test_vesin_guard_matches_vesin(case, works, fails):
    """The guard's model of vesin's grid against vesin itself, on both sides of a crash measured
    with vesin 0.6.2 (SIGFPE at 5e5 Å and 2000 Å, none at 3e5 Å and 1000 Å): vesin is called
    only on the side where it works, and must then equal the reference."""
    def system(size):
        if case.startswith("ethanol"):
            return far_atom_system("molecule", size, rotated=False)[:3]
        two = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
        return two, torch.diag(torch.tensor([size, size, 3.0], dtype=torch.float64)), torch.tensor([True] * 3)

    x, c, pbc = system(fails)
    with pytest.raises(ValueError, match="SIGFPE"):
        _resolve("vesin", validate(x, FAR_CUTOFF, c, pbc, None), FAR_CUTOFF)
    x, c, pbc = system(works)
    assert _resolve("vesin", validate(x, FAR_CUTOFF, c, pbc, None), FAR_CUTOFF) == "vesin"
    expected = molnets_pairs(*neighbor_list(x, FAR_CUTOFF, c, pbc, backend="reference"), x, c)
    assert_same_pairs(expected, molnets_pairs(*neighbor_list(x, FAR_CUTOFF, c, pbc, backend="vesin"), x, c), case)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_huge_periodic_cell(backend):
    """Two atoms 1 Å apart across the boundary of a periodic box 1e12 Å wide: a few bins 5e11 Å
    wide, whose stencil must still reach the neighbor images (S = ±1)."""
    x = torch.tensor([[0.5, 0.5, 0.5], [1e12 - 0.5, 0.5, 0.5]], dtype=torch.float64)
    c = torch.eye(3, dtype=torch.float64) * 1e12
    expected = molnets_pairs(*neighbor_list(x, FAR_CUTOFF, c, True, backend="reference"), x, c)
    assert set(expected) == {(0, 1, (-1, 0, 0)), (1, 0, (1, 0, 0))}
    assert_same_pairs(expected, molnets_pairs(*neighbor_list(x, FAR_CUTOFF, c, True, backend=backend), x, c), backend)


def copper_crystal(num_atoms: int):
    reps = round((num_atoms / 4) ** (1 / 3))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (reps, reps, reps)
    atoms.rattle(0.05, seed=0)
    return atoms


@functools.lru_cache(maxsize=None)
def ordinary_systems():
    """Structures that "auto" must keep giving to vesin (the fastest there, benchmarks/neighbors.py)."""
    systems = {"ethanol": molecule("CH3CH2OH"), "benzene (planar)": molecule("C6H6"), "benzene 1e4 Å away": molecule("C6H6")}
    systems["benzene 1e4 Å away"].translate([1e4, -3e3, 2e3])
    for n in (256, 2048, 16384):
        systems[f"Cu fcc {n}"] = copper_crystal(n)
    for vacuum in (10.0, 30.0):
        slab = fcc111("Cu", (6, 6, 4), vacuum=vacuum)
        slab.pbc = [True, True, False]
        systems[f"Cu(111) slab, {vacuum} Å vacuum, pbc TTF"] = slab
        periodic = slab.copy()
        periodic.pbc = True
        systems[f"Cu(111) slab, {vacuum} Å vacuum, pbc TTT"] = periodic
    adsorbate = fcc111("Cu", (6, 6, 4), vacuum=15.0)
    adsorbate.pbc = [True, True, False]
    adsorbate.positions[-1, 2] += 30.0  # a desorbing atom 30 Å above the surface
    systems["slab, one atom 30 Å above"] = adsorbate
    cluster = copper_crystal(500)
    cluster.pbc = False
    systems["Cu cluster 500, no pbc"] = cluster
    return systems


@pytest.mark.parametrize("name", sorted(ordinary_systems()))
def test_auto_keeps_vesin_on_ordinary_systems(name):
    atoms = ordinary_systems()[name]
    system = validate(torch.tensor(atoms.positions), FAR_CUTOFF, torch.tensor(atoms.cell[:]), torch.tensor(atoms.pbc), None)
    assert _resolve("auto", system, FAR_CUTOFF) == "vesin"


def vesin_failures():
    """(positions, cell, pbc) that vesin 0.6 handles slowly (slab, atom 1e4 Å up: ~1 s, its search
    visits cells ~ extent^2) or not at all (a thin periodic cell 2000 x 2000 x 3 Å: SIGFPE; an atom
    1e12 Å along a periodic direction: its int32 cell shifts overflow, pairs are lost), and whether
    backend="vesin" must refuse it."""
    slab_up = far_atom_system("slab", 1e4, rotated=False)[:3]
    diagonal = far_atom_system("molecule", 1e6, rotated=True)[:3]  # no thin grid: vesin takes ~10 ms
    two = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    thin = (two, torch.diag(torch.tensor([2e3, 2e3, 3.0], dtype=torch.float64)), torch.tensor([True] * 3))
    sideways = far_atom_system("slab", 0.0, rotated=False)[:3]
    sideways[0][-1, 0] += 1e12
    return {"slab, atom 1e4 Å up": (slab_up, False), "molecule, atom 1e6 Å away (rotated)": (diagonal, False),
            "thin periodic cell": (thin, True), "atom 1e12 Å along a periodic vector": (sideways, True)}


@pytest.mark.parametrize("name", sorted(vesin_failures()))
def test_auto_avoids_vesin_where_it_would_fail(name):
    (x, c, pbc), refused = vesin_failures()[name]
    system = validate(x, FAR_CUTOFF, c, pbc, None)
    assert _resolve("auto", system, FAR_CUTOFF) == "torch"
    if refused:
        with pytest.raises(ValueError, match="backend='torch'"):
            _resolve("vesin", system, FAR_CUTOFF)
    else:
        assert _resolve("vesin", system, FAR_CUTOFF) == "vesin"
    expected = molnets_pairs(*neighbor_list(x, FAR_CUTOFF, c, pbc, backend="reference"), x, c)
    assert_same_pairs(expected, molnets_pairs(*neighbor_list(x, FAR_CUTOFF, c, pbc), x, c), name)


def test_batch_with_a_far_atom():
    """One structure of a batch with a far atom sends the whole batch to the torch cell list."""
    parts = [far_atom_system("slab", 1e30, rotated=True), far_atom_system("molecule", 0.0, rotated=False)]
    x = torch.cat([p[0] for p in parts])
    cells = torch.stack([p[1] for p in parts])
    pbc = torch.stack([p[2] for p in parts])
    batch = torch.tensor([0] * len(parts[0][0]) + [1] * len(parts[1][0]))
    assert _resolve("auto", validate(x, FAR_CUTOFF, cells, pbc, batch), FAR_CUTOFF) == "torch"
    for backend in ("auto", "torch"):
        expected, actual = (
            neighbor_list(x, FAR_CUTOFF, cells, pbc, batch, backend=b) for b in ("reference", backend)
        )
        key = lambda r: sorted(zip(r[0].tolist(), r[1].tolist(), map(tuple, r[2].tolist())))  # noqa: E731
        assert key(actual) == key(expected)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference", "vesin"])
def test_far_along_a_periodic_direction(backend):
    """1e6 Å along a periodic lattice vector is just another image (exact); at 1e20 Å float64
    can no longer tell where in the cell the atom is: a ValueError, not a wrong list."""
    x, c, pbc, far, context = far_atom_system("slab", 0.0, rotated=False)
    x[far[0], 0] += 1e6
    expected = ase_pairs(x.numpy(), c.numpy(), pbc.numpy(), FAR_CUTOFF)
    assert_same_pairs(expected, molnets_pairs(*neighbor_list(x, FAR_CUTOFF, c, pbc, backend=backend), x, c), backend)
    x[far[0], 0] += 1e20
    with pytest.raises(ValueError, match="periodic"):
        neighbor_list(x, FAR_CUTOFF, c, pbc, backend=backend)


def test_gaps_at_the_cutoff_along_a_line():
    """Atoms on a line whose gaps straddle the cutoff (4.999 / 5.001 / exactly 5 Å), spread over
    1e30 Å: exactly the pairs closer than the cutoff."""
    gaps = [4.999, 5.001, 1.0, 1e3, 4.999, 1e15, 2.5, 2.5, 1e30]
    coordinates = np.concatenate([[0.0], np.cumsum(gaps)])
    x = torch.zeros(len(coordinates), 3, dtype=torch.float64)
    x[:, 0] = torch.tensor(coordinates)
    assert _resolve("auto", validate(x, FAR_CUTOFF, None, None, None), FAR_CUTOFF) == "torch"
    for backend in ("torch", "auto", "reference"):
        receivers, senders, _ = neighbor_list(x, FAR_CUTOFF, backend=backend)
        found = sorted(zip(receivers.tolist(), senders.tolist()))
        exact = [coordinates[j] - coordinates[i] for i, j in found]
        expected = sorted(
            p for i in range(len(coordinates)) for j in range(len(coordinates))
            if i != j and abs(coordinates[j] - coordinates[i]) < FAR_CUTOFF for p in [(i, j)]
        )
        assert found == expected, (backend, found, exact)


def free_direction(cell: np.ndarray, pbc: np.ndarray, rng) -> np.ndarray:
    """A unit vector orthogonal to the periodic lattice vectors (a direction in which the
    structure is not periodic). Shapes: [3, 3], [3] -> [3]"""
    v = rng.normal(size=3)
    for a in np.linalg.qr(cell[pbc].T)[0].T if pbc.any() else []:
        v -= (v @ a) * a
    return v / np.linalg.norm(v)


@settings(max_examples=30, **SETTINGS)
@given(structures(), st.integers(3, 30), st.integers(0, 2**32 - 1))
def test_far_atom_on_random_structures(case, exponent, seed):
    """Random structures (triclinic, skewed, smaller than the cutoff, rotated) with one atom
    moved 10^3 .. 10^30 Å along a non-periodic direction: torch and auto equal the reference."""
    (positions, cell, pbc, transform), cutoff = case
    assume(len(positions) >= 2 and not pbc.all())
    rng = np.random.default_rng(seed)
    positions = positions.copy()
    atom = int(rng.integers(len(positions)))
    positions[atom] += 10.0**exponent * free_direction(cell, pbc, rng)
    x, c, p = torch.tensor(positions), torch.tensor(cell), torch.tensor(pbc)
    try:
        expected = molnets_pairs(*neighbor_list(x, cutoff, c, p, backend="reference"), x, c)
    except ValueError as error:  # overlapping atoms (or their images) of the drawn structure
        assume("on top of each other" not in str(error))
        raise
    for backend in ("torch", "auto"):
        if backend == "auto":  # vesin only where it is safe (decided before it is called)
            _resolve("auto", validate(x, cutoff, c, p, None), cutoff)
        actual = molnets_pairs(*neighbor_list(x, cutoff, c, p, backend=backend), x, c)
        context = f"backend={backend}, atom {atom} moved 1e{exponent} Å, pbc={pbc.tolist()}, cutoff={cutoff}, {transform}"
        assert_same_pairs(expected, actual, context)
        assert_far_atoms_isolated(actual, [atom], context)
