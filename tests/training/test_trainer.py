"""The trainer: it learns (each model), resumes exactly (also after kill -9), and its parts."""

import dataclasses
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from molnets.models import Potential, load_model
from molnets.training import (
    ExponentialMovingAverage,
    GraphDataset,
    TrainConfig,
    apply_normalization,
    build_model,
    evaluate,
    read_structures,
    split_structures,
    train,
)

# (model_config, learning rate): small models that learn the tiny EMT set in 15 epochs
TINY_MODELS = {
    "schnet": (dict(num_channels=16, num_basis=8, num_layers=2), 1e-2),
    "tensornet": (dict(num_channels=32, num_layers=1, num_rbf=16), 5e-3),
    "mace": (dict(num_channels=8, lmax=1, correlation=2, num_layers=1, radial_mlp=(16,), readout_hidden=8), 2e-2),
}


def _config(data, out, **changes):
    base = dict(
        train_file=data, cutoff=4.0, batch_size=4, dtype="float64", progress=False, output_dir=str(out),
        valid_fraction=0.25, test_fraction=0.125, seed=1,
    )
    base.update(changes)
    return TrainConfig(**base)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_training_lowers_validation_force_error(name, tiny_xyz, tmp_path):
    model_config, lr = TINY_MODELS[name]
    config = _config(tiny_xyz, tmp_path, model=name, model_config=model_config, max_epochs=15, lr=lr, ema_decay=0.9)
    result = train(config)
    # The same untrained model: same seed, same normalization, no optimizer step.
    _, valid, _ = split_structures(read_structures(tiny_xyz), valid_fraction=0.25, test_fraction=0.125, seed=1)
    torch.manual_seed(config.seed)
    untrained = build_model(name, (29, 79), 4.0, model_config,
                            avg_num_neighbors=result.normalization.avg_num_neighbors)
    apply_normalization(untrained, result.normalization)
    dataset = GraphDataset(valid, 4.0, dtype=torch.float64)
    before = evaluate(Potential(untrained).double(), dataset).compute()["forces_mae"]
    after = evaluate(result.potential, dataset).compute()["forces_mae"]
    assert after < before / 4, f"{name}: validation force MAE {before:.3f} -> {after:.3f} eV/Å"
    for name_ in ("best_model.pt", "checkpoint.pt", "log.csv", "log.json", "metrics.json",
                  "learning_curve.png", "parity_energy.png", "parity_forces.png"):
        assert (tmp_path / name_).stat().st_size > 0, name_
    reloaded = load_model(tmp_path / "best_model.pt")
    assert reloaded.config.species == (29, 79)
    torch.testing.assert_close(reloaded.state_dict(), result.potential.model.state_dict())


def _weights(path):
    return torch.load(path, weights_only=True)["potential"]


_RESUME_OPTIONS = dict(model="schnet", model_config=dict(num_channels=8, num_basis=6, num_layers=1), max_epochs=3)


@pytest.fixture(scope="module")
def straight_run(tiny_xyz, tmp_path_factory):
    """The uninterrupted run that the interrupted ones must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("straight")
    torch.set_num_threads(1)
    result = train(_config(tiny_xyz, out, **_RESUME_OPTIONS))
    return result, _weights(out / "checkpoint.pt")


def test_resume_after_stop_gives_identical_weights(tiny_xyz, tmp_path, straight_run):
    train(_config(tiny_xyz, tmp_path, **_RESUME_OPTIONS), stop_after_epochs=1)
    train(_config(tiny_xyz, tmp_path, resume=True, **_RESUME_OPTIONS), stop_after_epochs=1)
    resumed = train(_config(tiny_xyz, tmp_path, resume=True, **_RESUME_OPTIONS))
    straight, pieces = straight_run[1], _weights(tmp_path / "checkpoint.pt")
    for key in straight:
        assert torch.equal(straight[key], pieces[key]), key
    assert [row["epoch"] for row in resumed.history] == [0, 1, 2]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert resumed.test_metrics["forces_mae"] == straight_run[0].test_metrics["forces_mae"]


_KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys, torch
    torch.set_num_threads(1)
    import molnets.training.trainer as trainer
    from molnets.training import TrainConfig

    real_save, calls = trainer.atomic_save, [0]

    def save_then_die(obj, path):
        calls[0] += 1
        if calls[0] == 2:  # epoch 1: die half-way through writing the temporary file
            with open(f"{path}.tmp.{os.getpid()}", "wb") as handle:
                handle.write(b"PK\\x03\\x04 half a zip file")
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, path)

    trainer.atomic_save = save_then_die
    trainer.train(TrainConfig(**eval(sys.argv[1])))
    """
)


def test_resume_after_kill_9_while_writing_the_checkpoint(tiny_xyz, tmp_path, straight_run):
    killed = _config(tiny_xyz, tmp_path, **_RESUME_OPTIONS)
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, repr(dataclasses.asdict(killed))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = sorted(os.listdir(tmp_path))
    assert "checkpoint.pt" in left and any(".tmp." in name for name in left)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 0
    resumed = train(dataclasses.replace(killed, resume=True))
    assert len(resumed.history) == 3
    straight, after_kill = straight_run[1], _weights(tmp_path / "checkpoint.pt")
    for key in straight:
        assert torch.equal(straight[key], after_kill[key]), key


# Resuming continues what the checkpoint holds the state of: the model (kind, cutoff, config
# and E0), the optimizer, the learning-rate schedule and the EMA. Another value of their options
# is refused: (option, value given on resume, what the error says).
_FIXED_ON_RESUME = [
    ("cutoff", 1.0, "cutoff: checkpoint 4.0, given 1.0"),
    ("model", "mace", "model: checkpoint 'schnet', given 'mace'"),
    ("model_config", dict(num_channels=16), "model_config.num_channels: checkpoint 8, given 16"),
    ("model_config", dict(lmax=2), "model_config.lmax: not a field of the checkpoint's schnet model"),
    ("atomic_energies", {"Cu": -1.0, "Au": -2.0}, "atomic_energies: checkpoint {29: "),
    ("lr", 1e-4, "lr: checkpoint 0.005, given 0.0001"),
    ("scheduler", "cosine", "scheduler: checkpoint 'plateau', given 'cosine'"),
    ("ema_decay", None, "ema_decay: checkpoint 0.99, given None"),
]


@pytest.mark.parametrize("option, value, message", _FIXED_ON_RESUME,
                         ids=[message.split(":")[0] for *_, message in _FIXED_ON_RESUME])
def test_resume_refuses_to_change_what_the_checkpoint_holds(option, value, message, tiny_xyz, tmp_path, straight_run):
    shutil.copytree(straight_run[0].output_dir, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    changed = {**_RESUME_OPTIONS, "max_epochs": 4, option: value}
    with pytest.raises(ValueError, match=re.escape(message)):
        train(_config(tiny_xyz, tmp_path, resume=True, **changed))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_takes_the_model_from_the_checkpoint_and_the_rest_may_change(tiny_xyz, tmp_path, straight_run):
    shutil.copytree(straight_run[0].output_dir, tmp_path, dirs_exist_ok=True)
    changed = dict(model="schnet", model_config={}, max_epochs=5, batch_size=8, forces_weight=1.0,
                   clip_grad_norm=None, early_stopping_patience=100)
    resumed = train(_config(tiny_xyz, tmp_path, resume=True, **changed))
    assert [row["epoch"] for row in resumed.history] == [0, 1, 2, 3, 4]
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 4 and saved["model_config"]["num_channels"] == 8
    recorded = saved["train_config"]  # what was trained: the checkpoint's model, the new rest
    assert (recorded["model"], recorded["cutoff"], recorded["model_config"]) == (
        "schnet", 4.0, _RESUME_OPTIONS["model_config"])
    assert (recorded["max_epochs"], recorded["batch_size"], recorded["forces_weight"]) == (5, 8, 1.0)


def test_resume_with_more_epochs_continues_the_cosine_decay(tiny_xyz, tmp_path):
    options = dict(model="schnet", model_config=dict(num_channels=4, num_basis=4, num_layers=1),
                   scheduler="cosine", lr=1e-2, min_lr=1e-4)
    train(_config(tiny_xyz, tmp_path, max_epochs=3, **options), stop_after_epochs=1)
    resumed = train(_config(tiny_xyz, tmp_path, max_epochs=6, resume=True, **options))
    lrs = [row["lr"] for row in resumed.history]
    assert len(lrs) == 6 and all(later < earlier for earlier, later in zip(lrs, lrs[1:])), lrs
    assert lrs[-1] > 1e-4


@pytest.mark.parametrize("damage", ["truncated", "flipped bit"])
def test_resume_from_a_corrupt_checkpoint_is_a_clear_error(damage, tiny_xyz, tmp_path):
    train(_config(tiny_xyz, tmp_path, **_RESUME_OPTIONS), stop_after_epochs=1)
    path = tmp_path / "checkpoint.pt"
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[:len(raw) // 2]
    else:  # one bit in the middle of the first tensor's bytes (stored uncompressed)
        with zipfile.ZipFile(path) as archive:
            entry = next(info for info in archive.infolist() if info.filename.endswith("/data/0"))
        name_length, extra_length = struct.unpack("<HH", raw[entry.header_offset + 26:entry.header_offset + 30])
        raw[entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    message = "not a readable checkpoint" if damage == "truncated" else "corrupt checkpoint: the checksum"
    with pytest.raises(ValueError, match=message):
        train(_config(tiny_xyz, tmp_path, resume=True, **_RESUME_OPTIONS))


@pytest.mark.parametrize("option, value", [
    ("lr", "1e-4"), ("weight_decay", "fast"), ("min_lr", True), ("cutoff", "4"), ("max_time", [60]),
    ("batch_size", 2.5), ("max_epochs", "10"), ("ema_decay", "none"),
])
def test_numeric_options_must_be_numbers(option, value):
    with pytest.raises(ValueError, match=f"^{option} must be "):
        TrainConfig(**{option: value})


def test_numeric_options_take_ints_as_floats_and_whole_floats_as_ints():
    config = TrainConfig(lr=1, cutoff=4, clip_grad_norm=None, max_epochs=1e3, batch_size=4.0)
    assert (config.lr, config.cutoff, config.max_epochs, config.batch_size) == (1.0, 4.0, 1000, 4)
    assert [type(v) for v in (config.lr, config.cutoff, config.max_epochs, config.batch_size)] == [
        float, float, int, int]
    assert config.clip_grad_norm is None


def test_ema_follows_the_formula():
    model = torch.nn.Linear(2, 1)
    ema = ExponentialMovingAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # t = 1: d = min(0.9, 2 / 11)
    d = 2 / 11
    torch.testing.assert_close(ema.module.weight, d * start + (1 - d) * (start + 1.0))


def test_early_stopping_and_max_time(tiny_xyz, tmp_path):
    kw = dict(model="schnet", model_config=dict(num_channels=4, num_basis=4, num_layers=1))
    stopped = train(_config(tiny_xyz, tmp_path / "a", max_epochs=50, lr=0.0, early_stopping_patience=2, **kw))
    assert len(stopped.history) == 3  # epoch 0 sets the best loss, two more without improvement
    timed = train(_config(tiny_xyz, tmp_path / "b", max_epochs=50, max_time=0.0, **kw))
    assert len(timed.history) == 1


def test_unknown_model_options_are_named(tiny_xyz, tmp_path):
    with pytest.raises(ValueError, match="no_such_field"):
        train(_config(tiny_xyz, tmp_path, model="schnet", model_config={"no_such_field": 1}, max_epochs=1))
    with pytest.raises(ValueError, match="unknown training options"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_weighted_loss_by_hand(tiny_frames):
    from molnets.training import structures_from_atoms, weighted_loss

    structures = structures_from_atoms(tiny_frames[:3])
    structures[1].weight = 2.0
    structures[2].stress = None
    batch = GraphDataset(structures, 4.0, dtype=torch.float64).batch([0, 1, 2])
    gen = torch.Generator().manual_seed(0)
    out = {
        "energy": batch.energy + torch.randn(3, generator=gen, dtype=torch.float64),
        "forces": batch.forces + torch.randn(24, 3, generator=gen, dtype=torch.float64),
        "stress": batch.stress + torch.randn(3, 3, 3, generator=gen, dtype=torch.float64),
    }
    loss = weighted_loss(out, batch, energy_weight=1.0, forces_weight=10.0, stress_weight=100.0)
    w = [1.0, 2.0, 1.0]
    energy = sum(w[b] * float((out["energy"][b] - batch.energy[b]) / 8) ** 2 for b in range(3)) / 3
    forces = sum(w[i // 8] * float(((out["forces"][i] - batch.forces[i]) ** 2).sum()) for i in range(24)) / 72
    stress = sum(w[b] * float(((out["stress"][b] - batch.stress[b]) ** 2).sum()) for b in range(2)) / 18
    assert float(loss) == pytest.approx(energy + 10.0 * forces + 100.0 * stress, rel=1e-12)
