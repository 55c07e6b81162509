"""SchNet-style model: the frozen-weights kernel of its interaction block (float64)."""

import torch

from molnets import testing
from molnets.models import _schnet_kernel
from molnets.models.schnet import CFConvInteraction, SchNet, SchNetConfig

DTYPE = torch.float64


def _block_inputs(num_atoms: int, num_pairs: int, channels: int, num_basis: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    node_feats = torch.randn(num_atoms, channels, generator=g, dtype=DTYPE, requires_grad=True)
    edge_radial = torch.randn(num_pairs, num_basis, generator=g, dtype=DTYPE, requires_grad=True)
    envelope = torch.rand(num_pairs, generator=g, dtype=DTYPE).requires_grad_(True)
    pair_i = torch.randint(0, num_atoms, (num_pairs,), generator=g)
    pair_j = (pair_i + torch.randint(1, num_atoms, (num_pairs,), generator=g)) % num_atoms
    return node_feats, edge_radial, envelope, pair_i, pair_j


def test_frozen_block_kernel_equals_the_reference(assert_kernel_equals_reference):
    """FrozenCFConv (one autograd node, hand-written backward) against the block's
    differentiable operations: values and input gradients to 1e-12, gradcheck and
    gradgradcheck; only with frozen weights and below one chunk of pair messages."""
    torch.manual_seed(0)
    block = CFConvInteraction(8, num_basis=5).to(DTYPE).requires_grad_(False)
    node_feats, edge_radial, envelope, pair_i, pair_j = _block_inputs(7, 15, 8, 5, seed=1)

    def call(node_feats, edge_radial, envelope):
        return block(node_feats, edge_radial, envelope, pair_i, pair_j)

    out = call(node_feats, edge_radial, envelope)
    assert type(out.grad_fn).__name__ == "FrozenCFConvBackward"
    expected = block._reference(node_feats, edge_radial, envelope, pair_i, pair_j)
    assert type(expected.grad_fn).__name__ != "FrozenCFConvBackward"
    assert_kernel_equals_reference(call, out, expected, (node_feats, edge_radial, envelope))
    trainable = CFConvInteraction(8, num_basis=5).to(DTYPE)  # weights need gradients: the reference
    assert type(trainable(node_feats, edge_radial, envelope, pair_i, pair_j).grad_fn).__name__ \
        != "FrozenCFConvBackward"


def test_frozen_block_kernel_stays_off_for_large_systems():
    """Above one chunk of pair messages the reference (with its chunked kernel) runs."""
    from molnets.layers._message_kernels import _chunk_size

    block = CFConvInteraction(4, num_basis=3).to(DTYPE).requires_grad_(False)
    out = block(*_block_inputs(50, _chunk_size(4) + 1, 4, 3, seed=2))
    assert type(out.grad_fn).__name__ != "FrozenCFConvBackward"


def _model_and_frozen_copy():
    torch.manual_seed(0)
    model = SchNet(SchNetConfig(species=(1, 6, 8), cutoff=3.5, num_channels=8, num_layers=2)).to(DTYPE)
    frozen = SchNet(model.config).to(DTYPE)
    frozen.load_state_dict(model.state_dict())
    return model, frozen.requires_grad_(False)


def test_frozen_model_equals_the_trainable_model(assert_frozen_equals_trainable):
    """Energies, forces, stress and force-loss gradients of the frozen model (kernel) equal the
    trainable one's (reference), molecule and crystal."""
    model, frozen = _model_and_frozen_copy()
    for periodic in (False, True):
        graph = testing.random_graph(num_atoms=9, cutoff=3.5, seed=3, periodic=periodic, dtype=DTYPE)
        assert_frozen_equals_trainable(model, frozen, graph)


def test_frozen_model_passes_the_model_suite(monkeypatch):
    """The frozen model (the kernel's path) through molnets.testing: O(3), translation and
    permutation invariance, batching, finite-difference forces and stress, cutoff smoothness."""
    calls = []
    forward = _schnet_kernel.FrozenCFConv.forward
    monkeypatch.setattr(_schnet_kernel.FrozenCFConv, "forward",
                        staticmethod(lambda *args: calls.append(1) or forward(*args)))
    testing.check_model(_model_and_frozen_copy()[1], skip=("check_compile", "check_export"))
    assert calls  # the checks ran through the kernel
