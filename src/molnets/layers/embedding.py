"""Species: atomic numbers -> species indices -> learned per-species feature vectors.

A model knows a fixed tuple of elements (its config's ``species``, atomic numbers). The
lookup from Z to the index s in ``0..S-1`` is a buffer table, so it moves with the model to
any device and needs no Python dict in ``forward``.

Unknown elements: the table holds -1 for every Z the model does not know. In eager mode
``SpeciesIndex`` raises a ``ValueError`` naming the unknown elements (one host sync, a
cheap ``any()``). Under ``torch.compile`` / ``torch.export`` the check is skipped
(``torch.compiler.is_compiling()`` is a trace-time constant, not a tensor value), so compiled
code never syncs; validate inputs once in eager mode (the ASE calculator does) before
handing them to compiled code.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SpeciesIndex", "SpeciesEmbedding", "MAX_ATOMIC_NUMBER"]

MAX_ATOMIC_NUMBER = 118


class SpeciesIndex(nn.Module):
    """Map atomic numbers Z to species indices s = position of Z in ``species``.

    Args:
        species: the atomic numbers the model knows, e.g. ``(1, 6, 8)``; distinct, in 1..118.

    Shapes:
        atomic_numbers [N] long  ->  [N] long, values in 0..S-1

    >>> SpeciesIndex((1, 6, 8))(torch.tensor([8, 1, 1, 6]))
    tensor([2, 0, 0, 1])
    """

    def __init__(self, species: Sequence[int]) -> None:
        super().__init__()
        species = tuple(int(z) for z in species)
        if not species or len(set(species)) != len(species):
            raise ValueError(f"species must be a non-empty tuple of distinct atomic numbers, got {species}")
        if min(species) < 1 or max(species) > MAX_ATOMIC_NUMBER:
            raise ValueError(f"atomic numbers must lie in 1..{MAX_ATOMIC_NUMBER}, got {species}")
        self.species = species
        table = torch.full((MAX_ATOMIC_NUMBER + 1,), -1, dtype=torch.long)  # [119]
        table[list(species)] = torch.arange(len(species))
        self.register_buffer("table", table, persistent=False)

    @property
    def num_species(self) -> int:
        """S."""
        return len(self.species)

    def forward(self, atomic_numbers: Tensor) -> Tensor:
        index = self.table.index_select(0, atomic_numbers.clamp(0, MAX_ATOMIC_NUMBER))  # [N]
        if not torch.compiler.is_compiling():
            # Eager only: one host sync, so that an unknown element is an error, not a
            # silent read of row -1.
            unknown = index < 0
            if bool(unknown.any()):
                bad = sorted(set(atomic_numbers[unknown].tolist()))
                raise ValueError(
                    f"the model knows the elements Z = {self.species}, got unknown Z = {bad}"
                )
        return index

    def extra_repr(self) -> str:
        return f"species={self.species}"


class SpeciesEmbedding(nn.Module):
    """Learned initial node features h_i^0 = W[s_i], one row per species (Schütt et al. 2018, Eq. 4).

    Equivalent to a bias-free linear layer on one-hot species vectors (the MACE and TensorNet
    formulation), without materialising the one-hot matrix.

    Args:
        num_species: S.
        num_channels: C.

    Shapes:
        species [N] long (indices from ``SpeciesIndex``)  ->  [N, C]
    """

    def __init__(self, num_species: int, num_channels: int) -> None:
        super().__init__()
        self.num_species, self.num_channels = int(num_species), int(num_channels)
        self.out_dim = self.num_channels
        # Unit-variance rows: the features entering the first layer are O(1) per channel.
        self.weight = nn.Parameter(torch.randn(self.num_species, self.num_channels))  # [S, C]

    def forward(self, species: Tensor) -> Tensor:
        return self.weight.index_select(0, species)  # [N, C]

    def extra_repr(self) -> str:
        return f"num_species={self.num_species}, num_channels={self.num_channels}"
