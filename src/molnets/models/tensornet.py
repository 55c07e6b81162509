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
channel, never as three ``[E, C, 3, 3]`` tensors, and summed by ``layers.pair_convolution``
and ``layers.scatter_outer`` (on large systems, fused CPU kernels that never hold the
per-pair messages in memory); the pair embedding W [z_i, z_j] is split into per-atom products;
with frozen weights (a calculator) the embedding and interaction layers of a molecule or a large
crystal run as one autograd node each, their backward written out, chunk by chunk on the crystal
(``_tensornet_kernel``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..graph import AtomicGraph, edge_vectors, half_edge_graph
from ..layers.cartesian import (
    TensorLinear,
    ComponentBasis,
    DirectionComponents,
    PART_SLICES,
    PartNorms,
    anticommutator,
    expand_parts,
    from_components,
    plus_square,
    tensor_norm,
    to_components,
)
from ..layers.embedding import SpeciesEmbedding, SpeciesIndex
from ..layers.mlp import MLP, radial_filter
from ..layers.pairs import pair_convolution
from ..layers.radial import CosineEnvelope, ExpNormalBasis
from ..layers.readout import AtomicReferenceEnergies, EnergyHead, ScaleShift
from ..layers.scatter import gather_rows, scatter_outer
from .._frozen import frozen_cached, frozen_on_cpu_eager, parameters_of
from ._tensornet_embedding_kernel import FrozenEmbedding
from ._tensornet_kernel import FrozenInteraction, kernels_apply
from .base import DesignSpace, count_parameters

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

    With frozen weights (eager, CPU) on a molecule or a large crystal
    (``_tensornet_kernel.kernels_apply``) the layer runs as one autograd node with a hand-written
    backward (``_tensornet_embedding_kernel.FrozenEmbedding``); ``_reference`` is the differentiable
    definition.
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
        self.direction = DirectionComponents()
        # sign of each component (I, A, S parts) under r̂ -> -r̂: the antisymmetric part is axial
        self.register_buffer("component_parity", expand_parts(torch.tensor([1.0, -1.0, 1.0])), persistent=False)  # [9]

    def forward(self, species: Tensor, edge_rbf: Tensor, edge_envelope: Tensor, edge_unit: Tensor,
                pair_i: Tensor, pair_j: Tensor, self_rbf: Tensor) -> Tensor:
        if frozen_on_cpu_eager(self, edge_rbf, [self_rbf]) and kernels_apply(self, pair_i.shape[0], edge_rbf):
            return FrozenEmbedding.apply(edge_rbf, edge_envelope, edge_unit, species, pair_i, pair_j, self_rbf, self)
        return self._reference(species, edge_rbf, edge_envelope, edge_unit, pair_i, pair_j, self_rbf)

    def _reference(self, species: Tensor, edge_rbf: Tensor, edge_envelope: Tensor, edge_unit: Tensor,
                   pair_i: Tensor, pair_j: Tensor, self_rbf: Tensor) -> Tensor:
        """The layer in differentiable operations."""
        C, num_atoms = self.num_channels, species.shape[0]
        z = self.species_embedding(species)                                              # [N, C]
        z_receiver, z_sender = self.pair_receiver(z), self.pair_sender(z)                # [N, C]
        f = radial_filter(self.radial, edge_rbf, edge_envelope).unflatten(-1, (3, C))   # [P, 3, C]
        geometry = self.direction(edge_unit)                                             # [P, 9]
        z_ij = gather_rows(z_receiver, pair_i) + gather_rows(z_sender, pair_j)           # [P, C]
        z_ji = gather_rows(z_receiver, pair_j) + gather_rows(z_sender, pair_i)           # [P, C]
        # r̂_ji = -r̂_ij: the axial part of the message to j changes sign (on the [P, 9] geometry,
        # not on the [P, 3, C] weights: the same product, a smaller tensor).
        X = (scatter_outer(geometry, f * z_ij[:, None], pair_i, num_atoms, PART_SLICES)
             + scatter_outer(geometry * self.component_parity, f * z_ji[:, None], pair_j, num_atoms,
                             PART_SLICES))                                               # [N, 9, C]
        self_scalar = self.radial(self_rbf)[:, :C] * (z_receiver + z_sender)             # [N, C]
        eye = torch.eye(3, dtype=f.dtype, device=f.device)
        X = from_components(X.transpose(1, 2), self.basis(X)) + self_scalar[..., None, None] * eye  # [N, C, 3, 3]
        gates = F.silu(self.gates(self.norm(tensor_norm(X))))                           # [N, 3C]
        return self.linear(X, gates.unflatten(-1, (3, C)).transpose(1, 2))              # [N, C, 3, 3]


class TensorInteraction(nn.Module):
    """One O(3) interaction layer (Simeon & De Fabritiis 2023, Eqs. 7-11).

        X <- X / (||X|| + 1),   Y = TensorLinear(X)
        M_i = Σ_j φ(r_ij) (f_I I^Y_j δ + f_A A^Y_j + f_S S^Y_j),   f = SiLU(MLP(e(r_ij)))
        M <- M Y + Y M,   M <- M / (||M|| + 1),   dX = TensorLinear(M)
        X <- X + dX + dX dX

    The self pair (j = i, r = 0) adds f(0) Y_i.

    With frozen weights (eager, CPU: ``molnets._frozen.frozen_on_cpu_eager``) on a molecule or a
    large crystal (``_tensornet_kernel.kernels_apply``) the layer runs as one autograd node with a
    hand-written backward (``FrozenInteraction``), the same numbers with far fewer operations,
    chunk by chunk on the crystal; ``_reference`` is the differentiable definition.

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
        self._frozen: dict = {}

    def forward(self, X: Tensor, edge_rbf: Tensor, edge_envelope: Tensor, pair_i: Tensor, pair_j: Tensor,
                self_rbf: Tensor) -> Tensor:
        # f(0), the same at every call while the weights are frozen (then kept: molnets._frozen)
        self_weights = frozen_cached(self._frozen, "self_weights", parameters_of(self.radial),
                                     lambda: self._self_weights(self_rbf), inputs=[self_rbf])  # [9, C]
        if frozen_on_cpu_eager(self, X, [self_weights]) and kernels_apply(self, pair_i.shape[0], X):  # one node
            return FrozenInteraction.apply(X, edge_rbf, edge_envelope, pair_i, pair_j, self_weights, self)
        return self._reference(X, edge_rbf, edge_envelope, pair_i, pair_j, self_weights)

    def _self_weights(self, self_rbf: Tensor) -> Tensor:
        """The self pair's filter f(0) = SiLU(MLP(e(0))) (φ(0) = 1) spread over the components. [9, C]"""
        f_self = F.silu(self.radial(self_rbf)).unflatten(-1, (3, self.num_channels))     # [1, 3, C]
        return expand_parts(f_self[0].T).T                                               # [9, C]

    def _reference(self, X: Tensor, edge_rbf: Tensor, edge_envelope: Tensor, pair_i: Tensor, pair_j: Tensor,
                   self_weights: Tensor) -> Tensor:
        """The layer in differentiable operations (``self_weights``: f(0) spread, [9, C])."""
        C = self.num_channels
        f = radial_filter(self.radial, edge_rbf, edge_envelope, F.silu).unflatten(-1, (3, C))  # [P, 3, C]
        X = X / (tensor_norm(X) + 1)[..., None, None]                                    # [N, C, 3, 3]
        Y = self.linear_in(X)                                                            # [N, C, 3, 3]
        basis = self.basis(X)                                                            # [9, 3, 3]
        y = to_components(Y, basis).transpose(1, 2).contiguous()                         # [N, 9, C]
        M = pair_convolution(f, y, pair_i, pair_j, PART_SLICES) + self_weights * y       # [N, 9, C]
        M = from_components(M.transpose(1, 2), basis)                                    # [N, C, 3, 3]
        M = anticommutator(M, Y)                                                         # M Y + Y M
        M = M / (tensor_norm(M) + 1)[..., None, None]                                    # [N, C, 3, 3]
        dX = self.linear_out(M)                                                          # [N, C, 3, 3]
        return plus_square(X, dX)                                                        # X + dX + dX dX


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
        self.part_norms = PartNorms()

    def forward(self, graph: AtomicGraph) -> Tensor:
        species = self.species_index(graph.atomic_numbers)                               # [N]
        pair_graph = half_edge_graph(graph)                                              # P = E // 2 edges
        pair_i, pair_j = pair_graph.receivers, pair_graph.senders                        # [P]
        edge_vec = edge_vectors(pair_graph)                                              # [P, 3]
        edge_len = edge_vec.norm(dim=-1)                                                 # [P]
        # As in torchmd-net, φ enters twice: in e(r) = φ(r) expnormal(r), and on the filters.
        envelope = self.envelope(edge_len)                                               # [P]
        edge_rbf = self.radial(edge_len) * envelope[:, None]                             # [P, K]
        self_rbf = self.radial(edge_len.new_zeros(1))                                    # [1, K], φ(0) = 1
        edge_unit = edge_vec / edge_len[:, None]                                         # [P, 3]
        X = self.embedding(species, edge_rbf, envelope, edge_unit, pair_i, pair_j, self_rbf)  # [N, C, 3, 3]
        for interaction in self.interactions:
            X = interaction(X, edge_rbf, envelope, pair_i, pair_j, self_rbf)             # [N, C, 3, 3]
        invariants = self.part_norms(X)                                                  # [N, 3C]
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
