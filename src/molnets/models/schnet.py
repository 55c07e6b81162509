"""SchNet-style potential: continuous-filter convolutions on distances (Schütt et al. 2018).

K. T. Schütt, H. E. Sauceda, P.-J. Kindermans, A. Tkatchenko, K.-R. Müller,
"SchNet - A deep learning architecture for molecules and materials",
J. Chem. Phys. 148, 241722 (2018).

    h_i^0 = a_{Z_i}                                                  (Eq. 4)
    x_i   = W_in h_i^t
    m_i   = Σ_{j ∈ N(i)} x_j ∘ W(r_ij),  W(r) = MLP_ssp(e(r)) · u(r)   (Eqs. 5, 11; cutoff u)
    h_i^{t+1} = h_i^t + W_2 ssp(W_1 m_i + b_1) + b_2                    (Fig. 2, interaction)
    E_i   = scale · MLP_ssp(h_i^T) + shift + E0[Z_i]

e(r) are Gaussians exp(-γ (r - μ_k)²) on [0, r_c], u(r) a cosine envelope (zero with zero
slope at r_c, so energies and forces are continuous when atoms cross the cutoff). Messages
are invariant scalars of one distance each: body order 2.

Pair symmetry: the filter depends on |r_ij| only and a neighbor list holds both (i, j) and
(j, i), so the filter network runs on one edge of each pair (half of the edges) and the pair
sends its message both ways (``layers.pair_convolution``, a fused kernel on large systems on
the CPU). This halves the dominant cost (two dense layers per edge) and changes no number
beyond float rounding order.

Frozen weights (as calculators run a model) on a molecule within a few cutoffs (N^2 <= 4P, and
the dense arrays below within ``_schnet_kernel.DENSE_MAX_BYTES`` a layer), eager on the CPU: the
whole model, positions and cell to per-atom energies, runs as one autograd node with its backward
written out (``_schnet_kernel.FrozenSchNet``; the pair filters of all layers as one dense
[T, N, N, C] array), about half the torch operations of the differentiable layers and none of
autograd's bookkeeping per operation, which is most of a call on 9-21 atoms. A model with a
module the kernel does not know (a user's head or filter network) runs its own modules;
``SchNet._energies`` is the definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Tuple

from torch import Tensor, nn

from .._frozen import frozen_cached, frozen_kernel_applies
from ..graph import AtomicGraph, edge_vectors, half_edge_graph
from ..layers.embedding import SpeciesEmbedding, SpeciesIndex
from ..layers.mlp import MLP, radial_filter
from ..layers.pairs import pair_convolution
from ..layers.radial import CosineEnvelope, GaussianBasis
from ..layers.readout import AtomicReferenceEnergies, EnergyHead, ScaleShift
from ._schnet_kernel import FrozenSchNet, arranged_weights, dense_enough, kernel_inputs
from .base import DesignSpace, count_parameters

__all__ = ["SchNetConfig", "SchNet", "CFConvInteraction"]


@dataclass(frozen=True)
class SchNetConfig:
    """Hyper-parameters of the SchNet-style model (JSON-serialisable, validated once).

    Fields:
        species: atomic numbers the model knows, e.g. (1, 6, 8).
        cutoff: r_c in Å.
        num_channels: C, width of the node features (and of the filters).
        num_basis: K, number of Gaussians on [0, r_c].
        num_layers: T, number of interaction blocks.
    """

    species: Tuple[int, ...]
    cutoff: float = 5.0
    num_channels: int = 128
    num_basis: int = 50
    num_layers: int = 3

    def __post_init__(self) -> None:
        species = tuple(int(z) for z in self.species)
        object.__setattr__(self, "species", species)
        if not species or len(set(species)) != len(species) or min(species) < 1:
            raise ValueError(f"species must be distinct atomic numbers >= 1, got {self.species}")
        if not (self.cutoff > 0 and math.isfinite(self.cutoff)):
            raise ValueError(f"cutoff must be a positive number of Å, got {self.cutoff}")
        for name in ("num_channels", "num_basis", "num_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class CFConvInteraction(nn.Module):
    """SchNet interaction block on a half edge list (Schütt et al. 2018, Eq. 5 and Fig. 2).

        m_i = Σ_{pairs {i, j}} (W_in h_j) ∘ W(r_ij)       (both directions of each pair)
        v_i = W_2 ssp(W_1 m_i + b_1) + b_2

    Args:
        num_channels: C.
        num_basis: K, width of the radial basis e(r).

    Shapes:
        node_feats [N, C], edge_radial [P, K], edge_envelope [P], pair_i [P], pair_j [P]
        (P pairs, each an unordered {i, j})  ->  [N, C]
    """

    def __init__(self, num_channels: int, *, num_basis: int) -> None:
        super().__init__()
        self.filter = MLP([num_basis, num_channels, num_channels], activation="ssp")
        self.linear_in = nn.Linear(num_channels, num_channels, bias=False)
        self.update = MLP([num_channels, num_channels, num_channels], activation="ssp")

    def forward(
        self, node_feats: Tensor, edge_radial: Tensor, edge_envelope: Tensor, pair_i: Tensor, pair_j: Tensor
    ) -> Tensor:
        filters = radial_filter(self.filter, edge_radial, edge_envelope)            # [P, C]
        x = self.linear_in(node_feats)                                             # [N, C]
        messages = pair_convolution(filters[:, None], x[:, None], pair_i, pair_j)[:, 0]  # [N, C]
        return self.update(messages)                                               # [N, C]


class SchNet(nn.Module):
    """SchNet-style per-atom energy model (Schütt et al. 2018); see the module docstring.

    Args:
        config: the hyper-parameters.

    Shapes:
        graph with N atoms  ->  per-atom energies [N], eV
    """

    name: ClassVar[str] = "schnet"
    config_class: ClassVar[type] = SchNetConfig

    def __init__(self, config: SchNetConfig) -> None:
        super().__init__()
        self.config = c = config
        self.cutoff = float(c.cutoff)
        self.species_index = SpeciesIndex(c.species)
        self.embedding = SpeciesEmbedding(len(c.species), c.num_channels)
        self.radial = GaussianBasis(c.cutoff, c.num_basis)
        self.envelope = CosineEnvelope(c.cutoff)
        self.interactions = nn.ModuleList(
            CFConvInteraction(c.num_channels, num_basis=c.num_basis) for _ in range(c.num_layers)
        )
        self.head = EnergyHead([c.num_channels, c.num_channels // 2 or 1, 1], activation="ssp")
        self.scale_shift = ScaleShift()
        self.reference_energies = AtomicReferenceEnergies(c.species)
        self._frozen: dict = {}  # the kernel's arranged weights while frozen (molnets._frozen)

    def forward(self, graph: AtomicGraph) -> Tensor:
        species = self.species_index(graph.atomic_numbers)                           # [N]
        pair_graph = half_edge_graph(graph)                                          # P = E // 2 edges
        num_pairs = pair_graph.receivers.shape[0]
        kernel_weights = kernel_inputs(self)  # None unless the modules are the kernel's
        if (kernel_weights is not None and frozen_kernel_applies(  # (False when compiling: no shape guard below)
                self, graph.positions, num_pairs, self.config.num_channels, parameters=kernel_weights)
                and dense_enough(species.shape[0], num_pairs, self.config.num_channels,
                                 graph.positions.element_size())):
            weights = frozen_cached(self._frozen, "kernel", kernel_weights, lambda: arranged_weights(self))
            return FrozenSchNet.apply(graph.positions, graph.cell, pair_graph, species, self, weights)  # one node
        return self._energies(pair_graph, species)                                   # [N]

    def _energies(self, pair_graph: AtomicGraph, species: Tensor) -> Tensor:
        """Per-atom energies [N] in differentiable operations, from the half-edge graph and the
        species indices: the model's definition, and the oracle of ``_schnet_kernel.FrozenSchNet``."""
        edge_len = edge_vectors(pair_graph).norm(dim=-1)                             # [P]
        edge_radial = self.radial(edge_len)                                          # [P, K]
        edge_envelope = self.envelope(edge_len)                                      # [P]
        h = self.embedding(species)                                                  # [N, C]
        for interaction in self.interactions:
            h = h + interaction(h, edge_radial, edge_envelope, pair_graph.receivers, pair_graph.senders)  # [N, C]
        return self.scale_shift(self.head(h)) + self.reference_energies(species)     # [N]

    def design_space(self) -> DesignSpace:
        """Invariant scalar messages of body order 2, T layers, receptive field T r_c."""
        return DesignSpace(
            model=self.name,
            message_type="invariant scalars (continuous filter on distances)",
            body_order=2,
            num_layers=self.config.num_layers,
            cutoff=self.cutoff,
            num_parameters=count_parameters(self),
        )
