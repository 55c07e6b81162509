"""DDP: `torchrun --nproc-per-node 2 ... molnets train` (gloo, CPU) equals one process."""

import os
import subprocess
import sys

import torch
import yaml

from molnets.training import TrainConfig, train


def test_two_processes_match_one_with_the_same_global_batch(tiny_xyz, tmp_path):
    options = dict(
        train_file=tiny_xyz, model="schnet", cutoff=4.0,
        model_config=dict(num_channels=8, num_basis=6, num_layers=1),
        batch_size=4, max_epochs=2, dtype="float64", progress=False,
        valid_fraction=0.125, test_fraction=0.125,  # 3 validation structures: uneven shards
    )
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({**options, "output_dir": str(tmp_path / "ddp")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "molnets.cli", "--threads", "1", "train", "--config", str(config_file)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = train(TrainConfig(**options, output_dir=str(tmp_path / "single")))
    ddp = torch.load(tmp_path / "ddp/checkpoint.pt", weights_only=True)
    one = torch.load(tmp_path / "single/checkpoint.pt", weights_only=True)
    for key, value in one["potential"].items():
        torch.testing.assert_close(ddp["potential"][key], value, rtol=1e-9, atol=1e-12)
    for row_ddp, row_one in zip(ddp["history"], single.history):
        for key in ("train_forces_mae", "valid_forces_mae", "valid_energy_mae"):
            assert abs(row_ddp[key] - row_one[key]) < 1e-9 * max(1.0, abs(row_one[key]))
