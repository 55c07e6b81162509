"""The same results on an accelerator as on the CPU: ``pytest --device cuda tests/``.

Collected only with ``--device`` other than cpu (tests/conftest.py): on the CPU every check
here would compare the CPU with itself. The physics of the models on that device is checked by
the model suite, which runs on ``--device`` too (tests/models/test_all_models.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from molnets import testing
from molnets.calculator import MolnetsCalculator
from molnets.graph import AtomicGraph, batch_graphs
from molnets.layers.spherical_harmonics import spherical_harmonics
from molnets.models import Potential
from molnets.neighbors import neighbor_list

from test_all_models import MODELS, _model

CUTOFF = 3.5


@pytest.fixture(autouse=True)
def _another_device(device):
    if device.type == "cpu":
        pytest.fail("tests/models/test_device.py compares a device with the CPU: run it with --device cuda")


def _structures() -> AtomicGraph:
    """A molecule, a triclinic crystal and a larger crystal in one batch (float64, CPU)."""
    return batch_graphs([
        testing.random_graph(9, cutoff=CUTOFF, seed=1),
        testing.random_graph(7, cutoff=CUTOFF, seed=2, periodic=True, density=0.06),
        testing.random_graph(40, cutoff=CUTOFF, seed=3, periodic=True),
    ])


def _edge_set(receivers, senders, shifts) -> set:
    return set(zip(receivers.tolist(), senders.tolist(), map(tuple, shifts.tolist())))


def test_neighbor_list_equals_cpu(device):
    """The device's cell list finds exactly the CPU's pairs (brute-force reference), periodic
    and not, batched."""
    graph = _structures()
    args = (graph.positions, CUTOFF, graph.cell, graph.pbc, graph.batch)
    expected = _edge_set(*neighbor_list(*args, backend="reference"))
    on_device = neighbor_list(graph.positions.to(device), CUTOFF, graph.cell.to(device),
                              graph.pbc.to(device), graph.batch.to(device))
    assert all(t.device.type == device.type for t in on_device)
    assert _edge_set(*on_device) == expected


def test_spherical_harmonics_equal_cpu_and_e3nn(device):
    """Y_0..Y_6 and their gradient on the device equal the CPU's, and e3nn's on the device."""
    from e3nn import o3

    vectors = torch.randn(500, 3, dtype=torch.float64)
    weights = torch.randn(500, 49, dtype=torch.float64)
    results = []
    for where in ("cpu", device):
        x = vectors.to(where).requires_grad_(True)
        sh = spherical_harmonics(x, 6)
        (grad,) = torch.autograd.grad((sh * weights.to(where)).sum(), x)
        results.append((sh.detach().cpu(), grad.cpu()))
        if where is device:
            e3nn = o3.spherical_harmonics(list(range(7)), x.detach(), normalize=True, normalization="component")
            torch.testing.assert_close(sh.detach(), e3nn, rtol=1e-12, atol=1e-12)
    (sh_cpu, grad_cpu), (sh_dev, grad_dev) = results
    torch.testing.assert_close(sh_dev, sh_cpu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_dev, grad_cpu, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_equals_cpu(name, device):
    """Energy, per-atom energies, forces, stress and the parameter gradient of a force loss
    (double backward, as in training) on the device equal the CPU's in float64; float32 on the
    device stays within float32 rounding of the float64 result."""
    graph = _structures()
    results = []
    for where, dtype in (("cpu", torch.float64), (device, torch.float64), (device, torch.float32)):
        potential = Potential(_model(name).to(where, dtype), compute_stress=True).train()
        out = potential(graph.to(where, dtype))
        loss = out["energy"].square().sum() + out["forces"].square().sum()
        grads = torch.autograd.grad(loss, [p for p in potential.parameters() if p.requires_grad])
        results.append(({k: out[k].detach().double().cpu() for k in ("energy", "energies", "forces", "stress")},
                        [g.double().cpu() for g in grads]))
    (cpu, cpu_grads), (f64, f64_grads), (f32, _) = results
    for key in cpu:
        torch.testing.assert_close(f64[key], cpu[key], rtol=1e-10, atol=1e-10, msg=lambda m, k=key: f"{k}: {m}")
        scale = cpu[key].abs().max().item() + 1.0
        torch.testing.assert_close(f32[key], cpu[key], rtol=1e-4, atol=1e-4 * scale, msg=lambda m, k=key: f"float32 {k}: {m}")
    for a, b in zip(f64_grads, cpu_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_calculator_on_device_equals_cpu(device):
    """The ASE calculator with ``device=`` gives the CPU's energy, forces and stress."""
    (atoms,) = testing.random_graph(16, cutoff=CUTOFF, seed=4, periodic=True, density=0.06).to_ase()
    model = _model("tensornet")
    out = []
    for where in ("cpu", device):
        atoms.calc = MolnetsCalculator(model, device=where)
        out.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    (e_cpu, f_cpu, s_cpu), (e_dev, f_dev, s_dev) = out
    assert abs(e_dev - e_cpu) < 1e-10 * max(1.0, abs(e_cpu))
    np.testing.assert_allclose(f_dev, f_cpu, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(s_dev, s_cpu, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("whole", [False, True], ids=["model-compiled", "potential-compiled"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_energy_and_forces_without_host_sync(name, whole, device):
    """Compiled, a model's energy, forces and stress queue work on the device without waiting
    for it (no .item(), no value-dependent shapes): CUDA's sync debug mode raises on a host
    sync. Both ways of compiling: the energy model inside an eager ``Potential`` (AOTAutograd
    derives the backward), and the whole ``Potential`` (``torch.func.grad``: one graph, as
    ``MolnetsCalculator(compile=...)`` runs it). (Eager calls check their input once, a
    documented sync: molnets.layers.embedding.)"""
    if device.type != "cuda":
        pytest.fail("the sync debug mode is CUDA's")
    graph = _structures().to(device)
    model = _model(name).to(device, torch.float64).requires_grad_(False)
    torch._dynamo.reset()
    try:
        if whole:
            potential = torch.compile(Potential(model, compute_stress=True).eval(), fullgraph=True, dynamic=True,
                                      backend="aot_eager")
        else:
            compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
            potential = Potential(compiled, compute_stress=True).eval()
        expected = Potential(model, compute_stress=True).eval()(graph)
        potential(graph)  # compiles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = potential(graph)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        torch._dynamo.reset()
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(out[key], expected[key], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_on_device_follows_the_cpu(name, device, tmp_path):
    """Three epochs of training (forces in the loss: double backward; EMA; checkpoints) on the
    device end at the CPU's weights, in float64 (the device's scatters add in another order:
    the runs agree to rounding, not bit for bit)."""
    import ase.io

    from molnets.training import TrainConfig, train
    from molnets.training.synthetic import emt_dataset

    data = tmp_path / "tiny.xyz"
    ase.io.write(data, emt_dataset(16, repeat=(2, 1, 1), seed=0))
    model_config = {"schnet": dict(num_channels=16, num_basis=8, num_layers=2),
                    "tensornet": dict(num_channels=16, num_layers=1, num_rbf=8),
                    "mace": dict(num_channels=8, lmax=1, correlation=2, num_layers=1, radial_mlp=(16,))}[name]
    weights = []
    for where in ("cpu", device.type):
        config = TrainConfig(train_file=str(data), cutoff=4.0, batch_size=4, dtype="float64", progress=False,
                             output_dir=str(tmp_path / where), valid_fraction=0.25, test_fraction=0.125, seed=1,
                             model=name, model_config=model_config, max_epochs=3, lr=5e-3, device=where)
        result = train(config)
        assert next(result.potential.parameters()).device.type == where
        weights.append({k: v.detach().cpu() for k, v in result.potential.model.state_dict().items()})
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-7, atol=1e-9, msg=lambda m, k=key: f"{k}: {m}")
