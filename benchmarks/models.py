"""Model benchmark: energy + forces of molnets' models and their peers, side by side, one run.

    python benchmarks/models.py [--repeats 10] [--rounds 2] [--small-rounds 6] [--threads 2] [--device cpu] [--quick]
                                [--molnets-only]
                                [--compile] [--families MACE-style ...] [--no-scaling | --scaling-only]
                                [--keep-heap | --reuse-freed-memory] [--train]

Every measurement runs in a fresh subprocess (``--worker IMPL SPEC.json``) of the interpreter
that has the implementation (the main venv for molnets and PyG; a peer's venv for its
library; on CUDA one subprocess times all systems of a table's group in turn, which saves a
CUDA start-up per system), which prints one JSON line per system: median and min wall time
of one energy + forces call (autograd) after warm-up, over ``--repeats`` calls or, up to 1000
atoms, as many more as fill one second (200 at most: a short call needs more samples for a
steady minimum), and the peak
extra memory of the calls (CPU: peak RSS above the RSS after set-up; CUDA:
``max_memory_allocated``). The peer and molnets run in alternation,
``--rounds`` times each (``--small-rounds`` times up to 1000 atoms, whose rounds take seconds:
one worker process in three or four runs ~30% slower than the next on these machines), and the
tables give each side's best call over all its rounds (on a shared machine the minimum is the
least noisy estimate of a call's own cost, and alternation keeps a change of load from
favouring one side). The neighbor list is built outside the
timed call (molnets' ``neighbor_list``) and given to both sides; random weights, frozen on
both sides (``requires_grad_(False)``, as the ASE calculators of molnets and mace-torch run a
model: forces need the gradient with respect to positions only). ``--reuse-freed-memory`` runs
every worker, both sides alike, with glibc's malloc keeping freed memory in its heap
(``molnets.memory``: without it every tensor above 32 MB is a fresh mapping whose pages are
faulted in again at every call, which makes large systems superlinear). ``--keep-heap`` runs
every worker, both sides alike, with glibc's thresholds at their maxima (32 MiB mmap, 64 MiB
trim: the state ``molnets.memory.keep_heap_between_calls`` brings a process to, as
``MolnetsCalculator`` and the ``molnets`` command do), so that a call's temporaries below 32 MiB
are not faulted in again at every call, whatever the worker freed before.

``--compile`` adds columns: molnets' ``Potential`` compiled whole with inductor (energy and
forces one graph, dynamic sizes: ``MolnetsCalculator(compile="inductor")``) and, where a
compiled peer is set up here (PyG's SchNet: the module compiled, autograd outside;
torchmd-net's TensorNet: its representation model compiled, its own forces inside), the peer
compiled; compilation is not timed (the first call).

``--train`` times a training step instead, the same on both sides (``_training_step``): the
weights trainable, the model in training mode, energy and forces with the forces kept
differentiable (``create_graph``), the loss Σ E² + Σ |F|² and its backward to the weights; no
optimizer step (the same for every model, and small). molnets runs its differentiable layers
then (the frozen-weight kernels need frozen weights), as training does; no scaling table. An
extra system, "aspirin x16" (``molecule_batch``: 16 molecules beyond each other's cutoff, one
structure), stands for a training batch of molecules.

Rows: SchNet-style vs PyG's SchNet at the hyper-parameters of ../shared/PEERS.md (128
channels, 3 interactions, 50 Gaussians, 5 Å cutoff). The same molnets weights are copied
into PyG's SchNet (the two models compute the same function; energies are compared).
TensorNet-style vs torchmd-net's TensorNet (128 channels, 2 layers, 32 exp-normal functions,
5 Å, O(3)), same weights too; torchmd-net builds its own neighbor list inside its call.

To add a family (TensorNet vs torchmd-net, MACE vs mace-torch): write ``setup_<impl>``
functions (``(system, spec) -> step``, step() computing energy and forces) for both sides,
register them in ``IMPLS`` with the interpreter that runs them (``PEERS`` venvs for peers; a
peer's setup must only import what its venv has: numpy and torch are imported here), and
add a ``Family`` to ``FAMILIES``. Both then appear in the same tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
MAIN_PYTHON = sys.executable
PEERS = HERE / ".peers"
SCHNET = {"cutoff": 5.0, "num_channels": 128, "num_layers": 3, "num_basis": 50}
# up to this size a call takes milliseconds (1 s of calls, three untimed first) and a round of a side
# (one worker process) seconds (--small-rounds); above it 3 calls, one untimed first, --rounds
SMALL_ATOMS = 1000
TENSORNET = {"cutoff": 5.0, "num_channels": 128, "num_layers": 2, "num_rbf": 32}


# ------------------------------------------------------------------------------ systems


def cu_fcc(reps: int) -> "ase.Atoms":  # noqa: F821
    """Rattled fcc Cu, 4 reps**3 atoms."""
    import ase.build

    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)
    atoms.rattle(0.05, seed=1)
    return atoms


def systems(quick: bool = False) -> Dict[str, "ase.Atoms"]:  # noqa: F821
    """Rattled fcc Cu with 256 and 2048 atoms, ethanol and aspirin (21 atoms)."""
    import ase.build
    from _tensornet import aspirin

    out = {f"Cu fcc {4 * r**3}": cu_fcc(r) for r in ((4,) if quick else (4, 8))}
    out["ethanol"] = ase.build.molecule("CH3CH2OH")
    out["aspirin"] = aspirin()
    return out


def molecule_batch(copies: int = 16, spacing: float = 15.0) -> "ase.Atoms":  # noqa: F821
    """``copies`` aspirin molecules on a square grid ``spacing`` Å apart (farther than a cutoff
    plus a molecule's size): what a training batch of molecules costs, as one structure."""
    from _tensornet import aspirin

    side = math.ceil(math.sqrt(copies))
    batch = aspirin()[:0]
    for k in range(copies):
        molecule = aspirin()
        molecule.translate((spacing * (k % side), spacing * (k // side), 0.0))
        batch += molecule
    return batch


def scaling_systems(quick: bool = False) -> Dict[int, "ase.Atoms"]:  # noqa: F821
    """Rattled fcc Cu, 256 ... 16384 atoms."""
    return {4 * r**3: cu_fcc(r) for r in ((4, 8) if quick else (4, 8, 12, 16))}


def _system_spec(atoms) -> dict:
    periodic = bool(atoms.pbc.any())
    return {
        "numbers": atoms.numbers.tolist(),
        "positions": atoms.positions.tolist(),
        "cell": atoms.cell[:].tolist(),
        "pbc": atoms.pbc.tolist(),
        "periodic": periodic,
    }


def _molnets_graph(system: dict, cutoff: float, dtype: torch.dtype, device: str):
    from molnets.graph import AtomicGraph

    return AtomicGraph.from_positions(
        torch.tensor(system["positions"], dtype=torch.float64),
        torch.tensor(system["numbers"]),
        cutoff,
        cell=torch.tensor(system["cell"], dtype=torch.float64),
        pbc=torch.tensor(system["pbc"]),
    ).to(device, dtype)


# ----------------------------------------------------------------- implementations (workers)


def _schnet_model(spec: dict):
    from molnets.models import SchNet, SchNetConfig, load_model

    if spec.get("weights"):
        return load_model(spec["weights"])
    torch.manual_seed(0)
    return SchNet(SchNetConfig(species=tuple(spec["species"]), **SCHNET))


def _training_step(module: torch.nn.Module, energy_and_forces: Callable[[], tuple]) -> Callable[[], object]:
    """``--train``: one step of training on energies and forces, the same on every side: the
    loss Σ E² + Σ |F|² (forces kept differentiable, ``create_graph``) and its backward to the
    weights of ``module`` (their gradients cleared first); no optimizer step."""

    def step():
        module.zero_grad(set_to_none=True)
        energy, forces = energy_and_forces()
        (energy.square().sum() + forces.square().sum()).backward()
        return energy.detach().sum(), forces.detach()

    return step


def _molnets_step(model, cutoff: float, system: dict, spec: dict) -> Callable[[], object]:
    """Energy + forces of a molnets model through ``Potential``; compiled as
    ``MolnetsCalculator(compile="inductor")`` runs it: the whole ``Potential`` (energy and
    forces one graph), dynamic sizes. With ``train``: a training step (``_training_step``), the
    model's weights trainable and ``Potential`` in training mode (forces differentiable)."""
    from molnets.models import Potential

    dtype, device, train = getattr(torch, spec["dtype"]), spec["device"], spec.get("train", False)
    model = model.to(device, dtype).requires_grad_(train)  # frozen unless training, as calculators run models
    potential = Potential(model).train(train)
    if spec.get("compile"):
        potential = torch.compile(potential, fullgraph=True, dynamic=True)
    graph = _molnets_graph(system, cutoff, dtype, device)

    def energy_and_forces():
        out = potential(graph)
        return out["energy"].sum(), out["forces"]

    return _training_step(model, energy_and_forces) if train else energy_and_forces


def setup_molnets_schnet(system: dict, spec: dict) -> Callable[[], object]:
    return _molnets_step(_schnet_model(spec), SCHNET["cutoff"], system, spec)


def setup_molnets_schnet_compiled(system: dict, spec: dict) -> Callable[[], object]:
    return setup_molnets_schnet(system, dict(spec, compile=True))


class _GivenEdges(torch.nn.Module):
    """PyG's ``interaction_graph``: a fixed edge list, distances from positions and cell shifts."""

    def __init__(self, receivers, senders, offsets) -> None:
        super().__init__()
        self.edge_index = torch.stack([senders, receivers])  # PyG: row 0 = source j, row 1 = target i
        self.receivers, self.senders, self.offsets = receivers, senders, offsets

    def forward(self, pos, batch):
        vectors = pos[self.senders] - pos[self.receivers] + self.offsets   # [E, 3]
        return self.edge_index, vectors.norm(dim=-1)


def pyg_schnet_from_molnets(model):
    """PyG's SchNet with the weights of a molnets SchNet (same architecture, layer by layer)."""
    from torch_geometric.nn.models import SchNet as PygSchNet

    c = model.config
    peer = PygSchNet(
        hidden_channels=c.num_channels, num_filters=c.num_channels, num_interactions=c.num_layers,
        num_gaussians=c.num_basis, cutoff=c.cutoff, readout="add",
    ).to(model.embedding.weight.dtype)
    with torch.no_grad():
        # PyG builds its Gaussian centres and width in float32; use molnets' float64 ones.
        peer.distance_expansion.offset.copy_(model.radial.centers)
        peer.distance_expansion.coeff = -0.5 / model.radial.width**2
        peer.embedding.weight.zero_()
        peer.embedding.weight[list(c.species)] = model.embedding.weight
        for mine, theirs in zip(model.interactions, peer.interactions):
            theirs.mlp[0].load_state_dict(mine.filter[0].state_dict())
            theirs.mlp[2].load_state_dict(mine.filter[2].state_dict())
            theirs.conv.lin1.load_state_dict(mine.linear_in.state_dict())
            theirs.conv.lin2.load_state_dict(mine.update[0].state_dict())
            theirs.lin.load_state_dict(mine.update[2].state_dict())
        peer.lin1.load_state_dict(model.head.mlp[0].state_dict())
        peer.lin2.load_state_dict(model.head.mlp[2].state_dict())
    return peer


def setup_pyg_schnet(system: dict, spec: dict) -> Callable[[], object]:
    from molnets.graph import edge_vectors

    dtype, device = getattr(torch, spec["dtype"]), spec["device"]
    graph = _molnets_graph(system, SCHNET["cutoff"], dtype, device)
    offsets = (edge_vectors(graph) - graph.positions[graph.senders] + graph.positions[graph.receivers]).detach()
    train = spec.get("train", False)
    peer = pyg_schnet_from_molnets(_schnet_model(spec)).to(device, dtype).train(train).requires_grad_(train)
    peer.interaction_graph = _GivenEdges(graph.receivers, graph.senders, offsets)
    module = peer
    if spec.get("compile"):  # the usual way to compile a PyG model: the module, autograd outside
        peer = torch.compile(peer, dynamic=True)
    z = graph.atomic_numbers

    def energy_and_forces():
        pos = graph.positions.detach().requires_grad_(True)
        energy = peer(z, pos).sum()
        (grad,) = torch.autograd.grad(energy, [pos], create_graph=train)
        return energy, -grad

    return _training_step(module, energy_and_forces) if train else energy_and_forces


def setup_pyg_schnet_compiled(system: dict, spec: dict) -> Callable[[], object]:
    return setup_pyg_schnet(system, dict(spec, compile=True))


def _tensornet_model(spec: dict):
    from molnets.models import load_model
    from molnets.models.tensornet import TensorNet, TensorNetConfig

    if spec.get("weights"):
        return load_model(spec["weights"])
    torch.manual_seed(0)
    return TensorNet(TensorNetConfig(species=tuple(spec["species"]), **TENSORNET))


def setup_molnets_tensornet(system: dict, spec: dict) -> Callable[[], object]:
    return _molnets_step(_tensornet_model(spec), TENSORNET["cutoff"], system, spec)


def setup_molnets_tensornet_compiled(system: dict, spec: dict) -> Callable[[], object]:
    return setup_molnets_tensornet(system, dict(spec, compile=True))


def setup_torchmdnet_tensornet(system: dict, spec: dict) -> Callable[[], object]:
    """torchmd-net 3.1 TensorNet + Scalar head (its venv); it builds its neighbor list inside."""
    from _torchmdnet_peer import build

    dtype, device = getattr(torch, spec["dtype"]), spec["device"]
    box = system["cell"] if system["periodic"] else None
    peer_spec = dict(TENSORNET, dtype=spec["dtype"], state_dict=None)
    if spec.get("weights"):
        peer_spec["state_dict"] = spec["weights"] + ".torchmdnet.pt"
    train = spec.get("train", False)  # in training mode its forces are differentiable (create_graph)
    model = build(peer_spec, box).to(device).train(train).requires_grad_(train)
    if spec.get("compile"):  # its representation model (forces by autograd inside its forward)
        model.representation_model = torch.compile(model.representation_model, dynamic=True)
    z = torch.tensor(system["numbers"], device=device)
    pos0 = torch.tensor(system["positions"], dtype=dtype, device=device)
    box_t = torch.tensor(box, dtype=dtype, device=device) if box is not None else None

    def energy_and_forces():
        energy, forces = model(z, pos0.clone(), box=box_t)
        return (energy if train else energy.detach()).sum(), forces  # (no graph kept between calls)

    return _training_step(model, energy_and_forces) if train else energy_and_forces


def setup_torchmdnet_tensornet_compiled(system: dict, spec: dict) -> Callable[[], object]:
    return setup_torchmdnet_tensornet(system, dict(spec, compile=True))


# MACE-style vs mace-torch: ../shared/PEERS.md sizes; each side knows only the system's elements
MACE = {"cutoff": 5.0, "num_channels": 64, "lmax": 3, "hidden_lmax": 1, "correlation": 3, "num_layers": 2,
        "num_bessel": 8, "envelope_p": 5, "avg_num_neighbors": 20.0}


def setup_molnets_mace(system: dict, spec: dict) -> Callable[[], object]:
    from molnets.models.mace import MACE as MolnetsMACE, MACEConfig

    torch.manual_seed(0)
    model = MolnetsMACE(MACEConfig(species=tuple(sorted(set(system["numbers"]))), **MACE))
    return _molnets_step(model, MACE["cutoff"], system, spec)


def setup_molnets_mace_compiled(system: dict, spec: dict) -> Callable[[], object]:
    return setup_molnets_mace(system, dict(spec, compile=True))


def setup_mace_torch(system: dict, spec: dict) -> Callable[[], object]:
    """mace-torch's ScaleShiftMACE (residual interaction blocks), matscipy neighbor list (untimed)."""
    import mace  # noqa: F401  (before e3nn: see ../shared/PEERS.md)
    from e3nn import o3
    from mace.data.neighborhood import get_neighborhood
    from mace.modules import RealAgnosticResidualInteractionBlock, ScaleShiftMACE

    dtype, device = getattr(torch, spec["dtype"]), spec["device"]
    torch.set_default_dtype(dtype)
    species = sorted(set(system["numbers"]))
    torch.manual_seed(0)
    model = ScaleShiftMACE(
        r_max=MACE["cutoff"], num_bessel=MACE["num_bessel"], num_polynomial_cutoff=MACE["envelope_p"],
        max_ell=MACE["lmax"], interaction_cls=RealAgnosticResidualInteractionBlock,
        interaction_cls_first=RealAgnosticResidualInteractionBlock, num_interactions=MACE["num_layers"],
        num_elements=len(species), hidden_irreps=o3.Irreps(f"{MACE['num_channels']}x0e + {MACE['num_channels']}x1o"),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(species)),
        avg_num_neighbors=MACE["avg_num_neighbors"], atomic_numbers=species, correlation=MACE["correlation"],
        gate=torch.nn.functional.silu, atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    ).to(device, dtype)
    train = spec.get("train", False)
    model.train(train).requires_grad_(train)  # frozen unless training, as mace-torch's calculator does
    positions = np.array(system["positions"])
    cell = np.array(system["cell"])
    edge_index, shifts, unit_shifts, cell = get_neighborhood(
        positions, MACE["cutoff"], pbc=tuple(system["pbc"]), cell=cell if system["periodic"] else None
    )
    numbers = np.array(system["numbers"])
    one_hot = torch.nn.functional.one_hot(torch.tensor([species.index(z) for z in numbers]), len(species))
    n = len(numbers)
    data = {
        "positions": torch.tensor(positions, dtype=dtype, device=device),
        "node_attrs": one_hot.to(device, dtype),
        "edge_index": torch.tensor(edge_index, dtype=torch.long, device=device),
        "shifts": torch.tensor(shifts, dtype=dtype, device=device),
        "unit_shifts": torch.tensor(unit_shifts, dtype=dtype, device=device),
        "cell": torch.tensor(cell, dtype=dtype, device=device).reshape(3, 3),
        "batch": torch.zeros(n, dtype=torch.long, device=device),
        "ptr": torch.tensor([0, n], dtype=torch.long, device=device),
        "head": torch.zeros(1, dtype=torch.long, device=device),
    }

    def energy_and_forces():
        out = model(data, training=train, compute_force=True)  # training: forces differentiable
        return out["energy"].sum(), out["forces"]

    return _training_step(model, energy_and_forces) if train else energy_and_forces


# impl name -> (interpreter, setup function name)
IMPLS: Dict[str, tuple] = {
    "molnets-schnet": (MAIN_PYTHON, "setup_molnets_schnet"),
    "molnets-schnet-compiled": (MAIN_PYTHON, "setup_molnets_schnet_compiled"),
    "pyg-schnet": (MAIN_PYTHON, "setup_pyg_schnet"),
    "pyg-schnet-compiled": (MAIN_PYTHON, "setup_pyg_schnet_compiled"),
    "molnets-mace": (MAIN_PYTHON, "setup_molnets_mace"),
    "molnets-mace-compiled": (MAIN_PYTHON, "setup_molnets_mace_compiled"),
    "mace-torch": (str(PEERS / "mace" / "bin" / "python"), "setup_mace_torch"),
    "molnets-tensornet": (MAIN_PYTHON, "setup_molnets_tensornet"),
    "molnets-tensornet-compiled": (MAIN_PYTHON, "setup_molnets_tensornet_compiled"),
    "torchmdnet-tensornet": (str(PEERS / "torchmdnet" / "bin" / "python"), "setup_torchmdnet_tensornet"),
    "torchmdnet-tensornet-compiled": (str(PEERS / "torchmdnet" / "bin" / "python"),
                                      "setup_torchmdnet_tensornet_compiled"),
}


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def worker(impl: str, spec_path: str) -> None:
    """Time one implementation on each system of the spec in turn; print one JSON line each."""
    spec = json.load(open(spec_path))
    torch.set_num_threads(spec["threads"])
    for system in spec["systems"]:
        print(json.dumps(_time_one(impl, system, spec)), flush=True)


def _time_one(impl: str, system: dict, spec: dict) -> dict:
    large = len(system["numbers"]) > SMALL_ATOMS  # seconds per call on a CPU: fewer repeats, one warm-up
    repeats, warmup, min_time_s = (min(spec["repeats"], 3), 0, 0.0) if large else (spec["repeats"], 2, 1.0)
    step = globals()[IMPLS[impl][1]](system, spec)
    cuda = spec["device"].startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_kb()  # before the first call: ru_maxrss below is the process's lifetime peak
    energy, _ = step()
    for _ in range(warmup):
        step()
    sync()
    times = []  # at least `repeats` calls; short calls go on for `min_time_s` (200 at most)
    while len(times) < repeats or (sum(times) < 1e3 * min_time_s and len(times) < 200):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    return {"median_ms": statistics.median(times), "min_ms": min(times), "peak_mb": peak_mb, "energy": float(energy)}


# ------------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class Family:
    """One model family: the molnets implementation and its peer, on the same inputs."""

    model: str        # e.g. "SchNet-style"
    peer_name: str    # e.g. "PyG SchNet"
    ours: str         # impl name in IMPLS
    peer: str         # impl name in IMPLS
    same_weights: bool  # whether the peer is given molnets' weights (energies then must agree)
    # largest scaling system each side runs (more would not fit in this machine's 24 GB)
    peer_max_atoms: int = 16384
    ours_max_atoms: int = 16384
    peer_compiled: Optional[str] = None  # impl name of the peer under torch.compile, if timed


FAMILIES: List[Family] = [
    Family("SchNet-style", "PyG SchNet", "molnets-schnet", "pyg-schnet", same_weights=True,
           peer_compiled="pyg-schnet-compiled"),
    Family("MACE-style", "mace-torch MACE", "molnets-mace", "mace-torch", same_weights=False,
           peer_max_atoms=2048),
    Family("TensorNet-style", "torchmd-net TensorNet", "molnets-tensornet", "torchmdnet-tensornet",
           same_weights=True, peer_max_atoms=6912, peer_compiled="torchmdnet-tensornet-compiled"),
]


def run_impl(impl: str, atoms_list: list, args, dtype: str, weights: Optional[str]) -> List[dict]:
    """One worker process timing ``impl`` on each system of ``atoms_list`` in turn."""
    python, _ = IMPLS[impl]
    species = sorted({1, 6, 8, 29})
    spec = {"systems": [_system_spec(atoms) for atoms in atoms_list], "dtype": dtype, "threads": args.threads,
            "repeats": args.repeats, "device": args.device, "species": species, "weights": weights,
            "train": args.train}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spec.json")
        json.dump(spec, open(path, "w"))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        if args.reuse_freed_memory:  # molnets.memory.reuse_freed_memory, for both sides alike
            env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**31 - 1))
        elif args.keep_heap:  # molnets.memory.keep_heap_between_calls' state, for both sides alike
            env.update(MALLOC_MMAP_THRESHOLD_=str(32 << 20), MALLOC_TRIM_THRESHOLD_=str(64 << 20))
        done = subprocess.run([python, __file__, "--worker", impl, path], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{done.stderr[-3000:]}")
    # a peer may print too (warp's kernel-cache messages): keep the worker's result lines
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"median_ms"')]
    assert len(results) == len(atoms_list), done.stdout
    return results


def run_pair(family: Family, atoms_list: list, args, dtype: str, weights: Optional[str],
             with_peer: bool = True) -> List[Tuple[Optional[dict], dict]]:
    """The peer and molnets on the systems of ``atoms_list`` (one worker per side and round),
    in alternation for ``args.rounds`` rounds, ``args.small_rounds`` for systems of at most
    ``SMALL_ATOMS`` atoms (so that a change in the machine's load hits both sides; on these
    shared machines one worker process in three or four can run ~30% slower than the next, and
    a small system's round takes seconds); per system each side's best call ("min_ms") over all
    its rounds and repeats, the largest peak memory, the energy of its first round."""
    runs: Dict[str, List[List[dict]]] = {"peer": [], "ours": []}  # [round][system]
    small = max(len(atoms) for atoms in atoms_list) <= SMALL_ATOMS
    for _ in range(args.small_rounds if small else args.rounds):
        if with_peer:
            runs["peer"].append(run_impl(family.peer, atoms_list, args, dtype, weights))
        runs["ours"].append(run_impl(family.ours, atoms_list, args, dtype, weights))

    def best(rounds: List[List[dict]], k: int) -> Optional[dict]:
        if not rounds:
            return None
        results = [r[k] for r in rounds]
        return dict(results[0], min_ms=min(r["min_ms"] for r in results),
                    peak_mb=max(r["peak_mb"] for r in results))
    return [(best(runs["peer"], k), best(runs["ours"], k)) for k in range(len(atoms_list))]


def _weights(tmp: str, dtype: str, family: Family) -> str:
    """A saved molnets model with random weights, shared by both sides of a row (for TensorNet
    also under torchmd-net's names, in ``<path>.torchmdnet.pt``)."""
    from molnets.models import SchNet, SchNetConfig, save_model
    from molnets.models.tensornet import TensorNet, TensorNetConfig

    torch.manual_seed(0)
    path = os.path.join(tmp, f"{family.ours}-{dtype}.pt")
    if family.ours == "molnets-tensornet":
        from _tensornet import torchmdnet_state_dict

        model = TensorNet(TensorNetConfig(species=(1, 6, 8, 29), **TENSORNET)).to(getattr(torch, dtype))
        torch.save(torchmdnet_state_dict(model), path + ".torchmdnet.pt")
    else:
        model = SchNet(SchNetConfig(species=(1, 6, 8, 29), **SCHNET)).to(getattr(torch, dtype))
    save_model(model, path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2,
                        help=f"peer and molnets alternated this many times (systems above {SMALL_ATOMS} atoms)")
    parser.add_argument("--small-rounds", type=int, default=None,
                        help=f"the same for systems of at most {SMALL_ATOMS} atoms, whose rounds take seconds"
                             " (default 6; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    parser.add_argument("--quick", action="store_true", help="small systems only (a smoke run)")
    parser.add_argument("--compile", action="store_true",
                        help="also time molnets' Potential compiled whole (inductor, dynamic sizes) and the"
                             " peers that have a compiled variant here (PyG's SchNet, torchmd-net's TensorNet)")
    malloc = parser.add_mutually_exclusive_group()
    malloc.add_argument("--keep-heap", action="store_true",
                        help="every worker (both sides) with glibc's mmap and trim thresholds at their"
                             " maxima, 32 and 64 MiB (molnets.memory.keep_heap_between_calls, as"
                             " MolnetsCalculator runs)")
    malloc.add_argument("--reuse-freed-memory", action="store_true",
                        help="every worker (both sides) keeps freed memory in its heap (glibc's malloc:"
                             " no mmap, no trim; molnets.memory)")
    parser.add_argument("--molnets-only", action="store_true",
                        help="time molnets alone (no peer columns: '-'), e.g. to check a change quickly")
    parser.add_argument("--families", nargs="+", default=None, help="e.g. SchNet-style (default: all)")
    parser.add_argument("--systems", nargs="+", default=None, help="e.g. ethanol 'Cu fcc 256' (default: all)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling-with-N table")
    parser.add_argument("--scaling-only", action="store_true", help="only the scaling-with-N table")
    parser.add_argument("--train", action="store_true",
                        help="time a training step instead (loss on energies and forces, backward to the"
                             " weights); no scaling table")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.small_rounds is None:
        args.small_rounds = 1 if args.quick else 6
    if args.worker:
        return worker(*args.worker)
    if args.train and (args.compile or args.scaling_only):
        parser.error("--train times eager training steps: not with --compile or --scaling-only")
    args.no_scaling = args.no_scaling or args.train

    what = ("training step (loss Σ E² + Σ |F|², backward to the weights)" if args.train
            else "energy + forces")
    print(f"# {what} per call, best of {args.rounds} alternated rounds ({args.small_rounds} up to {SMALL_ATOMS} atoms)"
          f" x {args.repeats} calls "
          f"(or 1 s of calls, up to 200; 3 calls above {SMALL_ATOMS} atoms), {args.threads} threads, {args.device}, torch {torch.__version__}; "
          f"neighbor list given; malloc: "
          f"{'heap kept' if args.keep_heap else 'freed memory reused' if args.reuse_freed_memory else 'glibc defaults'}"
          f" (both sides)\n")
    compiled = " peer compiled (ms) | molnets compiled (ms) | compiled vs peer's best |" if args.compile else ""
    print(f"| model | peer | system | atoms | dtype | peer (ms) | molnets (ms) | speed-up |{compiled}")
    print("|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.compile else ""))
    families = [f for f in FAMILIES if args.families is None or f.model in args.families]
    with tempfile.TemporaryDirectory() as tmp:
        for family in families if not args.scaling_only else []:
            for dtype in args.dtype:
                weights = _weights(tmp, dtype, family) if family.same_weights else None
                candidates = dict(systems(args.quick), **({"aspirin x16": molecule_batch()} if args.train else {}))
                chosen = [(name, atoms) for name, atoms in candidates.items()
                          if args.systems is None or name in args.systems]
                for batch in _worker_batches(chosen, args.device):
                    results = run_pair(family, [atoms for _, atoms in batch], args, dtype, weights,
                                       with_peer=not args.molnets_only)
                    compiled_results = [None] * len(batch)
                    peer_compiled_results = [None] * len(batch)
                    if args.compile:
                        batch_atoms = [atoms for _, atoms in batch]
                        compiled_results = run_impl(family.ours + "-compiled", batch_atoms, args, dtype, weights)
                        if family.peer_compiled and not args.molnets_only:
                            peer_compiled_results = run_impl(family.peer_compiled, batch_atoms, args, dtype, weights)
                    for (name, atoms), (peer, ours), fast, peer_fast in zip(
                            batch, results, compiled_results, peer_compiled_results):
                        if family.same_weights and peer is not None:
                            # float64: PyG's shifted softplus subtracts a float32 ln 2 (2e-9 off).
                            tol = (1e-3 if dtype == "float32" else 1e-6) * max(1.0, abs(ours["energy"]))
                            assert abs(ours["energy"] - peer["energy"]) < tol, (family, name, ours, peer)
                        peer_cell, speed_up = ("-", "-") if peer is None else (  # None: --molnets-only
                            f"{peer['min_ms']:.2f}", f"{peer['min_ms'] / ours['min_ms']:.2f}x")
                        row = (f"| {family.model} | {family.peer_name} | {name} | {len(atoms)} | {dtype} | "
                               f"{peer_cell} | {ours['min_ms']:.2f} | {speed_up} |")
                        if fast is not None:
                            assert abs(fast["energy"] - ours["energy"]) < 1e-4 * max(1.0, abs(ours["energy"]))
                            peer_bests = [r["min_ms"] for r in (peer, peer_fast) if r is not None]
                            peer_cell = "-" if peer_fast is None else f"{peer_fast['min_ms']:.2f}"
                            ratio = f"{min(peer_bests) / fast['min_ms']:.2f}x" if peer_bests else "-"
                            row += f" {peer_cell} | {fast['min_ms']:.2f} | {ratio} |"
                        print(row, flush=True)

        if args.no_scaling:
            return
        print("\n# scaling with N: rattled fcc Cu, float32, energy + forces per call; "
              "~42 neighbors per atom at 5 Å; memory = peak extra memory of the call\n")
        print("| model | atoms | peer (ms) | peer (MB) | molnets (ms) | molnets (MB) | molnets µs/atom |")
        print("|---|---|---|---|---|---|---|")
        for family in families:
            weights = _weights(tmp, "float32", family) if family.same_weights else None
            sizes = [(n, atoms) for n, atoms in scaling_systems(args.quick).items() if n <= family.ours_max_atoms]
            for with_peer in (True, False):
                chosen = [(n, atoms) for n, atoms in sizes if (n <= family.peer_max_atoms) == with_peer]
                for batch in _worker_batches(chosen, args.device):
                    results = run_pair(family, [atoms for _, atoms in batch], args, "float32", weights,
                                       with_peer and not args.molnets_only)
                    for (n, _), (peer, ours) in zip(batch, results):
                        peer_cells = f"{peer['min_ms']:.1f} | {peer['peak_mb']:.0f}" if peer else "- | -"
                        print(f"| {family.model} | {n} | {peer_cells} | {ours['min_ms']:.1f} | {ours['peak_mb']:.0f} | "
                              f"{1e3 * ours['min_ms'] / n:.1f} |", flush=True)


def _worker_batches(items: list, device: str) -> List[list]:
    """Systems timed by one worker process each: on the CPU one system per process (peak RSS is
    a process's lifetime peak); on CUDA all in one process (the peak is reset per system), which
    saves the start-up of a CUDA process per system."""
    if not items:
        return []
    return [items] if device.startswith("cuda") else [[item] for item in items]

if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
