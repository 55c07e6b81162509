"""MolnetsCalculator: ASE's own finite differences, save/load, and energy conservation in NVE MD."""

from __future__ import annotations

import struct
import zipfile

import ase.build
import numpy as np
import pytest
import torch
from ase import units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from molnets.calculator import MolnetsCalculator
from molnets.graph import AtomicGraph
from molnets.layers.readout import set_energy_normalization
from molnets.models import Potential, SchNet, SchNetConfig, load_model, save_model

SPECIES = (1, 6, 8, 29)


def _model() -> SchNet:
    torch.manual_seed(0)
    model = SchNet(SchNetConfig(species=SPECIES, cutoff=4.0, num_channels=16, num_basis=12, num_layers=2))
    set_energy_normalization(model, scale=0.5, shift=0.1, atomic_energies={1: -1.0, 6: -2.0, 8: -3.0, 29: -4.0})
    return model


def _crystal() -> ase.Atoms:
    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=1)
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.03 * np.random.default_rng(2).uniform(-1, 1, (3, 3))), scale_atoms=True)
    return atoms


def test_crystal_matches_ase_finite_differences():
    """Forces and stress against ASE's numerical derivatives (its stress convention and Voigt order)."""
    atoms = _crystal()
    atoms.calc = MolnetsCalculator(_model())
    forces, stress = atoms.get_forces(), atoms.get_stress()
    np.testing.assert_allclose(forces, calculate_numerical_forces(atoms, eps=1e-4), atol=1e-7)
    np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, eps=1e-5), atol=1e-8)
    assert np.abs(stress).max() > 1e-4  # the comparison above is not between two zeros
    np.testing.assert_allclose(atoms.get_potential_energies().sum(), atoms.get_potential_energy(), rtol=1e-12)
    assert atoms.get_potential_energy(force_consistent=True) == atoms.get_potential_energy()


def test_molecule_has_no_stress_and_matches_potential():
    atoms = ase.build.molecule("CH3CH2OH")
    model = _model()
    atoms.calc = MolnetsCalculator(model)
    # the calculator runs a frozen float64 copy; the caller's model is left as it was
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert not any(p.requires_grad for p in atoms.calc.model.parameters())
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, eps=1e-4), atol=1e-7)
    from molnets import AtomicGraph

    out = Potential(model.double()).eval()(AtomicGraph.from_ase(atoms, 4.0, dtype=torch.float64))
    np.testing.assert_allclose(atoms.get_potential_energy(), float(out["energy"][0].detach()), rtol=1e-12)


def test_unknown_element_is_a_clear_error():
    atoms = ase.build.molecule("CH3Cl")
    atoms.calc = MolnetsCalculator(_model())
    with pytest.raises(ValueError, match="unknown Z = \\[17\\]"):
        atoms.get_potential_energy()


def test_save_load_round_trip(tmp_path):
    model = _model()
    path = tmp_path / "schnet.pt"
    save_model(model, path)
    data = torch.load(path, weights_only=True)
    assert data["format"] == "molnets" and data["model"] == "schnet" and data["config"]["species"] == SPECIES
    loaded = load_model(path)
    assert loaded.config == model.config
    atoms = _crystal()
    atoms.calc = MolnetsCalculator(model)
    reference = (atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress())
    atoms.calc = MolnetsCalculator(path)
    np.testing.assert_array_equal(atoms.get_potential_energy(), reference[0])
    np.testing.assert_array_equal(atoms.get_forces(), reference[1])
    np.testing.assert_array_equal(atoms.get_stress(), reference[2])
    double = tmp_path / "double.pt"
    Potential(loaded.double()).save(double)
    assert Potential.load(double).model.reference_energies.energies.dtype == torch.float64


def test_corrupt_or_foreign_files_are_clear_errors(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    save_model(_model(), corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save(_model(), pickled)  # a whole pickled module: refused by weights_only
    for path in (corrupt, foreign, pickled):
        with pytest.raises(ValueError, match="molnets model file"):
            load_model(path)
    newer = tmp_path / "newer.pt"
    save_model(_model(), newer)
    data = torch.load(newer, weights_only=True)
    torch.save({**data, "version": 10**6}, newer)
    with pytest.raises(ValueError, match="upgrade molnets"):
        load_model(newer)


def _flip_a_bit_of_the_weights(path) -> None:
    """Flip one bit in the middle of the first tensor's bytes of a file ``torch.save`` wrote
    (a zip archive whose entries are stored uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        entry = next(info for info in archive.infolist() if info.filename.endswith("/data/0"))
        assert entry.compress_type == zipfile.ZIP_STORED and entry.file_size >= 8
    raw = bytearray(path.read_bytes())
    # the local file header: 30 bytes, then the name and the extra field, then the data
    name_length, extra_length = struct.unpack("<HH", raw[entry.header_offset + 26:entry.header_offset + 30])
    start = entry.header_offset + 30 + name_length + extra_length
    raw[start + entry.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_in_a_model_file_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    save_model(_model(), path)
    _flip_a_bit_of_the_weights(path)
    torch.load(path, weights_only=True)  # torch itself reads it without a word
    with pytest.raises(ValueError, match="corrupt molnets model file: the checksum"):
        load_model(path)


@pytest.mark.parametrize("change, message", [
    ({"model": None}, "has no \\['model'\\]"), ({"state_dict": None}, "has no \\['state_dict'\\]"),
    ({"dtype": "float16"}, "dtype 'float16'"), ({"version": 0}, "versions start at 1"),
])
def test_tampered_model_files_are_clear_errors(tmp_path, change, message):
    path = tmp_path / "model.pt"
    save_model(_model(), path)
    data = torch.load(path, weights_only=True)
    for key, value in change.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    torch.save(data, path)
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_a_neighbor_cutoff_below_the_models_is_refused():
    model = _model()  # cutoff 4 Å
    for cutoff in (3.9, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="at least the model's"):
            MolnetsCalculator(model, cutoff=cutoff)
    atoms = _crystal()  # a larger one adds pairs beyond the model's cutoff, which add nothing
    atoms.calc = MolnetsCalculator(model)
    default = (atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress())
    wider = MolnetsCalculator(model, cutoff=6.0)
    wider.calculate(atoms, ["energy", "forces", "stress"])
    assert AtomicGraph.from_ase(atoms, 6.0).num_edges > AtomicGraph.from_ase(atoms, 4.0).num_edges
    np.testing.assert_allclose(wider.results["energy"], default[0], rtol=1e-12)
    np.testing.assert_allclose(wider.results["forces"], default[1], atol=1e-12)
    np.testing.assert_allclose(wider.results["stress"], default[2], atol=1e-12)


def test_compiled_calculator_is_reused_and_equals_eager():
    atoms = _crystal()
    eager = MolnetsCalculator(_model())
    compiled = MolnetsCalculator(_model(), compile="eager")  # dynamo capture, no code generation
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # counters are global: earlier tests compiled too
    for step in range(3):
        atoms.positions[0, 0] += 0.01 * step
        for calc in (eager, compiled):
            calc.calculate(atoms, ["energy", "forces", "stress"])
        for key in ("energy", "forces", "stress"):
            np.testing.assert_allclose(compiled.results[key], eager.results[key], rtol=1e-10, atol=1e-12)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # compiled once, reused
    torch._dynamo.reset()


def _nve(atoms: ase.Atoms, model: SchNet, timestep_fs: float, duration_fs: float) -> tuple:
    atoms = atoms.copy()
    atoms.calc = MolnetsCalculator(model)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    potential, total = [], []

    def record() -> None:
        potential.append(atoms.get_potential_energy())
        total.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())

    dynamics = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    dynamics.attach(record, interval=1)
    dynamics.run(int(round(duration_fs / timestep_fs)))
    return np.array(potential), np.array(total)


@pytest.mark.parametrize("system", ["ethanol", "fcc Cu 32"])
def test_nve_energy_conservation(system, monkeypatch):
    """Velocity Verlet conserves a shadow Hamiltonian H + O(dt²): with forces that are exactly
    -∇E, the total energy only oscillates, by an amount that falls 4x when dt halves, and does
    not drift. Bounds (measured values are ~4x below them):

    - deviation of E_tot at dt = 1 fs below 1e-3 of the potential-energy range it balances;
    - halving dt divides that deviation by 3..5 (second order; a force inconsistent with the
      energy would leave an error that does not vanish with dt);
    - linear drift over the 100 fs below 2e-4 of the potential-energy range.

    The calculator's frozen model runs the SchNet kernel (``models._schnet_kernel``) on both:
    the crystal's 32 atoms with periodic images within 4 Å fill its dense pair arrays enough.
    """
    from molnets.models import _schnet_kernel

    kernel_calls = []
    monkeypatch.setattr(_schnet_kernel.FrozenSchNet, "forward", staticmethod(
        lambda *args, forward=_schnet_kernel.FrozenSchNet.forward: kernel_calls.append(1) or forward(*args)))
    atoms = ase.build.molecule("CH3CH2OH") if system == "ethanol" else _crystal()
    model = _model()
    runs = {dt: _nve(atoms, model, dt, 100.0) for dt in (1.0, 0.5)}
    assert kernel_calls
    potential, total = runs[1.0]
    scale = np.ptp(potential)
    assert scale > 1e-2, f"the trajectory hardly moves (E_pot range {scale} eV)"
    deviation = {dt: np.abs(tot - tot[0]).max() for dt, (_, tot) in runs.items()}
    assert deviation[1.0] < 1e-3 * scale, (deviation, scale)
    assert 3.0 < deviation[1.0] / deviation[0.5] < 5.0, deviation
    drift = np.polyfit(np.arange(len(total)) * 1.0, total, 1)[0] * 100.0
    assert abs(drift) < 2e-4 * scale, (drift, scale)
