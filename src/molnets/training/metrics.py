"""The weighted loss on energies, forces and stress, and error metrics (MAE, RMSE).

Loss of a batch (MACE's "weighted" loss, Batatia et al. 2022, with per-atom energies):

    L = λ_E / B      Σ_b w_b ((Ê_b - E_b) / N_b)²
      + λ_F / (3 N)  Σ_b w_b Σ_{i in b} |F̂_i - F_i|²
      + λ_σ / (9 B_σ) Σ_b w_b |σ̂_b - σ_b|²_F

B structures, N atoms with force labels, B_σ structures with stress labels, w_b the
per-structure weights. Under DDP the counts B, N, B_σ are those of the *global* batch (one
``all_reduce``), and each rank's loss is multiplied by the world size, so that DDP's mean of
the gradients equals the gradient of the single-process loss on the same global batch.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .data import Batch

__all__ = ["weighted_loss", "ErrorMetrics"]


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def weighted_loss(
    out: Dict[str, Tensor],
    batch: Batch,
    *,
    energy_weight: float,
    forces_weight: float,
    stress_weight: float,
) -> Tensor:
    """The loss of the module docstring (a scalar), DDP-aware.

    Args:
        out: ``Potential`` output: "energy" [B] eV, "forces" [N, 3] eV/Å, optional "stress".
        batch: the targets.
        energy_weight, forces_weight, stress_weight: λ_E (per (eV/atom)²), λ_F (per
            (eV/Å)²), λ_σ (per (eV/Å³)²).
    """
    w = batch.weight                                                              # [B]
    has_energy = torch.isfinite(batch.energy)                                     # [B]
    energy_error = (out["energy"] - batch.energy.nan_to_num()) / batch.num_atoms  # [B]
    energy_sum = (w * has_energy * energy_error**2).sum()
    atom_weight = (w * batch.has_forces)[batch.graph.batch]                       # [N]
    forces_sum = energy_sum.new_zeros(())
    if forces_weight > 0 and "forces" in out:
        forces_sum = (atom_weight[:, None] * (out["forces"] - batch.forces) ** 2).sum()
    stress_sum = energy_sum.new_zeros(())
    if stress_weight > 0 and "stress" in out:
        stress_weight_b = w * batch.has_stress                                    # [B]
        stress_sum = (stress_weight_b[:, None, None] * (out["stress"] - batch.stress) ** 2).sum()
    counts = torch.stack(
        [
            has_energy.sum(),
            3 * batch.has_forces[batch.graph.batch].sum(),
            9 * batch.has_stress.sum(),
        ]
    ).to(energy_sum.dtype)                                                        # [3]
    world = 1
    if _is_distributed():
        dist.all_reduce(counts)
        world = dist.get_world_size()
    counts = counts.clamp(min=1)
    loss = (
        energy_weight * energy_sum / counts[0]
        + forces_weight * forces_sum / counts[1]
        + stress_weight * stress_sum / counts[2]
    )
    return loss * world


class ErrorMetrics:
    """Running MAE and RMSE of energy per atom (eV/atom), forces (eV/Å) and stress (eV/Å³).

    Add batches with ``update``; under DDP call ``all_reduce`` once before ``compute``.
    The predictions added can also be kept (``keep=True``) for parity plots.
    """

    _KEYS = ("energy", "forces", "stress")

    def __init__(self, *, keep: bool = False) -> None:
        self.sums = torch.zeros(3, 3, dtype=torch.float64)  # [quantity, (abs, sq, count)]
        self.loss_sum = torch.zeros(2, dtype=torch.float64)  # (loss * batches, batches)
        self.keep = keep
        self.kept = {k: ([], []) for k in self._KEYS}

    @torch.no_grad()
    def update(self, out: Dict[str, Tensor], batch: Batch, loss: Optional[Tensor] = None) -> None:
        has_energy = torch.isfinite(batch.energy)                                   # [B]
        errors = {
            "energy": ((out["energy"] - batch.energy) / batch.num_atoms)[has_energy],  # [B']
        }
        references = {"energy": (batch.energy / batch.num_atoms)[has_energy]}
        predictions = {"energy": (out["energy"] / batch.num_atoms)[has_energy]}
        if "forces" in out:
            atom_mask = batch.has_forces[batch.graph.batch]                          # [N]
            references["forces"] = batch.forces[atom_mask].reshape(-1)
            predictions["forces"] = out["forces"][atom_mask].reshape(-1)
            errors["forces"] = predictions["forces"] - references["forces"]
        if "stress" in out:
            references["stress"] = batch.stress[batch.has_stress].reshape(-1)
            predictions["stress"] = out["stress"][batch.has_stress].reshape(-1)
            errors["stress"] = predictions["stress"] - references["stress"]
        for k, key in enumerate(self._KEYS):
            if key in errors:
                e = errors[key].detach().double().cpu()
                self.sums[k] += torch.stack([e.abs().sum(), (e**2).sum(), torch.tensor(float(e.numel()))])
                if self.keep:
                    self.kept[key][0].append(references[key].detach().double().cpu())
                    self.kept[key][1].append(predictions[key].detach().double().cpu())
        if loss is not None:
            self.loss_sum += torch.tensor([float(loss), 1.0], dtype=torch.float64)

    def all_reduce(self) -> None:
        """Sum the running totals over all DDP ranks (no-op when not distributed)."""
        if _is_distributed():
            packed = torch.cat([self.sums.reshape(-1), self.loss_sum])
            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            packed = packed.to(backend_device)
            dist.all_reduce(packed)
            packed = packed.cpu()
            self.sums = packed[:9].reshape(3, 3)
            self.loss_sum = packed[9:]

    def compute(self) -> Dict[str, float]:
        """{"energy_mae", "energy_rmse", "forces_mae", ..., "loss"} for what was seen."""
        result = {}
        for k, key in enumerate(self._KEYS):
            abs_sum, sq_sum, count = self.sums[k].tolist()
            if count > 0:
                result[f"{key}_mae"] = abs_sum / count
                result[f"{key}_rmse"] = (sq_sum / count) ** 0.5
        if self.loss_sum[1] > 0:
            result["loss"] = float(self.loss_sum[0] / self.loss_sum[1])
        return result

    def combined_loss(self, *, energy_weight: float, forces_weight: float, stress_weight: float) -> float:
        """λ_E MSE_E + λ_F MSE_F + λ_σ MSE_σ: the loss with all weights w_b = 1 (validation)."""
        metrics = self.compute()
        return sum(
            weight * metrics.get(f"{key}_rmse", 0.0) ** 2
            for key, weight in zip(self._KEYS, (energy_weight, forces_weight, stress_weight))
        )

    def predictions(self, key: str):
        """(reference, predicted) 1-D tensors of ``key`` kept so far (``keep=True``)."""
        refs, preds = self.kept[key]
        if not refs:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        return torch.cat(refs), torch.cat(preds)
