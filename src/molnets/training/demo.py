"""``molnets demo``: the whole workflow on data made on the fly, every file in one folder.

1. ``data.xyz``: Cu/Au fcc alloys from ASE EMT Langevin MD (``synthetic.emt_dataset``);
2. ``training/``: a model trained within a time budget (checkpoint, best model, logs, plots);
3. the test-set errors, printed next to those of a trivial baseline (zero forces);
4. ``md.traj``: NVE molecular dynamics with the trained model through ``MolnetsCalculator``.
"""

from __future__ import annotations

import os
import time
from typing import Dict, Optional

__all__ = ["run_demo", "DEMO_MODEL_CONFIGS", "DEMO_CUTOFF"]

# Small models that learn EMT Cu/Au within minutes on a laptop CPU.
# The cutoff is 4 Å (the first two neighbor shells of fcc Cu; EMT's own reach is longer, and
# two message-passing layers see 8 Å): 5 Å would triple the edges and the cost per step.
DEMO_CUTOFF = 4.0
DEMO_MODEL_CONFIGS: Dict[str, Dict] = {
    "mace": dict(num_channels=16, lmax=2, correlation=3, num_layers=2, radial_mlp=(32, 32)),
    "tensornet": dict(num_channels=32, num_layers=2, num_rbf=16),
    "schnet": dict(num_channels=32, num_basis=20, num_layers=3),
}
_QUICK_MODEL_CONFIGS: Dict[str, Dict] = {
    "mace": dict(num_channels=4, lmax=1, correlation=2, num_layers=1, radial_mlp=(8,), readout_hidden=4),
    "tensornet": dict(num_channels=4, num_layers=1, num_rbf=8),
    "schnet": dict(num_channels=8, num_basis=8, num_layers=1),
}


def run_demo(
    output_dir: str = "molnets-demo",
    *,
    model: str = "mace",
    time_budget: float = 200.0,
    quick: bool = False,
    num_structures: Optional[int] = None,
    md_steps: Optional[int] = None,
    seed: int = 0,
) -> Dict[str, float]:
    """Run the demo; returns the test metrics (eV/atom, eV/Å, eV/Å³) and MD numbers.

    Args:
        output_dir: the one folder every file goes to.
        model: "schnet", "tensornet" or "mace".
        time_budget: seconds of training (checked after each epoch).
        quick: tiny data (8-atom cells), a tiny model and 3 epochs: seconds, for tests.
        num_structures: structures to generate (default 240; 24 with ``quick``).
        md_steps: NVE steps of the final MD (default 200; 10 with ``quick``).
        seed: seed of the data, the split and the weights.
    """
    import ase.io
    import numpy as np

    from ..cli import run_md
    from .synthetic import emt_dataset
    from .trainer import TrainConfig, train

    out = os.path.abspath(output_dir)
    os.makedirs(out, exist_ok=True)
    num_structures = num_structures or (24 if quick else 240)
    md_steps = md_steps if md_steps is not None else (10 if quick else 200)
    print(f"molnets demo: every file goes to {out}", flush=True)

    t0 = time.perf_counter()
    repeat = (2, 1, 1) if quick else (2, 2, 2)
    frames = emt_dataset(num_structures, repeat=repeat, seed=seed)
    data_path = os.path.join(out, "data.xyz")
    ase.io.write(data_path, frames)
    print(f"[1/4] {len(frames)} Cu/Au structures of {len(frames[0])} atoms from EMT Langevin MD at "
          f"1200 K -> {data_path} ({time.perf_counter() - t0:.0f} s)", flush=True)

    config = TrainConfig(
        train_file=data_path,
        model=model,
        cutoff=DEMO_CUTOFF,
        model_config=dict((_QUICK_MODEL_CONFIGS if quick else DEMO_MODEL_CONFIGS)[model]),
        batch_size=4 if quick else 8,
        max_epochs=3 if quick else 10_000,
        max_time=None if quick else time_budget,
        lr=5e-3,
        scheduler="plateau",
        scheduler_patience=4,
        early_stopping_patience=15,
        forces_weight=10.0,
        dtype="float32",
        seed=seed,
        output_dir=os.path.join(out, "training"),
        progress=not quick,
    )
    budget = "3 epochs" if quick else f"a budget of {time_budget:.0f} s"
    print(f"[2/4] training a {model} model ({config.model_config}) for {budget}", flush=True)
    t1 = time.perf_counter()
    result = train(config)
    train_seconds = time.perf_counter() - t1

    metrics = dict(result.test_metrics)
    test_forces = np.concatenate([f.get_forces().reshape(-1) for f in frames])
    print(f"[3/4] test set after {result.epochs_run} epochs ({train_seconds:.0f} s of training):", flush=True)
    print(f"      energy MAE {1000 * metrics['energy_mae']:.2f} meV/atom, RMSE {1000 * metrics['energy_rmse']:.2f}")
    print(f"      forces MAE {1000 * metrics['forces_mae']:.1f} meV/Å, RMSE {1000 * metrics['forces_rmse']:.1f} "
          f"(for scale: the mean |force component| of the data is {1000 * np.abs(test_forces).mean():.0f} meV/Å)")
    if "stress_mae" in metrics:
        print(f"      stress MAE {1000 * metrics['stress_mae']:.2f} meV/Å³")
    print(f"      plots: {os.path.join(config.output_dir, 'parity_forces.png')} and the others there", flush=True)

    md_path = os.path.join(out, "md.traj")
    md = run_md(os.path.join(config.output_dir, "best_model.pt"), frames[-1], output=md_path, steps=md_steps,
                timestep=2.0, temperature=300.0, ensemble="nve", interval=max(md_steps // 20, 1),
                dtype="float64", seed=seed)
    print(f"[4/4] {md_steps} NVE steps (2 fs) with the trained model: {1000 * md['seconds'] / max(md_steps, 1):.0f} "
          f"ms/step, total-energy change {1000 * md['energy_drift_per_atom']:.2f} meV/atom -> {md_path}", flush=True)
    metrics.update({f"md_{k}": v for k, v in md.items()})
    metrics["seconds"] = time.perf_counter() - t0
    print(f"done in {metrics['seconds']:.0f} s; files in {out}:")
    for root, _, files in sorted(os.walk(out)):
        for name in sorted(files):
            print("   ", os.path.relpath(os.path.join(root, name), out))
    return metrics
