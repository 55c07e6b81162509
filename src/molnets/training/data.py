"""Labelled structures: reading, checking, splitting, and batching into ``AtomicGraph``.

The path of the data, as the trainer sees it::

    file (extxyz, or anything ase.io.read reads)
      -> read_structures()      one LabeledStructure per frame, labels checked here
      -> split_structures()     train / valid / test, reproducible from a seed
      -> GraphDataset(cutoff)   one AtomicGraph per structure, built once (neighbor list)
      -> dataset.batch(idx)     Batch: a batched AtomicGraph and its targets

Where labels are found: a key such as ``energy`` is looked up first in ``atoms.info``
(``REF_energy=...`` in an extxyz comment line), then in ``atoms.arrays`` (per-atom columns,
e.g. ``REF_forces``), then in the results of the calculator ASE attaches when it reads
``energy=``/``forces``/``stress`` (its ``SinglePointCalculator``). Stress is accepted as a
3x3 matrix, 9 numbers or Voigt's 6 (xx, yy, zz, yz, xz, xy), in eV/Å³ with ASE's sign
convention (the same as ``Potential``'s).

Units are ASE's: eV, Å, eV/Å, eV/Å³.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..graph import AtomicGraph, batch_graphs

__all__ = [
    "LabeledStructure",
    "Batch",
    "GraphDataset",
    "DataError",
    "read_structures",
    "structures_from_atoms",
    "split_structures",
    "check_elements",
]


class DataError(ValueError):
    """A data file or structure that cannot be used; the message names the structure."""


@dataclass
class LabeledStructure:
    """One structure with its reference labels.

    Fields:
        atoms: the ``ase.Atoms`` (positions Å, cell Å, pbc).
        energy: total energy in eV, or None (prediction-only data).
        forces: [n, 3] eV/Å, or None.
        stress: [3, 3] eV/Å³ (ASE's sign), or None.
        weight: per-structure weight of every loss term (default 1).
        name: where it came from, for error messages, e.g. ``"data.xyz, structure 12 (Cu32)"``.
    """

    atoms: "ase.Atoms"  # noqa: F821
    energy: Optional[float]
    forces: Optional[np.ndarray]
    stress: Optional[np.ndarray]
    weight: float
    name: str

    @property
    def num_atoms(self) -> int:
        return len(self.atoms)


def _lookup(atoms, key: str):
    """``key`` in info, arrays, or the attached calculator's results; None if nowhere."""
    if key in atoms.info:
        return atoms.info[key]
    if key in atoms.arrays:
        return atoms.arrays[key]
    calc = atoms.calc
    if calc is not None and key in getattr(calc, "results", {}):
        return calc.results[key]
    return None


def _numbers(value, name: str, what: str) -> np.ndarray:
    """``value`` as a float64 array, or a DataError naming the structure and the label."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise DataError(f"{name}: {what} is not numbers: {str(value)[:60]!r} ({error})") from error


def _stress_matrix(value, name: str) -> np.ndarray:
    from ase.stress import voigt_6_to_full_3x3_stress

    array = _numbers(value, name, "stress").reshape(-1)
    if array.size == 6:
        return voigt_6_to_full_3x3_stress(array)
    if array.size == 9:
        return array.reshape(3, 3)
    raise DataError(f"{name}: stress must have 6 (Voigt) or 9 numbers, got {array.size}")


def structures_from_atoms(
    frames: Sequence["ase.Atoms"],  # noqa: F821
    *,
    energy_key: Optional[str] = "energy",
    forces_key: Optional[str] = "forces",
    stress_key: Optional[str] = "stress",
    weight_key: str = "weight",
    source: str = "structures",
    require_labels: bool = True,
) -> List[LabeledStructure]:
    """Labelled structures from ``ase.Atoms``, with every label checked.

    Args:
        frames: the structures.
        energy_key: key of the total energy (eV); None: no energies.
        forces_key: key of the forces (eV/Å); None: no forces (an energy-only data set).
        stress_key: key of the stress (eV/Å³); a structure without it simply has no stress
            label (stress is optional per structure); None: ignore stress.
        weight_key: ``atoms.info`` key of a per-structure weight (default 1 when absent).
        source: the file name, used in error messages.
        require_labels: if True, a missing energy or forces (for the keys that are not None)
            is an error; if False (prediction), missing labels are None.

    Raises:
        DataError: empty input, missing energy/forces, labels that are not numbers, NaN or
            infinite labels, wrong shapes, a stress label without a cell, negative weights; the
            message names the structure.
    """
    if len(frames) == 0:
        raise DataError(f"{source}: contains no structures")
    out = []
    for index, atoms in enumerate(frames):
        name = f"{source}, structure {index} ({atoms.get_chemical_formula()})"
        if len(atoms) == 0:
            raise DataError(f"{name}: has no atoms")
        if not np.all(np.isfinite(atoms.positions)):
            raise DataError(f"{name}: positions contain NaN or inf")
        energy = forces = stress = None
        if energy_key is not None:
            value = _lookup(atoms, energy_key)
            if value is None:
                if require_labels:
                    raise DataError(f"{name}: no energy under the key {energy_key!r} (set --energy-key)")
            else:
                energy_array = _numbers(value, name, "energy")
                if energy_array.size != 1:
                    raise DataError(f"{name}: energy under the key {energy_key!r} has {energy_array.size} "
                                    "numbers, expected one (the total energy)")
                energy = float(energy_array.reshape(()))
                if not np.isfinite(energy):
                    raise DataError(f"{name}: energy is {energy}")
        if forces_key is not None:
            value = _lookup(atoms, forces_key)
            if value is None:
                if require_labels:
                    raise DataError(
                        f"{name}: no forces under the key {forces_key!r} (set --forces-key, "
                        "or forces_key: null for an energy-only data set)"
                    )
            else:
                forces = _numbers(value, name, "forces")
                if forces.shape != (len(atoms), 3):
                    raise DataError(f"{name}: forces have shape {forces.shape}, expected ({len(atoms)}, 3)")
                if not np.all(np.isfinite(forces)):
                    raise DataError(f"{name}: forces contain NaN or inf")
        if stress_key is not None:
            value = _lookup(atoms, stress_key)
            if value is not None:
                stress = _stress_matrix(value, name)
                if not np.all(np.isfinite(stress)):
                    raise DataError(f"{name}: stress contains NaN or inf")
                if abs(atoms.cell.volume) == 0:
                    raise DataError(f"{name}: has a stress label but no cell (zero volume), where a model's "
                                    "stress is zero: give the cell or drop the label")
        weight = _numbers(atoms.info.get(weight_key, 1.0), name, "weight")
        weight = float(weight.reshape(())) if weight.size == 1 else float("nan")
        if not (np.isfinite(weight) and weight >= 0):
            raise DataError(f"{name}: weight must be a finite number >= 0, got {weight}")
        out.append(LabeledStructure(atoms, energy, forces, stress, weight, name))
    return out


def read_structures(
    path: Union[str, os.PathLike],
    *,
    index: str = ":",
    energy_key: Optional[str] = "energy",
    forces_key: Optional[str] = "forces",
    stress_key: Optional[str] = "stress",
    weight_key: str = "weight",
    require_labels: bool = True,
) -> List[LabeledStructure]:
    """Read every structure of ``path`` with ``ase.io.read`` and check its labels.

    See ``structures_from_atoms`` for the keys and the errors; with an ``index`` other than
    ":", messages name a structure by its place among the frames read ("data.xyz[2:],
    structure 0" is the file's third frame).

    Raises:
        FileNotFoundError: no such file.
        DataError: the file is empty or unreadable, or a structure's labels are bad.
    """
    import ase.io

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such data file: {path!r}")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty, no structures")
    try:
        frames = ase.io.read(path, index=index)
    except Exception as error:  # ASE raises many types for malformed files
        raise DataError(f"{path}: ase.io.read could not read it: {type(error).__name__}: {error}") from error
    if not isinstance(frames, list):
        frames = [frames]
    return structures_from_atoms(
        frames,
        energy_key=energy_key,
        forces_key=forces_key,
        stress_key=stress_key,
        weight_key=weight_key,
        source=path if index == ":" else f"{path}[{index}]",  # structure k of the frames read
        require_labels=require_labels,
    )


def split_structures(
    structures: Sequence[LabeledStructure],
    *,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Tuple[List[LabeledStructure], List[LabeledStructure], List[LabeledStructure]]:
    """Random train / valid / test split, the same for the same ``seed`` and input order.

    Sizes: valid = round(f_valid * n), test = round(f_test * n), each at least 1 when its
    fraction is > 0 and n >= 3; train gets the rest and must not be empty.
    """
    n = len(structures)
    if not (0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions: valid={valid_fraction}, test={test_fraction}")
    num_valid = max(int(round(valid_fraction * n)), 1 if valid_fraction > 0 and n >= 3 else 0)
    num_test = max(int(round(test_fraction * n)), 1 if test_fraction > 0 and n >= 3 else 0)
    if n - num_valid - num_test < 1:
        raise DataError(f"too few structures ({n}) for a train/valid/test split")
    order = np.random.default_rng(seed).permutation(n)
    valid = [structures[i] for i in order[:num_valid]]
    test = [structures[i] for i in order[num_valid : num_valid + num_test]]
    train = [structures[i] for i in order[num_valid + num_test :]]
    return train, valid, test


def check_elements(structures: Iterable[LabeledStructure], species: Sequence[int]) -> None:
    """Raise ``DataError`` naming the first structure with an element outside ``species``."""
    from ase.data import chemical_symbols

    known = set(int(z) for z in species)
    for s in structures:
        unknown = sorted(set(int(z) for z in s.atoms.numbers) - known)
        if unknown:
            raise DataError(
                f"{s.name}: contains {[chemical_symbols[z] for z in unknown]}, which the model "
                f"does not know (it knows {[chemical_symbols[z] for z in sorted(known)]})"
            )


class Batch(NamedTuple):
    """A batched graph and its targets (B structures, N atoms).

    Fields:
        graph: the ``AtomicGraph``.
        energy: [B] eV (NaN where unlabelled).
        forces: [N, 3] eV/Å (zeros where unlabelled).
        stress: [B, 3, 3] eV/Å³ (zeros where unlabelled).
        has_forces: [B] bool.
        has_stress: [B] bool.
        weight: [B] per-structure weights.
        num_atoms: [B] float, atoms per structure.
    """

    graph: AtomicGraph
    energy: Tensor
    forces: Tensor
    stress: Tensor
    has_forces: Tensor
    has_stress: Tensor
    weight: Tensor
    num_atoms: Tensor

    def to(self, device) -> "Batch":
        return Batch(self.graph.to(device), *(t.to(device) for t in self[1:]))


class GraphDataset:
    """Structures with their ``AtomicGraph`` built once for one cutoff, ready to batch.

    The neighbor lists are computed in the constructor (float64, then cast to ``dtype``);
    ``batch(indices)`` only concatenates, so an epoch costs no neighbor search. Datasets
    are cached per cutoff by ``GraphDataset.cached``.

    Args:
        structures: the labelled structures.
        cutoff: neighbor cutoff in Å (the model's).
        dtype: float dtype of positions, cell and targets.
    """

    _CACHE_SIZE = 6  # a run uses three (train, valid, test)
    _cache: Dict[Tuple[int, float, torch.dtype], Tuple[Sequence[LabeledStructure], "GraphDataset"]] = {}

    def __init__(self, structures: Sequence[LabeledStructure], cutoff: float, *, dtype: torch.dtype = torch.float32):
        self.structures = list(structures)
        self.cutoff = float(cutoff)
        self.dtype = dtype
        self.graphs = [AtomicGraph.from_ase(s.atoms, self.cutoff, dtype=dtype) for s in self.structures]
        nan = float("nan")
        self.energy = torch.tensor([nan if s.energy is None else s.energy for s in self.structures], dtype=dtype)
        self.weight = torch.tensor([s.weight for s in self.structures], dtype=dtype)
        self.forces = [
            torch.zeros(s.num_atoms, 3, dtype=dtype) if s.forces is None else torch.as_tensor(s.forces, dtype=dtype)
            for s in self.structures
        ]
        self.stress = torch.stack(
            [torch.zeros(3, 3, dtype=dtype) if s.stress is None else torch.as_tensor(s.stress, dtype=dtype)
             for s in self.structures]
        ) if self.structures else torch.zeros(0, 3, 3, dtype=dtype)
        self.has_forces = torch.tensor([s.forces is not None for s in self.structures], dtype=torch.bool)
        self.has_stress = torch.tensor([s.stress is not None for s in self.structures], dtype=torch.bool)
        self.num_atoms = torch.tensor([s.num_atoms for s in self.structures], dtype=dtype)

    @classmethod
    def cached(cls, structures: Sequence[LabeledStructure], cutoff: float, *, dtype: torch.dtype = torch.float32):
        """The dataset for this list of structures and cutoff, built on first request only.

        The key is the identity of the list object, the cutoff and the dtype: pass the same
        list (e.g. the train split) to get the graphs built before. The last six datasets
        are kept.
        """
        key = (id(structures), float(cutoff), dtype)
        entry = cls._cache.pop(key, None)
        if entry is None or entry[0] is not structures:  # the cache holds the list: ids stay unique
            entry = (structures, cls(structures, cutoff, dtype=dtype))
        cls._cache[key] = entry  # most recent last
        while len(cls._cache) > cls._CACHE_SIZE:
            cls._cache.pop(next(iter(cls._cache)))
        return entry[1]

    def __len__(self) -> int:
        return len(self.structures)

    @property
    def num_edges(self) -> int:
        """Total number of directed edges over all structures."""
        return sum(g.num_edges for g in self.graphs)

    def batch(self, indices: Sequence[int]) -> Batch:
        """The ``Batch`` of the structures ``indices`` (in that order)."""
        indices = [int(i) for i in indices]
        index = torch.tensor(indices, dtype=torch.long)
        return Batch(
            graph=batch_graphs([self.graphs[i] for i in indices]),
            energy=self.energy[index],
            forces=torch.cat([self.forces[i] for i in indices]),
            stress=self.stress[index],
            has_forces=self.has_forces[index],
            has_stress=self.has_stress[index],
            weight=self.weight[index],
            num_atoms=self.num_atoms[index],
        )

    def batches(self, batch_size: int) -> Iterable[Batch]:
        """All structures in order, ``batch_size`` at a time (for evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self))))
