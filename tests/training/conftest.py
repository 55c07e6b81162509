"""Shared fixtures of the training tests: one thread (tiny tensors), a tiny EMT data set."""

import ase.io
import pytest
import torch

from molnets.training.synthetic import emt_dataset


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest on one thread, and the CI machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_frames():
    """24 Cu/Au structures of 8 atoms with EMT energy, forces, stress."""
    return emt_dataset(24, repeat=(2, 1, 1), seed=0)


@pytest.fixture(scope="session")
def tiny_xyz(tiny_frames, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.xyz"
    ase.io.write(path, tiny_frames)
    return str(path)
