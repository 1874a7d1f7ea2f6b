"""Linear CKA (biased and debiased) of every pair on all rows and on every delete-a-group subset, from per-group
sums over rows (one pass; :mod:`pairscout.estimation`).

The rows are globally centred once (float64 column means). For a subset S of the rows (all rows, or all but one
group) with ``n_S`` rows, ``delta = mean_S x`` and ``eps = mean_S y`` (small: the rows are already centred), every
HSIC term of :mod:`pairscout.metrics.cka` follows from sums over S, and a sum over "all but group g" is the total
minus group g's part:

* ``Xc^T Yc = M - n_S delta eps^T`` with ``M = sum_S x y^T``, so ``<K, L> = ||M - n_S delta eps^T||_F^2``;
* with ``p_a = |x_a|^2``, ``q_a = |y_a|^2`` the diagonal of the re-centred Gram is ``p'_a = p_a - 2 x_a.delta +
  |delta|^2``, and ``sum_S p' = sum p - n_S |delta|^2``,
  ``sum_S p' q' = sum pq - 2 (sum p y).eps - 2 delta.(sum q x) + 4 delta^T M eps + |eps|^2 sum p + |delta|^2 sum q
  - 3 n_S |delta|^2 |eps|^2``;
* ``K 1 = 0`` for re-centred rows, so biased ``HSIC_0 = <K, L> / (n_S - 1)^2`` and debiased
  ``HSIC_1 = [<K, L> - sum p'q' + (sum p')(sum q') / ((n_S-1)(n_S-2)) - 2 / (n_S-2) sum p'q'] / (n_S (n_S-3))``.

Per group and pair the work is one (d1 x d2) product of that group's rows (the bare product, split by group) and
G+1 (d1 x d2) updates; the linear CKA null moments need only the totals (:func:`null_sums`). Under torchrun each
process sums its own rows and one ``all_reduce`` per product makes them global.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

F64 = torch.float64
#: Bytes the per-group products of one vision model against a chunk of text models may hold.
GROUP_BYTES = 1 << 30


@dataclass
class ModelSums:
    """One model's per-group sums (leading dim G), float64."""

    count: torch.Tensor  # (G,) rows
    col: torch.Tensor  # (G, d) sum x
    gram: torch.Tensor  # (G, d, d) sum x x^T
    p: torch.Tensor  # (G,) sum |x|^2
    pp: torch.Tensor  # (G,) sum |x|^4
    xp: torch.Tensor  # (G, d) sum |x|^2 x


def subsets(t: torch.Tensor) -> torch.Tensor:
    """(G+1, ...) sums over [all rows, all but group 0, ..., all but group G-1] from per-group sums (G, ...)."""
    total = t.sum(0, keepdim=True)
    return torch.cat([total, total - t])


def _hsic(ss: torch.Tensor, spq: torch.Tensor, sp: torch.Tensor, sq: torch.Tensor, n: torch.Tensor,
          debiased: bool) -> torch.Tensor:
    """HSIC from ``<K, L>`` (ss), ``sum p'q'``, ``sum p'``, ``sum q'`` of re-centred rows, n rows (broadcasting)."""
    if not debiased:
        return ss / (n - 1) ** 2
    return (ss - spq + sp * sq / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * spq) / (n * (n - 3))


@dataclass
class LinearHSIC:
    """HSIC of every pair and model on every subset: cross (G+1, m, t), self (G+1, m + t), and the sums the
    self terms' zero tolerance compares against (G+1, m + t)."""

    cross: torch.Tensor
    self_: torch.Tensor
    base: torch.Tensor


def model_sums(z: torch.Tensor, seg: Sequence[int], reduce: Callable[[torch.Tensor], torch.Tensor]) -> ModelSums:
    """Per-group sums of one model's centred rows ``z`` (sorted by group, group g = rows seg[g]:seg[g+1])."""
    parts = [z[seg[g]:seg[g + 1]] for g in range(len(seg) - 1)]
    p = z.square().sum(1, dtype=F64)
    pg = [p[seg[g]:seg[g + 1]] for g in range(len(seg) - 1)]
    out = ModelSums(
        torch.tensor([float(x.shape[0]) for x in parts], dtype=F64, device=z.device),
        torch.stack([x.sum(0, dtype=F64) for x in parts]),
        _group_grams(parts),
        torch.stack([q.sum() for q in pg]),
        torch.stack([(q * q).sum() for q in pg]),
        torch.stack([(q.to(z.dtype) @ x).to(F64) if x.dtype != F64 else q @ x for q, x in zip(pg, parts, strict=True)]),
    )
    for f in ("count", "col", "gram", "p", "pp", "xp"):
        setattr(out, f, reduce(getattr(out, f)))
    return out


def _frobenius_subsets(parts: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """(G+1,) ``||S||_F^2`` of [total, total - parts[0], ...] without forming them: ``||T||^2``, then
    ``||T||^2 - 2 <T, P_g> + ||P_g||^2`` (parts (G, a, b), total (a, b))."""
    pf, tf = parts.reshape(parts.shape[0], -1), total.reshape(-1)
    tt = tf @ tf
    return torch.cat([tt[None], tt - 2 * (pf @ tf) + torch.einsum("gi,gi->g", pf, pf)])  # products, no temporaries


def _bilinear_subsets(u: torch.Tensor, parts: torch.Tensor, total: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(G+1,) ``u_S^T S v_S`` for S in [total, total - parts[0], ...] (u (G+1, a), v (G+1, b))."""
    whole = torch.einsum("gi,ij,gj->g", u, total, v)
    return whole - torch.cat([whole.new_zeros(1), torch.einsum("gi,gij,gj->g", u[1:], parts, v[1:])])


def _group_grams(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """(G, d, d) float64 ``x_g^T x_g`` of every group, written in place (no stacked copy)."""
    d = parts[0].shape[1]
    out = torch.empty(len(parts), d, d, dtype=F64, device=parts[0].device)
    for g, x in enumerate(parts):
        if x.dtype == F64:
            torch.mm(x.T, x, out=out[g])
        else:
            out[g] = x.T @ x
    return out


def self_terms(s: ModelSums, debiased: Sequence[bool]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each entry of ``debiased``: (G+1,) HSIC of a model with itself on every subset and the base of its
    zero tolerance (the sums are formed once for both estimators).

    ``||Xc_S^T Xc_S||^2 = ||G_S - n_S delta delta^T||^2 = ||G_S||^2 - 2 n_S delta^T G_S delta + n_S^2 |delta|^4`` with
    ``G_S`` the total minus one group's part: every term a reduction, no (G+1, d, d) tensor."""
    n, col, sp, spp, xp = (subsets(getattr(s, f)) for f in ("count", "col", "p", "pp", "xp"))
    total = s.gram.sum(0)
    delta = col / n[:, None]
    dd = delta.square().sum(1)
    dmd = _bilinear_subsets(delta, s.gram, total, delta)
    ss = _frobenius_subsets(s.gram, total) - 2 * n * dmd + n * n * dd * dd
    sp1 = sp - n * dd
    spq = spp - 4 * (xp * delta).sum(1) + 4 * dmd + 2 * dd * sp - 3 * n * dd * dd
    return [(_hsic(ss, spq, sp1, sp1, n, deb), ss - spq if deb else ss) for deb in debiased]


def cross_terms(x: torch.Tensor, sx: ModelSums, ybuf: torch.Tensor, sys_: Sequence[ModelSums], dims: Sequence[int],
                seg: Sequence[int], debiased: Sequence[bool], reduce: Callable[[torch.Tensor], torch.Tensor],
                py: torch.Tensor) -> list[torch.Tensor]:
    """(G+1, t) cross HSIC of vision model ``x`` against every text model (``ybuf`` = the text models' centred
    rows side by side, ``py`` (n, t) their squared row norms) on every subset, one tensor per entry of ``debiased``."""
    dev = x.device
    t = len(dims)
    offs = [0]
    for d in dims:
        offs.append(offs[-1] + d)
    G = len(seg) - 1
    px = x.square().sum(1, dtype=F64)
    outs = [torch.empty(G + 1, t, dtype=F64, device=dev) for _ in debiased]
    # text models in chunks so that G per-group (dx, chunk) products fit GROUP_BYTES
    per_col = 8 * (G + 1) * x.shape[1] * 2
    start = 0
    while start < t:
        stop, width = start, 0
        while stop < t and (stop == start or (width + dims[stop]) * per_col <= GROUP_BYTES):
            width += dims[stop]
            stop += 1
        c0, c1 = offs[start], offs[stop]
        yb = ybuf[:, c0:c1]
        m_g = torch.stack([(x[seg[g]:seg[g + 1]].T @ yb[seg[g]:seg[g + 1]]).to(F64) for g in range(G)])
        ytp = torch.stack([px[seg[g]:seg[g + 1]].to(yb.dtype) @ yb[seg[g]:seg[g + 1]] for g in range(G)]).to(F64)
        xtq = torch.stack([py[seg[g]:seg[g + 1], start:stop].T.to(x.dtype) @ x[seg[g]:seg[g + 1]] for g in range(G)]).to(F64)
        pq = torch.stack([px[seg[g]:seg[g + 1]] @ py[seg[g]:seg[g + 1], start:stop] for g in range(G)])
        m_g, ytp, xtq, pq = reduce(m_g), reduce(ytp), reduce(xtq), reduce(pq)
        total = m_g.sum(0)
        ytp, xtq, pq = subsets(ytp), subsets(xtq), subsets(pq)
        n = subsets(sx.count)
        delta = subsets(sx.col) / n[:, None]  # (G+1, dx)
        sp = subsets(sx.p)
        for jj, j in enumerate(range(start, stop)):
            a, b = offs[j] - c0, offs[j + 1] - c0
            sy = sys_[j]
            eps = subsets(sy.col) / n[:, None]  # (G+1, dy)
            sq = subsets(sy.p)
            parts, tj = m_g[:, :, a:b], total[:, a:b]
            # ||Xc_S^T Yc_S||^2 = ||M_S - n_S delta eps^T||^2, M_S the total minus one group's part (no (G+1, dx, dy))
            dme = _bilinear_subsets(delta, parts, tj, eps)
            dd, ee = delta.square().sum(1), eps.square().sum(1)
            ss = _frobenius_subsets(parts, tj) - 2 * n * dme + n * n * dd * ee
            spq = (pq[:, jj] - 2 * (ytp[:, a:b] * eps).sum(1) - 2 * (delta * xtq[:, jj]).sum(1) + 4 * dme
                   + ee * sp + dd * sq - 3 * n * dd * ee)
            for o, deb in zip(outs, debiased, strict=True):
                o[:, j] = _hsic(ss, spq, sp - n * dd, sq - n * ee, n, deb)
        del m_g, total
        start = stop
    return outs


def null_sums(s: ModelSums) -> tuple[torch.Tensor, float]:
    """The sums of :meth:`pairscout.metrics.calibration._GramSummary.sums` of the centred linear Gram of all rows
    and ``||Xc^T Xc||_F^2``, from the totals (``q_a = x_a^T G x_a`` enters only through ``sum q = ||G||^2``;
    ``r = X cs`` through ``cs.cs``, ``cs^T G cs`` and ``(sum p x).cs``)."""
    n = s.count.sum()
    cs, g, tr, d2, xp = s.col.sum(0), s.gram.sum(0), s.p.sum(), s.pp.sum(), s.xp.sum(0)
    f2 = g.square().sum()
    sum_r, r2, dr = cs @ cs, cs @ g @ cs, xp @ cs
    rt2 = r2 - 2 * dr + d2
    a2 = f2 - d2
    sums = torch.stack([n, tr, d2, sum_r - tr, a2, rt2 - a2, dr - d2, rt2])
    return sums, float(f2)
