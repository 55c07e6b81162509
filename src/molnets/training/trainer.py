"""Training a ``Potential`` on labelled structures: one function, ``train(TrainConfig)``.

What one run does:

1. reads the data (``train_file``, optional ``valid_file``/``test_file``; otherwise a random
   split of ``train_file`` by ``seed``), builds every neighbor list once;
2. builds the model with ``species`` = the elements of the data, ``cutoff`` and
   ``model_config``; models whose config has ``avg_num_neighbors`` get <n> of the training
   set unless ``model_config`` names it; sets E0, shift and scale (``normalization.py``);
3. optimizes the weighted loss (``metrics.py``) with AdamW, a plateau or cosine learning-rate
   schedule, gradient-norm clipping and an exponential moving average (EMA) of the weights;
   validation uses the EMA weights; stops at ``max_epochs``, at ``max_time`` or when the
   validation loss has not improved for ``early_stopping_patience`` epochs;
4. every epoch writes ``checkpoint.pt`` atomically (model, optimizer, scheduler, EMA, RNG,
   history) and the logs ``log.csv``/``log.json``; the best EMA model (lowest validation loss)
   goes to ``best_model.pt`` in the Potential's weights-only format;
5. at the end evaluates the best model on the test set (or the validation set when there is
   no test set): ``metrics.json``, ``learning_curve.png``, ``parity_energy.png``,
   ``parity_forces.png``.

Resuming (``resume=True``) continues from the last complete epoch of ``checkpoint.pt``: the
epoch order comes from ``seed + epoch`` and every state is restored, so an interrupted run
(``kill -9`` included) ends with the same weights as an uninterrupted one. The checkpoint
fixes the options whose state it holds: the model (``model``, ``cutoff``,
``model_config``, ``atomic_energies``), the optimizer (``lr``, ``weight_decay``), the
learning-rate schedule (``scheduler``, ``scheduler_patience``, ``scheduler_factor``,
``min_lr``) and the EMA (``ema_decay``). A different value of one of these is an error, never
silently ignored; ``model_config`` and ``atomic_energies`` may be left out (they are then the
checkpoint's). Every other option may change: the data and its keys, ``seed``,
``batch_size``, ``max_epochs`` (a cosine schedule then decays to ``min_lr`` at the new last
epoch), ``max_time``, ``clip_grad_norm``, ``early_stopping_patience``, the loss weights,
``dtype``, ``device`` and ``progress``.

Distributed: launched by ``torchrun --nproc-per-node N``, the same call runs DDP (gloo on CPU,
nccl on CUDA). ``batch_size`` is the global batch; each rank takes ``batch_size / N``
structures of the same shuffled order (``DistributedSampler``), so the k-th global batch is
the same set of structures as in a single-process run. Every rank reads the data itself.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import numbers
import os
import random
import time
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..models.base import Potential
from ..models.serialization import config_from_dict, model_class, save_model
from .checkpoint import atomic_save, atomic_write, atomic_write_text, load_checkpoint, rng_state, set_rng_state
from .data import GraphDataset, LabeledStructure, read_structures, split_structures
from .metrics import ErrorMetrics, weighted_loss
from .normalization import Normalization, apply_normalization, compute_normalization
from .plots import history_columns, plot_learning_curve, plot_parity

__all__ = ["TrainConfig", "TrainResult", "train", "build_model", "evaluate", "ExponentialMovingAverage"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TrainConfig:
    """Everything a training run needs; the YAML file and the flags of ``molnets train``.

    Data:
        train_file: extxyz (or any file ``ase.io.read`` reads) with the training structures.
        valid_file, test_file: optional separate sets; when absent, ``valid_fraction`` and
            ``test_fraction`` of ``train_file`` are split off at random by ``seed``.
        energy_key, forces_key, stress_key: where the labels are (``atoms.info``,
            ``atoms.arrays`` or ASE's stored calculator results); ``forces_key: null`` trains on
            energies only; structures without stress simply have no stress term.
        weight_key: ``atoms.info`` key of a per-structure weight (default 1).
    Model:
        model: "schnet", "tensornet" or "mace".
        cutoff: Å.
        model_config: further fields of the model's config dataclass (e.g. num_channels).
        atomic_energies: {element symbol or Z: E0 in eV}; null: fit by least squares.
    Optimization:
        batch_size: structures per step (global, over all DDP ranks).
        max_epochs, max_time (s, checked after each epoch; null: no limit).
        lr, weight_decay: AdamW's.
        scheduler: "plateau" (halve the lr after ``scheduler_patience`` epochs without
            improvement of the validation loss), "cosine" (to ``min_lr`` at ``max_epochs``)
            or "constant".
        clip_grad_norm: max gradient norm (null: no clipping).
        ema_decay: decay of the EMA of the weights (null: no EMA).
        early_stopping_patience: epochs without a better validation loss before stopping.
        energy_weight, forces_weight, stress_weight: λ of the loss terms.
        dtype: "float32" or "float64". device: "auto" (CUDA if there is one), "cpu", "cuda".
    Output:
        output_dir: every file of the run goes here. resume: continue ``checkpoint.pt``; the
            options of the model, optimizer, schedule and EMA must then be the checkpoint's
            (the module docstring lists them).
        progress: show a tqdm progress bar per epoch.

    Numeric options are checked here: an int is taken for a float, a whole float (``1e3``)
    for an int; anything else (a string, a bool) is a ``ValueError`` that names the option.
    """

    train_file: Optional[str] = None
    valid_file: Optional[str] = None
    test_file: Optional[str] = None
    energy_key: str = "energy"
    forces_key: Optional[str] = "forces"
    stress_key: Optional[str] = "stress"
    weight_key: str = "weight"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    model: str = "mace"
    cutoff: float = 5.0
    model_config: Dict[str, Any] = field(default_factory=dict)
    atomic_energies: Optional[Dict[Union[str, int], float]] = None
    batch_size: int = 8
    max_epochs: int = 100
    max_time: Optional[float] = None
    lr: float = 5e-3
    weight_decay: float = 5e-7
    scheduler: Literal["plateau", "cosine", "constant"] = "plateau"
    scheduler_patience: int = 5
    scheduler_factor: float = 0.5
    min_lr: float = 1e-5
    clip_grad_norm: Optional[float] = 10.0
    ema_decay: Optional[float] = 0.99
    early_stopping_patience: int = 30
    energy_weight: float = 1.0
    forces_weight: float = 10.0
    stress_weight: float = 1.0
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "auto"
    output_dir: str = "molnets-run"
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        _check_numbers(self)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.scheduler not in ("plateau", "cosine", "constant"):
            raise ValueError(f"scheduler must be plateau, cosine or constant, got {self.scheduler!r}")
        if self.batch_size < 1 or self.max_epochs < 0:
            raise ValueError("batch_size must be >= 1 and max_epochs >= 0")
        if self.cutoff <= 0:
            raise ValueError(f"cutoff must be > 0 Å, got {self.cutoff}")

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainConfig":
        """From a YAML mapping; unknown keys are an error that lists the known ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {names}")
        return cls(**data)


def _check_numbers(config: TrainConfig) -> None:
    """Make every int and float field of ``config`` a number of its type, or name it in a ValueError."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(config):
        kinds = set(typing.get_args(hints[f.name])) or {hints[f.name]}
        kind = int if int in kinds else float if float in kinds else None
        value = getattr(config, f.name)
        if kind is None or (value is None and type(None) in kinds):
            continue
        what = ("an integer" if kind is int else "a number") + (" or null" if type(None) in kinds else "")
        # bool is an int to Python, not a number of an option; a whole float may count epochs
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not number or (kind is int and not float(value).is_integer()):
            raise ValueError(f"{f.name} must be {what}, got {value!r}")
        setattr(config, f.name, kind(value))


@dataclass
class TrainResult:
    """What ``train`` returns: the trained potential (best EMA weights) and the numbers."""

    potential: Potential
    history: List[Dict[str, float]]
    test_metrics: Dict[str, float]
    normalization: Normalization
    output_dir: str
    epochs_run: int


class ExponentialMovingAverage:
    """θ_ema <- d θ_ema + (1 - d) θ after each step, with the warm-up d_t = min(d, (1+t)/(10+t)).

    (Polyak & Juditsky 1992; the warm-up is TensorFlow's ``ExponentialMovingAverage``
    with ``num_updates``.) Buffers (E0, scale, shift) are copied, not averaged.

    Args:
        model: the module being trained (its parameters are read, never written).
        decay: d, between 0 and 1.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> Dict[str, Any]:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])


def build_model(
    name: str,
    species: Sequence[int],
    cutoff: float,
    model_config: Optional[Dict[str, Any]] = None,
    *,
    avg_num_neighbors: Optional[float] = None,
) -> nn.Module:
    """The model ``name`` with ``species`` (Z), ``cutoff`` (Å) and the fields of ``model_config``.

    ``avg_num_neighbors`` goes into the config when the config class has that field and
    ``model_config`` does not set it.
    """
    try:
        cls = model_class(name)
    except ImportError as error:
        raise ValueError(f"the model {name!r} is not available in this molnets: {error}") from error
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    data = dict(model_config or {})
    for key in ("species", "cutoff"):
        if key in data:
            raise ValueError(f"model_config must not set {key!r}: it comes from the data / the cutoff option")
    data["species"] = tuple(sorted(int(z) for z in species))
    data["cutoff"] = float(cutoff)
    if avg_num_neighbors is not None and "avg_num_neighbors" in fields and "avg_num_neighbors" not in data:
        data["avg_num_neighbors"] = float(avg_num_neighbors)
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{cls.config_class.__name__} has no fields {unknown}; it has {sorted(fields)}")
    return cls(config_from_dict(cls.config_class, data))


def _atomic_number(key: Union[str, int]) -> int:
    from ase.data import atomic_numbers

    if isinstance(key, str) and not key.isdigit():
        if key not in atomic_numbers:
            raise ValueError(f"unknown element {key!r} in atomic_energies")
        return atomic_numbers[key]
    return int(key)


# ---------------------------------------------------------------------------------------
# Distributed set-up


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if world <= 1:
        return _Dist(device=torch.device("cuda" if use_cuda else device if device != "auto" else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        initialized_here = True
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=dev, initialized_here=initialized_here)


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        dist.barrier()


def _broadcast_flag(flag: bool, d: _Dist) -> bool:
    if d.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.broadcast(t, 0)
    return bool(t.item())


# ---------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    potential: Potential,
    dataset: GraphDataset,
    *,
    batch_size: int = 16,
    device: Union[str, torch.device] = "cpu",
    keep: bool = False,
    indices: Optional[Sequence[int]] = None,
) -> ErrorMetrics:
    """Errors of ``potential`` on ``dataset`` (or the structures ``indices`` of it).

    The potential is put in eval mode (no double-backward graph); forces need autograd, so
    this is not a ``no_grad`` block. The caller all-reduces under DDP.
    """
    was_training = potential.training
    potential.eval()
    metrics = ErrorMetrics(keep=keep)
    order = list(range(len(dataset))) if indices is None else list(indices)
    for start in range(0, len(order), batch_size):
        batch = dataset.batch(order[start : start + batch_size]).to(device)
        out = potential(batch.graph)
        metrics.update({k: v.detach() for k, v in out.items()}, batch)
    potential.train(was_training)
    return metrics


# ---------------------------------------------------------------------------------------
# The run


def _read_splits(config: TrainConfig):
    if config.train_file is None:
        raise ValueError("no training data: set train_file (a file ase.io.read reads)")
    keys = dict(
        energy_key=config.energy_key,
        forces_key=config.forces_key,
        stress_key=config.stress_key,
        weight_key=config.weight_key,
    )
    structures = read_structures(config.train_file, **keys)
    valid_fraction = 0.0 if config.valid_file else config.valid_fraction
    test_fraction = 0.0 if config.test_file else config.test_fraction
    train_set, valid_set, test_set = split_structures(
        structures, valid_fraction=valid_fraction, test_fraction=test_fraction, seed=config.seed
    )
    if config.valid_file:
        valid_set = read_structures(config.valid_file, **keys)
    if config.test_file:
        test_set = read_structures(config.test_file, **keys)
    return train_set, valid_set, test_set


def _make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=config.scheduler_factor, patience=config.scheduler_patience,
            min_lr=config.min_lr,
        )
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(config.max_epochs, 1), eta_min=config.min_lr
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def _write_logs(history: List[Dict[str, float]], output_dir: str) -> None:
    atomic_write_text(json.dumps(history, indent=1), os.path.join(output_dir, "log.json"))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=history_columns(history))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(buffer.getvalue(), os.path.join(output_dir, "log.csv"))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Options whose state a checkpoint holds besides the model's: the optimizer's, the schedule's and
# the EMA's. Restoring that state would ignore a new value, so resuming refuses one.
_OPTIMIZER_OPTIONS = ("lr", "weight_decay", "scheduler", "scheduler_patience", "scheduler_factor", "min_lr",
                      "ema_decay")


def _resumed_config(config: TrainConfig, checkpoint: Dict[str, Any], path: str) -> TrainConfig:
    """The resuming run's ``config``, its model's options taken from ``checkpoint`` once checked.

    The model's options are ``model``, ``cutoff``, ``model_config`` and ``atomic_energies``;
    they and ``_OPTIMIZER_OPTIONS`` must not differ from the checkpoint's. ``model`` and
    ``cutoff`` are compared with the checkpoint's model, each given key of
    ``model_config`` with the field of the model's config, given ``atomic_energies`` with the
    model's E0 and the other options with the checkpoint's training options. ``model_config``
    and ``atomic_energies`` may be left out (empty, null).

    Args:
        config: the options of the resuming run.
        checkpoint: ``checkpoint.pt`` of the run, as ``load_checkpoint`` returns it.
        path: the checkpoint's file, for the message.

    Raises:
        ValueError: naming every option that differs, with the checkpoint's and the given value.
    """
    model_name, model_config = checkpoint["model_name"], checkpoint["model_config"]
    saved = checkpoint["train_config"]
    conflicts = []

    def compare(option: str, in_checkpoint: Any, given: Any) -> None:
        if _as_lists(in_checkpoint) != _as_lists(given):
            conflicts.append(f"{option}: checkpoint {in_checkpoint!r}, given {given!r}")

    compare("model", model_name, config.model)
    compare("cutoff", float(model_config["cutoff"]), config.cutoff)
    for key, value in config.model_config.items():
        if key in model_config:
            compare(f"model_config.{key}", model_config[key], value)
        else:
            conflicts.append(f"model_config.{key}: not a field of the checkpoint's {model_name} model")
    if config.atomic_energies is not None:
        given_e0 = {_atomic_number(k): float(v) for k, v in config.atomic_energies.items()}
        compare("atomic_energies", checkpoint["normalization"]["atomic_energies"], given_e0)
    for option in _OPTIMIZER_OPTIONS:
        compare(option, saved[option], getattr(config, option))
    if conflicts:
        raise ValueError(
            f"cannot resume {path} with other settings ({'; '.join(conflicts)}): resuming continues the "
            "checkpoint's model, optimizer, learning-rate schedule and EMA, so give these options as they "
            "were (model_config and atomic_energies may be left out), or start a new run in another output_dir"
        )
    return dataclasses.replace(config, model=model_name, cutoff=float(model_config["cutoff"]),
                               model_config=dict(saved["model_config"]), atomic_energies=saved["atomic_energies"])


def _as_lists(value: Any) -> Any:
    """Tuples as lists, recursively: a config's (16,) is the (16,) or [16] given again."""
    if isinstance(value, (tuple, list)):
        return [_as_lists(v) for v in value]
    return value


def train(config: TrainConfig, *, stop_after_epochs: Optional[int] = None) -> TrainResult:
    """Run the training described in the module docstring; returns the best potential.

    Args:
        config: the run.
        stop_after_epochs: return after this many epochs of *this call* (checkpoint written),
            as if the process had been stopped there; for tests and for splitting a run into
            pieces. ``resume=True`` continues it.
    """
    d = _setup_distributed(config.device)
    try:
        return _train(config, d, stop_after_epochs)
    finally:
        if d.initialized_here:
            dist.destroy_process_group()


def _train(config: TrainConfig, d: _Dist, stop_after_epochs: Optional[int]) -> TrainResult:
    from torch.utils.data.distributed import DistributedSampler
    from tqdm import tqdm

    dtype = _DTYPES[config.dtype]
    out_dir = config.output_dir
    checkpoint_path = os.path.join(out_dir, "checkpoint.pt")
    best_path = os.path.join(out_dir, "best_model.pt")
    if d.main:
        os.makedirs(out_dir, exist_ok=True)
    _barrier(d)
    _seed_everything(config.seed)

    resume_state = None
    if config.resume and os.path.exists(checkpoint_path):
        resume_state = load_checkpoint(checkpoint_path)
        config = _resumed_config(config, resume_state, checkpoint_path)  # the graphs use the model's cutoff

    train_set, valid_set, test_set = _read_splits(config)
    species = sorted({int(z) for s in train_set + valid_set + test_set for z in s.atoms.numbers})
    train_data = GraphDataset.cached(train_set, config.cutoff, dtype=dtype)
    valid_data = GraphDataset.cached(valid_set, config.cutoff, dtype=dtype) if valid_set else None

    if resume_state is not None:
        normalization = Normalization(**resume_state["normalization"])
        normalization.atomic_energies = {int(z): e for z, e in normalization.atomic_energies.items()}
        cls = model_class(resume_state["model_name"])
        model = cls(config_from_dict(cls.config_class, resume_state["model_config"]))
    else:
        user_e0 = None
        if config.atomic_energies is not None:
            user_e0 = {_atomic_number(k): float(v) for k, v in config.atomic_energies.items()}
        normalization = compute_normalization(
            train_set, species, atomic_energies=user_e0, num_edges=train_data.num_edges
        )
        model = build_model(
            config.model, species, config.cutoff, config.model_config,
            avg_num_neighbors=normalization.avg_num_neighbors,
        )
        apply_normalization(model, normalization)
    model = model.to(device=d.device, dtype=dtype)
    use_stress = config.stress_weight > 0 and bool(train_data.has_stress.any())
    potential = Potential(model, compute_stress=use_stress).train()
    ema = ExponentialMovingAverage(potential, config.ema_decay) if config.ema_decay else None
    trained = potential
    if d.world > 1:
        # Size-1 dimensions make some gradients' strides differ from DDP's bucket views; the
        # values are right, only the copy is slower, and the warning would repeat every step.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        device_ids = [d.device.index] if d.device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(potential, device_ids=device_ids)

    optimizer = torch.optim.AdamW(potential.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _make_scheduler(config, optimizer)
    history: List[Dict[str, float]] = []
    start_epoch, best_loss, bad_epochs, elapsed_before = 0, math.inf, 0, 0.0
    if resume_state is not None:
        potential.load_state_dict(resume_state["potential"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if config.scheduler == "cosine":  # max_epochs may change: decay from here to min_lr at its new end
            scheduler.T_max = max(config.max_epochs, 1)
        if ema is not None:
            ema.load_state_dict(resume_state["ema"])
        history = list(resume_state["history"])
        start_epoch = int(resume_state["epoch"]) + 1
        best_loss = float(resume_state["best_loss"])
        bad_epochs = int(resume_state["bad_epochs"])
        elapsed_before = float(resume_state["elapsed"])
        set_rng_state(resume_state["rng"])
        if d.main:
            print(f"resuming {checkpoint_path} after epoch {start_epoch - 1}", flush=True)

    if config.batch_size % d.world:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {d.world} processes")
    local_batch = config.batch_size // d.world
    sampler = DistributedSampler(
        range(len(train_data)), num_replicas=d.world, rank=d.rank, shuffle=True, seed=config.seed
    )
    weights = dict(
        energy_weight=config.energy_weight, forces_weight=config.forces_weight, stress_weight=config.stress_weight
    )
    evaluated = ema.module if ema is not None else potential
    t_start = time.perf_counter()
    epoch = start_epoch - 1
    stop_reason = "max_epochs"
    for epoch in range(start_epoch, config.max_epochs):
        sampler.set_epoch(epoch)
        order = list(sampler)
        steps = range(0, len(order), local_batch)
        bar = tqdm(steps, desc=f"epoch {epoch}", leave=False, disable=not (config.progress and d.main))
        train_metrics = ErrorMetrics()
        for start in bar:
            batch = train_data.batch(order[start : start + local_batch]).to(d.device)
            out = trained(batch.graph)
            loss = weighted_loss(out, batch, **weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(potential.parameters(), config.clip_grad_norm)
            optimizer.step()
            if ema is not None:
                ema.update(potential)
            train_metrics.update({k: v.detach() for k, v in out.items()}, batch, loss.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
        bar.close()
        train_metrics.all_reduce()
        row: Dict[str, float] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row.update({f"train_{k}": v for k, v in train_metrics.compute().items()})
        if valid_data is not None:
            valid_metrics = evaluate(
                evaluated, valid_data, batch_size=local_batch, device=d.device,
                indices=range(d.rank, len(valid_data), d.world),
            )
            valid_metrics.all_reduce()
            row.update({f"valid_{k}": v for k, v in valid_metrics.compute().items()})
            monitored = valid_metrics.combined_loss(**weights)
        else:
            monitored = row["train_loss"]
        row["valid_loss"] = monitored
        elapsed = elapsed_before + time.perf_counter() - t_start
        row["time"] = elapsed
        history.append(row)

        if config.scheduler == "plateau":
            scheduler.step(monitored)
        else:
            scheduler.step()
        improved = monitored < best_loss
        if improved:
            best_loss, bad_epochs = monitored, 0
            if d.main:
                _save_best(evaluated, best_path)
        else:
            bad_epochs += 1
        if d.main:
            _print_epoch(row)
            _write_logs(history, out_dir)
            atomic_save(
                {
                    "epoch": epoch,
                    "model_name": potential.model.name,
                    "model_config": dataclasses.asdict(potential.model.config),
                    "normalization": normalization.as_dict(),
                    "potential": potential.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "history": history,
                    "best_loss": best_loss,
                    "bad_epochs": bad_epochs,
                    "elapsed": elapsed,
                    "rng": rng_state(),
                    "train_config": dataclasses.asdict(config),
                },
                checkpoint_path,
            )
        _barrier(d)
        stop = False
        if bad_epochs >= config.early_stopping_patience:
            stop, stop_reason = True, f"early stopping (no better validation loss for {bad_epochs} epochs)"
        if config.max_time is not None and elapsed >= config.max_time:
            stop, stop_reason = True, f"time budget of {config.max_time:.0f} s reached"
        if _broadcast_flag(stop, d):
            break
        if stop_after_epochs is not None and epoch - start_epoch + 1 >= stop_after_epochs:
            stop_reason = "stopped on request"
            return TrainResult(potential, history, {}, normalization, out_dir, epoch + 1)

    if d.main and history:
        print(f"training finished after epoch {epoch}: {stop_reason}", flush=True)
    return _finish(config, d, potential, evaluated, history, normalization, test_set or valid_set, epoch + 1)


def _save_best(module: Potential, path: str) -> None:
    """``save_model`` (the Potential's weights-only format), written atomically."""
    atomic_write(path, lambda handle: save_model(module.model, handle))


def _print_epoch(row: Dict[str, float]) -> None:
    parts = [f"epoch {row['epoch']:4d}", f"lr {row['lr']:.2e}"]
    for split in ("train", "valid"):
        for key, scale, unit in (("energy", 1000, "meV/atom"), ("forces", 1000, "meV/Å")):
            name = f"{split}_{key}_mae"
            if name in row:
                parts.append(f"{split} {key} MAE {scale * row[name]:8.2f} {unit}")
    parts.append(f"{row['time']:.0f} s")
    print(" | ".join(parts), flush=True)


def _finish(
    config: TrainConfig,
    d: _Dist,
    potential: Potential,
    evaluated: Potential,
    history: List[Dict[str, float]],
    normalization: Normalization,
    test_set: List[LabeledStructure],
    epochs_run: int,
) -> TrainResult:
    """Load the best weights, evaluate on the test set, write metrics and plots (rank 0)."""
    best_path = os.path.join(config.output_dir, "best_model.pt")
    dtype = _DTYPES[config.dtype]
    best = potential
    if os.path.exists(best_path):
        best = Potential.load(best_path, compute_stress=potential.compute_stress, map_location=d.device)
        best = best.to(dtype)
    test_metrics: Dict[str, float] = {}
    if d.main and test_set:
        test_data = GraphDataset.cached(test_set, config.cutoff, dtype=dtype)
        metrics = evaluate(best, test_data, batch_size=config.batch_size, device=d.device, keep=True)
        test_metrics = metrics.compute()
        atomic_write_text(json.dumps({"test": test_metrics, "num_structures": len(test_set)}, indent=1),
                          os.path.join(config.output_dir, "metrics.json"))
        write_parity_plots(metrics, config.output_dir, title="test set")
    if d.main and history:
        plot_learning_curve(history, os.path.join(config.output_dir, "learning_curve.png"))
    _barrier(d)
    return TrainResult(best, history, test_metrics, normalization, config.output_dir, epochs_run)


def write_parity_plots(metrics: ErrorMetrics, output_dir: str, *, title: str = "") -> List[str]:
    """parity_energy.png (eV/atom), parity_forces.png (eV/Å) and, with stress, parity_stress.png."""
    written = []
    for key, quantity, unit in (
        ("energy", "energy per atom", "eV/atom"),
        ("forces", "force component", "eV/Å"),
        ("stress", "stress component", "eV/Å³"),
    ):
        reference, predicted = metrics.predictions(key)
        if reference.numel():
            path = os.path.join(output_dir, f"parity_{key}.png")
            plot_parity(reference.numpy(), predicted.numpy(), path, quantity=quantity, unit=unit, title=title)
            written.append(path)
    return written

