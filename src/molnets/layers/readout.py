"""Per-atom energy heads and the physical normalisation of per-atom energies.

A model's per-atom energy is

    E_i = scale * e_i + shift + E0[s_i]

with e_i the (dimensionless, O(1)) output of a learned head, ``scale`` and ``shift`` in eV
(e.g. the force RMS and the mean per-atom residual energy of a data set) and E0 the
per-element atomic reference energies in eV (e.g. a least-squares fit of the data set's
energies on its composition). ``scale``, ``shift`` and E0 are buffers: saved in the
``state_dict``, moved and cast with the model, not trained. The training code sets them from
data with ``set_energy_normalization``; a user can call it by hand.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .mlp import MLP, Activation

__all__ = ["EnergyHead", "ScaleShift", "AtomicReferenceEnergies", "set_energy_normalization"]


class EnergyHead(nn.Module):
    """Per-atom scalar e_i = MLP(h_i) from invariant node features (Schütt et al. 2018, Fig. 2).

    Args:
        dims: [C, hidden..., 1]: the widths of the MLP; the last must be 1.
        activation: nonlinearity between the dense layers.

    Shapes:
        node_feats [N, C]  ->  [N]
    """

    def __init__(self, dims: Sequence[int], *, activation: Activation = "silu") -> None:
        super().__init__()
        if int(dims[-1]) != 1:
            raise ValueError(f"an energy head ends in width 1, got dims={list(dims)}")
        self.mlp = MLP(dims, activation=activation)
        self.in_dim, self.out_dim = self.mlp.in_dim, 1

    def forward(self, node_feats: Tensor) -> Tensor:
        return self.mlp(node_feats).squeeze(-1)  # [N]


class ScaleShift(nn.Module):
    """y = scale * x + shift, with scale and shift in eV (buffers, not trained).

    Args:
        scale: eV per unit of the head's output.
        shift: eV per atom.

    Shapes:
        x [*]  ->  [*]

    >>> ScaleShift(2.0, -1.0)(torch.tensor([0.0, 1.0]))
    tensor([-1.,  1.])
    """

    def __init__(self, scale: float = 1.0, shift: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("shift", torch.tensor(float(shift)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.6g}, shift={float(self.shift):.6g}"


class AtomicReferenceEnergies(nn.Module):
    """Per-element reference energies E0[s_i] in eV (buffer, not trained; zero by default).

    Args:
        species: the atomic numbers of the model, in the order of its species indices.

    Shapes:
        species [N] long (indices)  ->  [N], eV

    >>> e0 = AtomicReferenceEnergies((1, 8))
    >>> e0.set_energies({1: -13.6, 8: -2041.0})
    >>> e0(torch.tensor([1, 0, 0]))
    tensor([-2041.0000,   -13.6000,   -13.6000])
    """

    def __init__(self, species: Sequence[int]) -> None:
        super().__init__()
        self.species = tuple(int(z) for z in species)
        self.register_buffer("energies", torch.zeros(len(self.species)))  # [S]

    def set_energies(self, energies: Mapping[int, float]) -> None:
        """Set E0 from ``{Z: eV}``; elements not named keep their value, unknown Z is an error."""
        unknown = sorted(set(energies) - set(self.species))
        if unknown:
            raise ValueError(f"no such element in the model: Z = {unknown}; it knows {self.species}")
        with torch.no_grad():
            for z, e in energies.items():
                self.energies[self.species.index(int(z))] = float(e)

    def forward(self, species: Tensor) -> Tensor:
        return self.energies.index_select(0, species)  # [N]

    def extra_repr(self) -> str:
        return f"species={self.species}"


def set_energy_normalization(
    model: nn.Module,
    *,
    scale: Optional[float] = None,
    shift: Optional[float] = None,
    atomic_energies: Optional[Mapping[int, float]] = None,
) -> None:
    """Set scale (eV), shift (eV/atom) and E0 ({Z: eV}) in every ``ScaleShift`` and
    ``AtomicReferenceEnergies`` of ``model``; arguments left ``None`` are unchanged."""
    found = False
    for module in model.modules():
        if isinstance(module, ScaleShift):
            found = True
            with torch.no_grad():
                if scale is not None:
                    module.scale.fill_(float(scale))
                if shift is not None:
                    module.shift.fill_(float(shift))
        elif isinstance(module, AtomicReferenceEnergies) and atomic_energies is not None:
            found = True
            module.set_energies(atomic_energies)
    if not found:
        raise ValueError(f"{type(model).__name__} has no ScaleShift or AtomicReferenceEnergies to set")
