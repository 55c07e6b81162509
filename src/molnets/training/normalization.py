"""Normalization of energies and forces from data, the way the field does it.

A model's per-atom energy is E_i = scale * e_i + shift + E0[Z_i] (``layers/readout.py``).
From the training set:

- E0, the per-element reference energies, by linear least squares of the total energies on
  the composition (Batatia et al., MACE, 2022, "E0s average"; Unke et al. 2021):

      E0 = argmin_e  Σ_b ( E_b - Σ_Z n_{b,Z} e_Z )²,

  or given by the user (e.g. energies of isolated atoms).
- shift = mean over structures of the residual energy per atom, (E_b - Σ_Z n_{b,Z} E0_Z) / N_b
  (zero up to rounding when E0 comes from the least squares fit on the same data and the
  composition spans a constant, nonzero otherwise).
- scale = RMS of the force components, sqrt(<F_ia²>) (MACE's "rms_forces_scaling"), so that
  the head's output e_i is O(1) when forces are; when the data has no forces, the standard
  deviation of the residual energy per atom; 1 if both vanish.
- <n>, the average number of neighbors within the cutoff: E_total / N_total over the training
  graphs (the 1/<n> normalization of messages in MACE and NequIP).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
from torch import nn

from .data import DataError, LabeledStructure

__all__ = [
    "Normalization",
    "fit_atomic_energies",
    "compute_normalization",
    "apply_normalization",
    "average_num_neighbors",
]


@dataclass
class Normalization:
    """What the training code sets on a model from data (all JSON-serialisable).

    Fields:
        atomic_energies: {Z: E0 in eV}.
        shift: eV per atom.
        scale: eV (per unit of the head's output).
        avg_num_neighbors: <n>, or None when not computed.
    """

    atomic_energies: Dict[int, float] = field(default_factory=dict)
    shift: float = 0.0
    scale: float = 1.0
    avg_num_neighbors: Optional[float] = None

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["atomic_energies"] = {int(z): float(e) for z, e in self.atomic_energies.items()}
        return data


def fit_atomic_energies(structures: Sequence[LabeledStructure], species: Sequence[int]) -> Dict[int, float]:
    """Per-element reference energies E0 by least squares on composition (see module docstring).

    Elements whose column is not determined by the data (e.g. two elements always in a fixed
    ratio) get the minimum-norm solution of ``numpy.linalg.lstsq``.

    Args:
        structures: labelled structures (each with an energy).
        species: the atomic numbers to fit, the columns of the composition matrix.

    Returns:
        {Z: E0 in eV}.

    Shapes:
        composition [B, S], energies [B]  ->  E0 [S]
    """
    species = [int(z) for z in species]
    column = {z: k for k, z in enumerate(species)}
    counts = np.zeros((len(structures), len(species)))                       # [B, S]
    energies = np.zeros(len(structures))                                     # [B]
    for b, s in enumerate(structures):
        if s.energy is None:
            raise DataError(f"{s.name}: needs an energy to fit E0")
        for z in s.atoms.numbers:
            if int(z) not in column:
                raise DataError(f"{s.name}: element Z={int(z)} is not in the species {species}")
            counts[b, column[int(z)]] += 1
        energies[b] = s.energy
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)            # [S]
    return {z: float(e) for z, e in zip(species, solution)}


def average_num_neighbors(num_edges: int, num_atoms: int) -> float:
    """<n> = E / N, directed edges per atom (every neighbor of every atom counted once)."""
    if num_atoms <= 0:
        raise ValueError("average_num_neighbors needs at least one atom")
    return float(num_edges) / float(num_atoms)


def compute_normalization(
    structures: Sequence[LabeledStructure],
    species: Sequence[int],
    *,
    atomic_energies: Optional[Mapping[int, float]] = None,
    num_edges: Optional[int] = None,
) -> Normalization:
    """E0 (fitted unless given), shift, scale and <n> of a training set (see module docstring).

    Args:
        structures: the training structures.
        species: the model's atomic numbers.
        atomic_energies: user-given {Z: E0 in eV}; None: fit by least squares.
        num_edges: total directed edges of the training graphs at the model's cutoff; None:
            <n> is not computed.
    """
    if atomic_energies is None:
        e0 = fit_atomic_energies(structures, species)
    else:
        e0 = {int(z): float(e) for z, e in atomic_energies.items()}
        missing = sorted(set(int(z) for z in species) - set(e0))
        if missing:
            raise ValueError(f"atomic_energies lacks E0 for Z = {missing}")
    residual = np.array(
        [(s.energy - sum(e0[int(z)] for z in s.atoms.numbers)) / s.num_atoms for s in structures]
    )                                                                        # [B] eV/atom
    shift = float(residual.mean())
    forces = [s.forces for s in structures if s.forces is not None]
    scale = float(np.sqrt(np.mean(np.concatenate(forces) ** 2))) if forces else 0.0
    if not scale > 0:
        scale = float(residual.std())
    if not scale > 0:
        scale = 1.0
    num_atoms = sum(s.num_atoms for s in structures)
    avg = None if num_edges is None else average_num_neighbors(num_edges, num_atoms)
    return Normalization(atomic_energies=e0, shift=shift, scale=scale, avg_num_neighbors=avg)


def apply_normalization(model: nn.Module, normalization: Normalization) -> None:
    """Write E0, shift and scale into the model's readout buffers (``set_energy_normalization``).

    <n> is a hyper-parameter of the models that use it and goes into their config before
    they are built (``trainer.build_model``), not here.
    """
    from ..layers.readout import set_energy_normalization

    set_energy_normalization(
        model,
        scale=normalization.scale,
        shift=normalization.shift,
        atomic_energies=normalization.atomic_energies,
    )
