"""MACE-style model: equivariant hidden features, correlation order, size, the fast atomic basis."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

from molnets.ace import AtomicBasis, ProductBasis
from molnets.layers.pair_atomic_basis import PairAtomicBasis
from molnets.models.base import count_parameters
from molnets.models.mace import MACE, MACEConfig
from molnets.testing import random_graph, random_orthogonal, transform

SPECIES = (1, 6, 8)
SMALL = dict(species=SPECIES, cutoff=3.5, num_channels=8, lmax=2, num_bessel=6, avg_num_neighbors=4.0,
             radial_mlp=(16,))


def _representation(irreps: o3.Irreps, Q: torch.Tensor) -> torch.Tensor:
    """D(Q) of irreps, exact in float64: each D_l solves Y_l(Q x) = D_l Y_l(x) for e3nn's Y_l on
    random points (e3nn's ``D_from_matrix`` goes through float32 constants, ~1e-6 off), with the
    parity p of the irrep instead of Y_l's (-1)^l when det Q = -1."""
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    blocks = []
    for mul, ir in irreps:
        Y, Y_rot = (o3.spherical_harmonics(ir.l, v, normalize=True) for v in (x, x @ Q.T))  # [64, 2l+1]
        D = torch.linalg.lstsq(Y, Y_rot).solution.T  # [2l+1, 2l+1]; Y_l carries parity (-1)^l
        blocks += [D * (ir.p * (-1) ** ir.l if torch.linalg.det(Q) < 0 else 1)] * mul
    return torch.block_diag(*blocks)


def _graph(seed: int = 1):
    return random_graph(num_atoms=10, cutoff=3.5, species=SPECIES, seed=seed, dtype=torch.float64)


def test_hidden_features_are_equivariant_under_rotation_and_inversion():
    torch.manual_seed(0)
    model = MACE(MACEConfig(**SMALL, hidden_lmax=2, num_layers=3)).double()
    graph = _graph()
    for seed, inversion in ((2, False), (3, True)):
        Q = random_orthogonal(seed, inversion=inversion, dtype=torch.float64)  # det +1 or -1
        assert torch.isclose(torch.linalg.det(Q), torch.tensor(-1.0 if inversion else 1.0, dtype=torch.float64))
        before, after = model.node_features(graph), model.node_features(transform(graph, Q))
        for layer, (h, h_rot, interaction) in enumerate(zip(before, after, model.interactions)):
            D = _representation(interaction.irreps_out, Q)
            assert h.abs().max() > 1e-3, layer  # not trivially zero
            torch.testing.assert_close(h_rot, h @ D.T, atol=1e-10, rtol=1e-10)
    # the odd features really change sign under inversion (they are not all zero)
    h = before[0]
    assert h[:, 8:].abs().max() > 1e-3


def test_correlation_order_changes_the_model():
    """ν = 3 with its ν = 2, 3 weights set to zero is the ν = 1 model; with them, it is not."""
    torch.manual_seed(0)
    linear = MACE(MACEConfig(**SMALL, correlation=1)).double()
    cubic = MACE(MACEConfig(**SMALL, correlation=3)).double()
    shared = {k: v for k, v in linear.state_dict().items() if k in dict(cubic.named_parameters())}
    assert len(shared) == len(list(linear.parameters()))  # every ν = 1 weight has its place in ν = 3
    cubic.load_state_dict(shared, strict=False)
    graph = _graph()
    with torch.no_grad():
        higher = [w.clone() for interaction in cubic.interactions for w in interaction.product_basis.weights[1:]]
        for interaction in cubic.interactions:
            for w in interaction.product_basis.weights[1:]:
                w.zero_()
        torch.testing.assert_close(cubic(graph), linear(graph), atol=1e-12, rtol=1e-12)
        for w, value in zip((w for i in cubic.interactions for w in i.product_basis.weights[1:]), higher):
            w.copy_(value)
        assert (cubic(graph) - linear(graph)).abs().max() > 1e-3


def test_parameter_count_of_the_peers_configuration():
    """64x0e + 64x1o hidden, lmax 3, ν = 3, 2 layers, 8 Bessel, radial MLP 64-64-64, one element.

    Counted by hand (C = 64): embedding C; per layer: W h (C² per input irrep), radial MLP
    (8·64 + 64) + 2 (64·64 + 64) + (64·C P + C P) with P coupling paths (4 from 0e into 0e, 1o, 2e,
    3o; 10 from 0e + 1o: 4 + 6, the six 1o ⊗ Y_l1 -> l3 with l3 <= 3 and parity (-1)^l3),
    mixing of A (4 C²), product weights (number of symmetric couplings) · C, update (one C² per
    output irrep) and skip (one C² per irrep of h that is also in the output); readouts C and
    (64·16 + 16) + (16 + 1). Symmetric couplings of A = 0e+1o+2e+3o: to 0e: 1 (ν = 1), 4 (ν = 2:
    a_l · a_l), 8 (ν = 3: a0³, a0 |a_l|² for l = 1, 2, 3, (a1 a1 a2), (a2 a2 a2), (a1 a2 a3),
    (a2 a3 a3)); to 1o: 1, 3 (a0 a1, a1 a2, a2 a3) and 12 (ν = 3). mace-torch's MACE with these
    sizes has 173,328 (its product basis keeps linearly dependent couplings: 23 + 51 at ν = 3,
    and it mixes the paths of A before summing them).
    """
    C = 64
    radial = lambda P: (8 * 64 + 64) + 2 * (64 * 64 + 64) + (64 * C * P + C * P)  # noqa: E731
    layer1 = C * C + radial(4) + 4 * C * C + (2 + 7 + 20) * C + 2 * C * C + C * C
    layer2 = 2 * C * C + radial(10) + 4 * C * C + (1 + 4 + 8) * C + C * C + C * C
    expected = C + layer1 + layer2 + C + (64 * 16 + 16) + (16 + 1)
    model = MACE(MACEConfig(species=(29,)))
    assert count_parameters(model) == expected == 145_441
    assert model.design_space().body_order == 4


def test_pair_atomic_basis_equals_the_reference():
    """The fast path (radial MLP per pair, R folded first) computes ace.AtomicBasis' function."""
    torch.manual_seed(0)
    N, P = 7, 20
    reference = AtomicBasis(
        o3.Irreps("4x0e + 4x1o + 4x2e"), o3.Irreps.spherical_harmonics(3), o3.Irreps("4x0e + 4x1o + 4x2e + 4x3o"),
        num_basis=5, avg_num_neighbors=3.0, radial_hidden=(8,)).double()
    fast = PairAtomicBasis(reference)
    h = torch.randn(N, reference.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    edge_sh = torch.randn(2 * P, 16, dtype=torch.float64, requires_grad=True)
    edge_radial = torch.randn(P, 5, dtype=torch.float64)
    senders, receivers = torch.randint(0, N, (2 * P,)), torch.randint(0, N, (2 * P,))
    ours = fast(h, edge_sh, edge_radial, senders, receivers)
    ref = reference(h, edge_sh, torch.cat([edge_radial, edge_radial]), senders, receivers)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad((ours * ref.detach()).sum(), [h, edge_sh])
    ref_grads = torch.autograd.grad((ref * ref.detach()).sum(), [h, edge_sh])
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)


def _graph_nodes(output: torch.Tensor) -> set:
    """The names of every autograd node that ``output`` depends on."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in seen:
            seen.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return seen


@pytest.mark.parametrize("pairs_per_chunk", [None, 37])
def test_frozen_pair_atomic_basis_takes_the_kernel(monkeypatch, pairs_per_chunk):
    """Frozen weights: from FROZEN_KERNEL_BYTES of messages on, ``FrozenAtomicBasis`` runs even
    when the pairs fit in one chunk (a molecule), and chunk by chunk beyond one (here 200 pairs in
    chunks of 37, the last shorter), with the reference's values and first- and second-order
    gradients (of Y, the radial basis and h); trainable weights keep the reference there."""
    from molnets.layers import _atomic_basis_kernels, _message_kernels

    torch.manual_seed(0)
    N, P, C = 12, 200, 32
    reference = AtomicBasis(
        o3.Irreps(f"{C}x0e + {C}x1o"), o3.Irreps.spherical_harmonics(3), o3.Irreps(f"{C}x0e + {C}x1o + {C}x2e + {C}x3o"),
        num_basis=5, avg_num_neighbors=3.0, radial_hidden=(8,)).double()
    trainable = PairAtomicBasis(reference)
    h = torch.randn(N, reference.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    edge_sh = torch.randn(2 * P, 16, dtype=torch.float64, requires_grad=True)
    edge_radial = torch.randn(P, 5, dtype=torch.float64, requires_grad=True)
    senders, receivers = torch.randint(0, N, (2 * P,)), torch.randint(0, N, (2 * P,))
    rows = 4 + 6 * 3  # (path, m2) rows of X: 4 paths from 0e, 6 from 1o
    if pairs_per_chunk is None:
        assert P * rows * C * 8 >= _atomic_basis_kernels.FROZEN_KERNEL_BYTES  # the messages are above the threshold
        assert P <= _message_kernels._chunk_size(rows * C)  # and fit in one chunk
    else:
        numel = pairs_per_chunk * rows * C // torch.get_num_threads()
        monkeypatch.setattr(_message_kernels, "CHUNK_NUMEL", numel)
        assert _message_kernels._chunk_size(rows * C) == pairs_per_chunk
    args = (h, edge_sh, edge_radial, senders, receivers)
    expected = trainable(*args)
    frozen = PairAtomicBasis(reference).requires_grad_(False)
    ours = frozen(*args)
    assert "FrozenAtomicBasisBackward" in _graph_nodes(ours)
    assert "FrozenAtomicBasisBackward" not in _graph_nodes(expected)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)
    v = torch.randn_like(ours)
    inputs = [h, edge_sh, edge_radial]
    for create_graph in (False, True):  # (with a graph: the plain path's gradients)
        for g, g_ref in zip(torch.autograd.grad(frozen(*args), inputs, v, create_graph=create_graph),
                            torch.autograd.grad(expected, inputs, v, retain_graph=True)):
            torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
    # a force-loss-like second order: the gradient of <dA/dY, w> (create_graph through the plain
    # path) in h and the radial basis (A is linear in Y)
    w = torch.randn_like(edge_sh)
    second = [torch.autograd.grad((torch.autograd.grad(out, edge_sh, v, create_graph=True)[0] * w).sum(),
                                  [h, edge_radial]) for out in (frozen(*args), trainable(*args))]
    for g, g_ref in zip(*second):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)


def test_frozen_pair_atomic_basis_follows_weights_changed_in_place():
    """The frozen kernel reads the radial MLP through a copy with its outputs reordered, kept
    between calls (``PairAtomicBasis._network_by_path``): a weight changed in place, or the
    model cast to another dtype, is seen at the next call."""
    torch.manual_seed(2)
    N, P, C = 12, 300, 32
    reference = AtomicBasis(o3.Irreps(f"{C}x0e"), o3.Irreps.spherical_harmonics(3),
                            o3.Irreps(f"{C}x0e + {C}x1o + {C}x2e + {C}x3o"), num_basis=5, avg_num_neighbors=3.0,
                            radial_hidden=(8,)).double().requires_grad_(False)
    frozen = PairAtomicBasis(reference)
    h = torch.randn(N, C, dtype=torch.float64)
    edge_sh = torch.randn(2 * P, 16, dtype=torch.float64, requires_grad=True)
    edge_radial = torch.randn(P, 5, dtype=torch.float64)
    senders, receivers = torch.randint(0, N, (2 * P,)), torch.randint(0, N, (2 * P,))
    args = (h, edge_sh, edge_radial, senders, receivers)
    before = frozen(*args)
    assert "FrozenAtomicBasisBackward" in _graph_nodes(before)
    reference.radial_weights[-1].weight.mul_(2.0)  # the last layer, in place
    after = frozen(*args)
    torch.testing.assert_close(after, 2 * before, atol=1e-12, rtol=1e-12)  # A is linear in R
    frozen.float()
    cast = frozen(h.float(), edge_sh.float().requires_grad_(), edge_radial.float(), senders, receivers)
    assert "FrozenAtomicBasisBackward" in _graph_nodes(cast)
    torch.testing.assert_close(cast, after.float(), atol=1e-5, rtol=1e-5)


def test_frozen_atomic_basis_gradcheck(monkeypatch):
    """``FrozenAtomicBasis`` in two uneven chunks: gradcheck and gradgradcheck in every input
    (the second order through the plain path)."""
    from molnets.layers import _atomic_basis_kernels, _message_kernels

    torch.manual_seed(1)
    N, P, C = 5, 7, 2
    reference = AtomicBasis(o3.Irreps(f"{C}x0e + {C}x1o"), o3.Irreps.spherical_harmonics(2),
                            o3.Irreps(f"{C}x0e + {C}x1o + {C}x2e"), num_basis=3, avg_num_neighbors=2.0,
                            radial_hidden=(4,)).double()
    layer = PairAtomicBasis(reference).requires_grad_(False)
    senders, receivers = torch.randint(0, N, (2 * P,)), torch.randint(0, N, (2 * P,))
    edge_sh = torch.randn(2 * P, 9, dtype=torch.float64, requires_grad=True)
    R = torch.randn(P, reference.num_paths, C, dtype=torch.float64, requires_grad=True)  # paths grouped by irrep
    node_feats = [torch.randn(N, 1, C, dtype=torch.float64, requires_grad=True),
                  torch.randn(N, 3, C, dtype=torch.float64, requires_grad=True)]
    numel = _atomic_basis_kernels._atomic_basis_message_numel(layer.num_components, layer.num_rows, C)
    monkeypatch.setattr(_message_kernels, "CHUNK_NUMEL", 4 * numel // torch.get_num_threads())  # chunks 4 + 3
    assert _message_kernels._chunk_size(numel) == 4

    def kernel(sh, R_, W0, W1):
        return _atomic_basis_kernels.FrozenAtomicBasis.apply(sh, R_, senders, receivers, layer, W0, W1)

    inputs = (edge_sh, R, *node_feats)
    radial = list(R.split(layer.path_counts, dim=1))
    torch.testing.assert_close(kernel(*inputs), layer._messages(edge_sh, radial, node_feats, senders, receivers),
                               atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(kernel, inputs)
    assert torch.autograd.gradgradcheck(kernel, inputs)


def test_loads_files_that_saved_the_coupling_tensors(tmp_path):
    """Files saved by earlier 0.1.0 builds kept the product basis' U in the state dict ([T, ..., K]);
    they load, and the model computes the same energies as the one that was saved."""
    from molnets.models import load_model, save_model

    torch.manual_seed(0)
    model = MACE(MACEConfig(**SMALL, correlation=3, num_layers=2))
    path = tmp_path / "model.pt"
    save_model(model, path)
    data = torch.load(path, weights_only=True)
    assert not any(key.rsplit(".", 1)[-1].startswith("U") for key in data["state_dict"])
    for name, module in model.named_modules():  # what an older file held for every ProductBasis
        if isinstance(module, ProductBasis):
            for key in ("U1", "U2", "U_top_low", "U_top_last"):
                data["state_dict"][f"{name}.{key}"] = torch.randn(4, 3, 2)  # any layout: dropped
    torch.save(data, path)
    loaded = load_model(path)
    graph = random_graph(num_atoms=6, cutoff=3.5, species=SPECIES, seed=3, dtype=torch.float32)
    torch.testing.assert_close(loaded(graph), model(graph), rtol=0, atol=0)


def test_frozen_model_gives_the_same_energy_and_forces_call_after_call():
    """A frozen MACE (as the calculator runs it) keeps its folded product-basis weights between
    calls: the same energies and forces as the trainable model, also on a second geometry."""
    import copy

    from molnets.models.base import Potential

    torch.manual_seed(0)
    model = MACE(MACEConfig(**SMALL)).double()
    trainable, frozen = Potential(model).eval(), Potential(copy.deepcopy(model).requires_grad_(False)).eval()
    for seed in (1, 2, 1):
        graph = _graph(seed)
        expected, got = trainable(graph), frozen(graph)
        torch.testing.assert_close(got["energy"], expected["energy"], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got["forces"], expected["forces"], atol=1e-12, rtol=1e-12)
    assert all(pb._frozen_folds for pb in (i.product_basis for i in frozen.model.interactions))


def test_frozen_model_through_the_product_basis_kernels(kernels, monkeypatch, assert_frozen_equals_trainable):
    """Frozen weights: the product basis runs as the compiled terms (molnets._native, where a
    compiler is) or chunk by chunk (without it; here on more atoms than a chunk, a few atoms a
    chunk); energy, forces, stress and the double backward of a force loss equal the trainable
    model's (molecule and crystal), and the model suite passes."""
    import copy

    from molnets import _ace_kernel, testing

    kernel = {"torch": "FrozenProductBasis", "native": "NativeProductBasis"}[kernels]
    if kernel == "FrozenProductBasis":
        monkeypatch.setattr(_ace_kernel, "CHUNK_NUMEL", 2000)
    torch.manual_seed(0)
    model = MACE(MACEConfig(**SMALL, correlation=3, num_layers=2)).double()
    frozen = copy.deepcopy(model).requires_grad_(False)
    if kernel == "FrozenProductBasis":
        assert all(_ace_kernel.atoms_per_chunk(i.product_basis) < 9 for i in frozen.interactions)  # several chunks
    calls = []
    function = getattr(_ace_kernel, kernel)
    monkeypatch.setattr(function, "forward", staticmethod(
        lambda *args, forward=function.forward: calls.append(1) or forward(*args)))
    for periodic in (False, True):
        graph = testing.random_graph(num_atoms=9, cutoff=3.5, species=SPECIES, seed=5, periodic=periodic,
                                     dtype=torch.float64)
        assert_frozen_equals_trainable(model, frozen, graph)
    assert calls  # the frozen model ran through the kernel
    calls.clear()
    testing.check_model(frozen, skip=("check_compile", "check_export"))
    assert calls
