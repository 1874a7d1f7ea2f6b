"""Exact permutation moments of a quadratic assignment statistic and the per-model summaries they need (the
closed-form CKA nulls of :mod:`pairscout.metrics.calibration`), one process or row-sharded under torch.distributed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

import pairscout.metrics.cka as _cka
from pairscout.metrics._cka_stats import rbf_tile

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# Exact permutation moments of a quadratic assignment statistic
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _GramSummary:
    """What the permutation moments of ``T = sum_ij A_ij B_pi(i)pi(j)`` need from a symmetric A (float64)."""

    diag: torch.Tensor  # (n,) A_ii
    rt: torch.Tensor  # (n,) off-diagonal row sums
    qt: torch.Tensor  # (n,) off-diagonal row sums of squares

    def sums(self) -> torch.Tensor:
        """The sums over rows every moment needs: ``[rows, tr, d2, S1, A2, sum(rt^2 - qt), P, sum rt^2]`` (float64).
        Under torch.distributed each rank's sums over its rows add up to the global ones (one ``all_reduce``)."""
        d, rt, qt = self.diag, self.rt, self.qt
        return torch.stack([torch.tensor(float(d.numel()), dtype=F64, device=d.device), d.sum(), (d * d).sum(), rt.sum(),
                            qt.sum(), (rt * rt - qt).sum(), (d * rt).sum(), (rt * rt).sum()])

    def parts(self) -> dict[str, float]:
        return _parts(self.sums())


def _parts(sums: torch.Tensor) -> dict[str, float]:
    """The moments' inputs from :meth:`_GramSummary.sums` (global sums)."""
    n_, tr, d2, s1, a2, a3, p, rt2 = (float(v) for v in sums.cpu())
    n = int(round(n_))
    # ||U||^2 of the U-centred matrix (Szekely & Rizzo): n (n - 3) HSIC_1(A, A)
    u2 = a2 + s1 * s1 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * rt2
    return {"n": n, "tr": tr, "d2": d2, "s1": s1, "a2": a2, "a3": a3,
            "a4": s1 * s1 - 2 * a2 - 4 * a3, "p": p, "q": s1 * tr - 2 * p, "u2": u2}


def _quadratic_assignment_moments(a: dict[str, float], b: dict[str, float]) -> tuple[float, float]:
    """Exact mean and variance over uniform permutations pi of ``T = sum_ij A_ij B_pi(i)pi(j)``.

    With T = D + Z (D the diagonal part, Z the off-diagonal one) and, per matrix, tr, S1 (off-diagonal sum),
    A2 = sum_{i!=j} A_ij^2, A3 = sum over distinct i, j, k of A_ij A_ik, A4 = S1^2 - 2 A2 - 4 A3,
    P = sum_i A_ii rt_i, Q = sum_i A_ii (S1 - 2 rt_i) (Mantel 1967; Hubert's QAP moments)::

        E[T]   = tr_A tr_B / n + S1_A S1_B / (n)_2
        E[D^2] = d2_A d2_B / n + (tr_A^2 - d2_A)(tr_B^2 - d2_B) / (n)_2
        E[DZ]  = 2 P_A P_B / (n)_2 + Q_A Q_B / (n)_3
        E[Z^2] = 2 A2_A A2_B / (n)_2 + 4 A3_A A3_B / (n)_3 + A4_A A4_B / (n)_4

    with (n)_k the falling factorial; Var = E[D^2] + 2 E[DZ] + E[Z^2] - E[T]^2.
    """
    n = a["n"]
    n2, n3, n4 = n * (n - 1), n * (n - 1) * (n - 2), n * (n - 1) * (n - 2) * (n - 3)
    mean = a["tr"] * b["tr"] / n + a["s1"] * b["s1"] / n2
    ed2 = a["d2"] * b["d2"] / n + (a["tr"] ** 2 - a["d2"]) * (b["tr"] ** 2 - b["d2"]) / n2
    edz = 2 * a["p"] * b["p"] / n2 + a["q"] * b["q"] / n3
    ez2 = 2 * a["a2"] * b["a2"] / n2 + 4 * a["a3"] * b["a3"] / n3 + a["a4"] * b["a4"] / n4
    var = ed2 + 2 * edz + ez2 - mean * mean
    return mean, max(var, 0.0)


def _summary_dtype(z: torch.Tensor, precision: str | None) -> torch.dtype:
    """Products of the moment summaries: float64 for ``precision="float64"``, float32 for ``float32`` / ``tf32``,
    else the features' own precision (float64 input stays float64); every sum is float64."""
    if precision == "float64" or (precision is None and z.dtype == F64):
        return F64
    return torch.float32


def _linear_summary(z: torch.Tensor, precision: str | None = None, counts: Sequence[int] | None = None) -> tuple[torch.Tensor, float]:
    """Sums (:meth:`_GramSummary.sums`) of the centred linear Gram ``Xc Xc^T`` from features (O(n d^2)) and
    ``||Xc Xc^T||_F^2 = ||Xc^T Xc||_F^2``.

    ``counts``: ``z`` is this rank's rows under torch.distributed (rows per rank). Every per-row quantity is a
    function of the row and of global feature-space sums (column sums, ``Xc^T Xc``), which one ``all_reduce`` each
    makes global, so each rank touches only its rows and the result equals one process's."""
    from pairscout.metrics.sharded_rows import _reduce

    sharded = counts is not None
    n = sum(counts) if sharded else z.shape[0]
    col = z.sum(0, dtype=F64)
    mu = (_reduce(col) if sharded else col) / n
    dt = _summary_dtype(z, precision)
    x = (z.to(F64) - mu).to(dt)  # products in dt, reductions in float64
    with _cka._matmul_precision(precision, z.device):
        g = (x.T @ x).to(F64)
        g = _reduce(g) if sharded else g
        cs = x.sum(0, dtype=F64)
        cs = _reduce(cs) if sharded else cs
        d = x.square().sum(1, dtype=F64)
        r = (x @ cs.to(dt)).to(F64)
        q = ((x @ g.to(dt)) * x).sum(1, dtype=F64)
    sums = _GramSummary(d, r - d, q - d * d).sums()
    return (_reduce(sums) if sharded else sums), float(g.square().sum())


def _rbf_summary(z: torch.Tensor, sigma: float, tile: int = 2048, precision: str | None = None,
                 counts: Sequence[int] | None = None) -> tuple[torch.Tensor, float]:
    """Sums (:meth:`_GramSummary.sums`) of the centred RBF Gram ``Kc = H K H`` in two passes over row tiles
    (never n x n), and ``||Kc||_F^2``.

    ``counts``: ``z`` is this rank's rows under torch.distributed. Each pass walks every rank's rows in blocks
    (:func:`pairscout.metrics.sharded_rows.row_blocks`); between the passes the n row means of K (n numbers, not
    n x d) are shared, since centring an entry needs both rows' means. Each rank forms only its rows' tiles."""
    from pairscout.metrics.sharded_rows import _reduce, gather_all, rank_world, row_blocks

    dt = _summary_dtype(z, precision)
    dev = z.device
    sharded = counts is not None
    counts = list(counts) if sharded else [z.shape[0]]
    n = sum(counts)
    lo = sum(counts[: rank_world()[0]]) if sharded else 0
    col = z.sum(0, dtype=F64)
    x = (z.to(F64) - (_reduce(col) if sharded else col) / n).to(dt)
    m = x.shape[0]
    gamma = 1.0 / (2.0 * sigma * sigma)
    sq = x.square().sum(1)

    def tiles() -> Any:
        """(rows a:b of this rank, global offset of the other block, K tile as float64) over every pair of blocks."""
        blocks = row_blocks(x, counts, tile) if sharded else ((a, x[a:a + tile]) for a in range(0, m, tile))
        for off, blk in blocks:
            bsq = blk.square().sum(1)
            for a in range(0, m, tile):
                b = min(a + tile, m)
                same = torch.arange(lo + a, lo + b, device=dev)[:, None] == torch.arange(off, off + blk.shape[0], device=dev)[None, :]
                k = rbf_tile(x[a:b], sq[a:b], blk, bsq, gamma).masked_fill_(same, 1.0)  # the diagonal: K_aa = 1 exactly
                yield a, b, off, k.to(F64), same

    with _cka._matmul_precision(precision, dev):
        r = torch.zeros(m, dtype=F64, device=dev)
        for a, b, _, k, _ in tiles():
            r[a:b] += k.sum(1)
        s = float(_reduce(r.sum()) if sharded else r.sum())
        mu = r / n
        mu_all = gather_all(mu[:, None], counts)[:, 0] if sharded else mu
        q = torch.zeros(m, dtype=F64, device=dev)
        d = torch.zeros(m, dtype=F64, device=dev)
        for a, b, off, k, same in tiles():
            kc = k - mu[a:b, None] - mu_all[off:off + k.shape[1]][None, :] + s / (n * n)
            q[a:b] += kc.square().sum(1)
            d[a:b] += (kc * same).sum(1)
    # a centred Gram matrix has zero row sums, so the off-diagonal row sum is -diag
    sums = _GramSummary(d, -d, q - d * d).sums()
    f2 = q.sum()
    return (_reduce(sums) if sharded else sums), float(_reduce(f2) if sharded else f2)
