"""MACE-style potential: higher-order equivariant message passing on the ACE block.

I. Batatia, D. P. Kovács, G. N. C. Simm, C. Ortner, G. Csányi, "MACE: Higher order equivariant
message passing neural networks for fast and accurate force fields", NeurIPS 2022. Per layer t,
with node features h^{(t)} (irreps C x (0e + 1o + ... up to hidden_lmax)) and species s_i:

    A_i = W_A · (1/n̄) Σ_j R(r_ij) Y(r̂_ij) ⊗ W h_j^{(t)}       atomic basis (Eqs. 8-9, ``ace.AtomicBasis``)
    B_i = Σ_{ν=1}^{ν_max} W^{(ν)}_{s_i} U^{(ν)} A_i^{⊗ν}          product basis (Eqs. 10-11, ``ace.ProductBasis``)
    h_i^{(t+1)} = W_B B_i + W_{s_i} h_i^{(t)}                    update with species-dependent skip (Eq. 13)
    E_i = scale · Σ_t readout_t(h_i^{(t+1)}) + shift + E0[s_i]   readouts of every layer (Eq. 14)

R is a radial MLP on 8 Bessel functions, Y the spherical harmonics up to lmax times the
polynomial envelope of the cutoff (so that messages vanish smoothly at r_c). Intermediate
readouts are linear in the scalars, the last is a small MLP; the last layer keeps only scalars
(as mace-torch does). A message of correlation ν is a (ν+1)-body function of the neighborhood.

The architecture follows mace-torch's ``MACE`` with residual interaction blocks (sizes,
per-path radial weights, symmetric contraction, species-dependent self-connection, readouts);
A is mixed per irrep after the path sum instead of per path before it, and the product basis
keeps only linearly independent symmetric couplings (fewer weights: 145k against mace-torch's
173k at the sizes of ../shared/PEERS.md, one element). Speed: ``PairAtomicBasis`` (radial MLP
once per pair, radial weights folded into the node features before one batched coupling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, List, Tuple

import torch
from e3nn import o3
from torch import Tensor, nn

from ..ace import AtomicBasis, ProductBasis
from ..graph import AtomicGraph, edge_vectors, half_edge_graph
from ..layers.embedding import SpeciesEmbedding, SpeciesIndex
from ..layers.equivariant_linear import ComponentLinear, EquivariantLinear
from ..layers.pair_atomic_basis import PairAtomicBasis
from ..layers.radial import BesselBasis, PolynomialEnvelope
from ..layers.readout import AtomicReferenceEnergies, EnergyHead, ScaleShift
from ..layers.spherical_harmonics import SphericalHarmonics
from .base import DesignSpace, count_parameters

__all__ = ["MACEConfig", "MACE", "MACEInteraction"]


@dataclass(frozen=True)
class MACEConfig:
    """Hyper-parameters of the MACE-style model (JSON-serialisable, validated once).

    Fields:
        species: atomic numbers the model knows, e.g. (1, 6, 8).
        cutoff: r_c in Å.
        num_channels: C, channels of every irrep of the hidden features and of A.
        lmax: largest degree of the edge spherical harmonics (and of A).
        hidden_lmax: largest degree L of the hidden features C x (0e + 1o + ... L).
        correlation: ν_max, the correlation order of the product basis (1 to 4).
        num_layers: T, number of interaction layers.
        num_bessel: K, number of Bessel radial functions.
        envelope_p: p of the polynomial cutoff envelope.
        avg_num_neighbors: n̄, normalization of the neighbor sum in A.
        radial_mlp: hidden widths of the radial MLP R.
        readout_hidden: hidden width of the last (nonlinear) readout.
    """

    species: Tuple[int, ...]
    cutoff: float = 5.0
    num_channels: int = 64
    lmax: int = 3
    hidden_lmax: int = 1
    correlation: int = 3
    num_layers: int = 2
    num_bessel: int = 8
    envelope_p: int = 5
    avg_num_neighbors: float = 10.0
    radial_mlp: Tuple[int, ...] = (64, 64, 64)
    readout_hidden: int = 16

    def __post_init__(self) -> None:
        species = tuple(int(z) for z in self.species)
        object.__setattr__(self, "species", species)
        object.__setattr__(self, "radial_mlp", tuple(int(w) for w in self.radial_mlp))
        if not species or len(set(species)) != len(species) or min(species) < 1:
            raise ValueError(f"species must be distinct atomic numbers >= 1, got {self.species}")
        if not (self.cutoff > 0 and math.isfinite(self.cutoff)) or not self.avg_num_neighbors > 0:
            raise ValueError(f"cutoff (Å) and avg_num_neighbors must be positive, got {self}")
        for name in ("num_channels", "num_layers", "num_bessel", "envelope_p", "readout_hidden", "correlation"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.hidden_lmax <= self.lmax or self.correlation > 4 or min(self.radial_mlp, default=1) < 1:
            raise ValueError(f"need 0 <= hidden_lmax <= lmax, correlation <= 4, radial widths >= 1: {self}")


def _irreps(num_channels: int, lmax: int) -> o3.Irreps:
    """C x (0e + 1o + 2e + ...) up to lmax (the parity of the spherical harmonics)."""
    return o3.Irreps([(num_channels, (l, (-1) ** l)) for l in range(lmax + 1)])


class MACEInteraction(nn.Module):
    """One MACE layer: atomic basis, channel mixing, product basis, update with skip.

        A = W_A A(h, Y, R),   h' = W_B B(A, s) + W_s h        (Batatia et al. 2022, Eqs. 8-13)

    Args:
        irreps_in: irreps of h, e.g. "64x0e" (first layer) or "64x0e + 64x1o".
        irreps_out: irreps of h', e.g. "64x0e + 64x1o" (or "64x0e" in the last layer).
        lmax: largest degree of Y and of A.
        correlation: ν_max.
        num_species: S.
        num_basis: K, width of the radial basis.
        avg_num_neighbors: n̄.
        radial_mlp: hidden widths of R.

    Shapes:
        h [N, irreps_in.dim], species [N], edge_sh [E, (lmax+1)^2], edge_radial [P, K] (edges k
        and k + P are the two directions of pair k), senders [E], receivers [E]  ->  [N, irreps_out.dim]
    """

    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, *, lmax: int, correlation: int,
                 num_species: int, num_basis: int, avg_num_neighbors: float, radial_mlp: Tuple[int, ...]) -> None:
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        C = self.irreps_out[0].mul
        irreps_A = _irreps(C, lmax)
        self.atomic_basis = PairAtomicBasis(AtomicBasis(
            self.irreps_in, o3.Irreps.spherical_harmonics(lmax), irreps_A,
            num_basis=num_basis, avg_num_neighbors=avg_num_neighbors, radial_hidden=radial_mlp))
        self.mix = ComponentLinear(o3.Irreps.spherical_harmonics(lmax), C)
        self.product_basis = ProductBasis(irreps_A, self.irreps_out, correlation=correlation, num_species=num_species)
        self.update = EquivariantLinear(self.irreps_out, self.irreps_out)
        self.skip = EquivariantLinear(self.irreps_in, self.irreps_out, num_species=num_species)

    def forward(self, h: Tensor, species: Tensor, edge_sh: Tensor, edge_radial: Tensor,
                senders: Tensor, receivers: Tensor) -> Tensor:
        A = self.mix(self.atomic_basis(h, edge_sh, edge_radial, senders, receivers))  # [N, C, M]
        B = self.product_basis(A, species)  # [N, irreps_out.dim]
        return self.update(B, species) + self.skip(h, species)  # [N, irreps_out.dim]


class MACE(nn.Module):
    """MACE-style per-atom energy model (Batatia et al. 2022); see the module docstring.

    Args:
        config: the hyper-parameters.

    Shapes:
        graph with N atoms  ->  per-atom energies [N], eV
    """

    name: ClassVar[str] = "mace"
    config_class: ClassVar[type] = MACEConfig

    def __init__(self, config: MACEConfig) -> None:
        super().__init__()
        self.config = c = config
        self.cutoff = float(c.cutoff)
        S, C = len(c.species), c.num_channels
        self.species_index = SpeciesIndex(c.species)
        self.embedding = SpeciesEmbedding(S, C)
        self.sh = SphericalHarmonics(c.lmax)
        parity = [(-1.0) ** l for l in range(c.lmax + 1) for _ in range(2 * l + 1)]
        self.register_buffer("sh_parity", torch.tensor(parity), persistent=False)  # [M]
        self.radial = BesselBasis(c.cutoff, c.num_bessel)
        self.envelope = PolynomialEnvelope(c.cutoff, c.envelope_p)
        hidden = _irreps(C, c.hidden_lmax)
        irreps = [_irreps(C, 0)] + [hidden] * (c.num_layers - 1) + [_irreps(C, 0)]
        self.interactions = nn.ModuleList(
            MACEInteraction(irreps[t], irreps[t + 1], lmax=c.lmax, correlation=c.correlation, num_species=S,
                            num_basis=c.num_bessel, avg_num_neighbors=c.avg_num_neighbors, radial_mlp=c.radial_mlp)
            for t in range(c.num_layers)
        )
        self.readouts = nn.ModuleList(nn.Linear(C, 1, bias=False) for _ in range(c.num_layers - 1))
        self.head = EnergyHead([C, c.readout_hidden, 1])
        self.scale_shift = ScaleShift()
        self.reference_energies = AtomicReferenceEnergies(c.species)

    def node_features(self, graph: AtomicGraph) -> List[Tensor]:
        """The hidden features h^{(1)}, ..., h^{(T)} of every layer, each [N, irreps.dim] (e3nn layout)."""
        return self._features(graph, self.species_index(graph.atomic_numbers))

    def _features(self, graph: AtomicGraph, species: Tensor) -> List[Tensor]:
        # Geometry on one edge of each pair {i, j}; the reverse edge has Y_l(-r) = (-1)^l Y_l(r).
        pair_graph = half_edge_graph(graph)  # P = E // 2 edges
        pair_i, pair_j = pair_graph.receivers, pair_graph.senders  # [P]
        edge_vec = edge_vectors(pair_graph)  # [P, 3]
        edge_len = edge_vec.norm(dim=-1)  # [P]
        sh = self.sh(edge_vec) * self.envelope(edge_len)[:, None]  # [P, M]: vanishes at r_c
        edge_sh = torch.cat([sh, sh * self.sh_parity], dim=0)  # [E, M]
        edge_radial = self.radial(edge_len)  # [P, K]
        senders, receivers = torch.cat([pair_j, pair_i]), torch.cat([pair_i, pair_j])  # [E]
        h = self.embedding(species)  # [N, C]
        features = []
        for interaction in self.interactions:
            h = interaction(h, species, edge_sh, edge_radial, senders, receivers)  # [N, irreps.dim]
            features.append(h)
        return features

    def forward(self, graph: AtomicGraph) -> Tensor:
        species = self.species_index(graph.atomic_numbers)  # [N]
        features = self._features(graph, species)
        C = self.config.num_channels
        energy = self.head(features[-1])  # [N]
        for readout, h in zip(self.readouts, features[:-1]):
            energy = energy + readout(h[:, :C]).squeeze(-1)  # [N]: the scalars come first
        return self.scale_shift(energy) + self.reference_energies(species)  # [N]

    def design_space(self) -> DesignSpace:
        """Spherical-irreps messages of body order ν + 1, T layers, receptive field T r_c."""
        return DesignSpace(
            model=self.name,
            message_type=f"spherical irreps (ACE A, B; lmax {self.config.lmax}, hidden L {self.config.hidden_lmax})",
            body_order=self.config.correlation + 1,
            num_layers=self.config.num_layers,
            cutoff=self.cutoff,
            num_parameters=count_parameters(self),
        )
