"""Multi-layer perceptrons and the activations the models use.

The activation is a ``Literal`` choice resolved in one function, ``make_activation``; a new
activation is a new branch there, never a string registry.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional, Sequence

import torch  # noqa: F401 (the doctests use it)
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MLP", "ShiftedSoftplus", "Activation", "make_activation", "radial_filter"]

Activation = Literal["silu", "ssp", "tanh", "identity"]


class ShiftedSoftplus(nn.Module):
    """ssp(x) = ln(0.5 e^x + 0.5) = softplus(x) - ln 2 (Schütt et al. 2018, Eq. 9).

    ssp(0) = 0, smooth everywhere (infinitely differentiable, so forces and their gradients
    in a training loss stay smooth).

    Shapes:
        x [*]  ->  [*]

    >>> ShiftedSoftplus()(torch.zeros(2))
    tensor([0., 0.])
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x) - math.log(2.0)


def make_activation(name: Activation) -> nn.Module:
    """The activation module named ``name``: "silu", "ssp" (shifted softplus), "tanh", "identity"."""
    if name == "silu":
        return nn.SiLU()
    if name == "ssp":
        return ShiftedSoftplus()
    if name == "tanh":
        return nn.Tanh()
    if name == "identity":
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}; choose one of {Activation.__args__}")


class MLP(nn.Sequential):
    """Dense layers with an activation between them (none after the last):

        y = W_L σ(... σ(W_1 x + b_1) ...) + b_L

    Weights are Xavier-uniform, biases zero (the SchNet and PhysNet initialisation). The
    dense layers are ``nn.Linear`` modules (state dict ``{k}.weight``, ``{k}.bias``) that the
    forward calls as ``F.linear``: hooks on a single dense layer do not run (hook the MLP).

    Args:
        dims: [D_0, D_1, ..., D_L], input width, hidden widths, output width (at least two).
        activation: the nonlinearity σ between layers.
        bias: whether every dense layer has a bias.

    Shapes:
        x [*, D_0]  ->  [*, D_L]

    >>> MLP([4, 8, 1])(torch.zeros(3, 4)).shape
    torch.Size([3, 1])
    """

    def __init__(self, dims: Sequence[int], *, activation: Activation = "silu", bias: bool = True) -> None:
        dims = [int(d) for d in dims]
        if len(dims) < 2 or min(dims) < 1:
            raise ValueError(f"MLP needs at least [in, out] positive widths, got {dims}")
        layers = []
        for k, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if k > 0:
                layers.append(make_activation(activation))
            linear = nn.Linear(d_in, d_out, bias=bias)
            nn.init.xavier_uniform_(linear.weight)
            if bias:
                nn.init.zeros_(linear.bias)
            layers.append(linear)
        super().__init__(*layers)
        self.in_dim, self.out_dim = dims[0], dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        # Dense layers run as F.linear (a module call costs a few us, most of a small layer).
        # A shifted softplus on a large input folds its -ln 2 into the next layer's bias:
        # W (softplus(x) - ln 2) + b = W softplus(x) + (b - ln 2 Σ_c W_:c), one elementwise
        # pass over x fewer; on a small input the fold (three operations on W) costs more.
        shift_pending = False
        for layer in self._modules.values():
            if shift_pending and type(layer) is not nn.Linear:
                x, shift_pending = x - math.log(2.0), False
            if type(layer) is nn.Linear:
                bias = _bias_after_ssp(layer) if shift_pending else layer.bias
                x, shift_pending = F.linear(x, layer.weight, bias), False
            elif type(layer) is ShiftedSoftplus and x.numel() >= _FOLD_MIN_NUMEL:
                x, shift_pending = F.softplus(x), True
            else:
                x = layer(x)
        return x - math.log(2.0) if shift_pending else x


# Shifted-softplus inputs from this many numbers on have their shift folded (MLP.forward).
_FOLD_MIN_NUMEL = 1 << 16


def _bias_after_ssp(layer: nn.Linear) -> Tensor:
    """b - ln 2 Σ_c W_:c: the bias of a dense layer that takes softplus(x) instead of ssp(x). [D_out]"""
    shift = math.log(2.0) * layer.weight.sum(1)                                            # [D_out]
    return shift.neg() if layer.bias is None else layer.bias - shift


def radial_filter(network: nn.Module, radial: Tensor, envelope: Optional[Tensor] = None,
                  activation: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Edge filters from a filter-generating network on a radial basis, times the cutoff envelope:

        W_e = σ(network(e(r_e))) u(r_e)      (u = 1 without an envelope: MACE's radial weights,
                                               whose basis carries the cutoff already)

    (SchNet's continuous filter, Schütt et al. 2018, Eqs. 11-12 with the cutoff; TensorNet's
    f = SiLU(MLP(e)) φ, Simeon & De Fabritiis 2023, Eq. 8.) With the network's weights frozen
    (as calculators run a model), eager on the CPU, and activations over all edges larger than
    glibc's largest mmap threshold (32 MiB: a crystal of thousands of atoms; not when
    ``molnets.memory.reuse_freed_memory`` keeps freed memory, which avoids that cost), the same
    numbers come from ``layers._message_kernels.FrozenFilter``, chunk by chunk of edges, keeping
    no hidden activation of every edge for the backward (TensorNet-style, 2048 atoms of Cu,
    float64: 1.48x the whole call).

    Args:
        network: module mapping [E, K] to [E, D] (an ``MLP`` or an ``nn.Linear``).
        radial: e(r) [E, K].
        envelope: u(r) [E], or None.
        activation: σ after the network's last layer, or None.

    Shapes:
        radial [E, K], envelope [E]  ->  [E, D]

    >>> radial_filter(MLP([3, 4, 2]), torch.zeros(5, 3), torch.ones(5)).shape
    torch.Size([5, 2])
    """
    from ._message_kernels import FrozenFilter, filter_kernel_applies, network_output

    if filter_kernel_applies(network, radial):
        return FrozenFilter.apply(radial, envelope, network, activation)
    out = network_output(network, activation, radial)                                   # [E, D]
    return out if envelope is None else out * envelope[:, None]                         # [E, D]
