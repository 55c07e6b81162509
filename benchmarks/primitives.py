"""Primitive benchmark: molnets' equivariant primitives against e3nn 0.6 and torch_scatter, one run.

    python benchmarks/primitives.py [--quick] [--threads 2] [--repeats 5] [--only sh,tp,scatter]

Rows (time per call: the best, over alternated rounds, of the mean of a batch of consecutive
calls lasting at least 20 ms, after a warm-up; CPU):
- spherical harmonics, lmax 3 and 6, 1e3..1e6 random vectors (normalized, "component"):
  ``molnets.layers.spherical_harmonics.spherical_harmonics`` vs ``e3nn.o3.spherical_harmonics``;
- the channelwise tensor product of the MACE message, 64x0e+64x1o+64x2e+64x3o node features
  (x) lmax-3 harmonics -> every path to 0e+1o+2e+3o (23 paths, 6336 outputs per edge) with
  per-edge weights, 1e4 and 1e5 edges: ``ChannelwiseTensorProduct`` vs e3nn's
  ``TensorProduct(..., shared_weights=False, internal_weights=False)`` with the same
  instructions (the two outputs are compared before timing);
- scatter-sum of [E, 64] edge messages into E/32 atoms: ``molnets.layers.scatter.scatter_sum``
  (native ``index_add``) vs ``torch_scatter.scatter_add``. torch_scatter lives in its own venv
  (``bash benchmarks/setup_peers.sh scatter``), so those rows run in a subprocess of that venv,
  which loads molnets' scatter module from this checkout.

Each row is timed forward only ("fwd") and forward + backward of a random cotangent
("fwd+bwd"), in float32 and float64. A row whose estimated memory exceeds what the machine has
free is skipped and says so. The ratio is peer time / molnets time (> 1: molnets is faster).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
SCATTER_PYTHON = HERE / ".peers" / "scatter" / "bin" / "python"
NODE_IRREPS = "64x0e + 64x1o + 64x2e + 64x3o"
SH_IRREPS = "1x0e + 1x1o + 1x2e + 1x3o"


def measure(fns: Dict[str, Callable[[], object]], repeats: int, budget_s: float = 30.0,
            min_batch_s: float = 0.02) -> Dict[str, float]:
    """Seconds per call of each fn(): the best, over up to `repeats` rounds, of the mean of a
    batch of k consecutive calls (k per fn, so that a batch lasts at least `min_batch_s`, as
    timeit's autorange does: a short call is then not timer noise, and each implementation is
    timed in its steady state, not in the cache and allocator state the other one left).

    The implementations take turns round by round, so that a busy machine slows both alike;
    the minimum is the least noisy estimate of a call's own cost on a shared machine.
    """
    batch = {}
    for name, fn in fns.items():
        fn()  # warm-up
        t0 = time.perf_counter()
        fn()
        batch[name] = max(1, math.ceil(min_batch_s / max(time.perf_counter() - t0, 1e-7)))
    times: Dict[str, List[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(repeats):
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(batch[name]):
                fn()
            times[name].append((time.perf_counter() - t0) / batch[name])
    return {name: min(values) for name, values in times.items()}


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _step(forward: Callable[[], torch.Tensor], backward: bool) -> Callable[[], object]:
    """One timed call: forward, or forward + backward of a fixed random cotangent."""
    if not backward:
        def run() -> object:
            with torch.no_grad():
                return forward()
        return run
    cotangent = torch.randn_like(forward().detach())

    def run_backward() -> object:
        forward().backward(cotangent)
        return None
    return run_backward


def spherical_harmonics_rows(args: argparse.Namespace) -> List[dict]:
    from e3nn import o3

    from molnets.layers.spherical_harmonics import spherical_harmonics

    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000]
    rows = []
    for dtype in (torch.float32, torch.float64):
        for lmax in (3, 6):
            for n in sizes:
                vectors = torch.randn(n, 3, dtype=dtype, generator=torch.Generator().manual_seed(n))
                ours_fn = lambda x, lmax=lmax: spherical_harmonics(x, lmax)  # noqa: E731
                e3nn_fn = lambda x, lmax=lmax: o3.spherical_harmonics(  # noqa: E731
                    list(range(lmax + 1)), x, normalize=True, normalization="component")
                error = (ours_fn(vectors) - e3nn_fn(vectors)).abs().max().item()
                assert error < (1e-4 if dtype == torch.float32 else 1e-10), error
                for backward in (False, True):
                    x = vectors.clone().requires_grad_(backward)
                    times = measure({name: _step(lambda f=f: f(x), backward)
                                     for name, f in (("t_molnets", ours_fn), ("t_peer", e3nn_fn))}, args.repeats)
                    rows.append(dict(primitive=f"spherical harmonics lmax {lmax}", peer="e3nn",
                                     size=f"{n:.0e} vectors", dtype=str(dtype)[6:],
                                     mode="fwd+bwd" if backward else "fwd", **times))
    return rows


def tensor_product_rows(args: argparse.Namespace) -> List[dict]:
    from e3nn import o3

    from molnets.layers.tensor_product import ChannelwiseTensorProduct, uvu_instructions

    irreps_in, irreps_sh = o3.Irreps(NODE_IRREPS), o3.Irreps(SH_IRREPS)
    irreps_mid, instructions = uvu_instructions(irreps_in, irreps_sh, irreps_in)
    sizes = [10_000] if args.quick else [10_000, 100_000]
    rows = []
    for dtype in (torch.float32, torch.float64):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # e3nn rounds its constants to the dtype it is built in
        ours = ChannelwiseTensorProduct(irreps_in, irreps_sh, irreps_mid, instructions)
        peer = o3.TensorProduct(irreps_in, irreps_sh, irreps_mid, instructions, shared_weights=False,
                                internal_weights=False)
        torch.set_default_dtype(previous)
        for num_edges in sizes:
            generator = torch.Generator().manual_seed(num_edges)
            x1 = torch.randn(num_edges, irreps_in.dim, dtype=dtype, generator=generator)
            x2 = torch.randn(num_edges, irreps_sh.dim, dtype=dtype, generator=generator)
            w = torch.randn(num_edges, ours.weight_numel, dtype=dtype, generator=generator)
            with torch.no_grad():
                small = slice(0, 100)
                error = (ours(x1[small], x2[small], w[small]) - peer(x1[small], x2[small], w[small])).abs().max()
                assert error.item() < (1e-4 if dtype == torch.float32 else 1e-10), error
            for backward in (False, True):
                row = dict(primitive="channelwise TP (MACE, lmax 3)", peer="e3nn", size=f"{num_edges:.0e} edges",
                           dtype=str(dtype)[6:], mode="fwd+bwd" if backward else "fwd")
                # numbers per edge and channel: 99 outputs (x2 with a cotangent and a gradient when
                # backward), e3nn's x1 (x) x2 outer products (up to 49 at a time, all 256 kept
                # for the backward)
                per_channel = 4 * 99 + 256 if backward else 2 * 99 + 49
                need = num_edges * 64 * per_channel * torch.finfo(dtype).bits // 8
                if need > 0.7 * available_bytes():
                    rows.append(dict(row, skipped=f"needs ~{need / 2**30:.0f} GiB of memory"))
                    continue
                inputs = [t.clone().requires_grad_(backward) for t in (x1, x2, w)]
                times = measure({name: _step(lambda m=module: m(*inputs), backward)
                                 for name, module in (("t_molnets", ours), ("t_peer", peer))}, args.repeats)
                rows.append(dict(row, **times))
    return rows


def scatter_worker(args: argparse.Namespace) -> None:
    """Runs in the torch_scatter venv: prints one JSON line per row."""
    import importlib
    import types

    import torch_scatter

    torch.set_num_threads(args.threads)
    # molnets' scatter module (and the kernels module it imports) is plain torch: load it from
    # the checkout as a bare package, without molnets' __init__ (which needs e3nn, ase)
    package = types.ModuleType("_molnets_layers")
    package.__path__ = [str(SRC / "molnets" / "layers")]
    sys.modules["_molnets_layers"] = package
    module = importlib.import_module("_molnets_layers.scatter")
    sizes = [100_000] if args.quick else [100_000, 1_000_000]
    for dtype in (torch.float32, torch.float64):
        for num_edges in sizes:
            num_atoms = num_edges // 32
            generator = torch.Generator().manual_seed(num_edges)
            receivers = torch.randint(0, num_atoms, (num_edges,), generator=generator).sort().values
            messages = torch.randn(num_edges, 64, dtype=dtype, generator=generator)
            ours_fn = lambda x: module.scatter_sum(x, receivers, dim_size=num_atoms)  # noqa: E731
            peer_fn = lambda x: torch_scatter.scatter_add(x, receivers, dim=0, dim_size=num_atoms)  # noqa: E731
            assert torch.allclose(ours_fn(messages), peer_fn(messages), atol=1e-4)
            for backward in (False, True):
                x = messages.clone().requires_grad_(backward)
                times = measure({name: _step(lambda f=f: f(x), backward)
                                 for name, f in (("t_molnets", ours_fn), ("t_peer", peer_fn))}, args.repeats)
                print(json.dumps(dict(primitive="scatter-sum [E, 64] -> [E/32, 64]", peer="torch_scatter",
                                      size=f"{num_edges:.0e} edges", dtype=str(dtype)[6:],
                                      mode="fwd+bwd" if backward else "fwd", **times)), flush=True)


def scatter_rows(args: argparse.Namespace) -> List[dict]:
    if not SCATTER_PYTHON.exists():
        return [dict(primitive="scatter-sum", peer="torch_scatter", size="-", dtype="-", mode="-",
                     skipped="no venv: run `bash benchmarks/setup_peers.sh scatter`")]
    command = [str(SCATTER_PYTHON), __file__, "--scatter-worker", "--threads", str(args.threads),
               "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def markdown(rows: List[dict], threads: int) -> str:
    lines = [f"CPU, {threads} threads, torch {torch.__version__}; time per call: best of up to --repeats alternated rounds, each the mean of >= 20 ms of consecutive calls.", "",
             "| primitive | size | dtype | pass | peer | peer ms | molnets ms | peer / molnets |",
             "|---|---|---|---|---|---:|---:|---:|"]
    for row in rows:
        head = f"| {row['primitive']} | {row['size']} | {row['dtype']} | {row['mode']} | {row['peer']} |"
        if "skipped" in row:
            lines.append(f"{head} skipped: {row['skipped']} | | |")
        else:
            ratio = row["t_peer"] / row["t_molnets"]
            lines.append(f"{head} {row['t_peer'] * 1e3:.2f} | {row['t_molnets'] * 1e3:.2f} | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (about a minute)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="sh,tp,scatter",
                        help="comma-separated sections to run: sh (spherical harmonics), tp, scatter")
    parser.add_argument("--scatter-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scatter_worker:
        scatter_worker(args)
        return
    torch.set_num_threads(args.threads)
    sections = {"sh": spherical_harmonics_rows, "tp": tensor_product_rows, "scatter": scatter_rows}
    chosen = args.only.split(",")
    unknown = sorted(set(chosen) - set(sections))
    if unknown:
        parser.error(f"--only: unknown sections {unknown}, choose from {sorted(sections)}")
    rows = []
    for section in (sections[name] for name in sections if name in chosen):
        start = time.perf_counter()
        rows += section(args)
        print(f"{section.__name__}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(markdown(rows, args.threads))


if __name__ == "__main__":
    main()
