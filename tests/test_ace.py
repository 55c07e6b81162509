"""Tests of the ACE block (molnets.ace): atomic basis A and product basis B, in float64.

Equivariance uses e3nn's Wigner-D matrices (built in float64, the default dtype here) for random
orthogonal matrices of both determinants; the generalized coupling is compared with e3nn's
``ReducedTensorProducts``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from e3nn import o3

from molnets._ace_coupling import dense_coupling
from molnets.ace import AtomicBasis, ProductBasis
from molnets.layers.radial import BesselBasis
from molnets.layers.spherical_harmonics import spherical_harmonics
from molnets.testing import random_orthogonal

CUTOFF = 3.0
NUM_BASIS = 4


pytestmark = pytest.mark.usefixtures("float64_default")  # e3nn constants in float64 (tests/conftest.py)


def natural(lmax: int) -> str:
    return " + ".join(f"{l}{'e' if l % 2 == 0 else 'o'}" for l in range(lmax + 1))


def channels(C: int, irreps: str) -> o3.Irreps:
    return o3.Irreps([(C, ir) for _, ir in o3.Irreps(irreps)])


def edge_inputs(positions, senders, receivers, lmax):
    """Edge harmonics (component normalization) and a Bessel radial basis of r_ji."""
    vec = positions[senders] - positions[receivers]  # [E, 3]
    sh = spherical_harmonics(vec, lmax, normalize=True, normalization="component")  # [E, (lmax+1)^2]
    r = vec.norm(dim=1)  # [E]
    radial = BesselBasis(CUTOFF, NUM_BASIS)(r) * (1 - r[:, None] / CUTOFF) ** 2  # [E, K]
    return sh, radial


def radius_graph(positions):
    dist = torch.cdist(positions, positions)
    receivers, senders = torch.nonzero((dist < CUTOFF) & (dist > 0), as_tuple=True)
    return senders, receivers


def assert_close(actual, expected, tol=1e-12):
    # absolute error, relative to the size of the numbers compared (never below 1)
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3e} (scale {scale:.3e})"


def rotate_A(A, irreps_A_one_channel, R):
    D = o3.Irreps(irreps_A_one_channel).D_from_matrix(R)  # [M, M]
    return torch.einsum("ncm,pm->ncp", A, D)


# ------------------------------------------------------------------------------------------------
# generalized coupling U


COUPLING_CASES = [
    ("0e + 1o + 2e + 3o", 1, "1o"),
    ("0e + 1o + 2e + 3o", 2, "0e"),
    ("0e + 1o + 2e + 3o", 2, "2o"),
    ("0e + 1o + 2e", 3, "0e"),
    ("0e + 1o + 2e", 3, "1o"),
    ("0e + 1o + 2e", 3, "2e"),
    ("0e + 1o", 4, "0e"),
    ("0e + 1o", 4, "1o"),
]


@pytest.mark.parametrize("irreps,nu,target", COUPLING_CASES)
def test_coupling_is_orthonormal_symmetric_and_equivariant(irreps, nu, target):
    U = dense_coupling(o3.Irreps(irreps), nu, o3.Irrep(target))  # [O, M^ν, K]
    K = U.shape[-1]
    flat = U.reshape(-1, K)
    assert_close(flat.T @ flat, torch.eye(K))
    for perm in itertools.permutations(range(1, nu + 1)):
        assert_close(U.permute(0, *perm, nu + 1), U)
    for improper in (False, True):
        R = random_orthogonal(nu, inversion=improper, dtype=torch.float64)
        D, D_out = o3.Irreps(irreps).D_from_matrix(R), o3.Irrep(target).D_from_matrix(R)
        rotated = U
        for axis in range(1, nu + 1):  # Σ_{a'} U[.., a', ..] D[a', a] on every input index
            rotated = torch.movedim(torch.tensordot(rotated, D, dims=([axis], [0])), -1, axis)
        assert_close(rotated, torch.einsum("op,p...->o...", D_out, U))


def orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (rows) of the span of the rows of a [P, D] matrix."""
    _, sv, Vh = torch.linalg.svd(rows, full_matrices=False)
    return Vh[sv > 1e-9 * sv[0]]


def assert_same_span(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal spans (equal projectors) without forming the [D, D] projectors."""
    a, b = orthonormal_rows(a), orthonormal_rows(b)
    assert a.shape[0] == b.shape[0]
    assert_close((b @ a.T) @ a, b)  # b lies in span(a) ...
    assert_close((a @ b.T) @ b, a)  # ... and a in span(b)


def ours_as_rows(irreps, nu, target) -> torch.Tensor:
    U = dense_coupling(o3.Irreps(irreps), nu, target)  # [O, M^ν, K]
    return torch.movedim(U, -1, 0).reshape(U.shape[-1], -1)  # [K, O M^ν]


@pytest.mark.parametrize("irreps,nu,formula", [("0e + 1o + 2e", 2, "ij=ji"), ("0e + 1o", 3, "ijk=jik=ikj")])
def test_coupling_spans_the_same_space_as_e3nn_reduced_tensor_products(irreps, nu, formula):
    indices = formula.split("=")[0]
    rtp = o3.ReducedTensorProducts(formula, **{i: irreps for i in indices})
    Q = rtp.change_of_basis  # [rtp.irreps_out.dim, M, ..., M]
    targets = {ir for _, ir in rtp.irreps_out}
    for target in targets:
        theirs = torch.cat(
            [Q[s].reshape(mul, -1) for (mul, ir), s in zip(rtp.irreps_out, rtp.irreps_out.slices()) if ir == target]
        )  # [mul, O M^ν]
        ours = ours_as_rows(irreps, nu, target)
        assert ours.shape[0] == theirs.shape[0], target  # the same multiplicity
        assert_close(ours @ ours.T, torch.eye(ours.shape[0]))
        assert_same_span(ours, theirs)
    for target in [o3.Irrep(l, p) for l in range(4) for p in (1, -1)]:
        if target not in targets:
            with pytest.raises(ValueError):
                dense_coupling(o3.Irreps(irreps), nu, target)


@pytest.mark.parametrize("target", ["1o", "2o"])
def test_coupling_spans_the_same_space_as_chained_e3nn_wigner_3j(target):
    # every ordered triple of input irreps, every intermediate λ, fully symmetrized in M^3
    irreps, target = o3.Irreps("0e + 1o + 2e + 3o"), o3.Irrep(target)
    M, rows = irreps.dim, []
    for (s1, (_, ir1)), (s2, (_, ir2)), (s3, (_, ir3)) in itertools.product(zip(irreps.slices(), irreps), repeat=3):
        for lam in ir1 * ir2:
            if target not in lam * ir3:
                continue
            T = torch.einsum("abx,xcO->abcO", o3.wigner_3j(ir1.l, ir2.l, lam.l), o3.wigner_3j(lam.l, ir3.l, target.l))
            full = torch.zeros(M, M, M, target.dim)
            full[s1, s2, s3] = T
            sym = sum(full.permute(*p, 3) for p in itertools.permutations(range(3)))
            rows.append(sym.permute(3, 0, 1, 2).reshape(-1))
    ours = ours_as_rows(irreps, 3, target)
    assert_same_span(ours, torch.stack(rows))


# ------------------------------------------------------------------------------------------------
# product basis B


PRODUCT_CASES = [(lmax, nu, "0e + 1o") for lmax in (1, 2, 3) for nu in (1, 2, 3)] + [
    (1, 4, "0e + 1o"),
    (2, 4, "0e + 1o"),
    (3, 4, "0e"),
    (2, 2, "0e + 1o + 2e + 2o"),
    (2, 3, "0e + 1o + 1e + 2e + 2o"),
    (3, 3, "1o + 2e + 3o"),
    (0, 1, "0e"),
    (0, 3, "0e"),
]


def make_product_basis(lmax, nu, targets, C=3, S=2, seed=0):
    torch.manual_seed(seed)
    return ProductBasis(channels(C, natural(lmax)), channels(C, targets), correlation=nu, num_species=S)


@pytest.mark.parametrize("lmax,nu,targets", PRODUCT_CASES)
def test_product_basis_equivariance(lmax, nu, targets):
    pb = make_product_basis(lmax, nu, targets)
    A = 0.5 * torch.randn(5, 3, (lmax + 1) ** 2)
    species = torch.tensor([0, 1, 1, 0, 1])
    B = pb(A, species)
    assert B.shape == (5, pb.irreps_out.dim)
    for improper in (False, True):
        R = random_orthogonal(lmax + nu, inversion=improper, dtype=torch.float64)
        D_out = pb.irreps_out.D_from_matrix(R)
        assert_close(pb(rotate_A(A, natural(lmax), R), species), B @ D_out.T)


@pytest.mark.parametrize("nu", [1, 2, 3])
def test_fast_path_equals_einsum_reference(nu):
    pb = make_product_basis(3, nu, "0e + 1o + 2e + 2o" if nu > 1 else "0e + 1o + 2e", C=4, S=3)
    A = torch.randn(6, 4, 16)
    species = torch.tensor([0, 2, 1, 1, 0, 2])
    terms = pb.terms(A, species)
    reference = pb.reference(A, species)
    assert len(terms) == len(reference) == nu
    for fast, ref in zip(terms, reference):
        assert_close(fast, ref)
    assert_close(pb(A, species), sum(reference))


def test_fast_path_equals_dense_einsum_at_correlation_4():
    pb = make_product_basis(2, 4, "0e + 1o", C=2, S=2)
    A = torch.randn(3, 2, 9)
    species = torch.tensor([1, 0, 1])
    U = pb.coupling(4)  # [O, M, M, M, M, K]
    W = pb.weights[3][species]  # [N, K, C]
    expected = torch.einsum("oabdek,nca,ncb,ncd,nce,nkc->nco", U, A, A, A, A, W)  # [N, C, O]
    expected = torch.cat([expected[:, :, :1].reshape(3, -1), expected[:, :, 1:].reshape(3, -1)], dim=1)
    assert_close(pb.terms(A, species)[3], expected)


@pytest.mark.parametrize("nu", [1, 2, 3, 4])
def test_body_order_is_homogeneity_degree(nu):
    pb = make_product_basis(2, nu, "0e + 1o", C=3, S=2)
    A = torch.randn(4, 3, 9)
    species = torch.tensor([0, 1, 0, 1])
    lam = 1.7
    for order, (scaled, plain) in enumerate(zip(pb.terms(lam * A, species), pb.terms(A, species)), start=1):
        assert plain.abs().max() > 1e-3  # a non-trivial term
        assert_close(scaled, lam**order * plain)


def test_species_weights_are_per_atom():
    pb = make_product_basis(2, 3, "0e + 1o", C=3, S=3)
    A = torch.randn(1, 3, 9).expand(3, 3, 9)  # the same A for three atoms
    B = pb(A, torch.tensor([0, 1, 2]))
    assert (B[0] - B[1]).abs().max() > 1e-6 and (B[1] - B[2]).abs().max() > 1e-6
    for s in range(3):
        assert_close(pb(A[:1], torch.tensor([s]))[0], B[s])


def test_frozen_weights_keep_their_fold_until_they_change():
    """Frozen weights reuse their folded coupling; any change of W (in place, a loaded state
    dict, a dtype cast) gives the numbers of a fresh module; trainable weights never cache."""
    pb = make_product_basis(2, 3, "0e + 1o", C=3, S=2)
    A, species = torch.randn(4, 3, 9), torch.tensor([0, 1, 1, 0])
    expected = pb(A, species)
    assert not pb._frozen_folds  # trainable: nothing kept
    pb.requires_grad_(False)
    assert_close(pb(A, species), expected)
    assert pb._frozen_folds and pb(A, species).requires_grad is False
    with torch.no_grad():
        pb.weights[2].mul_(-2.0)  # in place: the version counter moves
    changed = pb(A, species)
    assert (changed - expected).abs().max() > 1e-3
    fresh = make_product_basis(2, 3, "0e + 1o", C=3, S=2)
    fresh.load_state_dict(pb.state_dict())
    assert_close(changed, fresh(A, species))
    pb.load_state_dict(make_product_basis(2, 3, "0e + 1o", C=3, S=2).state_dict())  # back to the first weights
    assert_close(pb(A, species), expected)
    pb.double()
    assert_close(pb(A.double(), species), expected.double(), tol=1e-5)


def test_gradcheck_and_double_backward():
    pb = make_product_basis(1, 3, "0e + 1o", C=2, S=2)
    A = torch.randn(2, 2, 4, requires_grad=True)
    species = torch.tensor([0, 1])
    assert torch.autograd.gradcheck(lambda a: pb(a, species), (A,))
    assert torch.autograd.gradgradcheck(lambda a: pb(a, species), (A,))


# ------------------------------------------------------------------------------------------------
# atomic basis A and the whole block


A_CASES = [
    ("3x0e", 1, "0e + 1o"),
    ("3x0e", 3, natural(3)),
    ("2x0e + 2x1o", 2, natural(2)),
    ("2x0e + 2x1o", 2, "0e + 1o + 1e + 2e + 2o"),
    ("2x0e + 1x1o + 2x2e", 3, "0e + 1o + 1e + 2e + 3o"),
]


def make_atomic_basis(irreps_in, lmax, irreps_A, C=3, seed=0):
    torch.manual_seed(seed)
    return AtomicBasis(
        o3.Irreps(irreps_in),
        o3.Irreps.spherical_harmonics(lmax),
        channels(C, irreps_A),
        num_basis=NUM_BASIS,
        avg_num_neighbors=3.0,
        radial_hidden=(8, 8),
    )


def random_structure(num_atoms, irreps_in, seed):
    torch.manual_seed(seed)
    positions = 2.0 * torch.rand(num_atoms, 3)
    h = torch.randn(num_atoms, o3.Irreps(irreps_in).dim)
    return positions, h


def atomic_basis(layer, positions, h, lmax, senders=None, receivers=None):
    if senders is None:
        senders, receivers = radius_graph(positions)
    sh, radial = edge_inputs(positions, senders, receivers, lmax)
    return layer(h, sh, radial, senders, receivers)


@pytest.mark.parametrize("irreps_in,lmax,irreps_A", A_CASES)
def test_atomic_basis_equivariance(irreps_in, lmax, irreps_A):
    layer = make_atomic_basis(irreps_in, lmax, irreps_A)
    positions, h = random_structure(7, irreps_in, seed=lmax)
    A = atomic_basis(layer, positions, h, lmax)  # [N, C, M]
    assert A.shape == (7, 3, o3.Irreps(irreps_A).dim)
    assert A.abs().max() > 1e-3
    for improper in (False, True):
        R = random_orthogonal(3, inversion=improper, dtype=torch.float64)
        D_in = o3.Irreps(irreps_in).D_from_matrix(R)
        A_rot = atomic_basis(layer, positions @ R.T, h @ D_in.T, lmax)
        assert_close(A_rot, rotate_A(A, irreps_A, R))


def test_atomic_basis_rejects_unreachable_irreps():
    with pytest.raises(ValueError):
        make_atomic_basis("3x0e", 1, "0e + 1e")  # Y_1 of a scalar is odd


class Block(torch.nn.Module):
    """A then B, with scalar node features from a species embedding (as in a first MACE layer)."""

    def __init__(self, lmax=2, nu=3, C=3, S=2):
        super().__init__()
        torch.manual_seed(1)
        self.lmax, self.embedding = lmax, torch.randn(S, C)
        self.A = make_atomic_basis(f"{C}x0e", lmax, natural(lmax), C=C)
        self.B = ProductBasis(self.A.irreps_out, channels(C, "0e + 1o"), correlation=nu, num_species=S)

    def forward(self, positions, species, senders=None, receivers=None):
        A = atomic_basis(self.A, positions, self.embedding[species], self.lmax, senders, receivers)
        return A, self.B(A, species)


def test_block_equivariance_and_terms():
    block = Block()
    positions, _ = random_structure(8, "0e", seed=5)
    species = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    A, B = block(positions, species)
    D_B = block.B.irreps_out.D_from_matrix
    for improper in (False, True):
        R = random_orthogonal(7, inversion=improper, dtype=torch.float64)
        _, B_rot = block(positions @ R.T, species)
        assert_close(B_rot, B @ D_B(R).T)


def test_one_neighbor_depends_only_on_that_neighbor():
    block = Block()
    v = torch.tensor([0.4, -1.1, 0.7])
    far = torch.tensor([[6.0, 0.0, 0.0], [7.0, 0.5, 0.3], [6.5, -1.0, 1.0]])
    positions = torch.cat([torch.zeros(1, 3), v[None], far])
    species = torch.tensor([0, 1, 1, 0, 0])
    _, B = block(positions, species)
    assert B[0].abs().max() > 1e-6
    # the same pair alone, or with the far atoms moved (still out of range): the same B_0
    _, B_pair = block(positions[:2], species[:2])
    assert_close(B[0], B_pair[0])
    _, B_moved = block(torch.cat([positions[:2], far + torch.tensor([0.5, 2.0, -1.0])]), species)
    assert_close(B[0], B_moved[0])
    # a function of the direction (equivariantly) and of the distance only
    for improper in (False, True):
        R = random_orthogonal(11, inversion=improper, dtype=torch.float64)
        _, B_rot = block(torch.stack([torch.zeros(3), R @ v]), species[:2])
        assert_close(B_rot[0], B[0] @ block.B.irreps_out.D_from_matrix(R).T)
    _, B_longer = block(torch.stack([torch.zeros(3), 1.2 * v]), species[:2])
    assert (B_longer[0] - B[0]).abs().max() > 1e-6


def test_permutation_of_neighbors_and_atoms():
    block = Block()
    positions, _ = random_structure(9, "0e", seed=3)
    species = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 1])
    senders, receivers = radius_graph(positions)
    A, B = block(positions, species, senders, receivers)
    order = torch.randperm(senders.shape[0])  # the same edges in another order
    A2, B2 = block(positions, species, senders[order], receivers[order])
    assert_close(A2, A)
    assert_close(B2, B)
    perm = torch.randperm(9)  # relabel the atoms: new atom i is old atom perm[i]
    inverse = torch.argsort(perm)
    A3, B3 = block(positions[perm], species[perm], inverse[senders], inverse[receivers])
    assert_close(A3, A[perm])
    assert_close(B3, B[perm])


def test_batched_equals_one_by_one():
    block = Block()
    (p1, _), (p2, _) = random_structure(5, "0e", seed=8), random_structure(7, "0e", seed=9)
    s1, s2 = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([1, 1, 0, 0, 1, 0, 1])
    e1, e2 = radius_graph(p1), radius_graph(p2)
    senders = torch.cat([e1[0], e2[0] + 5])
    receivers = torch.cat([e1[1], e2[1] + 5])
    A, B = block(torch.cat([p1, p2 + 100.0]), torch.cat([s1, s2]), senders, receivers)
    A1, B1 = block(p1, s1, *e1)
    A2, B2 = block(p2, s2, *e2)
    assert_close(A, torch.cat([A1, A2]))
    assert_close(B, torch.cat([B1, B2]))


@pytest.mark.parametrize("lmax,nu,targets", [(2, 1, "0e + 1o + 2e"), (3, 2, "0e + 1o + 2e + 2o"), (3, 3, "0e + 1o"),
                                             (2, 3, "0e + 1o + 1e + 2e + 2o"), (0, 3, "0e")])
def test_frozen_product_basis_kernel_equals_plain_operations(monkeypatch, without_native, lmax, nu, targets):
    """Frozen weights on more atoms than a chunk: the chunked kernel (molnets._ace_kernel) runs,
    with the plain operations' values and gradients, chunks of uneven length included."""
    from molnets import _ace_kernel

    pb = make_product_basis(lmax, nu, targets, C=4, S=3).requires_grad_(False)
    threads = torch.get_num_threads()
    monkeypatch.setattr(_ace_kernel, "CHUNK_NUMEL", -(-5 * _ace_kernel.numbers_per_atom(pb) // threads))
    assert _ace_kernel.atoms_per_chunk(pb) == 5  # 13 atoms: chunks of 5, 5 and 3
    A = torch.randn(13, 4, (lmax + 1) ** 2, requires_grad=True)
    species = torch.tensor([0, 2, 1, 1, 0, 2, 2, 1, 0, 0, 1, 2, 1])
    B = pb(A, species)
    assert type(B.grad_fn).__name__ == "FrozenProductBasisBackward"
    expected = pb._plain_forward(A, species)
    assert_close(B, expected, tol=1e-12)
    v = torch.randn_like(B)
    assert_close(torch.autograd.grad(B, A, v)[0], torch.autograd.grad(expected, A, v)[0], tol=1e-12)
    assert torch.autograd.gradcheck(lambda a: pb(a, species), (A,))
    assert torch.autograd.gradgradcheck(lambda a: pb(a, species), (A,))  # double backward: plain operations


def test_product_basis_kernel_runs_only_for_frozen_weights_on_many_atoms(monkeypatch, without_native):
    """Trainable weights, correlation 4, or atoms within one chunk: the plain operations."""
    from molnets import _ace_kernel

    monkeypatch.setattr(_ace_kernel, "CHUNK_NUMEL", 1)  # one atom a chunk
    A, species = torch.randn(3, 3, 9), torch.tensor([0, 1, 0])
    trainable = make_product_basis(2, 3, "0e + 1o", C=3, S=2)
    assert type(trainable(A, species).grad_fn).__name__ != "FrozenProductBasisBackward"
    frozen = make_product_basis(2, 3, "0e + 1o", C=3, S=2).requires_grad_(False)
    assert type(frozen(A.requires_grad_(), species).grad_fn).__name__ == "FrozenProductBasisBackward"
    assert not _ace_kernel.product_kernel_applies(frozen, A[:1])
    assert not _ace_kernel.product_kernel_applies(make_product_basis(2, 4, "0e", C=3, S=2).requires_grad_(False), A)
