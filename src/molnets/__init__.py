"""molnets: equivariant molecular neural-network layers and interatomic potentials.

The data path of every model: ``ase.Atoms`` -> :class:`AtomicGraph` (with the neighbor list of
:func:`neighbor_list`) -> a model's per-atom energies -> :class:`Potential` (energy, forces,
stress) -> :class:`MolnetsCalculator` for ASE. Layers live in :mod:`molnets.layers`, the ACE
block in :mod:`molnets.ace`, training in :mod:`molnets.training`, the reusable model test suite
in :mod:`molnets.testing`; :mod:`molnets.memory` keeps freed memory for the next call on the CPU
(:func:`molnets.memory.keep_heap_between_calls`, which the calculator makes, and
:func:`molnets.memory.reuse_freed_memory` for large systems).
"""

from . import ace, layers, memory, models, neighbors, testing, training
from .calculator import MolnetsCalculator
from .describe import compare, describe
from .graph import AtomicGraph, batch_graphs, edge_vectors, half_edge_graph, split_graphs
from .models import (
    MACE,
    MACEConfig,
    Potential,
    SchNet,
    SchNetConfig,
    TensorNet,
    TensorNetConfig,
    load_model,
    save_model,
)
from .neighbors import neighbor_list

__version__ = "0.1.0"

__all__ = [
    "AtomicGraph", "batch_graphs", "split_graphs", "edge_vectors", "half_edge_graph", "neighbor_list",
    "Potential", "save_model", "load_model",
    "SchNet", "SchNetConfig", "TensorNet", "TensorNetConfig", "MACE", "MACEConfig",
    "MolnetsCalculator", "describe", "compare",
    "ace", "layers", "memory", "models", "neighbors", "testing", "training",
    "__version__",
]
