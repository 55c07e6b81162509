"""Learning-curve and parity plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Union

import numpy as np

__all__ = ["plot_learning_curve", "plot_parity"]

PathLike = Union[str, os.PathLike]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curve(history: Sequence[Dict[str, float]], path: PathLike) -> None:
    """Energy (meV/atom) and force (meV/Å) MAE of train and validation per epoch, log scale.

    Args:
        history: one dict per epoch with "epoch" and keys like "train_forces_mae" (eV/Å).
        path: the PNG to write.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    epochs = [h["epoch"] for h in history]
    for ax, key, unit in zip(axes, ("energy", "forces"), ("meV/atom", "meV/Å")):
        for split, style in (("train", "-"), ("valid", "--")):
            name = f"{split}_{key}_mae"
            values = [1000 * h[name] if name in h else np.nan for h in history]
            if not all(np.isnan(values)):
                ax.plot(epochs, values, style, label=split)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{key} MAE ({unit})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_parity(
    reference: Sequence[float],
    predicted: Sequence[float],
    path: PathLike,
    *,
    quantity: str,
    unit: str,
    title: str = "",
) -> None:
    """Predicted against reference values with the y = x line, MAE and RMSE in the legend.

    Args:
        reference, predicted: 1-D values in ``unit``.
        path: the PNG to write.
        quantity: axis label, e.g. "energy per atom".
        unit: e.g. "eV/atom".
    """
    plt = _pyplot()
    reference = np.asarray(reference, dtype=float)
    predicted = np.asarray(predicted, dtype=float)
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    error = predicted - reference
    mae = float(np.abs(error).mean()) if error.size else float("nan")
    rmse = float(np.sqrt((error**2).mean())) if error.size else float("nan")
    ax.scatter(reference, predicted, s=6, alpha=0.6, label=f"MAE {mae:.3g}, RMSE {rmse:.3g} {unit}")
    if reference.size:
        lo = float(min(reference.min(), predicted.min()))
        hi = float(max(reference.max(), predicted.max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k-", lw=0.8)
    ax.set_xlabel(f"reference {quantity} ({unit})")
    ax.set_ylabel(f"predicted {quantity} ({unit})")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def history_columns(history: List[Dict[str, float]]) -> List[str]:
    """All keys of the history, "epoch" first, in first-seen order (the CSV header)."""
    columns: List[str] = []
    for row in history:
        for key in row:
            if key not in columns:
                columns.append(key)
    return columns
