"""Every neighbor-list backend against ASE's ``neighbor_list("ijS")`` and the brute-force reference.

Random structures come from hypothesis (the discrete choices and a seed; the floats from numpy, so
that no two atoms coincide by shrinking): triclinic, strongly skewed and smaller-than-cutoff
cells, unwrapped atoms, mixed pbc with tilted or zero non-periodic vectors, molecules 1e4 Å from
the origin, one atom, no atom, each under a random rotation (det ±1) and translation.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list as ase_neighbor_list
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from molnets.neighbors import neighbor_list
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
