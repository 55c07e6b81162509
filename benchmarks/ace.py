"""Benchmark: the ACE product basis B (symmetric contraction), molnets vs mace-torch.

Both libraries contract the same atomic basis A [N, C, M] (C = 128 channels, irreps
0e+1o+2e+3o, M = 16) to B with target irreps 128x0e + 128x1o at correlation ν = 3, with
per-species weights (3 species), random inputs and weights, float32 and float64, forward
(graph recorded, as when forces follow) and forward + backward. mace-torch's
``mace.modules.symmetric_contraction.SymmetricContraction`` runs in its own environment
(benchmarks/.peers/mace, e3nn 0.4.4) in a subprocess of this script that prints JSON timings.

    python benchmarks/ace.py            # 10^3 and 10^4 atoms
    python benchmarks/ace.py --quick    # 10^3 atoms only

Prints a markdown table: median time per call (ms) and the ratio mace-torch / molnets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHANNELS, IRREPS_A, IRREPS_B, CORRELATION, NUM_SPECIES = 128, "0e + 1o + 2e + 3o", "0e + 1o", 3, 3
MACE_PYTHON = Path(__file__).resolve().parent / ".peers" / "mace" / "bin" / "python"
BUDGET_S = 8.0  # time per measurement: repeat until spent (after a warm-up, 1 to 10 calls)


def _with_channels(irreps: str) -> str:
    return " + ".join(f"{CHANNELS}x{ir.strip()}" for ir in irreps.split("+"))


def _median_time(fn) -> float:
    start = time.perf_counter()
    fn()  # warm-up, also tells how many calls the budget affords
    spent, times = time.perf_counter() - start, []
    while not times or (len(times) < 10 and spent + sum(times) < BUDGET_S):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_module(torch, module, A, species_arg) -> dict:
    grad = torch.randn(A.shape[0], module(A, species_arg).shape[1], dtype=A.dtype)

    def forward():
        module(A, species_arg)

    def forward_backward():
        module(A, species_arg).backward(grad)

    return {"forward": _median_time(forward), "forward+backward": _median_time(forward_backward)}


def run_cases(library: str, sizes: list, dtypes: list) -> list:
    """Time one library for every (atoms, dtype); returns JSON-able rows."""
    if library == "mace":
        import mace.modules.symmetric_contraction as mace_sc  # before e3nn: see PEERS.md
    import torch
    from e3nn import o3

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        torch.set_default_dtype(dtype)
        irreps_in, irreps_out = o3.Irreps(_with_channels(IRREPS_A)), o3.Irreps(_with_channels(IRREPS_B))
        torch.manual_seed(0)
        if library == "mace":
            module = mace_sc.SymmetricContraction(
                irreps_in, irreps_out, correlation=CORRELATION, num_elements=NUM_SPECIES
            )
        else:
            from molnets.ace import ProductBasis

            module = ProductBasis(irreps_in, irreps_out, correlation=CORRELATION, num_species=NUM_SPECIES)
        for num_atoms in sizes:
            A = torch.randn(num_atoms, CHANNELS, irreps_in.dim // CHANNELS, requires_grad=True)
            species = torch.randint(0, NUM_SPECIES, (num_atoms,))
            species_arg = torch.nn.functional.one_hot(species, NUM_SPECIES).to(dtype) if library == "mace" else species
            rows.append({"atoms": num_atoms, "dtype": dtype_name, **_time_module(torch, module, A, species_arg)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10^3 atoms only")
    parser.add_argument("--peer", choices=["mace"], help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", help="numbers of atoms (default 1000 10000)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    args = parser.parse_args()
    sizes = args.sizes or ([1000] if args.quick else [1000, 10000])
    dtypes = args.dtypes
    if args.peer:
        print(json.dumps(run_cases(args.peer, sizes, dtypes)))
        return

    ours = run_cases("molnets", sizes, dtypes)
    command = [str(MACE_PYTHON), __file__, "--peer", "mace", "--sizes", *map(str, sizes), "--dtypes", *dtypes]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0:
        peer = json.loads(result.stdout.strip().splitlines()[-1])
    else:  # e.g. out of memory at 10^4 atoms in float64: keep molnets' numbers
        print(f"mace-torch run failed (exit {result.returncode}): {result.stderr.strip()[-300:]}\n")
        peer = [{"forward": math.nan, "forward+backward": math.nan} for _ in ours]

    print(f"Product basis B: {CHANNELS} channels, A = {IRREPS_A}, B = {IRREPS_B}, correlation "
          f"{CORRELATION}, {NUM_SPECIES} species, {torch_threads()} threads; median ms per call\n")
    print("| atoms | dtype | pass | molnets (ms) | mace-torch (ms) | mace-torch / molnets |")
    print("|---:|---|---|---:|---:|---:|")
    for mine, theirs in zip(ours, peer):
        for mode in ("forward", "forward+backward"):
            a, b = 1e3 * mine[mode], 1e3 * theirs[mode]
            ratio = "—" if math.isnan(b) else f"{b / a:.2f}x"
            print(f"| {mine['atoms']} | {mine['dtype']} | {mode} | {a:.1f} | {b:.1f} | {ratio} |")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
