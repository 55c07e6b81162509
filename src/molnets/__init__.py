"""molnets: equivariant molecular neural-network layers and interatomic potentials."""

from .graph import AtomicGraph, batch_graphs, edge_vectors, split_graphs
from .neighbors import neighbor_list

__version__ = "0.1.0"

__all__ = ["AtomicGraph", "batch_graphs", "split_graphs", "edge_vectors", "neighbor_list", "__version__"]
