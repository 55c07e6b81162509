"""Neighbor-list demo: the edges of a rattled fcc Cu crystal, compared with ASE's list."""

import time

from ase.build import bulk
from ase.neighborlist import neighbor_list as ase_neighbor_list

import molnets

atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (4, 4, 4)
atoms.rattle(0.05, seed=0)
cutoff = 5.0

start = time.perf_counter()
graph = molnets.AtomicGraph.from_ase(atoms, cutoff)
elapsed = time.perf_counter() - start
lengths = molnets.edge_vectors(graph).norm(dim=-1)
print(f"{len(atoms)} Cu atoms, cutoff {cutoff} Å: {graph.num_edges} directed edges in {elapsed * 1e3:.1f} ms")
print(f"neighbors per atom: {graph.num_edges / len(atoms):.1f}; shortest edge {lengths.min():.3f} Å")
print(f"ASE finds {len(ase_neighbor_list('i', atoms, cutoff))} edges")
