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


@pytest.mark.parametrize("with_envelope", [True, False], ids=["envelope", "no envelope"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("network", ["mlp", "linear"])
def test_radial_filter_of_a_frozen_network_chunk_by_chunk_equals_plain_operations(network, activation, with_envelope,
                                                                                 monkeypatch):
    """radial_filter with frozen weights on large activations runs FrozenFilter (forward
    chunk by chunk, backward recomputing each chunk): values and the gradients of e and u equal
    the plain operations' to 1e-13, gradcheck and gradgradcheck (the double backward goes
    through the plain operations); trainable weights take the plain operations."""
    from torch.nn import functional as F

    from molnets.layers import _message_kernels
    from molnets.layers.mlp import radial_filter

    monkeypatch.setattr(_message_kernels, "CHUNK_NUMEL", 24)                  # a few rows per chunk
    monkeypatch.setattr(_message_kernels, "FRESH_MAPPING_BYTES", 0)           # and on a small input
    monkeypatch.setattr(_message_kernels, "freed_memory_is_reused", lambda: False)  # (`molnets md` in this process)
    torch.manual_seed(0)
    net = (MLP([5, 12, 16], activation="ssp") if network == "mlp" else nn.Linear(5, 16)).double()
    sigma = None if activation is None else F.silu
    e = torch.randn(23, 5, dtype=torch.float64, requires_grad=True)
    u = torch.rand(23, dtype=torch.float64, requires_grad=True) if with_envelope else None
    inputs = (e, u) if with_envelope else (e,)
    plain = radial_filter(net, e, u, sigma)                                   # trainable: plain operations
    assert "FrozenFilter" not in type(plain.grad_fn).__name__
    net.requires_grad_(False)
    out = radial_filter(net, e, u, sigma)
    assert type(out.grad_fn).__name__ == "FrozenFilterBackward"
    torch.testing.assert_close(out, plain, atol=1e-13, rtol=1e-13)
    g = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(plain, inputs, g)):
        torch.testing.assert_close(got, expected, atol=1e-13, rtol=1e-13)
    assert torch.autograd.gradcheck(lambda e, u=None: radial_filter(net, e, u, sigma), inputs)
    assert torch.autograd.gradgradcheck(lambda e, u=None: radial_filter(net, e, u, sigma), inputs)
