"""torchmd-net's TensorNet, timed: run with the torchmd-net venv's python, not molnets'.

    benchmarks/.peers/torchmdnet/bin/python benchmarks/_torchmdnet_peer.py SPEC.json

SPEC.json: {"dtype": "float32" | "float64", "cutoff": 5.0, "num_channels": 128,
"num_layers": 2, "num_rbf": 32, "repeats": 10, "threads": 2, "state_dict": PATH or null,
"systems": [{"name": str, "numbers": [Z], "positions": [[x, y, z]], "cell": [[3x3]] or null}]}

Prints one JSON object {name: {"median_ms", "min_ms", "min_cpu_ms" (process CPU time),
"energy", "forces" (if state_dict)}}:
energy + forces (autograd, torchmd-net's own ``derivative=True`` path) per call, the model's
own neighbor list included (torchmd-net builds it inside the model). With ``state_dict``
(a file of torchmd-net-named weights, see ``benchmarks/tensornet_peer.py``) the energies and
forces come back too, so that molnets can check it computes the same function.
"""

import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("WARP_CACHE_PATH", os.path.join(tempfile.gettempdir(), "molnets-warp-cache"))

import torch  # noqa: E402
from torchmdnet.models.model import create_model  # noqa: E402


def build(spec, box):
    args = {
        "model": "tensornet",
        "embedding_dimension": spec["num_channels"],
        "num_layers": spec["num_layers"],
        "num_rbf": spec["num_rbf"],
        "rbf_type": "expnorm",
        "trainable_rbf": False,
        "activation": "silu",
        "cutoff_lower": 0.0,
        "cutoff_upper": spec["cutoff"],
        "max_z": 128,
        "max_num_neighbors": 128,
        "equivariance_invariance_group": "O(3)",
        "static_shapes": False,
        "box_vecs": box,
        "precision": 64 if spec["dtype"] == "float64" else 32,
        "derivative": True,
        "atom_filter": -1,
        "prior_model": None,
        "output_model": "Scalar",
        "reduce_op": "sum",
    }
    model = create_model(args)
    if spec.get("state_dict"):
        model.load_state_dict(torch.load(spec["state_dict"], weights_only=True), strict=False)
    return model.eval()


def main(path):
    spec = json.load(open(path))
    torch.set_num_threads(int(spec.get("threads", 2)))
    dtype = torch.float64 if spec["dtype"] == "float64" else torch.float32
    results = {}
    for system in spec["systems"]:
        torch.manual_seed(0)
        box = system.get("cell")
        model = build(spec, box)
        z = torch.tensor(system["numbers"], dtype=torch.long)
        pos0 = torch.tensor(system["positions"], dtype=dtype)
        box_t = torch.tensor(box, dtype=dtype) if box is not None else None
        times, cpu_times = [], []
        for k in range(int(spec["repeats"]) + 2):  # two warm-up calls: Warp compiles kernels
            pos = pos0.clone()
            start, cpu_start = time.perf_counter(), time.process_time()
            energy, forces = model(z, pos, box=box_t)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if k >= 2:
                times.append(elapsed * 1e3)
                cpu_times.append(cpu * 1e3)
        out = {
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "min_cpu_ms": min(cpu_times),
            "energy": float(energy.detach().sum()),
        }
        if spec.get("state_dict"):
            out["forces"] = forces.detach().double().tolist()
        results[system["name"]] = out
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
