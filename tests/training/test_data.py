"""Reading labelled structures: every place ASE keeps labels, bad data, splits and batches."""

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from molnets.graph import AtomicGraph
from molnets.training import (
    DataError,
    GraphDataset,
    check_elements,
    read_structures,
    split_structures,
    structures_from_atoms,
)


def _labelled_cu(n, seed=0):
    frames = []
    rng = np.random.default_rng(seed)
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames.append(atoms)
    return frames


def test_extxyz_stored_results_round_trip(tmp_path, tiny_frames):
    path = tmp_path / "data.xyz"
    ase.io.write(path, tiny_frames[:3])
    structures = read_structures(path)
    for s, atoms in zip(structures, tiny_frames[:3]):
        assert s.energy == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
        np.testing.assert_allclose(s.forces, atoms.get_forces(), atol=1e-7)  # extxyz keeps 8 decimals
        # ASE keeps Voigt (xx, yy, zz, yz, xz, xy); the full matrix is symmetric.
        voigt = atoms.get_stress()
        assert s.stress.shape == (3, 3)
        assert s.stress[1, 2] == pytest.approx(voigt[3]) and s.stress[2, 1] == pytest.approx(voigt[3])
        assert s.stress[0, 1] == pytest.approx(voigt[5])
        assert s.weight == 1.0


def test_info_and_arrays_keys_and_weights(tmp_path):
    frames = _labelled_cu(2)
    for k, atoms in enumerate(frames):
        atoms.info["REF_energy"] = -1.5 * (k + 1)
        atoms.new_array("REF_forces", np.full((len(atoms), 3), 0.25 * (k + 1)))
        atoms.info["REF_stress"] = np.arange(9.0).reshape(3, 3)
        atoms.info["config_weight"] = 3.0
        atoms.calc = None
    path = tmp_path / "ref.xyz"
    ase.io.write(path, frames)
    structures = read_structures(
        path, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress", weight_key="config_weight"
    )
    assert [s.energy for s in structures] == [-1.5, -3.0]
    np.testing.assert_array_equal(structures[1].forces, np.full((4, 3), 0.5))
    np.testing.assert_array_equal(structures[0].stress, np.arange(9.0).reshape(3, 3))
    assert [s.weight for s in structures] == [3.0, 3.0]


def test_missing_forces_names_the_structure(tmp_path):
    frames = _labelled_cu(3)
    frames[1].calc = None
    frames[1].info["energy"] = 1.0  # energy present, forces not
    path = tmp_path / "missing.xyz"
    ase.io.write(path, frames)
    with pytest.raises(DataError, match=r"structure 1 \(Cu4\): no forces under the key 'forces'"):
        read_structures(path)
    # an energy-only data set is fine when asked for
    assert read_structures(path, forces_key=None)[1].forces is None


def test_nan_energy_names_the_structure():
    frames = _labelled_cu(3)
    for atoms in frames:
        atoms.calc = None
        atoms.info["energy"] = 0.0
        atoms.arrays["forces"] = np.zeros((4, 3))
    frames[2].info["energy"] = float("nan")
    with pytest.raises(DataError, match=r"src.xyz, structure 2 \(Cu4\): energy is nan"):
        structures_from_atoms(frames, source="src.xyz")


@pytest.mark.parametrize("where, value, message", [
    ("info", "abc", r"structure 1 \(Cu4\): energy is not numbers: 'abc'"),
    ("arrays", np.ones(4), r"structure 1 \(Cu4\): energy under the key 'energy' has 4 numbers"),
    ("weight", "heavy", r"structure 1 \(Cu4\): weight is not numbers: 'heavy'"),
])
def test_labels_that_are_not_one_number_name_the_structure(where, value, message):
    frames = _labelled_cu(2)
    for atoms in frames:
        atoms.calc = None
        atoms.info["energy"] = 0.0
        atoms.arrays["forces"] = np.zeros((4, 3))
    if where == "info":
        frames[1].info["energy"] = value
    elif where == "arrays":  # a per-atom array under the energy key
        del frames[1].info["energy"]
        frames[1].arrays["energy"] = value
    else:
        frames[1].info["weight"] = value
    with pytest.raises(DataError, match=message):
        structures_from_atoms(frames, source="src.xyz")


def test_a_stress_label_without_a_cell_is_refused():
    water = molecule("H2O")
    water.info.update(energy=0.0, stress=np.zeros(6))
    water.arrays["forces"] = np.zeros((3, 3))
    with pytest.raises(DataError, match=r"structure 0 \(H2O\): has a stress label but no cell"):
        structures_from_atoms([water], source="src.xyz")


def test_a_frame_read_by_index_is_named_by_its_place_in_the_selection(tmp_path):
    frames = _labelled_cu(4)
    frames[3].calc = None  # the file's last frame has no labels
    path = tmp_path / "cu.xyz"
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(DataError, match=r"cu.xyz\[2:\], structure 1 \(Cu4\): no energy"):
        read_structures(path, index="2:")


def test_empty_file_and_no_structures(tmp_path):
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_structures(empty)
    with pytest.raises(FileNotFoundError):
        read_structures(tmp_path / "absent.xyz")
    with pytest.raises(DataError, match="no structures"):
        structures_from_atoms([], source="x.xyz")


def test_unknown_element_at_predict_time_names_the_structure():
    water = molecule("H2O")
    water.info["energy"] = 0.0
    structures = structures_from_atoms(_labelled_cu(1) + [water], source="mixed.xyz", forces_key=None)
    with pytest.raises(DataError, match=r"mixed.xyz, structure 1 \(H2O\): contains \['H', 'O'\]"):
        check_elements(structures, species=(29,))


def test_split_is_reproducible_and_disjoint(tiny_frames):
    structures = structures_from_atoms(tiny_frames)
    a = split_structures(structures, valid_fraction=0.25, test_fraction=0.125, seed=3)
    b = split_structures(structures, valid_fraction=0.25, test_fraction=0.125, seed=3)
    c = split_structures(structures, valid_fraction=0.25, test_fraction=0.125, seed=4)
    assert [len(x) for x in a] == [15, 6, 3]
    names = [[s.name for s in part] for part in a]
    assert names == [[s.name for s in part] for part in b]
    assert names != [[s.name for s in part] for part in c]
    assert sorted(sum(names, [])) == sorted(s.name for s in structures)


def test_batches_equal_graphs_built_from_ase(tiny_frames):
    structures = structures_from_atoms(tiny_frames[:5])
    dataset = GraphDataset(structures, 4.0, dtype=torch.float64)
    assert GraphDataset.cached(structures, 4.0, dtype=torch.float64) is GraphDataset.cached(
        structures, 4.0, dtype=torch.float64
    )
    order = [3, 0, 4]
    batch = dataset.batch(order)
    reference = AtomicGraph.from_ase([tiny_frames[i] for i in order], 4.0, dtype=torch.float64)
    for got, want in zip(batch.graph, reference):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        batch.energy, torch.tensor([tiny_frames[i].get_potential_energy() for i in order], dtype=torch.float64)
    )
    torch.testing.assert_close(
        batch.forces, torch.from_numpy(np.concatenate([tiny_frames[i].get_forces() for i in order]))
    )
    assert batch.num_atoms.tolist() == [8.0, 8.0, 8.0]
