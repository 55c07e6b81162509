"""Reference data made on the fly: Cu/Au fcc alloys sampled by ASE EMT molecular dynamics.

EMT (effective medium theory, Jacobsen, Stoltze & Nørskov, Surf. Sci. 366, 394 (1996)) is
ASE's built-in many-body potential for fcc metals: cheap, smooth, with energies, forces and
stress, so it gives a realistic-looking training set in seconds without any download.

Each trajectory starts from an fcc Cu supercell with a random fraction of the atoms replaced
by Au (so the composition varies and E0 of both elements is determined), a random isotropic
strain of the cell (so that the stress varies), and runs Langevin dynamics; frames are taken
every ``sample_interval`` steps after a short equilibration.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np

__all__ = ["emt_dataset", "thermalize"]


def emt_dataset(
    num_structures: int,
    *,
    repeat: Sequence[int] = (2, 2, 2),
    gold_fraction: float = 0.3,
    temperature: float = 1200.0,
    strain: float = 0.03,
    num_trajectories: int = 4,
    sample_interval: int = 5,
    timestep: float = 4.0,
    seed: int = 0,
) -> List["ase.Atoms"]:  # noqa: F821
    """``num_structures`` Cu/Au structures with EMT energy, forces and stress.

    Args:
        num_structures: frames in total.
        repeat: supercell of the 4-atom fcc Cu cube (a = 3.61 Å); (2, 2, 2) gives 32 atoms.
        gold_fraction: maximum fraction of Au; each trajectory draws one in [0, gold_fraction].
        temperature: Langevin temperature in K.
        strain: each trajectory's cell is scaled by 1 + u, u uniform in [-strain, strain].
        num_trajectories: independent trajectories the frames are spread over.
        sample_interval: MD steps between frames.
        timestep: fs.
        seed: everything is reproducible from it.

    Returns:
        ``ase.Atoms`` with a ``SinglePointCalculator`` holding energy (eV), forces (eV/Å),
        stress (eV/Å³); written to extxyz they become ``energy=``, ``forces``, ``stress=``.
    """
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.md.langevin import Langevin

    rng = np.random.default_rng(seed)
    frames: List = []
    per_trajectory = [num_structures // num_trajectories + (k < num_structures % num_trajectories)
                      for k in range(num_trajectories)]
    for count in per_trajectory:
        if count == 0:
            continue
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(tuple(int(r) for r in repeat))
        num_gold = int(round(rng.uniform(0, gold_fraction) * len(atoms)))
        atoms.numbers[rng.choice(len(atoms), size=num_gold, replace=False)] = 79
        atoms.set_cell(atoms.cell * (1 + rng.uniform(-strain, strain)), scale_atoms=True)
        atoms.calc = EMT()
        thermalize(atoms, temperature, rng)
        dynamics = Langevin(
            atoms, timestep * units.fs, temperature_K=temperature, friction=0.02, fixcm=False, rng=rng
        )
        dynamics.run(2 * sample_interval)  # leave the perfect lattice
        for _ in range(count):
            dynamics.run(sample_interval)
            frame = atoms.copy()
            frame.calc = SinglePointCalculator(
                frame,
                energy=atoms.get_potential_energy(),
                forces=atoms.get_forces(),
                stress=atoms.get_stress(),
            )
            frames.append(frame)
    return frames


def thermalize(atoms, temperature: float, rng) -> None:
    """Maxwell-Boltzmann momenta at ``temperature`` K (ASE >= 3.28 renamed the function)."""
    import ase.md.velocitydistribution as velocities

    thermalize = getattr(velocities, "thermalize_momenta", None) or velocities.MaxwellBoltzmannDistribution
    thermalize(atoms, temperature_K=temperature, rng=rng)
