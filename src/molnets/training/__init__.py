"""Training: labelled data, normalization from data, the trainer, checkpoints and plots."""

from .checkpoint import atomic_save, load_checkpoint
from .data import (
    Batch,
    DataError,
    GraphDataset,
    LabeledStructure,
    check_elements,
    read_structures,
    split_structures,
    structures_from_atoms,
)
from .metrics import ErrorMetrics, weighted_loss
from .normalization import (
    Normalization,
    apply_normalization,
    average_num_neighbors,
    compute_normalization,
    fit_atomic_energies,
)
from .trainer import ExponentialMovingAverage, TrainConfig, TrainResult, build_model, evaluate, train

__all__ = [
    "Batch",
    "DataError",
    "GraphDataset",
    "LabeledStructure",
    "check_elements",
    "read_structures",
    "split_structures",
    "structures_from_atoms",
    "ErrorMetrics",
    "weighted_loss",
    "Normalization",
    "apply_normalization",
    "average_num_neighbors",
    "compute_normalization",
    "fit_atomic_energies",
    "ExponentialMovingAverage",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "train",
    "atomic_save",
    "load_checkpoint",
]
