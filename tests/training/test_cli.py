"""The molnets command: help texts, train/evaluate from the command line, the quick demo."""

import json
import os
import shutil
import subprocess
import sys

import ase.io
import pytest
import torch
import yaml
from ase.build import molecule

from molnets.cli import build_parser, main, resolve_train_config
from molnets.models import load_model


def test_console_script_help():
    # The script installed with the interpreter that runs the tests (its venv need not be on PATH).
    beside = os.path.join(os.path.dirname(sys.executable), "molnets")
    exe = beside if os.access(beside, os.X_OK) else shutil.which("molnets")
    assert exe is not None, "the molnets console script is not installed"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("demo", "train", "evaluate", "md", "describe"):
        assert command in proc.stdout


@pytest.mark.parametrize("command", ["demo", "train", "evaluate", "md", "describe"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert len(text) > 300 and "usage: molnets " + command in text


def test_train_resolves_yaml_then_flags_and_evaluate(tiny_xyz, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "train_file": tiny_xyz, "model": "schnet", "cutoff": 3.0, "max_epochs": 5,
        "model_config": {"num_channels": 8, "num_basis": 6}, "progress": False,
    }))
    out = tmp_path / "run"
    code = main(["--threads", "1", "train", "--config", str(config), "--cutoff", "4.0", "--max-epochs", "2",
                 "--model-config", "num_layers=1", "--output-dir", str(out), "--stress-key", "none"])
    assert code == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed.split("\nepoch")[0])
    assert resolved["cutoff"] == 4.0 and resolved["max_epochs"] == 2 and resolved["stress_key"] is None
    assert resolved["model_config"] == {"num_channels": 8, "num_basis": 6, "num_layers": 1}
    model = load_model(out / "best_model.pt")
    assert model.config.cutoff == 4.0 and model.config.num_layers == 1
    assert "test errors" in printed

    code = main(["evaluate", str(out / "best_model.pt"), tiny_xyz, "--output-dir", str(tmp_path / "ev")])
    assert code == 0
    metrics = json.loads((tmp_path / "ev/metrics.json").read_text())["metrics"]
    assert metrics["forces_mae"] > 0 and metrics["energy_rmse"] >= metrics["energy_mae"]
    assert (tmp_path / "ev/parity_forces.png").stat().st_size > 0


# YAML 1.1 reads 1e-4, 5e3 and -.5 as strings: wherever a number is expected they are floats
_NUMBERS = [("1e-4", 1e-4), ("1E-4", 1e-4), ("5e3", 5000.0), (".5", 0.5), ("-1e-3", -1e-3), ("-.5", -0.5),
            ("2.5e3", 2500.0), ("+1.0e-2", 0.01)]


@pytest.mark.parametrize("text, number", _NUMBERS, ids=[text for text, _ in _NUMBERS])
def test_exponent_notation_is_a_float_in_flags_and_in_the_yaml_file(text, number, tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"min_lr: {text}\natomic_energies: {{Cu: {text}}}\n"
                           f"model_config:\n  avg_num_neighbors: {text}\n")
    parser = build_parser()
    from_file = resolve_train_config(parser.parse_args(["train", "--config", str(config_file)]))
    from_flags = resolve_train_config(parser.parse_args([
        "train", f"--min-lr={text}", "--atomic-energies", f"Cu={text}", "--model-config", f"avg_num_neighbors={text}",
    ]))
    for config in (from_file, from_flags):
        assert type(config.min_lr) is float and config.min_lr == number
        assert config.atomic_energies == {"Cu": number}
        assert config.model_config == {"avg_num_neighbors": number}
    assert resolve_train_config(parser.parse_args(["train", "--max-epochs", "3"])).max_epochs == 3


def test_train_with_learning_rates_in_exponent_notation(tiny_xyz, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--threads", "1", "train", "--train-file", tiny_xyz, "--model", "schnet", "--cutoff", "4",
                 "--model-config", "num_channels=4", "num_basis=4", "num_layers=1", "--max-epochs", "2",
                 "--lr", "1e-2", "--weight-decay", "1e-6", "--scheduler", "cosine", "--min-lr", "1e-4",
                 "--no-progress", "--output-dir", str(out)])
    assert code == 0
    lrs = [row["lr"] for row in json.loads((out / "log.json").read_text())]
    assert lrs == [pytest.approx(1e-2), pytest.approx((1e-2 + 1e-4) / 2)]


def test_a_non_number_is_an_error_that_names_the_option():
    with pytest.raises(SystemExit, match="lr must be a number, got 'fast'"):
        resolve_train_config(build_parser().parse_args(["train", "--lr", "fast"]))


def test_resume_refuses_another_model_cutoff_or_model_config(tiny_xyz, tmp_path, capsys):
    run = ["--threads", "1", "train", "--train-file", tiny_xyz, "--model", "schnet", "--cutoff", "4",
           "--model-config", "num_channels=4", "num_basis=4", "num_layers=1", "--batch-size", "8",
           "--no-progress", "--output-dir", str(tmp_path)]
    assert main(run + ["--max-epochs", "1"]) == 0
    capsys.readouterr()
    for change, message in (
        (["--cutoff", "1.0"], "cutoff: checkpoint 4.0, given 1.0"),
        (["--model", "mace"], "model: checkpoint 'schnet', given 'mace'"),
        (["--model-config", "num_channels=16"], "model_config.num_channels: checkpoint 4, given 16"),
    ):
        assert main(run + ["--max-epochs", "2", "--resume"] + change) == 2
        assert message in capsys.readouterr().err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert main(run + ["--max-epochs", "2", "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_evaluate_names_a_structure_with_unknown_elements(tiny_xyz, tmp_path, capsys):
    from molnets.models import SchNet, SchNetConfig
    from molnets.models import save_model

    torch.manual_seed(0)
    model_path = tmp_path / "cu.pt"
    save_model(SchNet(SchNetConfig(species=(29, 79), cutoff=4.0, num_channels=4, num_basis=4, num_layers=1)),
               model_path)
    frames = ase.io.read(tiny_xyz, index=":3")
    water = molecule("H2O")
    water.info["energy"] = -14.0
    water.arrays["forces"] = water.positions * 0
    data = tmp_path / "mixed.xyz"
    ase.io.write(data, frames + [water])
    code = main(["evaluate", str(model_path), str(data), "--output-dir", str(tmp_path / "ev")])
    assert code == 2
    assert "structure 3 (H2O): contains ['H', 'O']" in capsys.readouterr().err


def test_demo_quick_writes_everything_into_one_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    before = set(os.listdir(tmp_path))
    assert main(["--threads", "1", "demo", "--quick", "--output-dir", str(out)]) == 0
    assert set(os.listdir(tmp_path)) - before == {"demo"}
    printed = capsys.readouterr().out
    assert str(out) in printed and "forces MAE" in printed and "NVE" in printed
    files = {os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs}
    for name in ("data.xyz", "md.traj", "training/best_model.pt", "training/learning_curve.png",
                 "training/parity_energy.png", "training/parity_forces.png", "training/log.csv"):
        assert name in files, name
    trajectory = ase.io.read(out / "md.traj", index=":")
    assert len(trajectory) >= 2 and len(trajectory[0]) == 8


def test_every_command_keeps_the_heap_between_steps(tmp_path, monkeypatch, capsys):
    """The molnets command's process is its own: it lets glibc keep freed heap for the next step
    (molnets.memory.keep_heap_between_calls) before it runs a subcommand."""
    import molnets.memory
    from molnets.models import SchNet, SchNetConfig
    from molnets.models import save_model

    made = []
    monkeypatch.setattr(molnets.memory, "keep_heap_between_calls", lambda: made.append(1) or True)
    save_model(SchNet(SchNetConfig(species=(29,), cutoff=4.5, num_channels=4, num_basis=4, num_layers=1)),
               tmp_path / "m.pt")
    assert main(["describe", str(tmp_path / "m.pt")]) == 0
    assert made == [1]


def test_describe_prints_the_design_space_of_model_files(tmp_path, capsys):
    from molnets.models import SchNet, SchNetConfig
    from molnets.models import save_model

    for layers in (1, 3):
        save_model(SchNet(SchNetConfig(species=(29,), cutoff=4.5, num_channels=4, num_basis=4, num_layers=layers)),
                   tmp_path / f"m{layers}.pt")
    assert main(["describe", str(tmp_path / "m1.pt"), str(tmp_path / "m3.pt")]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.strip().splitlines()[2:]]
    assert [(r[1].strip(), r[3].strip(), r[4].strip(), r[6].strip()) for r in rows] == [
        ("schnet", "2", "1", "4.5"), ("schnet", "2", "3", "13.5")
    ]


def test_md_compiled_follows_the_eager_trajectory(tmp_path, capsys):
    """``molnets md --compile BACKEND`` runs the calculator's compiled potential (here dynamo's
    capture with the "eager" backend: no code generation) and gives the eager trajectory."""
    from molnets.models import SchNet, SchNetConfig
    from molnets.models import save_model

    torch.manual_seed(0)
    save_model(SchNet(SchNetConfig(species=(1, 6, 8), cutoff=4.0, num_channels=8, num_basis=6, num_layers=2)),
               tmp_path / "m.pt")
    ase.io.write(tmp_path / "start.xyz", molecule("CH3CH2OH"))
    trajectories = []
    for extra in ([], ["--compile", "eager"]):
        output = tmp_path / f"md{len(extra)}.xyz"
        assert main(["md", str(tmp_path / "m.pt"), str(tmp_path / "start.xyz"), "--steps", "6", "--interval", "2",
                     "--timestep", "0.5", "--output", str(output), *extra]) == 0
        trajectories.append(ase.io.read(output, index=":"))
    assert "6 steps of NVE MD" in capsys.readouterr().out
    eager, compiled = trajectories
    assert len(eager) == len(compiled) == 4
    for a, b in zip(eager, compiled):
        assert abs(a.positions - b.positions).max() < 1e-10
        assert abs(a.get_momenta() - b.get_momenta()).max() < 1e-10
    assert abs(eager[-1].positions - eager[0].positions).max() > 1e-4  # the atoms moved
    assert abs(eager[-1].get_momenta()).max() > 0  # and the file has their momenta


def _md_inputs(tmp_path):
    from molnets.models import SchNet, SchNetConfig
    from molnets.models import save_model

    torch.manual_seed(0)
    save_model(SchNet(SchNetConfig(species=(1, 6, 8), cutoff=4.0, num_channels=8, num_basis=6, num_layers=2)),
               tmp_path / "m.pt")
    ase.io.write(tmp_path / "start.xyz", molecule("CH3CH2OH"))
    return [str(tmp_path / "m.pt"), str(tmp_path / "start.xyz")]


def test_md_xyz_frames_keep_energy_and_forces(tmp_path, capsys):
    """A trajectory in a format other than .traj keeps each frame's energy and forces (a copy
    of the atoms alone drops the calculator), equal to the model's at those positions."""
    from molnets.calculator import MolnetsCalculator

    model, start = _md_inputs(tmp_path)
    output = tmp_path / "md.xyz"
    assert main(["md", model, start, "--steps", "4", "--interval", "2", "--output", str(output)]) == 0
    frames = ase.io.read(output, index=":")
    assert len(frames) == 3
    for frame in frames:
        energy, forces = frame.get_potential_energy(), frame.get_forces()
        frame.calc = MolnetsCalculator(model)
        assert abs(frame.get_potential_energy() - energy) < 1e-8
        assert abs(frame.get_forces() - forces).max() < 1e-8


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--steps", "-5"), ("--timestep", "0"),
                                           ("--timestep", "-1"), ("--interval", "0"), ("--temperature", "-10"),
                                           ("--temperature", "nan")])
def test_md_refuses_impossible_values(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["md", *_md_inputs(tmp_path), option, value])
    assert exit_.value.code == 2 and option in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--index", "99"], "has no frame '99'"), (["--output", "md.unknownformat"], "knows no format"),
    (["--compile", "nosuch"], "unknown torch.compile backend 'nosuch'"), (["--device", "foo"], "unknown device 'foo'"),
])
def test_md_bad_options_are_one_line_errors_before_the_run(extra, message, tmp_path, capsys):
    assert main(["md", *_md_inputs(tmp_path), "--steps", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_evaluate_refuses_a_batch_size_below_one_and_an_unknown_device(tiny_xyz, tmp_path, capsys):
    model, _ = _md_inputs(tmp_path)
    with pytest.raises(SystemExit):
        main(["evaluate", model, str(tiny_xyz), "--batch-size", "0"])
    assert "--batch-size" in capsys.readouterr().err
    assert main(["evaluate", model, str(tiny_xyz), "--device", "foo"]) == 2
    assert "unknown device 'foo'" in capsys.readouterr().err
