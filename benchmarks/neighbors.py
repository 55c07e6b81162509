"""Neighbor lists: every molnets backend against vesin, matscipy and ASE, in one run.

Rattled periodic fcc Cu supercells (256, 2048, 16384 atoms) and a batch of 64 small molecules
(ASE's g2 set, non-periodic), 5 Å cutoff, float64 positions on the CPU. Prints the time of each
and its ratio to vesin as a markdown table, and the fitted exponent of time vs N of the torch
cell list.

How it times: each contender is timed in tight alternation with vesin alone (contender, vesin,
contender, vesin, ...), so that both see the same load and the same caches (no other backend
runs in between), for at least ``--repeats`` pairs and at least ``--seconds`` per contender,
spread over 5 rounds that cycle through the contenders (a burst of load from other processes
then cannot spoil all runs of one contender). Times are the minimum over the repeats (the least
disturbed run, on a shared machine); a ratio is the contender's minimum over vesin's minimum in
the same pairs. vesin is asked for "ijSd": the pairs, shifts and distances, the quantities
molnets' vesin backend needs (the distances feed the check for overlapping atoms), on
``--threads`` threads, like molnets (which gives vesin torch's thread count).

    python benchmarks/neighbors.py [--repeats 10] [--seconds 1.0] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Dict, Tuple

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


def paired_times(
    runs: Dict[str, Callable[[], object]], repeats: int, seconds: float, rounds: int = 5
) -> Dict[str, Tuple[float, float]]:
    """(minimum time, ratio to vesin) of each run, timed in alternation with ``runs["vesin"]``.

    The time of each contender is spread over ``rounds`` rounds that cycle through all of them,
    so that a burst of load from other processes cannot spoil one contender's every run.
    """
    baseline = runs["vesin"]
    contenders = {name: fn for name, fn in runs.items() if fn is not baseline}
    times = {name: ([], []) for name in contenders}  # (contender's times, vesin's in the same pairs)
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in contenders.items():
            start, count = time.perf_counter(), 0
            while count < math.ceil(repeats / rounds) or time.perf_counter() - start < seconds / rounds:
                for run, out in zip((fn, baseline), times[name]):
                    tick = time.perf_counter()
                    run()
                    out.append(time.perf_counter() - tick)
                count += 1
    results = {name: (min(own), min(own) / min(paired)) for name, (own, paired) in times.items()}
    results["vesin"] = (min(t for _, paired in times.values() for t in paired), 1.0)
    return results


def case_inputs(structures):
    """positions [N, 3], cutoff, cells [B, 3, 3], pbc [B, 3], batch [N] of a list of ase.Atoms."""
    positions = torch.from_numpy(np.concatenate([a.positions for a in structures]))
    cells = torch.from_numpy(np.stack([a.cell[:] for a in structures]))
    pbc = torch.from_numpy(np.stack([a.pbc for a in structures]))
    batch = torch.repeat_interleave(torch.arange(len(structures)), torch.tensor([len(a) for a in structures]))
    return positions, CUTOFF, cells, pbc, batch


def contenders(structures) -> Dict[str, Callable[[], object]]:
    positions, _, cells, pbc, batch = case_inputs(structures)
    vesin_list = NeighborList(cutoff=CUTOFF, full_list=True, n_threads=torch.get_num_threads())
    runs = {
        f"molnets {backend}": (lambda backend=backend: neighbor_list(positions, CUTOFF, cells, pbc, batch, backend=backend))
        for backend in ("auto", "torch", "vesin")
    }
    if len(positions) <= 300:
        runs["molnets reference"] = lambda: neighbor_list(positions, CUTOFF, cells, pbc, batch, backend="reference")
    if not pbc.any():
        runs["molnets cluster"] = lambda: neighbor_list(positions, CUTOFF, cells, pbc, batch, backend="cluster")
    runs["vesin"] = lambda: [vesin_list.compute(a.positions, a.cell[:], a.pbc, quantities="ijSd") for a in structures]
    runs["matscipy"] = lambda: [matscipy_neighbour_list("ijS", a, CUTOFF) for a in structures]
    if len(positions) <= 2048:
        runs["ase"] = lambda: [ase_neighbor_list("ijS", a, CUTOFF) for a in structures]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="pairs of runs per contender, at least")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per contender, at least")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases = {f"Cu fcc {n}": copper(n) for n in (256, 2048, 16384)}
    cases["64 molecules (g2)"] = molecules(64)
    results: Dict[str, Dict[str, Tuple[float, float]]] = {}
    for case, structures in cases.items():
        results[case] = paired_times(contenders(structures), args.repeats, args.seconds)

    names = sorted({n for r in results.values() for n in r}, key=lambda n: (not n.startswith("molnets"), n))
    print(f"Neighbor lists, {CUTOFF} Å cutoff, float64, CPU, {args.threads} threads: "
          "best ms (ratio to vesin, timed in alternation with it)\n")
    print("| system | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for case, times in results.items():
        cells = [f"{times[n][0] * 1e3:.2f} ({times[n][1]:.2f}x)" if n in times else "-" for n in names]
        print(f"| {case} | " + " | ".join(cells) + " |")

    sizes = np.array([len(cases[c][0]) for c in cases if c.startswith("Cu")], dtype=float)
    torch_times = np.array([results[c]["molnets torch"][0] for c in cases if c.startswith("Cu")])
    slope = np.polyfit(np.log(sizes), np.log(torch_times), 1)[0]
    print(f"\ntorch cell list: time ~ N^{slope:.2f} (fit over N = {sizes.astype(int).tolist()})")
    molecules_case = {n: t for n, (t, _) in results["64 molecules (g2)"].items() if n.startswith("molnets") and "auto" not in n}
    print(f"64 molecules: fastest molnets backend {min(molecules_case, key=molecules_case.get)}; "
          f"auto picks {_resolve('auto', validate(*case_inputs(cases['64 molecules (g2)'])), CUTOFF)}")


if __name__ == "__main__":
    main()
