"""A user's subclass of a molnets model (another readout) runs the public suite and saves/loads."""

from __future__ import annotations

import pytest
import torch

from molnets import testing
from molnets.layers.readout import EnergyHead
from molnets.models import Potential, SchNet, SchNetConfig, load_model, save_model


class SchNetLinearReadout(SchNet):
    """SchNet with a linear per-atom energy head instead of the two-layer MLP."""

    def __init__(self, config: SchNetConfig) -> None:
        super().__init__(config)
        self.head = EnergyHead([config.num_channels, 1])


def _model() -> SchNetLinearReadout:
    torch.manual_seed(0)
    return SchNetLinearReadout(SchNetConfig(species=(1, 6, 8), cutoff=3.5, num_channels=8, num_basis=6, num_layers=2))


def test_subclass_passes_the_suite():
    model = _model()
    for check in (testing.check_o3_equivariance, testing.check_batching, testing.check_forces_finite_difference,
                  testing.check_cutoff_smoothness, testing.check_periodic_images):
        check(model)


def test_subclass_save_load(tmp_path):
    model = _model().double()
    save_model(model, tmp_path / "mine.pt")
    loaded = load_model(tmp_path / "mine.pt", model_type=SchNetLinearReadout)
    assert type(loaded) is SchNetLinearReadout
    graph = testing.random_graph(6, cutoff=3.5, seed=3)
    torch.testing.assert_close(Potential(loaded).eval()(graph)["forces"], Potential(model).eval()(graph)["forces"])


def test_subclass_file_without_model_type_names_the_fix(tmp_path):
    save_model(_model(), tmp_path / "mine.pt")
    with pytest.raises(ValueError, match="model_type"):  # SchNet's head has other weights
        load_model(tmp_path / "mine.pt")
