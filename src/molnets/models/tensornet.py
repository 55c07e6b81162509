"""TensorNet-style potential: O(3)-equivariant Cartesian rank-2 tensor messages.

G. Simeon, G. De Fabritiis, "TensorNet: Cartesian tensor representations for efficient
learning of molecular potentials", NeurIPS 2023 (O(3) variant). Per atom i and channel c a
3x3 tensor X_i = I_i δ + A_i + S_i (see ``molnets.layers.cartesian``):

    embedding    X_i = Σ_j φ(r_ij) Z_ij ∘ (f_I δ + f_A skew(r̂_ij) + f_S (r̂r̂ᵀ - δ/3))    (Eqs. 4-6)
                 Z_ij = W [z_i, z_j] + b,   X_i <- TensorLinear(X_i) gated by MLP(LN(||X_i||))
    interaction  X <- X / (||X|| + 1);   Y = TensorLinear(X)                           (Eqs. 7-11)
                 M_i = Σ_j φ(r_ij) (f_I I_j δ + f_A A_j + f_S S_j),   f = MLP(e(r_ij))
                 M <- M Y + Y M;   M <- M / (||M|| + 1);   X <- X + dX + dX², dX = TensorLinear(M)
    readout      E_i = scale · MLP(SiLU(W LN([||I δ||, ||A||, ||S||]))) + shift + E0[Z_i]

e(r) are exp-normal radial functions times a cosine cutoff φ, as in torchmd-net, whose
TensorNet (3.1) this follows, hyper-parameters and self pairs (r = 0, seen by torchmd-net as
self loops) included. Parity: the antisymmetric part is built from skew(r̂), an axial
tensor, so an inversion x -> -x acts on the features as X -> Xᵀ; X Y + Y X, dX², the linear
maps and the norms all commute with transposition, so the energy is O(3)-invariant.

Speed (the same numbers, computed with less work): the radial MLPs depend on |r_ij| only, so
they run on one edge of each pair {i, j} and the pair sends its message both ways (half the
dense-layer work, the dominant cost); messages are formed in 9 irreducible components per
channel (``[E, C, 9]``), never as three ``[E, C, 3, 3]`` tensors; the pair embedding
W [z_i, z_j] is split into per-atom products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..graph import AtomicGraph, edge_vectors
from ..layers.cartesian import (
    TensorLinear,
    ComponentBasis,
    compose,
    expand_parts,
    from_components,
    part_norms,
    skew,
    tensor_norm,
    to_components,
    traceless_outer,
    transpose_components,
)
from ..layers.embedding import SpeciesEmbedding, SpeciesIndex
from ..layers.mlp import MLP
from ..layers.radial import CosineEnvelope, ExpNormalBasis
from ..layers.readout import AtomicReferenceEnergies, EnergyHead, ScaleShift
from ..layers.scatter import scatter_sum
from .base import DesignSpace, count_parameters
from .schnet import half_edges

__all__ = ["TensorNetConfig", "TensorNet", "TensorEmbedding", "TensorInteraction"]


@dataclass(frozen=True)
class TensorNetConfig:
    """Hyper-parameters of the TensorNet-style model (JSON-serialisable, validated once).

    Fields:
        species: atomic numbers the model knows, e.g. (1, 6, 8).
        cutoff: r_c in Å.
        num_channels: C, tensor channels per atom.
        num_layers: T, number of interaction layers.
        num_rbf: K, number of exp-normal radial functions.
    """

    species: Tuple[int, ...]
    cutoff: float = 5.0
    num_channels: int = 128
    num_layers: int = 2
    num_rbf: int = 32

    def __post_init__(self) -> None:
        species = tuple(int(z) for z in self.species)
        object.__setattr__(self, "species", species)
        if not species or len(set(species)) != len(species) or min(species) < 1:
            raise ValueError(f"species must be distinct atomic numbers >= 1, got {self.species}")
        if not (self.cutoff > 0 and math.isfinite(self.cutoff)):
            raise ValueError(f"cutoff must be a positive number of Å, got {self.cutoff}")
        for name in ("num_channels", "num_layers", "num_rbf"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _send_both_ways(msg_i: Tensor, msg_j: Tensor, pair_i: Tensor, pair_j: Tensor, num_atoms: int) -> Tensor:
    """Sum the messages of each pair into both of its atoms. [P, *F] x2 -> [N, *F]"""
    return scatter_sum(torch.cat((msg_i, msg_j)), torch.cat((pair_i, pair_j)), dim_size=num_atoms)


class TensorEmbedding(nn.Module):
    """Initial tensors from species and edge geometry (Simeon & De Fabritiis 2023, Eqs. 4-6).

        X_i = Σ_j φ(r_ij) Z_ij ∘ (f_I(r) δ + f_A(r) skew(r̂_ij) + f_S(r) (r̂r̂ᵀ - δ/3)),  f = W_f e(r) + b_f
        Z_ij = W_r z_i + W_s z_j + b   (one dense layer on [z_i, z_j], split per atom)
        X_i <- TensorLinear(X_i) with parts gated by SiLU(MLP(LayerNorm(||X_i||)))

    The self pair (j = i, r = 0) adds f_I(0) Z_ii δ.

    Args:
        num_species: S.
        num_channels: C.
        num_rbf: K.

    Shapes:
        species [N], edge_rbf [P, K], edge_envelope [P] (φ), edge_unit [P, 3] (r̂_ij of each
        pair), pair_i [P], pair_j [P], self_rbf [1, K] (e(0))  ->  [N, C, 3, 3]
    """

    def __init__(self, num_species: int, num_channels: int, *, num_rbf: int) -> None:
        super().__init__()
        C = self.num_channels = int(num_channels)
        self.species_embedding = SpeciesEmbedding(num_species, C)
        self.pair_receiver = nn.Linear(C, C)
        self.pair_sender = nn.Linear(C, C, bias=False)
        self.radial = nn.Linear(num_rbf, 3 * C)
        self.norm = nn.LayerNorm(C)
        self.gates = MLP([C, 2 * C, 3 * C])
        self.linear = TensorLinear(C, C)
        self.basis = ComponentBasis()

    def forward(self, species: Tensor, edge_rbf: Tensor, edge_envelope: Tensor, edge_unit: Tensor,
                pair_i: Tensor, pair_j: Tensor, self_rbf: Tensor) -> Tensor:
        C, num_atoms = self.num_channels, species.shape[0]
        z = self.species_embedding(species)                                              # [N, C]
        z_receiver, z_sender = self.pair_receiver(z), self.pair_sender(z)                # [N, C]
        f = self.radial(edge_rbf) * edge_envelope[:, None]                               # [P, 3C]
        f = f.unflatten(-1, (3, C)).transpose(1, 2)                                      # [P, C, 3]
        ones = torch.ones_like(edge_unit[:, 0])                                          # [P]
        basis = self.basis(edge_unit)                                                    # [9, 3, 3]
        geometry = to_components(compose(ones, skew(edge_unit), traceless_outer(edge_unit)), basis)  # [P, 9]
        filters = expand_parts(f) * geometry[:, None, :]                                 # [P, C, 9]
        # r̂_ji = -r̂_ij: the message to j has its axial part flipped.
        msg_i = filters * (z_receiver[pair_i] + z_sender[pair_j])[..., None]             # [P, C, 9]
        msg_j = transpose_components(filters) * (z_receiver[pair_j] + z_sender[pair_i])[..., None]  # [P, C, 9]
        X = _send_both_ways(msg_i, msg_j, pair_i, pair_j, num_atoms)                     # [N, C, 9]
        self_scalar = self.radial(self_rbf)[:, :C] * (z_receiver + z_sender)             # [N, C]
        eye = torch.eye(3, dtype=X.dtype, device=X.device)
        X = from_components(X, basis) + self_scalar[..., None, None] * eye          # [N, C, 3, 3]
        gates = F.silu(self.gates(self.norm(tensor_norm(X))))                           # [N, 3C]
        return self.linear(X, gates.unflatten(-1, (3, C)).transpose(1, 2))              # [N, C, 3, 3]


class TensorInteraction(nn.Module):
    """One O(3) interaction layer (Simeon & De Fabritiis 2023, Eqs. 7-11).

        X <- X / (||X|| + 1),   Y = TensorLinear(X)
        M_i = Σ_j φ(r_ij) (f_I I^Y_j δ + f_A A^Y_j + f_S S^Y_j),   f = SiLU(MLP(e(r_ij)))
        M <- M Y + Y M,   M <- M / (||M|| + 1),   dX = TensorLinear(M)
        X <- X + dX + dX dX

    The self pair (j = i, r = 0) adds f(0) Y_i.

    Args:
        num_channels: C.
        num_rbf: K.

    Shapes:
        X [N, C, 3, 3], edge_rbf [P, K], edge_envelope [P] (φ), pair_i [P], pair_j [P],
        self_rbf [1, K] (e(0))  ->  [N, C, 3, 3]
    """

    def __init__(self, num_channels: int, *, num_rbf: int) -> None:
        super().__init__()
        C = self.num_channels = int(num_channels)
        self.radial = MLP([num_rbf, C, 2 * C, 3 * C])
        self.linear_in = TensorLinear(C, C)
        self.linear_out = TensorLinear(C, C)
        self.basis = ComponentBasis()

    def forward(self, X: Tensor, edge_rbf: Tensor, edge_envelope: Tensor, pair_i: Tensor, pair_j: Tensor,
                self_rbf: Tensor) -> Tensor:
        C, num_atoms = self.num_channels, X.shape[0]
        envelope = torch.cat((edge_envelope.new_ones(1), edge_envelope))                # [1 + P], φ(0) = 1
        f = F.silu(self.radial(torch.cat((self_rbf, edge_rbf)))) * envelope[:, None]     # [1 + P, 3C]
        f = expand_parts(f.unflatten(-1, (3, C)).transpose(1, 2))                        # [1 + P, C, 9]
        X = X / (tensor_norm(X) + 1)[..., None, None]                                    # [N, C, 3, 3]
        Y = self.linear_in(X)                                                            # [N, C, 3, 3]
        basis = self.basis(X)                                                            # [9, 3, 3]
        y = to_components(Y, basis)                                                      # [N, C, 9]
        filters = f[1:]                                                                  # [P, C, 9]
        M = _send_both_ways(filters * y[pair_j], filters * y[pair_i], pair_i, pair_j, num_atoms)  # [N, C, 9]
        M = from_components(M + f[:1] * y, basis)                                   # [N, C, 3, 3]
        M = M @ Y + Y @ M                                                                # [N, C, 3, 3]
        M = M / (tensor_norm(M) + 1)[..., None, None]                                    # [N, C, 3, 3]
        dX = self.linear_out(M)                                                          # [N, C, 3, 3]
        return X + dX + dX @ dX                                                          # [N, C, 3, 3]


class TensorNet(nn.Module):
    """TensorNet-style per-atom energy model (Simeon & De Fabritiis 2023); see the module docstring.

    Args:
        config: the hyper-parameters.

    Shapes:
        graph with N atoms  ->  per-atom energies [N], eV
    """

    name: ClassVar[str] = "tensornet"
    config_class: ClassVar[type] = TensorNetConfig

    def __init__(self, config: TensorNetConfig) -> None:
        super().__init__()
        self.config = c = config
        self.cutoff = float(c.cutoff)
        C = c.num_channels
        self.species_index = SpeciesIndex(c.species)
        self.radial = ExpNormalBasis(c.cutoff, c.num_rbf)
        self.envelope = CosineEnvelope(c.cutoff)
        self.embedding = TensorEmbedding(len(c.species), C, num_rbf=c.num_rbf)
        self.interactions = nn.ModuleList(TensorInteraction(C, num_rbf=c.num_rbf) for _ in range(c.num_layers))
        self.out_norm = nn.LayerNorm(3 * C)
        self.out_linear = nn.Linear(3 * C, C)
        self.head = EnergyHead([C, C // 2 or 1, 1], activation="silu")
        self.scale_shift = ScaleShift()
        self.reference_energies = AtomicReferenceEnergies(c.species)
        self.basis = ComponentBasis()

    def forward(self, graph: AtomicGraph) -> Tensor:
        species = self.species_index(graph.atomic_numbers)                               # [N]
        pairs = half_edges(graph.receivers, graph.senders, graph.shifts, species.shape[0])  # [P]
        pair_i, pair_j = graph.receivers[pairs], graph.senders[pairs]                    # [P]
        edge_vec = edge_vectors(graph._replace(receivers=pair_i, senders=pair_j, shifts=graph.shifts[pairs]))  # [P, 3]
        edge_len = edge_vec.norm(dim=-1)                                                 # [P]
        # As in torchmd-net, φ enters twice: in e(r) = φ(r) expnormal(r), and on the filters.
        envelope = self.envelope(edge_len)                                               # [P]
        edge_rbf = self.radial(edge_len) * envelope[:, None]                             # [P, K]
        self_rbf = self.radial(edge_len.new_zeros(1))                                    # [1, K], φ(0) = 1
        edge_unit = edge_vec / edge_len[:, None]                                         # [P, 3]
        X = self.embedding(species, edge_rbf, envelope, edge_unit, pair_i, pair_j, self_rbf)  # [N, C, 3, 3]
        for interaction in self.interactions:
            X = interaction(X, edge_rbf, envelope, pair_i, pair_j, self_rbf)             # [N, C, 3, 3]
        invariants = part_norms(to_components(X, self.basis(X))).transpose(1, 2).flatten(1)  # [N, 3C]
        h = F.silu(self.out_linear(self.out_norm(invariants)))                           # [N, C]
        return self.scale_shift(self.head(h)) + self.reference_energies(species)         # [N]

    def design_space(self) -> DesignSpace:
        """Cartesian rank-2 tensor messages; a layer's X Y products make body order 3 per layer."""
        return DesignSpace(
            model=self.name,
            message_type="Cartesian rank-2 tensors (I, A, S), O(3)",
            body_order=3,
            num_layers=self.config.num_layers,
            cutoff=self.cutoff,
            num_parameters=count_parameters(self),
        )
