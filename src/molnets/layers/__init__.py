"""Tensor -> tensor building blocks of molnets' models (no layer ever sees an ``AtomicGraph``)."""

from .cartesian import (
    ComponentBasis,
    TensorLinear,
    component_basis,
    compose,
    decompose,
    expand_parts,
    from_components,
    PartNorms,
    part_norms,
    skew,
    skew_to_vector,
    tensor_norm,
    to_components,
    traceless_outer,
    transpose_components,
)
from .clebsch_gordan import wigner_3j
from .embedding import SpeciesEmbedding, SpeciesIndex
from .equivariant_linear import ComponentLinear, EquivariantLinear
from .mlp import MLP, ShiftedSoftplus, make_activation
from .pairs import half_edges, pair_convolution
from .radial import (
    BesselBasis,
    CosineEnvelope,
    ExpNormalBasis,
    GaussianBasis,
    PolynomialEnvelope,
    RadialEmbedding,
)
from .readout import AtomicReferenceEnergies, EnergyHead, ScaleShift, set_energy_normalization
from .scatter import gather_rows, scatter_mean, scatter_outer, scatter_sum
from .spherical_harmonics import SphericalHarmonics, spherical_harmonics, spherical_harmonics_l
from .tensor_product import ChannelwiseTensorProduct, FullyConnectedTensorProduct, uvu_instructions

__all__ = [
    # geometry: spherical harmonics, radial bases, envelopes
    "spherical_harmonics", "spherical_harmonics_l", "SphericalHarmonics",
    "BesselBasis", "GaussianBasis", "ExpNormalBasis", "PolynomialEnvelope", "CosineEnvelope",
    "RadialEmbedding",
    # coupling
    "wigner_3j", "ChannelwiseTensorProduct", "FullyConnectedTensorProduct", "uvu_instructions",
    "EquivariantLinear", "ComponentLinear",
    # Cartesian rank-2 tensors (TensorNet)
    "decompose", "compose", "tensor_norm", "skew", "skew_to_vector", "traceless_outer",
    "component_basis", "ComponentBasis", "to_components", "from_components", "expand_parts",
    "transpose_components", "part_norms", "PartNorms", "TensorLinear",
    # message passing, embeddings, readouts
    "scatter_sum", "scatter_mean", "scatter_outer", "gather_rows", "half_edges", "pair_convolution", "SpeciesIndex", "SpeciesEmbedding", "MLP",
    "ShiftedSoftplus", "make_activation", "EnergyHead", "ScaleShift", "AtomicReferenceEnergies",
    "set_energy_normalization",
]
