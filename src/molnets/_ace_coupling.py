"""Generalized Clebsch-Gordan coefficients of the ACE product basis (private to ``molnets.ace``).

The ν-fold product A^{⊗ν} of one channel of the atomic basis is coupled to an irrep (L, p) by a
tensor U^{(ν)}[O, M, ..., M, K] (Drautz 2019, PRB 99 014104, Eq. 27; Batatia et al. 2022,
"MACE", Eq. 10). Because every factor is the same A, only the part of U that is symmetric in
its ν input indices contributes; U is therefore an orthonormal basis (K elements) of the
*symmetric* equivariant tensors, computed once, in float64:

1. for every multiset of input irreps (i_1 <= ... <= i_ν) and every chain of intermediate
   couplings ((l_1 ⊗ l_2) -> λ_2, (λ_2 ⊗ l_3) -> λ_3, ...) ending in (L, p), the chained
   Wigner-3j tensor (Yutsis et al.; Drautz 2019, Eq. 28);
2. its symmetrization over the permutations of equal input irreps (the other orderings of the
   multiset are copies of the same block of the symmetric tensor);
3. an orthonormal basis of the span of all of these, by SVD, in the Frobenius inner product of
   the full [O, M^ν] tensor.

The result is stored sparsely, as the coefficients of the polynomial in A that U^{(ν)} defines:

    Σ_{a_1..a_ν} U[o, a_1, ..., a_ν, k] A_{a_1} ... A_{a_ν} = Σ_t coeffs[t, o, k] Π_s A_{monomials[t, s]}

with sorted monomials (a_1 <= ... <= a_ν). ``dense_coupling`` rebuilds the dense U from them.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Dict, List, NamedTuple, Tuple

import torch
from e3nn import o3
from torch import Tensor

from molnets.layers.clebsch_gordan import wigner_3j

__all__ = ["symmetric_coupling", "dense_coupling", "irreps_slices", "contraction_plan", "ContractionPlan"]

_TOL = 1e-10  # singular values and coefficients below this are exact zeros lost to rounding


def irreps_slices(irreps: o3.Irreps) -> List[Tuple[int, int, o3.Irrep]]:
    """(start, stop, irrep) of every irrep in a multiplicity-one irreps list, in order."""
    out, start = [], 0
    for mul, ir in irreps:
        for _ in range(mul):
            out.append((start, start + ir.dim, ir))
            start += ir.dim
    return out


def _chains(irs: Tuple[o3.Irrep, ...], target: o3.Irrep) -> List[Tensor]:
    """All chained couplings of irs[0] ⊗ irs[1] ⊗ ... to ``target``: tensors [d_1, ..., d_ν, O]."""
    lmax_rest = [sum(ir.l for ir in irs[t + 1 :]) for t in range(len(irs))]
    current = [(torch.eye(irs[0].dim, dtype=torch.float64), irs[0])]  # [d_1, d_λ]
    for t in range(1, len(irs)):
        grown = []
        for T, ir_cur in current:
            for ir_new in ir_cur * irs[t]:
                if ir_new.l > target.l + lmax_rest[t]:
                    continue  # can no longer couple down to the target
                cg = wigner_3j(ir_cur.l, irs[t].l, ir_new.l, dtype=torch.float64)  # [d_λ, d_t, d_new]
                grown.append((torch.tensordot(T, cg, dims=([-1], [0])), ir_new))
        current = grown
    return [T for T, ir in current if ir == target]


def _block_entries(dims: Tuple[int, ...], starts: Tuple[int, ...]) -> Tensor:
    """Global component indices of every entry of a block: [Π d, ν] long."""
    grids = torch.meshgrid(*[torch.arange(d) + s for d, s in zip(dims, starts)], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


@lru_cache(maxsize=None)
def _symmetric_coupling_f64(irreps_in: str, correlation: int, target: str) -> Tuple[Tensor, Tensor]:
    slices = irreps_slices(o3.Irreps(irreps_in))
    ir_out = o3.Irrep(target)
    nu = correlation
    blocks = []  # (monomial keys [Π d], weight w_β, list of symmetrized block tensors [Π d, O])
    for combo in itertools.combinations_with_replacement(range(len(slices)), nu):
        irs = tuple(slices[i][2] for i in combo)
        chains = _chains(irs, ir_out)
        if not chains:
            continue
        # permutations of positions that carry the same irrep map the block onto itself
        stab = [p for p in itertools.permutations(range(nu)) if all(combo[p[s]] == combo[s] for s in range(nu))]
        sym = [sum(T.permute(*p, nu) for p in stab) / len(stab) for T in chains]
        entries = _block_entries(tuple(ir.dim for ir in irs), tuple(slices[i][0] for i in combo))
        weight = math.factorial(nu) / len(stab)  # number of orderings of the multiset
        blocks.append((entries, weight, [S.reshape(entries.shape[0], ir_out.dim) for S in sym]))
    if not blocks:
        raise ValueError(f"no coupling of ({irreps_in})^{nu} to {target}")

    # Frobenius inner product of full symmetric tensors = Σ_β w_β <U_β, V_β>
    rows = []
    for b, (entries, weight, sym) in enumerate(blocks):
        for S in sym:
            row = [torch.zeros(e.shape[0] * ir_out.dim, dtype=torch.float64) for e, _, _ in blocks]
            row[b] = math.sqrt(weight) * S.reshape(-1)
            rows.append(torch.cat(row))
    _, sv, Vh = torch.linalg.svd(torch.stack(rows), full_matrices=False)  # [P, D]
    basis = Vh[sv > _TOL]  # [K, D] orthonormal (the chains have norm 1: an absolute threshold)
    if basis.shape[0] == 0:
        raise ValueError(f"no symmetric coupling of ({irreps_in})^{nu} to {target}")

    # back to polynomial coefficients on sorted monomials
    keys, coeffs, offset = [], [], 0
    M = slices[-1][1]
    for entries, weight, _ in blocks:
        size = entries.shape[0] * ir_out.dim
        U_beta = basis[:, offset : offset + size].reshape(-1, entries.shape[0], ir_out.dim) / math.sqrt(weight)
        offset += size
        mono = entries.sort(dim=1).values  # [Π d, ν]
        key = sum(mono[:, s] * M ** (nu - 1 - s) for s in range(nu))  # [Π d]
        keys.append(key)
        coeffs.append(weight * U_beta.permute(1, 2, 0))  # [Π d, O, K]
    key = torch.cat(keys)
    uniq, inverse = torch.unique(key, return_inverse=True)
    total = torch.zeros((uniq.shape[0],) + coeffs[0].shape[1:], dtype=torch.float64)
    total.index_add_(0, inverse, torch.cat(coeffs))  # [T, O, K]
    keep = total.abs().amax(dim=(1, 2)) > _TOL
    uniq, total = uniq[keep], total[keep]
    monomials = torch.stack([(uniq // M ** (nu - 1 - s)) % M for s in range(nu)], dim=1)  # [T, ν]
    return monomials, total


def symmetric_coupling(irreps_in: o3.Irreps, correlation: int, ir_out: o3.Irrep) -> Tuple[Tensor, Tensor]:
    """Orthonormal symmetric generalized Clebsch-Gordan coupling U^{(ν)}, as polynomial coefficients.

    Args:
        irreps_in: irreps of one channel of A, multiplicity one each (e.g. "0e + 1o + 2e + 3o").
        correlation: ν >= 1, the number of factors A.
        ir_out: target irrep (L, p).

    Returns:
        monomials [T, ν] (long, sorted component indices into M = irreps_in.dim) and
        coeffs [T, O, K] (float64), O = 2L + 1, K the number of independent symmetric couplings.
    """
    monomials, coeffs = _symmetric_coupling_f64(str(o3.Irreps(irreps_in)), int(correlation), str(o3.Irrep(ir_out)))
    return monomials.clone(), coeffs.clone()


def dense_coupling(irreps_in: o3.Irreps, correlation: int, ir_out: o3.Irrep) -> Tensor:
    """The dense symmetric coupling tensor U^{(ν)} [O, M, ..., M, K] (float64), orthonormal in K.

    Σ_{o, a} U[o, a, k] U[o, a, k'] = δ_{kk'}, symmetric in the ν indices a, and equivariant:
    U[o, a] = Σ D^{L}(R)_{o o'} U[o', a'] Π_s D(R)_{a'_s a_s}... (Drautz 2019, Eq. 27).
    """
    monomials, coeffs = symmetric_coupling(irreps_in, correlation, ir_out)
    nu, M = int(correlation), o3.Irreps(irreps_in).dim
    O, K = coeffs.shape[1:]
    U = torch.zeros((M,) * nu + (O, K), dtype=torch.float64)
    perms = list(itertools.permutations(range(nu)))
    for p in perms:
        idx = tuple(monomials[:, s] for s in p)
        U.index_put_(idx, coeffs / len(perms), accumulate=True)
    return U.permute(nu, *range(nu), nu + 1).contiguous()  # [O, M^ν, K]


class ContractionPlan(NamedTuple):
    """Index and coefficient tensors of ``ProductBasis``'s fast path (all float64 or long).

    U[ν-1] [T_ν, O, K_ν]: coefficients of the degree-ν monomials (ν < ν_max), which are
    built as monomial[prefix] * A[last]; prefix[ν-2] ([M, T] one-hot at ν = 2, else [T] long)
    and last[ν-2] ([M, T] one-hot) for ν = 2 .. ν_max - 1. U_top_low [n_low, d_low, O, K] and
    U_top_last [T, d_last, O, K]: the top degree by Horner's rule on its largest index d,
    split at the last irrep of A (d_low = its first component).
    """

    num_couplings: List[int]
    U: List[Tensor]
    prefix: List[Tensor]
    last: List[Tensor]
    U_top_low: Tensor
    U_top_last: Tensor


def contraction_plan(irreps_A: o3.Irreps, irreps_B: o3.Irreps, correlation: int) -> ContractionPlan:
    """The fast-path tensors for B = Σ_ν W^{(ν)} U^{(ν)} A^{⊗ν}, A and B one channel each.

    Couplings to several target irreps are stacked: O = irreps_B.dim, and K_ν the total number
    of couplings of degree ν (a target irrep's block of K has zeros outside its O rows).
    Raises ValueError if some target irrep is reached by no degree.
    """
    irreps_A, irreps_B, top = o3.Irreps(irreps_A), o3.Irreps(irreps_B), int(correlation)
    M, O = irreps_A.dim, irreps_B.dim
    used: List[Dict[Tuple[int, ...], Tensor]] = []  # per ν: monomial -> coefficients [O, K]
    num_couplings, reached = [], set()
    for nu in range(1, top + 1):
        per_target = []
        for start, stop, ir in irreps_slices(irreps_B):
            try:
                per_target.append((start, stop, *symmetric_coupling(irreps_A, nu, ir)))
            except ValueError:
                continue  # no symmetric coupling of A^ν to this irrep
            reached.add(ir)
        K = sum(coeffs.shape[2] for *_, coeffs in per_target)
        table: Dict[Tuple[int, ...], Tensor] = {}
        k0 = 0
        for start, stop, monomials, coeffs in per_target:
            for t, mono in enumerate(map(tuple, monomials.tolist())):
                row = table.setdefault(mono, torch.zeros(O, K, dtype=torch.float64))
                row[start:stop, k0 : k0 + coeffs.shape[2]] = coeffs[t]
            k0 += coeffs.shape[2]
        used.append(table)
        num_couplings.append(K)
    if reached != {ir for _, ir in irreps_B}:
        raise ValueError(f"{irreps_B} is not reachable from products of up to {top} x {irreps_A}")

    # degree-ν monomials (ν < top) are built from degree-(ν-1) prefixes: close the sets
    # top-down; sort each level by (largest index, monomial) for the Horner split below
    levels: List[List[Tuple[int, ...]]] = [[] for _ in range(top)]
    needed = {mono[:-1] for mono in used[top - 1]}
    for nu in range(top - 1, 0, -1):
        levels[nu - 1] = sorted(set(used[nu - 1]) | needed, key=lambda m: (m[-1], m))
        needed = {mono[:-1] for mono in levels[nu - 1]}
    if top > 1:
        levels[0] = [(a,) for a in range(M)]
    onehot = torch.eye(M, dtype=torch.float64)
    U, prefix, last = [], [], []
    for nu in range(1, top):
        zero = torch.zeros(O, num_couplings[nu - 1], dtype=torch.float64)
        U.append(torch.stack([used[nu - 1].get(m, zero) for m in levels[nu - 1]]))  # [T, O, K]
        if nu > 1:
            position = {m: t for t, m in enumerate(levels[nu - 2])}
            index = torch.tensor([position[m[:-1]] for m in levels[nu - 1]], dtype=torch.long)
            # from the M components of A, a one-hot product is much faster than indexing
            prefix.append(onehot[:, index].contiguous() if nu == 2 else index)
            last.append(onehot[:, [m[-1] for m in levels[nu - 1]]].contiguous())  # [M, T]

    # top degree: monomial = prefix p + (d,) with max(p) <= d; with the prefixes sorted by
    # their largest index, those below the last irrep of A are a leading run of the list
    prefixes = levels[top - 2] if top > 1 else [()]
    position = {m: t for t, m in enumerate(prefixes)}
    d_split = irreps_slices(irreps_A)[-1][0]
    n_low = sum(1 for p in prefixes if (p[-1] if p else -1) < d_split)
    K = num_couplings[top - 1]
    U_low = torch.zeros(n_low, d_split, O, K, dtype=torch.float64)
    U_last = torch.zeros(len(prefixes), M - d_split, O, K, dtype=torch.float64)
    for mono, row in used[top - 1].items():
        if mono[-1] < d_split:
            U_low[position[mono[:-1]], mono[-1]] = row
        else:
            U_last[position[mono[:-1]], mono[-1] - d_split] = row
    return ContractionPlan(num_couplings, U, prefix, last, U_low, U_last)
