"""E0 by least squares, shift/scale and <n> from data, against numbers made independently."""

import numpy as np
import pytest
from ase import Atoms
from ase.neighborlist import neighbor_list as ase_neighbor_list

from molnets.training import GraphDataset, compute_normalization, fit_atomic_energies, structures_from_atoms


def _synthetic(e0, num=40, seed=0, noise=0.0):
    """Random H/C/O clusters whose energy is exactly sum_Z n_Z E0_Z (+ noise per atom)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(num):
        n = int(rng.integers(3, 12))
        numbers = rng.choice(sorted(e0), size=n)
        atoms = Atoms(numbers=numbers, positions=rng.uniform(0, 6, size=(n, 3)))
        atoms.info["energy"] = float(sum(e0[z] for z in numbers) + noise * n * rng.normal())
        atoms.arrays["forces"] = rng.normal(scale=0.7, size=(n, 3))
        frames.append(atoms)
    return structures_from_atoms(frames)


def test_e0_fit_recovers_known_energies():
    e0 = {1: -13.6, 6: -1029.8, 8: -2041.3}
    fitted = fit_atomic_energies(_synthetic(e0), species=(1, 6, 8))
    for z, value in e0.items():
        assert fitted[z] == pytest.approx(value, abs=1e-8)


def test_e0_fit_with_noise_is_close():
    e0 = {1: -13.6, 6: -1029.8, 8: -2041.3}
    fitted = fit_atomic_energies(_synthetic(e0, num=200, noise=0.01), species=(1, 6, 8))
    for z, value in e0.items():
        assert fitted[z] == pytest.approx(value, abs=0.02)


def test_shift_scale_with_user_e0():
    e0 = {1: -13.6, 6: -1029.8, 8: -2041.3}
    structures = _synthetic(e0, num=30, seed=2)
    given = {1: -13.0, 6: -1030.0, 8: -2041.0}
    norm = compute_normalization(structures, (1, 6, 8), atomic_energies=given)
    # exact energies are sum n_Z e0_Z, so the residual per atom is a composition average of e0 - given
    residuals = [
        sum(e0[int(z)] - given[int(z)] for z in s.atoms.numbers) / len(s.atoms) for s in structures
    ]
    assert norm.shift == pytest.approx(np.mean(residuals), rel=1e-10)
    rms = np.sqrt(np.mean(np.concatenate([s.forces.ravel() for s in structures]) ** 2))
    assert norm.scale == pytest.approx(rms, rel=1e-12)
    assert 0.6 < norm.scale < 0.8  # forces were drawn with standard deviation 0.7
    assert norm.atomic_energies == given


def test_fitted_e0_leaves_zero_mean_residual_for_one_element(tiny_frames):
    cu_only = [a for a in tiny_frames if set(a.numbers) == {29}] or tiny_frames
    structures = structures_from_atoms(cu_only)
    norm = compute_normalization(structures, sorted({int(z) for s in structures for z in s.atoms.numbers}))
    assert abs(norm.shift) < 1e-10


def test_average_num_neighbors_against_ase(tiny_frames):
    structures = structures_from_atoms(tiny_frames[:6])
    dataset = GraphDataset(structures, 4.0)
    norm = compute_normalization(structures, (29, 79), num_edges=dataset.num_edges)
    pairs = sum(len(ase_neighbor_list("i", a, 4.0)) for a in tiny_frames[:6])
    atoms = sum(len(a) for a in tiny_frames[:6])
    assert norm.avg_num_neighbors == pytest.approx(pairs / atoms, rel=1e-12)
