"""The ACE block: the atomic basis A and the body-ordered product basis B.

The atomic cluster expansion (Drautz 2019, PRB 99 014104) as used by MACE (Batatia et al. 2022,
"MACE: Higher order equivariant message passing neural networks for fast and accurate force
fields", NeurIPS) and laid out in Batatia et al. 2022, "The design space of E(3)-equivariant
atom-centered interatomic potentials" (arXiv:2205.06643):

    A_{i,k l3 m3} = Σ_{l1 m1, l2 m2} C^{l3 m3}_{l1 m1, l2 m2} Σ_{j∈N(i)} R_{k l1 l2 l3}(r_ji) Y_{l1}^{m1}(r̂_ji) W_{k l2} h_{j, l2 m2}

    B_{i,k,LM} = Σ_{ν=1}^{ν_max} Σ_η W^{(ν)}_{z_i, k, η} Σ_{l m} U^{(ν)}_{LM, η, l m} Π_{t=1}^{ν} A_{i,k,l_t m_t}

A product of ν factors A, each a sum over neighbors, is a (ν+1)-body function of the
environment: the correlation order ν sets the body order ν + 1.

Layout (channels before components, DESIGN.md): A is [N, C, M], with M = the components of
one channel of ``AtomicBasis.irreps_out`` in e3nn order (e.g. 0e+1o+2e+3o: M = 16). B leaves
the block flat, [N, ProductBasis.irreps_out.dim], in e3nn's layout, ready for an
``o3.Linear``-style layer.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
from e3nn import o3
from torch import Tensor, nn

from molnets._ace_coupling import contraction_plan, dense_coupling, irreps_slices
from molnets._ace_kernel import FrozenProductBasis, NativeProductBasis, native_product_applies, product_kernel_applies
from molnets._constants import register_constant, restore_constants
from molnets._frozen import frozen_cached
from molnets.layers.clebsch_gordan import wigner_3j
from molnets.layers.mlp import MLP
from molnets.layers.scatter import scatter_sum

__all__ = [
    "AtomicBasis",
    "ProductBasis",
    "product_basis_order1",
    "product_basis_order2",
    "product_basis_order3",
]


def _uniform_channels(irreps: o3.Irreps, what: str) -> Tuple[int, o3.Irreps]:
    """Split "Cx0e + Cx1o + ..." into C and the one-channel irreps "0e + 1o + ..."."""
    irreps = o3.Irreps(irreps)
    muls = {mul for mul, _ in irreps}
    if len(muls) != 1:
        raise ValueError(f"{what} needs the same number of channels for every irrep, got {irreps}")
    return muls.pop(), o3.Irreps([(1, ir) for _, ir in irreps])


class AtomicBasis(nn.Module):
    """The ACE atomic basis A: one equivariant convolution of node features with edge harmonics.

        A_{i,k l3 m3} = (1/n̄) Σ_{l1 m1, l2 m2} C^{l3 m3}_{l1 m1, l2 m2}
                        Σ_{j∈N(i)} R_{k l1 l2 l3}(r_ji) Y_{l1}^{m1}(r̂_ji) W_{k l2} h_{j, l2 m2}

    (Drautz 2019, Eq. 22; Batatia et al. 2022 "MACE", Eq. 8-9). W mixes the channels of each
    irrep of h, R is a radial MLP on the radial basis with one weight per channel k and coupling
    path (l1, l2, l3), C are Clebsch-Gordan coefficients (e3nn's Wigner-3j times sqrt(2 l3 + 1),
    divided by sqrt(number of paths into l3) to keep A's scale independent of the path count),
    and n̄ is the average number of neighbors. All paths with the same (l3, p3) are summed, as in
    the equation.

    Args:
        irreps_in: irreps of the node features h, any multiplicities (e.g. "32x0e + 32x1o").
        irreps_sh: irreps of the edge spherical harmonics Y (e.g. "0e + 1o + 2e + 3o").
        irreps_out: irreps of A, C channels each (e.g. "128x0e + 128x1o + 128x2e + 128x3o").
        num_basis: size K of the radial basis that ``edge_radial`` holds.
        avg_num_neighbors: n̄, the normalization of the neighbor sum.
        radial_hidden: widths of the hidden layers of the radial MLP R.

    Shapes:
        h [N, irreps_in.dim], edge_sh [E, irreps_sh.dim], edge_radial [E, K], senders [E],
        receivers [E]  ->  A [N, C, M], M = irreps_out.dim // C (one channel, e3nn order)
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_sh: o3.Irreps,
        irreps_out: o3.Irreps,
        *,
        num_basis: int,
        avg_num_neighbors: float,
        radial_hidden: Sequence[int] = (64, 64, 64),
    ) -> None:
        super().__init__()
        self.irreps_in, self.irreps_sh, self.irreps_out = (o3.Irreps(i) for i in (irreps_in, irreps_sh, irreps_out))
        self.num_channels, irreps_A = _uniform_channels(self.irreps_out, "irreps_out")
        self.inv_avg_num_neighbors = 1.0 / float(avg_num_neighbors)
        C = self.num_channels

        # W_{k l2}: one [mul, C] channel mixing per irrep of h
        self.in_slices = [(s.start, s.stop, mul, ir.dim) for (mul, ir), s in zip(self.irreps_in, self.irreps_in.slices())]
        self.channel_weights = nn.ParameterList(torch.randn(mul, C) / math.sqrt(mul) for _, _, mul, _ in self.in_slices)

        # paths (l1 from Y, l2 from h, l3 in A) and their dense coupling tensor
        sh_slices = irreps_slices(self.irreps_sh)
        h_slices = irreps_slices(o3.Irreps([(1, ir) for _, ir in self.irreps_in]))
        A_slices = irreps_slices(irreps_A)
        paths = [
            (s1, s2, s3)
            for s3 in A_slices
            for s1 in sh_slices
            for s2 in h_slices
            if s3[2] in s1[2] * s2[2]
        ]
        reached = {s3[2] for _, _, s3 in paths}
        if reached != {ir for _, _, ir in A_slices}:
            raise ValueError(f"{irreps_A} is not reachable from {self.irreps_sh} x {self.irreps_in}")
        fan_in = {ir: sum(1 for _, _, s3 in paths if s3[2] == ir) for ir in reached}
        num_cols = sum(s3[2].dim for _, _, s3 in paths)
        M_h = sum(ir.dim for _, ir in self.irreps_in)
        cg = torch.zeros(self.irreps_sh.dim, M_h, num_cols, dtype=torch.float64)
        path_of_col, col_to_m = [], torch.zeros(num_cols, irreps_A.dim, dtype=torch.float64)
        col = 0
        for p, ((a0, a1, ir1), (b0, b1, ir2), (o0, o1, ir3)) in enumerate(paths):
            norm = math.sqrt(ir3.dim / fan_in[ir3])
            cg[a0:a1, b0:b1, col : col + ir3.dim] = norm * wigner_3j(ir1.l, ir2.l, ir3.l, dtype=torch.float64)
            col_to_m[torch.arange(col, col + ir3.dim), torch.arange(o0, o1)] = 1.0
            path_of_col += [p] * ir3.dim
            col += ir3.dim
        self.num_paths = len(paths)
        # float64 masters: .double() after a float32 build keeps the exact coefficients
        register_constant(self, "cg", cg)  # [M_sh, M_h, Q]
        self.register_buffer("path_of_col", torch.tensor(path_of_col, dtype=torch.long))  # [Q]
        register_constant(self, "col_to_m", col_to_m)  # [Q, M]
        self.radial_weights = MLP([num_basis, *radial_hidden, C * self.num_paths], activation="silu")

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        return restore_constants(super()._apply(fn, recurse))

    def forward(self, h: Tensor, edge_sh: Tensor, edge_radial: Tensor, senders: Tensor, receivers: Tensor) -> Tensor:
        N, E, C = h.shape[0], edge_sh.shape[0], self.num_channels
        mixed = [
            torch.einsum("nub,uc->ncb", h[:, start:stop].reshape(N, mul, dim), W)  # [N, C, 2 l2 + 1]
            for (start, stop, mul, dim), W in zip(self.in_slices, self.channel_weights)
        ]
        Wh = torch.cat(mixed, dim=2)  # [N, C, M_h]
        R = self.radial_weights(edge_radial).reshape(E, C, self.num_paths)  # [E, C, P]
        sh_cg = torch.einsum("ea,abq->ebq", edge_sh, self.cg)  # [E, M_h, Q]
        messages = torch.bmm(Wh[senders], sh_cg)  # [E, C, Q]
        messages = messages * R[:, :, self.path_of_col]  # [E, C, Q]
        messages = messages @ self.col_to_m  # [E, C, M]: sum the paths into each (l3, m3)
        A = scatter_sum(messages, receivers, dim_size=N)  # [N, C, M]
        return A * self.inv_avg_num_neighbors


# ---------------------------------------------------------------------------------------------
# The product basis: the readable reference (hand-written einsums, correlation 1 to 3) ...


def product_basis_order1(A: Tensor, U: Tensor, W: Tensor, species: Tensor) -> Tensor:
    """Correlation-order-1 term of the product basis (Batatia et al. 2022 "MACE", Eq. 10-11).

        B[n, c, o] = Σ_k W[s(n), k, c] Σ_a U[o, a, k] A[n, c, a]

    Shapes:
        A [N, C, M], U [O, M, K], W [S, K, C], species [N]  ->  [N, C, O]
    """
    UA = torch.einsum("oak,nca->ncok", U, A)  # [N, C, O, K]
    return torch.einsum("ncok,nkc->nco", UA, W[species])  # [N, C, O]


def product_basis_order2(A: Tensor, U: Tensor, W: Tensor, species: Tensor) -> Tensor:
    """Correlation-order-2 term of the product basis (Batatia et al. 2022 "MACE", Eq. 10-11).

        B[n, c, o] = Σ_k W[s(n), k, c] Σ_{a, b} U[o, a, b, k] A[n, c, a] A[n, c, b]

    Shapes:
        A [N, C, M], U [O, M, M, K], W [S, K, C], species [N]  ->  [N, C, O]
    """
    UAA = torch.einsum("oabk,nca,ncb->ncok", U, A, A)  # [N, C, O, K]
    return torch.einsum("ncok,nkc->nco", UAA, W[species])  # [N, C, O]


def product_basis_order3(A: Tensor, U: Tensor, W: Tensor, species: Tensor) -> Tensor:
    """Correlation-order-3 term of the product basis (Batatia et al. 2022 "MACE", Eq. 10-11).

        B[n, c, o] = Σ_k W[s(n), k, c] Σ_{a, b, d} U[o, a, b, d, k] A[n, c, a] A[n, c, b] A[n, c, d]

    Shapes:
        A [N, C, M], U [O, M, M, M, K], W [S, K, C], species [N]  ->  [N, C, O]
    """
    UAAA = torch.einsum("oabdk,nca,ncb,ncd->ncok", U, A, A, A)  # [N, C, O, K]
    return torch.einsum("ncok,nkc->nco", UAAA, W[species])  # [N, C, O]


_REFERENCE = {1: product_basis_order1, 2: product_basis_order2, 3: product_basis_order3}


# ... and the module, whose fast path is tested equal to it.


class ProductBasis(nn.Module):
    """The ACE product basis B: symmetric contraction of A up to correlation order ν_max.

        B_{i,k,LM} = Σ_{ν=1}^{ν_max} Σ_η W^{(ν)}_{z_i, k, η} Σ_{l m} U^{(ν)}_{LM, η, l m} Π_{t=1}^{ν} A_{i,k,l_t m_t}

    (Drautz 2019, Eq. 27-30; Batatia et al. 2022 "MACE", Eq. 10-11; Batatia et al. 2022
    "The design space...", Sec. 3). U^{(ν)} (``coupling(ν)``) is an orthonormal basis of the
    equivariant tensors that are symmetric in their ν inputs, computed once, exactly (see
    ``molnets._ace_coupling``); W^{(ν)} are learnable weights per species, coupling index η and
    channel k. The ν-th term is a homogeneous polynomial of degree ν in A: a (ν+1)-body term.

    Fast path (tested equal to the einsums ``product_basis_order1..3``): U^{(ν)} is symmetric,
    so U^{(ν)} · A^{⊗ν} only needs the *distinct* monomials A_{a1} ... A_{aν} (a1 <= ... <= aν)
    that U touches (77 of the 4096 entries of A^{⊗3} for 0e+1o+2e+3o -> 0e). The weights are
    folded into U first, for every species at once (S is small; the atom's own species is
    picked at the end). Degrees below ν_max are built one factor at a time, each monomial a
    lower-degree one times one more A; the top degree is never materialized: by Horner's rule,
    B^{(ν_max)} = Σ_d A_d Σ_p (monomial p of degree ν_max - 1) (W U)_{p d}, two dense batched
    products per call. Nothing of size M^ν is ever formed. With frozen weights (eager, CPU,
    ν_max <= 3) the compiled kernel (``molnets._native``, where a C compiler is) walks the list
    of the couplings' nonzero terms (distinct monomial, output component) instead, each atom's
    own species only: 414 terms for 0e+1o+2e+3o -> 0e+1o at ν = 3, where the folded weights of
    the dense products are ~93% zeros. Without it, on more atoms than one cache-sized chunk (a
    crystal) the same numbers are computed chunk by chunk of atoms, the backward computing each
    chunk's monomials again instead of keeping them (``molnets._ace_kernel``).

    Args:
        irreps_in: irreps of A, C channels each (e.g. "128x0e + 128x1o + 128x2e + 128x3o").
        irreps_out: irreps of B, the same C channels each (e.g. "128x0e + 128x1o").
        correlation: ν_max, 1 to 4.
        num_species: S, the number of species indices.

    Shapes:
        A [N, C, M] (M = irreps_in.dim // C), species [N] (long, 0..S-1)
        ->  B [N, irreps_out.dim] (e3nn layout)
    """

    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, *, correlation: int, num_species: int) -> None:
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        C, self.irreps_A = _uniform_channels(self.irreps_in, "irreps_in")
        C_out, self.irreps_B = _uniform_channels(self.irreps_out, "irreps_out")
        if C != C_out or not 1 <= correlation <= 4:
            raise ValueError(f"need equal channels in and out and 1 <= correlation <= 4, got {C}, {C_out}, {correlation}")
        self.num_channels, self.correlation, self.num_species = C, int(correlation), int(num_species)
        self.out_slices = [(start, stop) for start, stop, _ in irreps_slices(self.irreps_B)]
        self.num_components_out = self.irreps_B.dim  # O; a plain int for torch.compile

        plan = contraction_plan(self.irreps_A, self.irreps_B, self.correlation)
        self.num_couplings = plan.num_couplings
        # float64 masters: .double() after a float32 build keeps the exact coefficients
        self._coupling_shapes: Dict[str, Tuple[int, int, int]] = {}
        for nu in range(1, self.correlation):
            self._register_coupling(f"U{nu}", plan.U[nu - 1].unsqueeze(1))  # [T, 1, O, K]
            if nu > 1:
                register_constant(self, f"last{nu}", plan.last[nu - 2])  # [M, T] one-hot
                prefix = plan.prefix[nu - 2]  # [M, T] one-hot at ν = 2, else [T] long
                if prefix.is_floating_point():
                    register_constant(self, f"prefix{nu}", prefix)
                else:
                    self.register_buffer(f"prefix{nu}", prefix)
        self._register_coupling("U_top_low", plan.U_top_low)  # [n_low, d_low, O, K]
        self._register_coupling("U_top_last", plan.U_top_last)  # [T, d_last, O, K]
        self.weights = nn.ParameterList(
            torch.randn(self.num_species, K, C) / math.sqrt(max(K, 1)) for K in self.num_couplings
        )
        self._frozen_folds: Dict[str, Tuple[tuple, Tensor]] = {}  # see _fold

    def _register_coupling(self, name: str, U: Tensor) -> None:
        """Keep U [T, D, O, K] (float64) for ``_fold`` in compressed form: its nonzero columns
        ``{name}_values`` [K, nnz] (coupling index first: folding the weights in is one plain
        matmul) and where each (column, species) lands in the folded [T, D, S, O] layout,
        ``{name}_offsets`` [nnz S]. U is exact and sparse (about 8% of the (t, d, o) columns
        of the top degree are nonzero for 0e+1o+2e+3o -> 0e+1o); it is rebuilt from the
        config, never saved."""
        T, D, O, K = U.shape
        dense = U.permute(3, 0, 1, 2).reshape(K, T * D * O)  # [K, T D O]
        columns = torch.nonzero(dense.abs().sum(0) > 0).flatten()  # [nnz], column = (t D + d) O + o
        S = self.num_species
        offsets = (columns // O)[:, None] * (S * O) + torch.arange(S)[None, :] * O + (columns % O)[:, None]
        register_constant(self, f"{name}_values", dense[:, columns].contiguous(), persistent=False)  # [K, nnz]
        self.register_buffer(f"{name}_offsets", offsets.flatten(), persistent=False)  # [nnz S]
        self._coupling_shapes[name] = (T, D, O)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        return restore_constants(super()._apply(fn, recurse))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        # Files saved before molnets stopped saving the U (in another layout, [T, ..., K]): the
        # U built from the config are exact, so the saved copies are dropped, not loaded.
        for name in [f"U{nu}" for nu in range(1, self.correlation)] + ["U_top_low", "U_top_last"]:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def coupling(self, correlation: int) -> Tensor:
        """The dense U^{(ν)} [O, M, ..., M, K] (float64, O = irreps_out.dim // C), for tests and reading."""
        K_total = self.num_couplings[correlation - 1]
        U = torch.zeros((self.irreps_B.dim,) + (self.irreps_A.dim,) * correlation + (K_total,), dtype=torch.float64)
        k0 = 0
        for start, stop, ir in irreps_slices(self.irreps_B):
            try:
                block = dense_coupling(self.irreps_A, correlation, ir)  # [O_L, M^ν, K_L]
            except ValueError:
                continue
            U[start:stop, ..., k0 : k0 + block.shape[-1]] = block
            k0 += block.shape[-1]
        return U

    def _flat(self, B: Tensor) -> Tensor:
        """[N, C, O] -> [N, irreps_out.dim] in e3nn layout (channel-major within each irrep)."""
        N = B.shape[0]
        return torch.cat([B[:, :, start:stop].reshape(N, -1) for start, stop in self.out_slices], dim=1)

    def _fold(self, name: str, nu: int) -> Tensor:
        """W^{(ν)} folded into the coupling ``name`` (U [T, D, O, K]) for every species,

            (W U)[c, t, d, s, o] = Σ_k W[s, k, c] U[t, d, o, k]         ->  [C, T, D S O],

        on U's nonzero columns only (one small matmul), laid into a zero [C, T, D, S, O] by one
        index_copy: a fixed cost per call, independent of N, which is most of the product basis
        on a small molecule. Frozen weights (``requires_grad`` False, as a calculator runs a
        model) keep their fold from call to call (``molnets._frozen``)."""
        W = self.weights[nu - 1]  # [S, K, C]
        return frozen_cached(self._frozen_folds, name, [W], lambda: self._fold_now(name, nu))

    def _fold_now(self, name: str, nu: int) -> Tensor:
        """``_fold`` computed now. -> [C, T, D S O]"""
        W = self.weights[nu - 1]  # [S, K, C]
        S, K, C = W.shape
        T, D, O = self._coupling_shapes[name]
        values = getattr(self, f"{name}_values")  # [K, nnz]
        folded = W.transpose(1, 2).reshape(S * C, K) @ values  # [S C, nnz]
        folded = folded.view(S, C, values.shape[1]).permute(1, 2, 0).reshape(C, S * values.shape[1])  # [C, nnz S]
        out = folded.new_zeros(C, T * D * S * O)  # [C, T D S O]
        return out.index_copy_(1, getattr(self, f"{name}_offsets"), folded).view(C, T, D * S * O)

    def _terms_every_species(self, A: Tensor) -> List[Tensor]:
        """The ν-terms for every species at once (W folded into U first): each [C, N, S O]."""
        N, C, S, O = A.shape[0], self.num_channels, self.num_species, self.num_components_out
        x = A.transpose(0, 1).contiguous()  # [C, N, M]
        monomials = x  # [C, N, T], degree ν
        out = []
        for nu in range(1, self.correlation):
            if nu == 2:
                monomials = (x @ self.prefix2) * (x @ self.last2)  # [C, N, T]
            elif nu > 2:
                prefix, last = getattr(self, f"prefix{nu}"), getattr(self, f"last{nu}")
                monomials = monomials.gather(2, prefix.expand(C, N, -1)) * (x @ last)  # [C, N, T]
            out.append(torch.bmm(monomials, self._fold(f"U{nu}", nu)))  # [C, N, S O]
        if self.correlation == 1:
            monomials = x.new_ones(C, N, 1)  # the empty prefix
        n_low = self._coupling_shapes["U_top_low"][0]
        H = torch.cat(
            [torch.bmm(monomials[:, :, :n_low], self._fold("U_top_low", self.correlation)),
             torch.bmm(monomials, self._fold("U_top_last", self.correlation))], dim=2
        ).reshape(C, N, x.shape[2], S * O)  # [C, N, M, S O]: the polynomial divided by A_d
        out.append((H * x.unsqueeze(3)).sum(2))  # [C, N, S O]
        return out

    def _select(self, B_every: Tensor, species: Tensor) -> Tensor:
        """Keep each atom's own species and lay out flat: [C, N, S O] -> [N, irreps_out.dim]."""
        C, N, O = B_every.shape[0], B_every.shape[1], self.num_components_out
        index = species.reshape(1, N, 1, 1).expand(C, N, 1, O)  # [C, N, 1, O]
        B = B_every.reshape(C, N, self.num_species, O).gather(2, index).squeeze(2)  # [C, N, O]
        return self._flat(B.transpose(0, 1))  # [N, irreps_out.dim]

    def terms(self, A: Tensor, species: Tensor) -> List[Tensor]:
        """The ν = 1 .. ν_max terms of B separately (fast path), each [N, irreps_out.dim]."""
        return [self._select(B, species) for B in self._terms_every_species(A)]

    def forward(self, A: Tensor, species: Tensor) -> Tensor:
        if native_product_applies(self, A):  # frozen weights, the compiled kernel
            return NativeProductBasis.apply(A, species, self)
        if product_kernel_applies(self, A):  # frozen weights, many atoms: chunk by chunk
            return FrozenProductBasis.apply(A, species, self)
        return self._plain_forward(A, species)

    def _plain_forward(self, A: Tensor, species: Tensor) -> Tensor:
        """``forward`` in differentiable operations on all atoms at once (the definition the
        chunked kernel is tested against, and its double backward). [N, irreps_out.dim]"""
        return self._select(sum(self._terms_every_species(A)), species)

    def reference(self, A: Tensor, species: Tensor) -> List[Tensor]:
        """The ν = 1 .. min(ν_max, 3) terms by the hand-written einsums, each [N, irreps_out.dim]."""
        return [
            self._flat(_REFERENCE[nu](A, self.coupling(nu).to(A.dtype), self.weights[nu - 1], species))
            for nu in range(1, min(self.correlation, 3) + 1)
        ]
