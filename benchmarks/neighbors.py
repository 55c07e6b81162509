"""Neighbor lists: every molnets backend against vesin, matscipy and ASE, in one run.

Rattled periodic fcc Cu supercells (256, 2048, 16384 atoms) and a batch of 64 small molecules
(ASE's g2 set, non-periodic), 5 Å cutoff, float64 positions on the CPU. Prints the median time of
each and its ratio to vesin as a markdown table, and the fitted exponent of time vs N of the
torch cell list.

    python benchmarks/neighbors.py [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable, Dict

import numpy as np
import torch
from ase.build import bulk, molecule
from ase.collections import g2
from ase.neighborlist import neighbor_list as ase_neighbor_list
from matscipy.neighbours import neighbour_list as matscipy_neighbour_list
from vesin import NeighborList

from molnets.neighbors import _resolve, neighbor_list
from molnets.neighbors._geometry import validate

CUTOFF = 5.0


def copper(num_atoms: int):
    reps = round((num_atoms / 4) ** (1 / 3))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (reps, reps, reps)
    atoms.rattle(0.05, seed=0)
    return [atoms]


def molecules(count: int = 64):
    structures = [molecule(name) for name in sorted(g2.names)[:count]]
    for atoms in structures:
        atoms.center(vacuum=6.0)  # a box only for matscipy, which needs an invertible cell; pbc stays False
    return structures


def median_times(runs: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median wall time of each run; the runs take turns, so that load drifts hit all alike."""
    for fn in runs.values():
        fn()  # warm-up
    times: Dict[str, list] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def case_inputs(structures):
    """positions [N, 3], cutoff, cells [B, 3, 3], pbc [B, 3], batch [N] of a list of ase.Atoms."""
    positions = torch.from_numpy(np.concatenate([a.positions for a in structures]))
    cells = torch.from_numpy(np.stack([a.cell[:] for a in structures]))
    pbc = torch.from_numpy(np.stack([a.pbc for a in structures]))
    batch = torch.repeat_interleave(torch.arange(len(structures)), torch.tensor([len(a) for a in structures]))
    return positions, CUTOFF, cells, pbc, batch


def contenders(structures) -> Dict[str, Callable[[], object]]:
    positions, _, cells, pbc, batch = case_inputs(structures)
    vesin_list = NeighborList(cutoff=CUTOFF, full_list=True)
    runs = {
        f"molnets {backend}": (lambda backend=backend: neighbor_list(positions, CUTOFF, cells, pbc, batch, backend=backend))
        for backend in ("auto", "torch", "vesin")
    }
    if len(positions) <= 300:
        runs["molnets reference"] = lambda: neighbor_list(positions, CUTOFF, cells, pbc, batch, backend="reference")
    if not pbc.any():
        runs["molnets cluster"] = lambda: neighbor_list(positions, CUTOFF, cells, pbc, batch, backend="cluster")
    runs["vesin"] = lambda: [vesin_list.compute(a.positions, a.cell[:], bool(a.pbc.any()), quantities="ijS") for a in structures]
    runs["matscipy"] = lambda: [matscipy_neighbour_list("ijS", a, CUTOFF) for a in structures]
    if len(positions) <= 2048:
        runs["ase"] = lambda: [ase_neighbor_list("ijS", a, CUTOFF) for a in structures]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases = {f"Cu fcc {n}": copper(n) for n in (256, 2048, 16384)}
    cases["64 molecules (g2)"] = molecules(64)
    results: Dict[str, Dict[str, float]] = {}
    for case, structures in cases.items():
        repeats = args.repeats if len(structures[0]) < 10000 else max(3, args.repeats // 2)
        results[case] = median_times(contenders(structures), repeats)

    names = sorted({n for r in results.values() for n in r}, key=lambda n: (not n.startswith("molnets"), n))
    print(f"Neighbor lists, {CUTOFF} Å cutoff, float64, CPU, {args.threads} threads: median ms (ratio to vesin)\n")
    print("| system | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for case, times in results.items():
        cells = [
            f"{times[n] * 1e3:.2f} ({times[n] / times['vesin']:.2f}x)" if n in times else "-" for n in names
        ]
        print(f"| {case} | " + " | ".join(cells) + " |")

    sizes = np.array([len(cases[c][0]) for c in cases if c.startswith("Cu")], dtype=float)
    torch_times = np.array([results[c]["molnets torch"] for c in cases if c.startswith("Cu")])
    slope = np.polyfit(np.log(sizes), np.log(torch_times), 1)[0]
    print(f"\ntorch cell list: time ~ N^{slope:.2f} (fit over N = {sizes.astype(int).tolist()})")
    molecules_case = {n: t for n, t in results["64 molecules (g2)"].items() if n.startswith("molnets") and "auto" not in n}
    print(f"64 molecules: fastest molnets backend {min(molecules_case, key=molecules_case.get)}; "
          f"auto picks {_resolve('auto', validate(*case_inputs(cases['64 molecules (g2)'])))}")


if __name__ == "__main__":
    main()
