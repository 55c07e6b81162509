"""TensorNet-style model: O(3) invariance, forces, and its own building blocks (float64)."""

from typing import Optional

import ase.build
import pytest
import torch

from molnets.graph import AtomicGraph
from molnets.models.base import Potential
from molnets.models.tensornet import TensorNet, TensorNetConfig

DTYPE = torch.float64
CUTOFF = 3.5


def small_model(**overrides) -> TensorNet:
    torch.manual_seed(0)
    config = dict(species=(1, 6, 8), cutoff=CUTOFF, num_channels=8, num_layers=2, num_rbf=8)
    config.update(overrides)
    return TensorNet(TensorNetConfig(**config)).to(DTYPE).eval()


def ethanol_graph(positions=None) -> AtomicGraph:
    atoms = ase.build.molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=3)
    if positions is not None:
        atoms.positions = positions
    return AtomicGraph.from_ase(atoms, CUTOFF, dtype=DTYPE)


def orthogonal(seed: int, det: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=DTYPE))
    q = q * torch.sign(torch.diagonal(r))
    return q if float(torch.linalg.det(q)) * det > 0 else -q


@pytest.mark.parametrize("det", [1.0, -1.0])
def test_energy_invariant_forces_equivariant_under_o3(det):
    potential = Potential(small_model())
    graph = ethanol_graph()
    Q = orthogonal(seed=1, det=det)
    ref = potential(graph)
    rot = potential(graph._replace(positions=graph.positions @ Q.T))
    torch.testing.assert_close(rot["energy"], ref["energy"], rtol=0, atol=1e-12)
    torch.testing.assert_close(rot["forces"], ref["forces"] @ Q.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("det", [1.0, -1.0])
def test_features_transform_as_tensors_and_transpose_under_inversion(det):
    """Inside the model X -> Q X Qᵀ for rotations and Q Xᵀ Qᵀ for improper Q (the axial part)."""
    model = small_model()
    feats = []
    model.interactions[0].register_forward_hook(lambda module, args, out: feats.append(out.detach()))
    graph = ethanol_graph()
    Q = orthogonal(seed=2, det=det)
    model(graph)
    model(graph._replace(positions=graph.positions @ Q.T))
    expected = feats[0] if det > 0 else feats[0].transpose(-2, -1)
    torch.testing.assert_close(feats[1], Q @ expected @ Q.T, rtol=0, atol=1e-12)
    assert float((feats[0] - feats[0].transpose(-2, -1)).abs().max()) > 1e-3  # A is not zero


def test_forces_equal_central_finite_differences():
    potential = Potential(small_model())
    graph = ethanol_graph()
    forces = potential(graph)["forces"].detach()
    step = 1e-5
    for atom, axis in [(0, 0), (2, 1), (5, 2), (8, 0)]:
        energies = []
        for sign in (1, -1):
            positions = graph.positions.clone()
            positions[atom, axis] += sign * step
            energies.append(float(potential(graph._replace(positions=positions))["energy"].sum().detach()))
        expected = -(energies[0] - energies[1]) / (2 * step)
        assert abs(float(forces[atom, axis]) - expected) < 1e-7, (atom, axis)


def test_half_pairs_equal_full_edge_list():
    """The model's pair trick changes nothing: the reference sums over every directed edge."""
    model = small_model()
    graph = ethanol_graph()
    # Reversing the edge order changes which direction of each pair is kept; same energies.
    flipped = graph._replace(receivers=graph.receivers.flip(0), senders=graph.senders.flip(0),
                             shifts=graph.shifts.flip(0))
    torch.testing.assert_close(model(flipped), model(graph), rtol=0, atol=1e-13)


def test_isolated_atoms_and_gradcheck():
    model = small_model(num_layers=1)
    graph = ethanol_graph()
    positions = graph.positions.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: model(graph._replace(positions=x)).sum(), (positions,))
    # Far apart atoms: no edges, energies from the self pairs only, no NaN.
    lonely = AtomicGraph.from_ase(ase.Atoms("CO", positions=[[0, 0, 0], [10, 0, 0]]), CUTOFF, dtype=DTYPE)
    energies = model(lonely)
    assert lonely.num_edges == 0 and torch.isfinite(energies).all()


def test_config_validation_and_parameter_count():
    with pytest.raises(ValueError):
        TensorNetConfig(species=(1, 1))
    with pytest.raises(ValueError):
        TensorNetConfig(species=(1,), cutoff=-1.0)
    # torchmd-net's TensorNet (128 channels, 2 layers, 32 rbf) has 769,921 parameters with its
    # 128-row element table; ours has one row per species: 769,921 - 127 * 128.
    model = TensorNet(TensorNetConfig(species=(29,), cutoff=5.0))
    assert model.design_space().num_parameters == 769_921 - 127 * 128


def test_frozen_model_gives_the_same_energy_and_forces_call_after_call():
    """A frozen TensorNet (as the calculator runs it) keeps what its weights alone give (the self
    pair's filter f(0)) between calls: the same energies and forces as the trainable model on
    alternating geometries, and again after weights are changed in place."""
    import copy

    model = small_model()
    trainable, frozen = Potential(model).eval(), Potential(copy.deepcopy(model).requires_grad_(False)).eval()
    base = ethanol_graph()
    shifted = base._replace(positions=base.positions + 0.03 * torch.randn(base.positions.shape, dtype=DTYPE))
    for graph in (base, shifted, base):
        expected, got = trainable(graph), frozen(graph)
        torch.testing.assert_close(got["energy"], expected["energy"], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got["forces"], expected["forces"], atol=1e-12, rtol=1e-12)
    assert frozen.model.interactions[0]._frozen  # f(0) was kept
    with torch.no_grad():
        for potential in (trainable, frozen):
            potential.model.interactions[1].linear_out.weight[2] *= -2.0
            potential.model.interactions[0].radial[2].weight[0] *= 3.0  # changes f(0) too
    expected, got = trainable(base), frozen(base)
    torch.testing.assert_close(got["energy"], expected["energy"], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got["forces"], expected["forces"], atol=1e-12, rtol=1e-12)


def test_frozen_interaction_follows_its_self_pair_input():
    """The frozen layer keeps f(0) = SiLU(MLP(e(0))) between calls, compared by the value of the
    e(0) it is given (a new tensor may sit where an old one was): a different e(0) gives the
    reference's result, not the kept one."""
    from molnets.models.tensornet import TensorInteraction

    layer = TensorInteraction(8, num_rbf=5).to(DTYPE).requires_grad_(False)
    X, edge_rbf, envelope, pair_i, pair_j, self_rbf = _interaction_inputs(6, 9, 8, 5, seed=2)
    for rbf in (self_rbf, 2.0 * self_rbf, self_rbf.clone()):
        out = layer(X, edge_rbf, envelope, pair_i, pair_j, rbf)
        expected = layer._reference(X, edge_rbf, envelope, pair_i, pair_j, layer._self_weights(rbf))
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert layer._frozen


def _interaction_inputs(num_atoms: int, num_pairs: int, channels: int, num_rbf: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(num_atoms, channels, 3, 3, generator=g, dtype=DTYPE, requires_grad=True)
    edge_rbf = torch.randn(num_pairs, num_rbf, generator=g, dtype=DTYPE, requires_grad=True)
    envelope = torch.rand(num_pairs, generator=g, dtype=DTYPE).requires_grad_(True)
    pair_i = torch.randint(0, num_atoms, (num_pairs,), generator=g)
    pair_j = (pair_i + torch.randint(1, num_atoms, (num_pairs,), generator=g)) % num_atoms
    self_rbf = torch.randn(1, num_rbf, generator=g, dtype=DTYPE)
    return X, edge_rbf, envelope, pair_i, pair_j, self_rbf


@pytest.mark.parametrize("pairs, atoms", [(None, None), (5, 4)])
def test_frozen_model_equals_the_trainable_model_with_derivative_graphs(monkeypatch, assert_frozen_equals_trainable,
                                                                        pairs, atoms):
    """Through the kernels, also in training mode: forces, stress and the double backward of a
    force loss equal the trainable model's (molecule and crystal), in one chunk and chunk by
    chunk of 5 pairs and 4 atoms."""
    import copy

    from molnets import testing

    _chunks_of(monkeypatch, pairs, atoms, 8)
    model = small_model()
    frozen = copy.deepcopy(model).requires_grad_(False)
    for periodic in (False, True):
        graph = testing.random_graph(num_atoms=9, cutoff=CUTOFF, seed=5, periodic=periodic, dtype=DTYPE)
        assert_frozen_equals_trainable(model, frozen, graph)


def _chunks_of(monkeypatch, pairs: Optional[int], atoms: Optional[int], channels: int) -> None:
    """The frozen kernels' chunks made tiny: ``pairs`` pairs and ``atoms`` atoms per chunk (None:
    left as they are, one chunk on the tests' systems)."""
    from molnets.layers import _message_kernels
    from molnets.models import _tensornet_ops

    if pairs is not None:  # and the system "large": the kernels run (``kernels_apply``)
        monkeypatch.setattr(_message_kernels, "CHUNK_NUMEL", pairs * 9 * channels // torch.get_num_threads())
        monkeypatch.setattr(_message_kernels, "FRESH_MAPPING_BYTES", 0)
    if atoms is not None:
        monkeypatch.setattr(_tensornet_ops, "ATOM_CHUNK_NUMEL", atoms * 9 * channels)


CHUNKS = [(None, None), (4, 3), (None, 3), (4, None)]


@pytest.mark.parametrize("pairs, atoms", CHUNKS)
@pytest.mark.parametrize("filters_kept", [True, False])
def test_frozen_interaction_kernel_equals_the_reference(monkeypatch, assert_kernel_equals_reference, pairs, atoms,
                                                        filters_kept, kernels):
    """FrozenInteraction (one autograd node, hand-written backward) against the layer's
    differentiable operations: values and input gradients to 1e-12, gradcheck and gradgradcheck
    (the double backward goes through the reference); taken only with frozen weights. In one
    chunk (a molecule) and in uneven chunks of 4 pairs (15 pairs: filters and convolution chunk
    by chunk) and of 3 atoms (7 atoms: the node updates chunk by chunk, computed again in the
    backward), each way alone and both; with the filter network's activations kept for the
    backward, and computed again there (as on a large crystal); the pair convolution by the
    PyTorch kernels and by the compiled one (``kernels``)."""
    from molnets.layers import _message_kernels
    from molnets.models import _tensornet_kernel
    from molnets.models.tensornet import TensorInteraction

    torch.manual_seed(0)
    layer = TensorInteraction(4, num_rbf=3).to(DTYPE).requires_grad_(False)
    X, edge_rbf, envelope, pair_i, pair_j, self_rbf = inputs = _interaction_inputs(7, 15, 4, 3, seed=6)
    expected = layer._reference(X, edge_rbf, envelope, pair_i, pair_j, layer._self_weights(self_rbf))
    assert type(expected.grad_fn).__name__ != "FrozenInteractionBackward"
    _chunks_of(monkeypatch, pairs, atoms, 4)  # on many pairs: filter activations "too large to keep" ...
    if filters_kept and pairs is not None:  # ... unless freed memory is reused (molnets.memory)
        monkeypatch.setattr(_message_kernels, "freed_memory_is_reused", lambda: True)
    elif not filters_kept:
        monkeypatch.setattr(_message_kernels, "FRESH_MAPPING_BYTES", 0)
    filter_calls = []
    monkeypatch.setattr(_tensornet_kernel, "_filters",
                        lambda *args, f=_tensornet_kernel._filters: filter_calls.append(1) or f(*args))
    out = layer(*inputs)
    assert type(out.grad_fn).__name__ == "FrozenInteractionBackward"
    num_pair_chunks = 1 if pairs is None else 4
    assert len(filter_calls) == num_pair_chunks
    torch.autograd.grad(out, [X, edge_rbf, envelope], torch.ones_like(out), retain_graph=True)
    assert len(filter_calls) == num_pair_chunks * (1 if filters_kept else 2)  # kept, or computed again

    def call(X, edge_rbf, envelope):
        return layer(X, edge_rbf, envelope, pair_i, pair_j, self_rbf)

    assert_kernel_equals_reference(call, out, expected, (X, edge_rbf, envelope))
    trainable = TensorInteraction(4, num_rbf=3).to(DTYPE)  # weights need gradients: the reference
    assert type(trainable(*inputs).grad_fn).__name__ != "FrozenInteractionBackward"


@pytest.mark.parametrize("pairs, atoms", CHUNKS)
def test_frozen_embedding_kernel_equals_the_reference(monkeypatch, assert_kernel_equals_reference, pairs, atoms,
                                                      kernels):
    """FrozenEmbedding against the layer's differentiable operations: values and gradients with
    respect to e(r), φ and r̂ to 1e-12, gradcheck and gradgradcheck; in one chunk and chunk by
    chunk of pairs (their filters and weights formed per chunk) and of atoms, the backward
    computing each chunk again, as for the interaction."""
    from molnets.models.tensornet import TensorEmbedding

    torch.manual_seed(0)
    layer = TensorEmbedding(3, 4, num_rbf=3).to(DTYPE).requires_grad_(False)
    _, edge_rbf, envelope, pair_i, pair_j, self_rbf = _interaction_inputs(7, 15, 4, 3, seed=7)
    g = torch.Generator().manual_seed(8)
    unit = torch.nn.functional.normalize(torch.randn(15, 3, generator=g, dtype=DTYPE), dim=1).requires_grad_(True)
    species = torch.randint(0, 3, (7,), generator=g)
    expected = layer._reference(species, edge_rbf, envelope, unit, pair_i, pair_j, self_rbf)
    _chunks_of(monkeypatch, pairs, atoms, 4)

    def call(edge_rbf, envelope, unit):
        return layer(species, edge_rbf, envelope, unit, pair_i, pair_j, self_rbf)

    out = call(edge_rbf, envelope, unit)
    assert type(out.grad_fn).__name__ == "FrozenEmbeddingBackward"
    assert_kernel_equals_reference(call, out, expected, (edge_rbf, envelope, unit))
    trainable = TensorEmbedding(3, 4, num_rbf=3).to(DTYPE)
    assert type(trainable(species, edge_rbf, envelope, unit, pair_i, pair_j, self_rbf).grad_fn).__name__ \
        != "FrozenEmbeddingBackward"


def test_frozen_kernels_skip_mid_sized_systems(monkeypatch):
    """More pairs than one chunk, but filter activations below ``FRESH_MAPPING_BYTES`` (a few
    hundred atoms): the reference runs; above them (a large crystal) the kernels do."""
    from molnets.layers import _message_kernels
    from molnets.models.tensornet import TensorEmbedding, TensorInteraction

    interaction = TensorInteraction(4, num_rbf=3).to(DTYPE).requires_grad_(False)
    embedding = TensorEmbedding(3, 4, num_rbf=3).to(DTYPE).requires_grad_(False)
    X, edge_rbf, envelope, pair_i, pair_j, self_rbf = inputs = _interaction_inputs(7, 15, 4, 3, seed=9)
    unit = torch.nn.functional.normalize(edge_rbf.detach(), dim=1)
    species = torch.zeros(7, dtype=torch.long)
    monkeypatch.setattr(_message_kernels, "CHUNK_NUMEL", 4 * 9 * 4 // torch.get_num_threads())  # 4 pairs a chunk
    for large in (False, True):
        if large:
            monkeypatch.setattr(_message_kernels, "FRESH_MAPPING_BYTES", 15 * 12 * 8 - 1)  # 15 pairs x 3C
        names = (type(interaction(*inputs).grad_fn).__name__,
                 type(embedding(species, edge_rbf, envelope, unit, pair_i, pair_j, self_rbf).grad_fn).__name__)
        assert (names == ("FrozenInteractionBackward", "FrozenEmbeddingBackward")) == large, names


@pytest.mark.parametrize("pairs, atoms", [(None, None), (5, 4)])
def test_frozen_model_passes_the_model_suite(monkeypatch, pairs, atoms):
    """The frozen model (the kernel's path) through molnets.testing: O(3), translation and
    permutation invariance, batching, finite-difference forces and stress, cutoff smoothness;
    in one chunk and chunk by chunk of 5 pairs and 4 atoms."""
    from molnets import testing
    from molnets.models import _tensornet_embedding_kernel, _tensornet_kernel

    _chunks_of(monkeypatch, pairs, atoms, 8)
    calls = []
    for kernel in (_tensornet_kernel.FrozenInteraction, _tensornet_embedding_kernel.FrozenEmbedding):
        monkeypatch.setattr(kernel, "forward", staticmethod(
            lambda *args, forward=kernel.forward, name=kernel.__name__: calls.append(name) or forward(*args)))
    testing.check_model(small_model().requires_grad_(False), skip=("check_compile", "check_export"))
    assert set(calls) == {"FrozenInteraction", "FrozenEmbedding"}  # the checks ran through the kernels
