"""TensorNet rows of the model benchmark: molnets' TensorNet against torchmd-net's, one run.

    python benchmarks/_tensornet.py [--repeats 10] [--dtype float32 float64] [--compile]

Energy + forces per call (median of ``repeats`` after warm-up), 2 threads, random weights,
hyper-parameters of ../shared/PEERS.md (128 channels, 2 layers, 32 exp-normal functions,
5 Å cutoff). torchmd-net runs in its own venv (``benchmarks/.peers/torchmdnet``) through
``benchmarks/_torchmdnet_peer.py`` and builds its neighbor list inside the model; the molnets
column is the model on a given graph, and the neighbor list (vesin) is timed on its own.

Before timing, the molnets weights are copied into torchmd-net (``torchmdnet_state_dict``)
and both energies and forces are compared: the two compute the same function.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
PEER_PYTHON = HERE / ".peers" / "torchmdnet" / "bin" / "python"
HYPER = {"cutoff": 5.0, "num_channels": 128, "num_layers": 2, "num_rbf": 32}


def aspirin():
    """Aspirin (C9H8O4, 21 atoms), built from idealised bond lengths and 120° angles."""
    import ase

    def at(origin, angle_deg, length, z=0.0):
        a = math.radians(angle_deg)
        return np.asarray(origin) + np.array([length * math.cos(a), length * math.sin(a), z])

    ring = [at((0, 0, 0), 60 * k, 1.39) for k in range(6)]
    sym, pos = ["C"] * 6, list(ring)
    for k in (2, 3, 4, 5):                                    # ring hydrogens
        sym.append("H"), pos.append(at(ring[k], 60 * k, 1.08))
    c7 = at(ring[0], 0, 1.48)                                 # carboxylic acid on C1
    sym += ["C", "O", "O", "H"]
    o9 = at(c7, -60, 1.31)
    pos += [c7, at(c7, 60, 1.21), o9, at(o9, 0, 0.97)]
    o10 = at(ring[1], 60, 1.36)                               # acetoxy group on C2
    c11 = at(o10, 120, 1.36)
    c13 = at(c11, 60, 1.50)
    sym += ["O", "C", "O", "C", "H", "H", "H"]
    pos += [o10, c11, at(c11, 180, 1.20), c13, at(c13, 0, 1.09), at(c13, 120, 1.09, 0.6), at(c13, 120, 1.09, -0.6)]
    return ase.Atoms(sym, positions=np.array(pos))


def systems() -> Dict[str, "ase.Atoms"]:  # noqa: F821
    """Rattled fcc Cu (256 and 2048 atoms; boxes >= 2 cutoffs), ethanol and aspirin."""
    import ase.build

    out = {}
    for reps in (4, 8):
        cu = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)
        cu.rattle(0.05, seed=1)
        out[f"Cu fcc {len(cu)}"] = cu
    out["ethanol"] = ase.build.molecule("CH3CH2OH")
    out["aspirin"] = aspirin()
    return out


def torchmdnet_state_dict(model) -> Dict[str, torch.Tensor]:
    """molnets TensorNet weights under torchmd-net 3.1 TensorNet + Scalar output names."""
    C = model.config.num_channels
    emb, out = model.embedding, {}
    rep, head = "representation_model.", "output_model.output_network.layers."
    table = torch.zeros(128, C, dtype=emb.species_embedding.weight.dtype)
    table[list(model.config.species)] = emb.species_embedding.weight.detach()
    out[rep + "tensor_embedding.emb.weight"] = table
    out[rep + "tensor_embedding.emb2.weight"] = torch.cat((emb.pair_receiver.weight, emb.pair_sender.weight), 1)
    out[rep + "tensor_embedding.emb2.bias"] = emb.pair_receiver.bias
    for k in range(3):
        out[rep + f"tensor_embedding.distance_proj{k + 1}.weight"] = emb.radial.weight[k * C:(k + 1) * C]
        out[rep + f"tensor_embedding.distance_proj{k + 1}.bias"] = emb.radial.bias[k * C:(k + 1) * C]
        out[rep + f"tensor_embedding.linears_tensor.{k}.weight"] = emb.linear.weight[k]
    for k in range(2):
        out[rep + f"tensor_embedding.linears_scalar.{k}.weight"] = emb.gates[2 * k].weight
        out[rep + f"tensor_embedding.linears_scalar.{k}.bias"] = emb.gates[2 * k].bias
    out[rep + "tensor_embedding.init_norm.weight"] = emb.norm.weight
    out[rep + "tensor_embedding.init_norm.bias"] = emb.norm.bias
    for t, layer in enumerate(model.interactions):
        for k in range(3):
            out[rep + f"layers.{t}.linears_scalar.{k}.weight"] = layer.radial[2 * k].weight
            out[rep + f"layers.{t}.linears_scalar.{k}.bias"] = layer.radial[2 * k].bias
            out[rep + f"layers.{t}.linears_tensor.{k}.weight"] = layer.linear_in.weight[k]
            out[rep + f"layers.{t}.linears_tensor.{k + 3}.weight"] = layer.linear_out.weight[k]
    for name in ("linear", "out_norm"):
        mine = model.out_linear if name == "linear" else model.out_norm
        out[rep + f"{name}.weight"], out[rep + f"{name}.bias"] = mine.weight, mine.bias
    for k in (0, 2):
        out[head + f"{k}.weight"], out[head + f"{k}.bias"] = model.head.mlp[k].weight, model.head.mlp[k].bias
    return {key: value.detach().clone().contiguous() for key, value in out.items()}


def run_torchmdnet(structures: Dict[str, "ase.Atoms"], dtype: str, repeats: int,  # noqa: F821
                   state_dict=None) -> dict:
    """Time (and optionally evaluate) torchmd-net's TensorNet in its own venv."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(HYPER, dtype=dtype, repeats=repeats, threads=torch.get_num_threads(), state_dict=None)
        if state_dict is not None:
            spec["state_dict"] = os.path.join(tmp, "weights.pt")
            torch.save(state_dict, spec["state_dict"])
        spec["systems"] = [
            {"name": name, "numbers": a.numbers.tolist(), "positions": a.positions.tolist(),
             "cell": a.cell[:].tolist() if a.pbc.any() else None}
            for name, a in structures.items()
        ]
        path = os.path.join(tmp, "spec.json")
        json.dump(spec, open(path, "w"))
        env = dict(os.environ, WARP_CACHE_PATH=os.path.join(tempfile.gettempdir(), "molnets-warp-cache"))
        done = subprocess.run([str(PEER_PYTHON), str(HERE / "_torchmdnet_peer.py"), path],
                              capture_output=True, text=True, env=env, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])


def time_calls(fn, repeats: int) -> float:
    """Median wall time of fn() in ms after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def molnets_model(species, dtype):
    from molnets.models.tensornet import TensorNet, TensorNetConfig

    torch.manual_seed(0)
    return TensorNet(TensorNetConfig(species=tuple(species), **HYPER)).to(dtype).eval()


def main(argv: List[str] = None) -> None:
    from molnets.graph import AtomicGraph
    from molnets.models.base import Potential

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    parser.add_argument("--systems", nargs="+", default=None, help="names from systems()")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    structures = {k: v for k, v in systems().items() if args.systems is None or k in args.systems}
    species = sorted({int(z) for a in structures.values() for z in a.numbers})

    # Same weights in both: same energies and forces (float64).
    check = {k: v for k, v in structures.items() if len(v) <= 256}
    model64 = molnets_model(species, torch.float64)
    peer = run_torchmdnet(check, "float64", 1, torchmdnet_state_dict(model64))
    for name, atoms in check.items():
        out = Potential(model64)(AtomicGraph.from_ase(atoms, HYPER["cutoff"], dtype=torch.float64))
        d_e = abs(float(out["energy"].sum()) - peer[name]["energy"])
        d_f = float((out["forces"].detach() - torch.tensor(peer[name]["forces"])).abs().max())
        print(f"same weights, {name}: |ΔE| = {d_e:.2e} eV, max |ΔF| = {d_f:.2e} eV/Å", file=sys.stderr)
        assert d_e < 1e-6 * max(1.0, len(atoms)) and d_f < 1e-6, "molnets and torchmd-net TensorNet differ"

    header = "| system | atoms | dtype | torchmd-net (ms) | molnets eager (ms) | ratio |"
    sep = "|---|---|---|---|---|---|"
    if args.compile:
        header += " molnets compiled (ms) | ratio |"
        sep += "---|---|"
    print(header + " neighbor list (ms) |")
    print(sep + "---|")
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        peer = run_torchmdnet(structures, dtype_name, args.repeats)
        model = molnets_model(species, dtype)
        for name, atoms in structures.items():
            graph = AtomicGraph.from_ase(atoms, HYPER["cutoff"], dtype=dtype)
            potential = Potential(model)
            eager = time_calls(lambda: potential(graph), args.repeats)
            ref = peer[name]["median_ms"]
            row = f"| {name} | {len(atoms)} | {dtype_name} | {ref:.1f} | {eager:.1f} | {ref / eager:.2f}x |"
            if args.compile:
                compiled = torch.compile(Potential(model), fullgraph=True)
                fast = time_calls(lambda: compiled(graph), args.repeats)
                row += f" {fast:.1f} | {ref / fast:.2f}x |"
            nl = time_calls(lambda: AtomicGraph.from_ase(atoms, HYPER["cutoff"], dtype=dtype), args.repeats)
            print(row + f" {nl:.1f} |", flush=True)


if __name__ == "__main__":
    main()
