"""The ``molnets`` command: train, evaluate, run MD with, and describe interatomic potentials.

    molnets demo                      make data, train, evaluate, run MD: all in one folder
    molnets train --config run.yaml   train on your extxyz data (flags override the YAML)
    molnets evaluate model.pt data.xyz
    molnets md model.pt start.xyz
    molnets describe model.pt

Run ``molnets <command> --help`` for the options of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time
import typing
from typing import Any, Callable, Dict, List, Optional

__all__ = ["main", "build_parser", "resolve_train_config"]

_TRAIN_HELP = {
    "train_file": "extxyz (or any file ase.io.read reads) with energies and forces",
    "valid_file": "separate validation file (default: split valid_fraction off train_file)",
    "test_file": "separate test file (default: split test_fraction off train_file)",
    "energy_key": "key of the total energy in eV (atoms.info, or ASE's stored results)",
    "forces_key": "key of the forces in eV/Å (atoms.arrays, or stored results); 'none': energy only",
    "stress_key": "key of the stress in eV/Å³ (Voigt 6 or 3x3); 'none': ignore stress",
    "weight_key": "atoms.info key of a per-structure loss weight (default weight 1)",
    "valid_fraction": "fraction of train_file used for validation",
    "test_fraction": "fraction of train_file held out for the final test",
    "seed": "random seed of the split, the initial weights and the batch order",
    "model": "which model: schnet, tensornet or mace",
    "cutoff": "neighbor cutoff radius in Å",
    "model_config": "a field of the model's config, KEY=VALUE (repeat), e.g. num_channels=32",
    "atomic_energies": "per-element reference energies SYMBOL=eV (repeat); default: least-squares fit",
    "batch_size": "structures per optimizer step (global over all torchrun processes)",
    "max_epochs": "stop after this many epochs",
    "max_time": "stop after the first epoch that ends past this many seconds",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "scheduler": "learning-rate schedule: plateau (reduce on no improvement), cosine, constant",
    "scheduler_patience": "plateau: epochs without improvement before the lr is reduced",
    "scheduler_factor": "plateau: factor applied to the lr",
    "min_lr": "lower bound of the lr (plateau and cosine)",
    "clip_grad_norm": "clip the gradient norm to this value ('none': no clipping)",
    "ema_decay": "decay of the exponential moving average of the weights ('none': no EMA)",
    "early_stopping_patience": "stop when the validation loss has not improved for this many epochs",
    "energy_weight": "loss weight of the energy per atom",
    "forces_weight": "loss weight of the forces",
    "stress_weight": "loss weight of the stress (structures with a stress label only)",
    "dtype": "float32 or float64",
    "device": "auto (CUDA when available), cpu or cuda",
    "output_dir": "folder for checkpoint.pt, best_model.pt, logs and plots",
    "resume": "continue the run in output_dir from its last checkpoint; its model, optimizer, schedule and EMA "
              "go on, so model, cutoff, model_config, atomic_energies, lr, weight_decay, scheduler, "
              "scheduler_patience, scheduler_factor, min_lr and ema_decay must be as they were (an error "
              "otherwise; model_config and atomic_energies may be left out); the other options may change",
    "progress": "show a progress bar per epoch",
}


# ---------------------------------------------------------------------------------------
# Parsing helpers


# YAML 1.1 (PyYAML's) reads a float only with a dot, a signed exponent and no sign before a
# leading dot: 1e-4, 5e3, 2.5e3 and -.5 would be strings. YAML 1.2 and Python read them as
# numbers, and so do the options here.
_FLOAT = re.compile(r"^[-+]?(?:(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+|\.[0-9_]+)$")


@functools.lru_cache(maxsize=None)
def _yaml_loader() -> type:
    """``yaml.SafeLoader`` that also resolves ``_FLOAT`` as float (checked after its own int and float)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return Loader


def _load_yaml(stream: Any) -> Any:
    """``yaml.safe_load`` with 1e-4, 1E-4, 5e3, .5 and -1e-3 read as floats."""
    import yaml

    return yaml.load(stream, Loader=_yaml_loader())


def _parse_value(text: str) -> Any:
    """YAML scalar: 3 -> int, 1e-3 -> float, none/null -> None, true -> bool, else str."""
    if text.strip().lower() == "none":
        return None
    return _load_yaml(text)


def _at_least(kind: type, least: float, strict: bool) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` above ``least`` (at least it, unless ``strict``)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (value > least if strict else value >= least) or value != value:
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {least:g}, got {text}")
        return value

    return parse


_POSITIVE_INT, _POSITIVE, _NON_NEGATIVE = _at_least(int, 1, False), _at_least(float, 0, True), _at_least(float, 0, False)


def _torch_device(name: str) -> str:
    """The device ``name`` ("auto": CUDA when there is one, else the CPU), checked: a ValueError
    naming it instead of torch's RuntimeError deep inside loading a model."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N, ...): {error}") from None
    return name


def _key_values(items: Optional[List[str]], what: str) -> Optional[Dict[str, Any]]:
    if items is None:
        return None
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"molnets: {what} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    from .training import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training options (each also a key of the YAML file)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{_TRAIN_HELP[f.name]} (default: {default})"
        if f.name in ("model_config", "atomic_energies"):
            group.add_argument(flag, nargs="+", metavar="KEY=VALUE", default=argparse.SUPPRESS, help=help_text)
        elif hints[f.name] is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, type=_parse_value, default=argparse.SUPPRESS, metavar=f.name.upper(),
                               help=help_text)


def resolve_train_config(args: argparse.Namespace) -> "TrainConfig":  # noqa: F821
    """Defaults, then the YAML file (``--config``), then the flags given on the command line."""
    from .training import TrainConfig

    data: Dict[str, Any] = {}
    if args.config:
        with open(args.config) as handle:
            loaded = _load_yaml(handle) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"molnets: {args.config} must hold a mapping of training options")
        data.update(loaded)
    for f in dataclasses.fields(TrainConfig):
        if not hasattr(args, f.name):  # flag not given (argparse.SUPPRESS)
            continue
        value = getattr(args, f.name)
        if f.name in ("model_config", "atomic_energies"):
            data[f.name] = {**(data.get(f.name) or {}), **_key_values(value, "--" + f.name.replace("_", "-"))}
        else:
            data[f.name] = value
    for key in ("energy_key", "forces_key", "stress_key"):
        if isinstance(data.get(key), str) and data[key].lower() == "none":
            data[key] = None
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"molnets: bad training options: {error}")


def _print_config(config) -> None:
    import yaml

    print("# resolved training configuration (save it as a YAML file to rerun with --config)")
    print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False).rstrip(), flush=True)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# ---------------------------------------------------------------------------------------
# Subcommands


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import train

    config = resolve_train_config(args)
    if _rank() == 0:
        _print_config(config)
    result = train(config)
    if _rank() == 0:
        _print_metrics("test", result.test_metrics)
        print(f"files written to {os.path.abspath(result.output_dir)}")
    return 0


def _print_metrics(title: str, metrics: Dict[str, float]) -> None:
    if not metrics:
        return
    rows = [("energy", "meV/atom"), ("forces", "meV/Å"), ("stress", "meV/Å³")]
    print(f"{title} errors:      MAE        RMSE")
    for key, unit in rows:
        if f"{key}_mae" in metrics:
            print(f"  {key:8s} {1000 * metrics[key + '_mae']:10.3f} {1000 * metrics[key + '_rmse']:10.3f}  {unit}")


def _load_potential(path: str, device: str, dtype: str, *, compute_stress: bool = False):
    import torch

    from .models.base import Potential

    dev = _torch_device(device)
    potential = Potential.load(path, compute_stress=compute_stress, map_location=dev)
    if dtype != "model":
        potential = potential.to({"float32": torch.float32, "float64": torch.float64}[dtype])
    return potential.eval(), dev


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .training import GraphDataset, check_elements, evaluate, read_structures
    from .training.checkpoint import atomic_write_text
    from .training.trainer import write_parity_plots

    keys = {k: (None if v is not None and v.lower() == "none" else v)
            for k, v in (("energy_key", args.energy_key), ("forces_key", args.forces_key),
                         ("stress_key", args.stress_key))}
    potential, device = _load_potential(args.model, args.device, args.dtype, compute_stress=keys["stress_key"] is not None)
    structures = read_structures(args.data, **keys, require_labels=True)
    check_elements(structures, potential.model.config.species)
    dtype = next(potential.parameters()).dtype
    if not any(s.stress is not None for s in structures):
        potential.compute_stress = False
    dataset = GraphDataset(structures, potential.model.config.cutoff, dtype=dtype)
    metrics = evaluate(potential, dataset, batch_size=args.batch_size, device=device, keep=True)
    values = metrics.compute()
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_text(json.dumps({"model": args.model, "data": args.data, "num_structures": len(structures),
                                  "metrics": values}, indent=1), os.path.join(args.output_dir, "metrics.json"))
    plots = write_parity_plots(metrics, args.output_dir, title=os.path.basename(args.data))
    print(f"{len(structures)} structures of {args.data}, model {args.model} ({potential.model.name})")
    _print_metrics("evaluation", values)
    print("wrote", ", ".join([os.path.join(args.output_dir, "metrics.json")] + plots))
    return 0


def run_md(
    model_path: str,
    atoms,
    *,
    output: str,
    steps: int,
    timestep: float,
    temperature: float,
    ensemble: str,
    interval: int,
    device: str = "auto",
    dtype: str = "float64",
    seed: int = 0,
    compile: Optional[str] = None,
) -> Dict[str, float]:
    """MD of ``atoms`` with ``MolnetsCalculator``; writes every ``interval``-th frame to ``output``.

    Args:
        timestep: fs. temperature: K (initial velocities; Langevin's bath).
        ensemble: "nve" (velocity Verlet) or "langevin" (NVT, friction 0.01 / fs).
        compile: ``torch.compile`` backend of the calculator (``MolnetsCalculator(compile=...)``),
            or None for eager.

    Returns:
        {"steps", "seconds", "energy_drift_per_atom" (eV/atom, NVE), "temperature" (K, last frame)}.
    """
    import numpy as np
    from ase import units
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import Trajectory
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary
    from ase.md.verlet import VelocityVerlet

    from .calculator import MolnetsCalculator
    from .training.synthetic import thermalize

    from .models.serialization import load_model
    from .training.data import check_elements, structures_from_atoms

    check_elements(
        structures_from_atoms([atoms], energy_key=None, forces_key=None, stress_key=None, source="the MD start"),
        load_model(model_path).config.species,
    )
    atoms = atoms.copy()
    import torch

    device = _torch_device(device)
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    atoms.calc = MolnetsCalculator(model_path, device=device, dtype=torch_dtype, compile=compile)
    rng = np.random.default_rng(seed)
    thermalize(atoms, temperature, rng)
    Stationary(atoms)
    if ensemble == "nve":
        dynamics = VelocityVerlet(atoms, timestep * units.fs)
    elif ensemble == "langevin":
        dynamics = Langevin(atoms, timestep * units.fs, temperature_K=temperature, friction=0.01 / units.fs,
                            fixcm=False, rng=rng)
    else:
        raise ValueError(f"ensemble must be nve or langevin, got {ensemble!r}")
    trajectory = Trajectory(output, "w", atoms) if output.endswith(".traj") else None
    frames = []

    def record() -> None:
        if trajectory is not None:
            trajectory.write()
        else:  # a copy drops the calculator: its results go with the frame
            frame = atoms.copy()
            results = atoms.calc.results
            frame.calc = SinglePointCalculator(frame, **{key: results[key] for key in ("energy", "forces", "stress")
                                                         if key in results})
            frames.append(frame)

    dynamics.attach(record, interval=interval)
    e_start = atoms.get_total_energy()
    t0 = time.perf_counter()
    dynamics.run(steps)
    seconds = time.perf_counter() - t0
    if trajectory is not None:
        trajectory.close()
    else:
        import ase.io

        ase.io.write(output, frames)
    return {
        "steps": steps,
        "seconds": seconds,
        "energy_drift_per_atom": float(atoms.get_total_energy() - e_start) / len(atoms),
        "temperature": float(atoms.get_temperature()),
    }


def _cmd_md(args: argparse.Namespace) -> int:
    import ase.io

    from .memory import reuse_freed_memory

    reuse_freed_memory()  # this process is ours: per-step tensors reuse the heap (molnets.memory)
    if not args.output.endswith(".traj"):  # an unknown format would fail only after the run
        from ase.io.formats import UnknownFileTypeError, filetype, get_ioformat

        try:
            get_ioformat(filetype(args.output, read=False))
        except UnknownFileTypeError as error:
            raise ValueError(f"ase.io.write knows no format for the output {args.output!r} ({error})") from None
    if args.compile is not None:
        import torch

        if args.compile not in torch.compiler.list_backends(exclude_tags=()):
            raise ValueError(f"unknown torch.compile backend {args.compile!r}; known: "
                             f"{torch.compiler.list_backends(exclude_tags=())}")
    device = _torch_device(args.device)
    if not os.path.exists(args.structure):
        raise FileNotFoundError(f"no such structure file: {args.structure!r}")
    try:
        atoms = ase.io.read(args.structure, index=args.index)
    except (StopIteration, IndexError) as error:
        raise ValueError(f"{args.structure} has no frame {args.index!r} ({type(error).__name__})") from None
    result = run_md(args.model, atoms, output=args.output, steps=args.steps, timestep=args.timestep,
                    temperature=args.temperature, ensemble=args.ensemble, interval=args.interval,
                    device=device, dtype=args.dtype, seed=args.seed, compile=args.compile)
    print(f"{args.steps} steps of {args.ensemble.upper()} MD, {len(atoms)} atoms, "
          f"{1000 * result['seconds'] / max(args.steps, 1):.1f} ms/step; "
          f"final temperature {result['temperature']:.0f} K; total-energy change "
          f"{1000 * result['energy_drift_per_atom']:.3f} meV/atom; trajectory: {args.output}")
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    from .models.serialization import load_model

    from .describe import compare

    models = [load_model(path) for path in args.models]
    print(compare(models, print_table=False))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .training.demo import run_demo

    run_demo(
        output_dir=args.output_dir,
        model=args.model,
        time_budget=args.time_budget,
        quick=args.quick,
        num_structures=args.structures,
        md_steps=args.md_steps,
        seed=args.seed,
    )
    return 0


# ---------------------------------------------------------------------------------------
# The parser


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="molnets", description=__doc__.replace("``", ""), formatter_class=formatter,
    )
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 for demo)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", formatter_class=formatter,
        help="make a data set, train a model, evaluate it and run MD, with no data of yours",
        description=(
            "The whole workflow on data made on the fly, in one folder:\n"
            "  1. ASE's EMT potential runs Langevin MD of Cu/Au fcc alloys (32 atoms) and\n"
            "     records a few hundred structures with energy, forces and stress (data.xyz);\n"
            "  2. a model (MACE-style by default) is trained on them within a time budget,\n"
            "     with logs, checkpoint and best_model.pt in training/;\n"
            "  3. the test-set errors are printed, parity and learning-curve plots written;\n"
            "  4. a short NVE MD with the trained model writes md.traj.\n"
            "It takes about --time-budget seconds plus about a minute (data and MD).\n"
            "It runs on one CPU thread unless you pass molnets --threads N demo."
        ),
    )
    demo.add_argument("--output-dir", default="molnets-demo", help="folder for every file (default: %(default)s)")
    demo.add_argument("--model", default="mace", choices=["schnet", "tensornet", "mace"],
                      help="model to train (default: %(default)s)")
    demo.add_argument("--time-budget", type=float, default=200.0,
                      help="seconds of training, checked after each epoch (default: %(default)s)")
    demo.add_argument("--structures", type=int, default=None, help="structures to generate (default: 240)")
    demo.add_argument("--md-steps", type=int, default=None, help="steps of the final MD (default: 200)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, split and weights (default: 0)")
    demo.add_argument("--quick", action="store_true",
                      help="a tiny version that finishes in seconds (for tests; the errors are not meaningful)")
    demo.set_defaults(func=_cmd_demo)

    train = commands.add_parser(
        "train", formatter_class=formatter,
        help="train a model on your data (YAML config and/or flags)",
        description=(
            "Train a potential on labelled structures.\n\n"
            "Options come from the defaults, then the YAML file of --config (keys are the\n"
            "option names with underscores), then the flags. The resolved configuration is\n"
            "printed first. Example:\n\n"
            "  molnets train --train-file data.xyz --model mace --cutoff 5 \\\n"
            "      --model-config num_channels=32 --max-epochs 200 --output-dir run1\n\n"
            "Several processes (DDP, same options):  torchrun --nproc-per-node 4 $(which molnets) train ...\n"
            "Resume after a crash or kill:  molnets train --config run.yaml --resume\n"
            "(the options of the model, optimizer, schedule and EMA must be as they were;\n"
            "the data, batch size, max epochs, time, loss weights and the like may change)\n\n"
            "Writes to output_dir: checkpoint.pt (every epoch), best_model.pt (load with\n"
            "molnets.models.Potential.load or MolnetsCalculator), log.csv, log.json,\n"
            "metrics.json (test set), learning_curve.png, parity_energy.png, parity_forces.png."
        ),
    )
    train.add_argument("--config", metavar="YAML", default=None, help="YAML file with training options")
    _add_train_options(train)
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser(
        "evaluate", formatter_class=formatter,
        help="errors and parity plots of a model on a data file",
        description="Energy, force (and stress) MAE/RMSE of MODEL on DATA, with parity plots.",
    )
    evaluate.add_argument("model", help="model file (best_model.pt of a training run)")
    evaluate.add_argument("data", help="labelled structures (extxyz or anything ase.io.read reads)")
    evaluate.add_argument("--energy-key", default="energy", help="energy key (default: %(default)s)")
    evaluate.add_argument("--forces-key", default="forces", help="forces key, 'none' for none (default: %(default)s)")
    evaluate.add_argument("--stress-key", default="stress", help="stress key, 'none' for none (default: %(default)s)")
    evaluate.add_argument("--output-dir", default="molnets-evaluation", help="folder for metrics.json and plots (default: %(default)s)")
    evaluate.add_argument("--batch-size", type=_POSITIVE_INT, default=16, help="structures per batch (default: %(default)s)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    evaluate.add_argument("--dtype", default="model", choices=["model", "float32", "float64"],
                          help="precision (default: the model's)")
    evaluate.set_defaults(func=_cmd_evaluate)

    md = commands.add_parser(
        "md", formatter_class=formatter,
        help="molecular dynamics with a model (ASE), writes a trajectory",
        description=(
            "Run MD from a structure with MolnetsCalculator. Velocities start from a\n"
            "Maxwell-Boltzmann distribution at --temperature; NVE uses velocity Verlet,\n"
            "langevin a thermostat at --temperature. Output: .traj (ASE) or any format\n"
            "ase.io.write knows (e.g. .xyz)."
        ),
    )
    md.add_argument("model", help="model file")
    md.add_argument("structure", help="start structure (any file ase.io.read reads)")
    md.add_argument("--index", default="-1", help="which frame of the file (default: the last)")
    md.add_argument("--steps", type=_POSITIVE_INT, default=1000, help="MD steps (default: %(default)s)")
    md.add_argument("--timestep", type=_POSITIVE, default=2.0, help="fs (default: %(default)s)")
    md.add_argument("--temperature", type=_NON_NEGATIVE, default=300.0, help="K (default: %(default)s)")
    md.add_argument("--ensemble", default="nve", choices=["nve", "langevin"], help="(default: %(default)s)")
    md.add_argument("--interval", type=_POSITIVE_INT, default=10, help="write every N-th step (default: %(default)s)")
    md.add_argument("--output", default="md.traj", help="trajectory file (default: %(default)s)")
    md.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    md.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="(default: %(default)s)")
    md.add_argument("--seed", type=int, default=0, help="seed of the initial velocities (default: %(default)s)")
    md.add_argument("--compile", default=None, metavar="BACKEND",
                    help="torch.compile the potential (energy and forces one graph) with this backend,\n"
                         "e.g. inductor: compiled once (tens of seconds), then reused at every step.\n"
                         "On the CPU it pays for SchNet-style models, and for TensorNet- and\n"
                         "MACE-style models on small molecules (default: eager)")
    md.set_defaults(func=_cmd_md)

    describe = commands.add_parser(
        "describe", help="where a model stands in the design space (message type, body order, ...)",
        formatter_class=formatter,
        description=(
            "Print where a trained model stands in the design space of message-passing\n"
            "potentials: the type of its messages (invariant scalars, Cartesian tensors,\n"
            "spherical irreps), the body order of one message, the number of message-passing\n"
            "layers, the receptive field (layers x cutoff, Å) and the number of parameters.\n"
            "With several files, one table lines them up side by side.\n\n"
            "  molnets describe run1/best_model.pt run2/best_model.pt"
        ),
    )
    describe.add_argument("models", nargs="+", help="model files")
    describe.set_defaults(func=_cmd_describe)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``molnets`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = args.threads
    if threads is None and args.command == "demo":
        threads = 1  # the demo's tensors are small: one thread is faster, much faster on a busy machine
    if threads:
        import torch

        torch.set_num_threads(threads)
    from .memory import keep_heap_between_calls
    from .training.data import DataError

    # this process is ours: a step's temporaries reuse the heap instead of being faulted in again
    # (molnets.memory; a training step of MACE-style on 128 atoms of Cu: ~16000 page faults -> ~9000)
    keep_heap_between_calls()

    try:
        return int(args.func(args) or 0)
    except (DataError, FileNotFoundError, ValueError) as error:  # user errors: a message, no traceback
        print(f"molnets {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
