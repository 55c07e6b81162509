"""Cartesian rank-2 tensor operations of TensorNet (Simeon & De Fabritiis 2023).

G. Simeon, G. De Fabritiis, "TensorNet: Cartesian tensor representations for efficient
learning of molecular potentials", NeurIPS 2023.

A 3x3 tensor splits into its irreducible parts under rotations (paper Eq. 2):

    X = I δ + A + S,   I = Tr(X) / 3,   A = (X - Xᵀ) / 2,   S = (X + Xᵀ) / 2 - I δ,

a scalar (l = 0), an antisymmetric part (3 numbers, l = 1) and a symmetric traceless part
(5 numbers, l = 2). Under a rotation R every part transforms as X -> R X Rᵀ.

Components: an orthonormal basis B_0..B_8 of the 3x3 matrices (Frobenius product) adapted to
the parts (k = 0: I; k = 1..3: A; k = 4..8: S), so that the 9 numbers <B_k, X> hold the
three parts in three slices, the Frobenius norm is the Euclidean norm of the components, and a
channel-linear map per part is one batched matrix product. Features are ``[N, C, 3, 3]`` at
layer boundaries; components ``[N, C, 9]`` live inside layers (message passing, linear maps).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .._constants import register_constant, restore_constants
from .._frozen import frozen_cached

__all__ = [
    "decompose",
    "compose",
    "tensor_norm",
    "anticommutator",
    "plus_square",
    "skew",
    "skew_to_vector",
    "traceless_outer",
    "component_basis",
    "ComponentBasis",
    "to_components",
    "from_components",
    "PART_OF_COMPONENT",
    "PART_SLICES",
    "PART_SIZES",
    "expand_parts",
    "transpose_components",
    "part_norms",
    "PartNorms",
    "DirectionComponents",
    "TensorLinear",
]

# Which part (0: I, 1: A, 2: S) each of the 9 components belongs to, and each part's slice.
PART_OF_COMPONENT = (0, 1, 1, 1, 2, 2, 2, 2, 2)
PART_SLICES = ((0, 1), (1, 4), (4, 9))
PART_SIZES = (1, 3, 5)


def decompose(X: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Irreducible parts of X = I δ + A + S (Simeon & De Fabritiis 2023, Eq. 2).

    Shapes:
        X [*, 3, 3]  ->  I [*], A [*, 3, 3], S [*, 3, 3]

    >>> I, A, S = decompose(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    >>> I, A[0, 1], S[0, 1]
    (tensor(1.), tensor(1.), tensor(1.))
    """
    I = X.diagonal(dim1=-2, dim2=-1).mean(-1)                                   # [*]
    XT = X.transpose(-2, -1)                                                   # [*, 3, 3]
    A = 0.5 * (X - XT)                                                         # [*, 3, 3]
    eye = torch.eye(3, dtype=X.dtype, device=X.device)
    S = 0.5 * (X + XT) - I[..., None, None] * eye                              # [*, 3, 3]
    return I, A, S


def compose(I: Tensor, A: Tensor, S: Tensor) -> Tensor:
    """X = I δ + A + S, the inverse of ``decompose``.

    Shapes:
        I [*], A [*, 3, 3], S [*, 3, 3]  ->  [*, 3, 3]
    """
    eye = torch.eye(3, dtype=A.dtype, device=A.device)
    return I[..., None, None] * eye + A + S                                     # [*, 3, 3]


def tensor_norm(X: Tensor) -> Tensor:
    """The paper's tensor norm ||X|| = Tr(Xᵀ X) = Σ_ab X_ab² (the squared Frobenius norm).

    Invariant under X -> Q X Qᵀ for any orthogonal Q, and under X -> Xᵀ.

    Shapes:
        X [*, 3, 3]  ->  [*]

    >>> tensor_norm(2 * torch.eye(3))
    tensor(12.)
    """
    return X.square().sum((-2, -1))                                              # [*]


def anticommutator(M: Tensor, Y: Tensor) -> Tensor:
    """M Y + Y M for stacks of 3x3 matrices (TensorNet's message update, Eq. 10): batched
    matrix products on the CPU, a broadcast product and sum on other devices (``_matmul3``).

    Shapes:
        M [*, 3, 3], Y [*, 3, 3]  ->  [*, 3, 3]

    >>> anticommutator(torch.eye(3), 2 * torch.eye(3))[0]
    tensor([4., 0., 0.])
    """
    if _batched_products(M):
        M3, Y3 = M.view(-1, 3, 3), Y.view(-1, 3, 3)                                 # [B, 3, 3]
        return torch.baddbmm(torch.bmm(M3, Y3), Y3, M3).view(M.shape)
    return _matmul3(M, Y) + _matmul3(Y, M)


def plus_square(X: Tensor, D: Tensor) -> Tensor:
    """X + D + D D for stacks of 3x3 matrices (TensorNet's node update, Eq. 11), computed as
    ``anticommutator`` is on each device.

    Shapes:
        X [*, 3, 3], D [*, 3, 3]  ->  [*, 3, 3]

    >>> plus_square(torch.zeros(3, 3), 2 * torch.eye(3))[0]
    tensor([6., 0., 0.])
    """
    if _batched_products(D):
        D3 = D.view(-1, 3, 3)                                                        # [B, 3, 3]
        return torch.baddbmm((X + D).view(-1, 3, 3), D3, D3).view(D.shape)
    return X + D + _matmul3(D, D)


def _batched_products(like: Tensor) -> bool:
    """Batched matrix products for 3x3 stacks in eager mode on the CPU; elsewhere (GPUs, and
    compiled code, which fuses them with their neighbours) the broadcast form."""
    return like.device.type == "cpu" and not torch.compiler.is_compiling()


def _matmul3(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for stacks of 3x3 matrices as one broadcast product [*, 3, 3, 3] and a sum over j:
    on a GPU the batched GEMM of 3x3 matrices is the slow way (an H100 spent 7.4 of 25.8 ms of a
    TensorNet-style call on 2048 atoms in them); on the CPU a batched matrix product is faster."""
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)                               # [*, 3, 3]


def skew(v: Tensor) -> Tensor:
    """The antisymmetric tensor of a vector, skew(v) w = v × w (paper Eq. 4, A_ij from r̂_ij).

    skew(R v) = det(R) R skew(v) Rᵀ: the antisymmetric part is an axial vector.

    Shapes:
        v [*, 3]  ->  [*, 3, 3]

    >>> skew(torch.tensor([0.0, 0.0, 1.0])) @ torch.tensor([1.0, 0.0, 0.0])
    tensor([0., 1., 0.])
    """
    x, y, z = v.unbind(-1)                                                      # [*] each
    zero = torch.zeros_like(x)
    rows = (zero, -z, y, z, zero, -x, -y, x, zero)
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))                      # [*, 3, 3]


def skew_to_vector(A: Tensor) -> Tensor:
    """The vector v with skew(v) = antisymmetric part of A (inverse of ``skew``).

    Shapes:
        A [*, 3, 3]  ->  [*, 3]
    """
    x = A[..., 2, 1] - A[..., 1, 2]
    y = A[..., 0, 2] - A[..., 2, 0]
    z = A[..., 1, 0] - A[..., 0, 1]
    return 0.5 * torch.stack((x, y, z), dim=-1)                                  # [*, 3]


def traceless_outer(v: Tensor) -> Tensor:
    """The symmetric traceless tensor v vᵀ - |v|² δ / 3 (paper Eq. 4, S_ij from r̂_ij).

    Shapes:
        v [*, 3]  ->  [*, 3, 3]
    """
    outer = v[..., :, None] * v[..., None, :]                                   # [*, 3, 3]
    eye = torch.eye(3, dtype=v.dtype, device=v.device)
    return outer - v.square().sum(-1)[..., None, None] / 3 * eye                # [*, 3, 3]


def component_basis(dtype: Optional[torch.dtype] = None, device=None) -> Tensor:
    """Orthonormal basis B_k of the 3x3 matrices, adapted to I (k = 0), A (1..3), S (4..8).

        B_0 = δ / √3,   B_{1+a} = skew(e_a) / √2,
        B_4..B_6 = (E_xy + E_yx, E_xz + E_zx, E_yz + E_zy) / √2,
        B_7 = (E_xx - E_yy) / √2,   B_8 = (E_xx + E_yy - 2 E_zz) / √6.

    Σ_ab B_k[a, b] B_l[a, b] = δ_kl.

    Shapes:
        ->  [9, 3, 3]
    """
    B = torch.zeros(9, 3, 3, dtype=torch.float64)
    B[0] = torch.eye(3, dtype=torch.float64) / math.sqrt(3)
    B[1:4] = skew(torch.eye(3, dtype=torch.float64)) / math.sqrt(2)
    for k, (a, b) in enumerate(((0, 1), (0, 2), (1, 2))):
        B[4 + k, a, b] = B[4 + k, b, a] = 1 / math.sqrt(2)
    B[7, 0, 0], B[7, 1, 1] = 1 / math.sqrt(2), -1 / math.sqrt(2)
    B[8, 0, 0] = B[8, 1, 1] = 1 / math.sqrt(6)
    B[8, 2, 2] = -2 / math.sqrt(6)
    return B.to(dtype=dtype or torch.get_default_dtype(), device=device)


class ComponentBasis(nn.Module):
    """``component_basis`` as a module, exact in the dtype of the model.

    The basis is a constant buffer (``molnets._constants``): computed in float64 and rebuilt
    from that master copy whenever the module is cast, so a model built in float32 and cast to
    float64 carries no float32 rounding (which would break float64 equivariance at 1e-8).

    Shapes:
        like (any tensor)  ->  [9, 3, 3] in like's dtype and device
    """

    def __init__(self) -> None:
        super().__init__()
        register_constant(self, "basis", component_basis(torch.float64), persistent=False)  # [9, 3, 3]

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        return restore_constants(super()._apply(fn, recurse))

    def forward(self, like: Tensor) -> Tensor:
        return self.basis.to(like.dtype)                                            # [9, 3, 3], no copy in the model's dtype


def to_components(X: Tensor, basis: Optional[Tensor] = None) -> Tensor:
    """Components c_k = <B_k, X> of X in the basis of ``component_basis``.

    c[..., 0] = √3 I, c[..., 1:4] = √2 skew_to_vector(A), c[..., 4:9] the 5 numbers of S;
    Σ_k c_k² = tensor_norm(X). Pass ``basis`` (from ``component_basis`` or a
    ``ComponentBasis`` module) to avoid rebuilding it on every call.

    Shapes:
        X [*, 3, 3], basis [9, 3, 3]  ->  [*, 9]
    """
    if basis is None:
        basis = component_basis(X.dtype, X.device)
    return X.flatten(-2) @ basis.flatten(1).T                                   # [*, 9]


def from_components(c: Tensor, basis: Optional[Tensor] = None) -> Tensor:
    """X = Σ_k c_k B_k, the inverse of ``to_components``.

    Shapes:
        c [*, 9], basis [9, 3, 3]  ->  [*, 3, 3]
    """
    if basis is None:
        basis = component_basis(c.dtype, c.device)
    return (c @ basis.flatten(1)).unflatten(-1, (3, 3))                          # [*, 3, 3]


def expand_parts(factors: Tensor) -> Tensor:
    """Spread one number per part (I, A, S) onto the 9 components: out[k] = factors[part(k)].

    Shapes:
        factors [*, 3]  ->  [*, 9]
    """
    shape = factors.shape[:-1]
    return torch.cat(
        (factors[..., 0:1], factors[..., 1:2].expand(shape + (3,)), factors[..., 2:3].expand(shape + (5,))),
        dim=-1,
    )                                                                           # [*, 9]


def transpose_components(c: Tensor) -> Tensor:
    """Components of Xᵀ from those of X: the antisymmetric part changes sign.

    Shapes:
        c [*, 9]  ->  [*, 9]
    """
    return torch.cat((c[..., 0:1], -c[..., 1:4], c[..., 4:9]), dim=-1)          # [*, 9]


def part_norms(c: Tensor) -> Tensor:
    """The norms (||I δ||, ||A||, ||S||) of the three parts (``tensor_norm`` of each), from
    components; they sum to ``tensor_norm(X)`` and are O(3)-invariant and invariant under Xᵀ.

    Shapes:
        c [*, 9]  ->  [*, 3]
    """
    squares = c.square()                                                        # [*, 9]
    return torch.stack(
        (squares[..., 0], squares[..., 1:4].sum(-1), squares[..., 4:9].sum(-1)), dim=-1
    )                                                                           # [*, 3]


class PartNorms(nn.Module):
    """``part_norms`` of every channel's matrix, grouped by part: the invariants that TensorNet's
    readout reads (||I δ||, ||A||, ||S|| of each channel; Simeon & De Fabritiis 2023).

        c = B X (components, ``to_components``),   n_p = Σ_(k in part p) c_k²

    as two matrix products over the 9 entries of all N C matrices at once (the basis B [9, 9] and
    the 0/1 part sums [3, 9], exact constant buffers), one operation and autograd node each
    instead of a slice, sum and stack per part. Equal to
    ``part_norms(to_components(X)).transpose(1, 2).flatten(1)``.

    Shapes:
        X [N, C, 3, 3]  ->  [N, 3C] (the C norms of I, then of A, then of S)
    """

    def __init__(self) -> None:
        super().__init__()
        register_constant(self, "basis", component_basis(torch.float64).flatten(1), persistent=False)  # [9, 9]
        part_sums = torch.zeros(3, 9, dtype=torch.float64)
        for part, (a, b) in enumerate(PART_SLICES):
            part_sums[part, a:b] = 1
        register_constant(self, "part_sums", part_sums, persistent=False)       # [3, 9]

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        return restore_constants(super()._apply(fn, recurse))

    def forward(self, X: Tensor) -> Tensor:
        N, C = X.shape[:2]
        # entries of all N C matrices as rows [9, N C]: a view of a TensorNet-style kernel's output
        c = torch.mm(self.basis.to(X.dtype), X.reshape(N * C, 9).T)             # [9, N C]
        norms = torch.mm(self.part_sums.to(X.dtype), c.square())                # [3, N C]
        return norms.view(3, N, C).transpose(0, 1).reshape(N, 3 * C)           # [N, 3C]


class DirectionComponents(nn.Module):
    """Components of the edge tensor δ + skew(r̂) + (r̂ r̂ᵀ - |r̂|² δ / 3) of a direction r̂
    (the three parts of TensorNet's embedding, paper Eq. 4), in one matrix product:

        c = c(δ) + Σ_a r̂_a c(skew(e_a)) + Σ_ab r̂_a r̂_b c(E_ab - δ_ab δ / 3)

    (c(.) = ``to_components``; every term is linear in 1, r̂ and r̂ r̂ᵀ). Equal to
    ``to_components(compose(1, skew(r̂), traceless_outer(r̂)))`` with a few operations instead of
    some twenty; the coefficients are an exact constant buffer.

    Shapes:
        unit [P, 3]  ->  [P, 9]
    """

    def __init__(self) -> None:
        super().__init__()
        eye = torch.eye(3, dtype=torch.float64)
        basis = component_basis(torch.float64)
        outer_terms = eye[:, None, :, None] * eye[None, :, None, :] - eye[:, :, None, None] * eye / 3  # [3, 3, 3, 3]
        rows = torch.cat([skew(eye), outer_terms.flatten(0, 1)])                       # [12, 3, 3]
        register_constant(self, "coefficients", to_components(rows, basis), persistent=False)  # [12, 9]
        register_constant(self, "constant", to_components(eye, basis), persistent=False)       # [9]

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        return restore_constants(super()._apply(fn, recurse))

    def forward(self, unit: Tensor) -> Tensor:
        outer = (unit[:, :, None] * unit[:, None, :]).flatten(1)                       # [P, 9]
        return torch.addmm(self.constant, torch.cat((unit, outer), dim=1), self.coefficients)  # [P, 9]


class TensorLinear(nn.Module):
    """Channel mixing of each irreducible part with its own weights (paper Eq. 7):

        Y^(d) = Σ_c (W^I_dc I^(c) δ + W^A_dc A^(c) + W^S_dc S^(c))

    Linear maps over channels commute with X -> R X Rᵀ and with X -> Xᵀ, so the output is
    equivariant like the input. Optionally each output part is scaled per atom and channel
    (the embedding's norm-dependent gates, paper Eq. 5).

    Computed in three products: components in, one batched product over the 9 components
    (each with its part's weights; the stack is kept between calls while the weights are
    frozen, ``molnets._frozen``), Cartesian out. On small systems this is several times fewer
    operations than one product per part on sliced components.

    Args:
        in_channels: C.
        out_channels: D.

    Shapes:
        X [N, C, 3, 3], part_scales [N, D, 3] (optional, for I, A, S)  ->  [N, D, 3, 3]
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = int(in_channels), int(out_channels)
        bound = 1 / math.sqrt(self.in_dim)  # nn.Linear's default scale
        self.weight = nn.Parameter(torch.empty(3, self.out_dim, self.in_dim).uniform_(-bound, bound))  # [3, D, C]
        self.basis = ComponentBasis()
        self._frozen_weight: dict = {}

    def component_weight(self) -> Tensor:
        """The weights of each component's part, ready for a batched product: [9, C, D]."""
        return frozen_cached(self._frozen_weight, "weight", [self.weight],
                             lambda: expand_parts(self.weight.permute(2, 1, 0)).permute(2, 0, 1).contiguous())

    def forward(self, X: Tensor, part_scales: Optional[Tensor] = None) -> Tensor:
        num_atoms = X.shape[0]
        basis = self.basis(X).flatten(1)                                        # [9, 9]: B_k over (a, b)
        # components as [9, N C] (component-major): one matrix product in, one batched product
        # for the three parts' maps (the weights of a part repeated on its rows), one product out
        c = torch.mm(basis, X.reshape(-1, 9).T).view(9, num_atoms, self.in_dim)   # [9, N, C]
        out = torch.bmm(c, self.component_weight())                             # [9, N, D]
        if part_scales is not None:
            out = out * expand_parts(part_scales).permute(2, 0, 1)              # [9, N, D]
        return torch.mm(out.view(9, -1).T, basis).view(num_atoms, self.out_dim, 3, 3)  # [N, D, 3, 3]

    def extra_repr(self) -> str:
        return f"in_channels={self.in_dim}, out_channels={self.out_dim}"
