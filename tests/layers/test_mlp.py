"""MLP: the shifted softplus's -ln 2 folded into the next layer's bias changes no number."""

import math

import pytest
import torch
from torch import nn

from molnets.layers import mlp as mlp_module
from molnets.layers.mlp import MLP, ShiftedSoftplus


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_with_folded_shift_equals_the_layers_in_sequence(bias, fold, monkeypatch):
    """Both ways MLP.forward runs a shifted softplus: folded into the next bias (large inputs)
    and subtracted (small inputs)."""
    monkeypatch.setattr(mlp_module, "_FOLD_MIN_NUMEL", 0 if fold else 1 << 30)
    torch.manual_seed(0)
    mlp = MLP([5, 7, 6, 3], activation="ssp", bias=bias).double()
    if bias:
        for layer in mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.bias)  # non-zero biases: the fold must keep them
    x = torch.randn(4, 5, dtype=torch.float64)
    expected = x
    for layer in mlp:  # each layer on its own, ssp(x) = softplus(x) - ln 2
        expected = layer(expected)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-14, atol=1e-14)
    assert isinstance(mlp[1], ShiftedSoftplus)
    torch.testing.assert_close(mlp[1](torch.zeros(1, dtype=torch.float64)), torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(mlp[1](torch.ones(1, dtype=torch.float64)),
                               torch.tensor([math.log(0.5 * math.e + 0.5)], dtype=torch.float64))


def test_silu_mlp_unchanged():
    torch.manual_seed(1)
    mlp = MLP([3, 4, 2]).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), mlp[2](torch.nn.functional.silu(mlp[0](x))))
