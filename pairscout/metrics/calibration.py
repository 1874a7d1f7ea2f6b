"""Calibrated pair metrics: each raw value beside its chance level under shuffled pairings, a score in null
standard deviations, and p-values corrected across all pairs.

The null hypothesis is "no pairing": the rows of the text side are shuffled (one permutation applied to every
text model). For each metric and pair this module gives

* ``null_mean``, ``null_sd``: mean and standard deviation of the metric over row permutations;
* ``z = (value - null_mean) / null_sd``: the **calibrated score, in null standard deviations** (0 = chance;
  for independent embeddings z is centred on 0 with unit spread, whatever n, d or the metric);
* ``p``: one-sided p-value of a value this high under the null; ``p_holm``: Holm's step-down correction
  across all pairs of that metric (valid under any dependence between pairs, which share encoders).

How the null is obtained (``method="auto"``, the default):

* **CKA, any kernel, debiased** (HSIC_1 of Song et al. 2012): exact permutation moments in closed form.
  HSIC_1(K, L) = <K', L'> / (n(n-3)) with K' the U-centred Gram matrix (zero diagonal, zero row sums;
  Szekely & Rizzo 2014), and U-centring commutes with permutations. For zero-diagonal, zero-row-sum
  matrices Mantel's permutation moments reduce to ``E[<K', P L' P^T>] = 0`` and
  ``Var = 2 ||K'||^2 ||L'||^2 / (n(n-3))``, so **debiased CKA has null mean 0 and null sd
  sqrt(2 / (n(n-3))) exactly** (for every pair whose self terms are > 0).
* **CKA, biased** (linear in feature form, O(n d^2); RBF in two passes over Gram tiles, O(n^2 d)): exact
  permutation mean and variance of ``T = <Kc, P Lc P^T>`` from Mantel's moments of a quadratic assignment
  statistic, split into its diagonal and off-diagonal parts (``_quadratic_assignment_moments``; each
  model contributes its diagonal, off-diagonal row sums and row sums of squares).
* p-values of the CKA family: the gamma approximation of the HSIC null (Gretton et al. 2008), fitted to
  the exact moments: biased, ``T ~ Gamma(shape = E^2 / V, scale = V / E)``; debiased (mean 0, can be
  negative), the same gamma shifted to mean 0, with the biased statistic's mean as shift and the exact
  debiased variance (the two statistics differ by diagonal terms only). No permutation is run, so it costs
  a fraction of one metric evaluation and resolves p far below 1e-3. Tested against brute-force
  permutations (``tests/test_calibration.py``).
* **Mutual k-NN**: exact permutation mean and variance in closed form too. Its statistic is the weighted overlap
  ``T = sum_ij A_ij B_pi(i)pi(j)`` of the two models' neighbour adjacencies (tie weights, zero diagonal, not
  symmetric), a quadratic assignment statistic whose moments need, per model, seven sums over its n k list
  entries (:func:`~pairscout.metrics.neighbour_null.overlap_moments`: entries, squares, transposed pairs, shared
  rows, shared columns, paths); each pair then costs O(1). T >= 0 is a sum of many rare coincidences
  (about k^2 of them by chance), so p is the gamma law with these moments, as for CKA. No permutation is drawn.
* **CKNNA**: Monte-Carlo permutations of the neighbour lists (exact, no recomputation of features or
  neighbours; its statistic is an unbiased HSIC restricted to the entries both lists share, whose mask moves
  with the permutation, so it has no closed form here): ``p_mc = (1 + #{null >= observed}) / (1 + n_perm)``,
  used as p where at least 10 permutations reach the observed value; beyond, where p_mc would sit at its floor
  1 / (n_perm + 1) and Holm's correction would floor every strong pair at (pairs / (n_perm + 1)), p is the tail
  of a Pearson III law fitted to the permutations' mean, sd and skewness (``p_mc`` is kept beside it). They are
  vectorised over permutations (sorted entry keys + searchsorted, no n x n matrix) and cost O(n k log(nk)) per
  permutation and pair: ``min(n_perm, cknna_perm)`` = 49 by default (p resolved to 0.02); ``--permutations 999``
  gives 999 (1e-3) at a higher cost (``benchmarks/results/null_cpu.md``).

``method="permutation"`` runs Monte-Carlo permutations for the CKA family too (Gram form is never built;
each permutation re-evaluates the metric), for checking the approximation on small data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import pairscout.metrics.cka as _cka
import pairscout.metrics.knn as _knn
from pairscout.errors import MetricError
from pairscout.metrics.hsic_stats import rbf_tile
from pairscout.metrics.neighbour_null import (
    _cknna_null,
    _from_samples,
    _mutual_knn_null,
    _perms,
    mutual_knn_moments,
)
from pairscout.metrics.validate import ArrayLike, as_matrices, check_same_rows
from pairscout.statistics import holm

log = logging.getLogger(__name__)

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
        return qap_parts(self.sums())


def qap_parts(sums: torch.Tensor) -> dict[str, float]:
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
    from pairscout.metrics.sharded_rows import reduce_across_ranks

    sharded = counts is not None
    n = sum(counts) if sharded else z.shape[0]
    col = z.sum(0, dtype=F64)
    mu = (reduce_across_ranks(col) if sharded else col) / n
    dt = _summary_dtype(z, precision)
    x = (z.to(F64) - mu).to(dt)  # products in dt, reductions in float64
    with _cka.matmul_precision(precision, z.device):
        g = (x.T @ x).to(F64)
        g = reduce_across_ranks(g) if sharded else g
        cs = x.sum(0, dtype=F64)
        cs = reduce_across_ranks(cs) if sharded else cs
        d = x.square().sum(1, dtype=F64)
        r = (x @ cs.to(dt)).to(F64)
        q = ((x @ g.to(dt)) * x).sum(1, dtype=F64)
    sums = _GramSummary(d, r - d, q - d * d).sums()
    return (reduce_across_ranks(sums) if sharded else sums), float(g.square().sum())


def _rbf_summary(z: torch.Tensor, sigma: float, tile: int = 2048, precision: str | None = None,
                 counts: Sequence[int] | None = None) -> tuple[torch.Tensor, float]:
    """Sums (:meth:`_GramSummary.sums`) of the centred RBF Gram ``Kc = H K H`` in two passes over row tiles
    (never n x n), and ``||Kc||_F^2``.

    ``counts``: ``z`` is this rank's rows under torch.distributed. Each pass walks every rank's rows in blocks
    (:func:`pairscout.metrics.sharded_rows.row_blocks`); between the passes the n row means of K (n numbers, not
    n x d) are shared, since centring an entry needs both rows' means. Each rank forms only its rows' tiles."""
    from pairscout.distributed import rank_world
    from pairscout.metrics.sharded_rows import gather_all, reduce_across_ranks, row_blocks

    dt = _summary_dtype(z, precision)
    dev = z.device
    sharded = counts is not None
    counts = list(counts) if sharded else [z.shape[0]]
    n = sum(counts)
    lo = sum(counts[: rank_world()[0]]) if sharded else 0
    col = z.sum(0, dtype=F64)
    x = (z.to(F64) - (reduce_across_ranks(col) if sharded else col) / n).to(dt)
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

    with _cka.matmul_precision(precision, dev):
        r = torch.zeros(m, dtype=F64, device=dev)
        for a, b, _, k, _ in tiles():
            r[a:b] += k.sum(1)
        s = float(reduce_across_ranks(r.sum()) if sharded else r.sum())
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
    return (reduce_across_ranks(sums) if sharded else sums), float(reduce_across_ranks(f2) if sharded else f2)

CKA_METRICS = ("cka_linear", "cka_linear_debiased", "cka_rbf", "cka_rbf_debiased")
NEIGHBOUR_METRICS = ("mutual_knn", "cknna")
#: Default Monte-Carlo permutations (CKNNA gets at most CKNNA_PERM of them; every metric with method="permutation").
N_PERM = 199
#: CKNNA recomputes a sparse HSIC per permutation and pair: it gets at most this many permutations.
CKNNA_PERM = 49


@dataclass(frozen=True)
class Calibration:
    """A metric's values for all (vision, text) pairs with their null, calibrated score and p-values.

    Every tensor is (m, t) float64. ``method`` says how the null was obtained (see the module docstring).
    """

    metric: str
    observed: torch.Tensor
    null_mean: torch.Tensor
    null_sd: torch.Tensor
    z: torch.Tensor
    """Calibrated score: ``(observed - null_mean) / null_sd`` (null standard deviations above chance)."""
    p_value: torch.Tensor
    """One-sided p-value (a value this high under shuffled pairings)."""
    p_holm: torch.Tensor
    """``p_value`` corrected across all pairs of this metric by Holm's step-down method."""
    method: str
    n_perm: int
    seed: int
    p_mc: torch.Tensor | None = None
    """Monte-Carlo nulls: the plain permutation p, ``(1 + #{null >= observed}) / (1 + n_perm)``, which
    :attr:`p_value` equals wherever the permutations resolve it (None for the closed-form CKA nulls)."""

    def to_dict(self) -> dict[str, Any]:
        keys = ("observed", "null_mean", "null_sd", "z", "p_value", "p_holm", *(("p_mc",) if self.p_mc is not None else ()))
        return {"metric": self.metric, "method": self.method, "n_perm": self.n_perm, "seed": self.seed,
                **{k: getattr(self, k).tolist() for k in keys}}


# ----------------------------------------------------------------------------------------------------------
# Multiple testing
# ----------------------------------------------------------------------------------------------------------
P_FLOOR = 1e-12
"""Smallest p reported. Below it a p-value is the far tail of a fitted law (gamma from exact moments, Pearson III
from the permutations), an extrapolation no permutation count or moment fit can back (a bare 2.8e-301 from 199
permutations); p reads ``P_FLOOR`` there and the calibrated score ``z`` says how far above chance the value is."""


def _gamma_sf(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """P(G >= x) for G ~ Gamma(shape = mean^2 / var, scale = var / mean); 1 where var <= 0 and x <= mean."""
    from scipy import stats

    with np.errstate(divide="ignore", invalid="ignore"):
        shape = mean * mean / var
        scale = var / mean
        p = stats.gamma.sf(x, shape, scale=scale)
    bad = ~np.isfinite(p)
    p[bad] = np.where(x[bad] > mean[bad], 0.0, 1.0)
    return p


def _cka_moments(xs: list[torch.Tensor], ys: list[torch.Tensor], kernel: str, debiased: bool, sigma_frac: float,
                 observed: torch.Tensor, cache: dict[Any, Any] | None = None, counts: Sequence[int] | None = None,
                 precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(null_mean, null_sd, p) of CKA for all pairs from exact permutation moments + the gamma approximation.

    ``cache``: a dict shared between calls on the same embeddings (biased and debiased CKA of one kernel need
    the same per-model summaries). ``counts``: the models are row-sharded under torch.distributed (rows per rank);
    each summary is then computed from this rank's rows and all-reduced sums (:func:`_linear_summary`,
    :func:`_rbf_summary`)."""
    from pairscout.metrics.sharded_rows import sharded_median_sigma

    summ, norm2 = [], []
    for k, z in enumerate([*xs, *ys]):
        key = (kernel, sigma_frac, precision, k, len(xs))
        if cache is not None and key in cache:
            s, f2 = cache[key]
        else:
            if kernel == "linear":
                sums, f2 = _linear_summary(z, precision, counts)
            else:
                sigma = sharded_median_sigma(z, counts, sigma_frac) if counts is not None else _cka.median_sigma(z, sigma_frac)
                sums, f2 = _rbf_summary(z, sigma, precision=precision, counts=counts)
            s = qap_parts(sums)
            if cache is not None:
                cache[key] = (s, f2)
        summ.append(s)
        norm2.append(f2)
    return cka_null(summ, norm2, len(xs), debiased, observed)


def cka_null(summ: Sequence[dict[str, float]], norm2: Sequence[float], m: int, debiased: bool,
             observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(null_mean, null_sd, p) of CKA for all pairs from every model's moment summary (:func:`_parts` of
    :meth:`_GramSummary.sums`, vision models first, ``m`` of them) and ``||Kc||_F^2`` (module docstring)."""
    n = int(summ[0]["n"])
    t = len(summ) - m
    mean_b = np.zeros((m, t))
    var_b = np.zeros((m, t))
    for i in range(m):
        for j in range(t):
            mean_b[i, j], var_b[i, j] = _quadratic_assignment_moments(summ[i], summ[m + j])
    fx = np.sqrt(np.array(norm2[:m]))[:, None]
    fy = np.sqrt(np.array(norm2[m:]))[None, :]
    obs = observed.numpy()
    if not debiased:
        # CKA_b = T / (||Kc|| ||Lc||): the denominators do not change under permutation
        scale = fx * fy
        mean, sd = mean_b / scale, np.sqrt(var_b) / scale
        p = _gamma_sf(obs, mean, sd * sd)
    else:
        u2 = np.array([s["u2"] for s in summ])
        ok = (u2[:m] > 0)[:, None] & (u2[m:] > 0)[None, :]
        var = np.full((m, t), 2.0 / (n * (n - 3)))
        mean = np.zeros((m, t))
        # shift: the biased statistic's null mean on the debiased CKA scale, ||K'|| ||L'|| = n(n-3) sqrt(HSIC_1 HSIC_1)
        u = np.sqrt(np.clip(u2[:m, None] * u2[None, m:], 1e-300, None))
        shift = mean_b / u
        p = _gamma_sf(obs + shift, shift, var)
        sd = np.sqrt(var)
        bad = ~ok
        mean[bad], sd[bad], p[bad] = np.nan, np.nan, np.nan
    return torch.from_numpy(mean), torch.from_numpy(sd), torch.from_numpy(np.clip(p, 0.0, 1.0))


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------
def calibrate(xs: ArrayLike | Sequence[ArrayLike], ys: ArrayLike | Sequence[ArrayLike], metric: str,
              observed: torch.Tensor | None = None, *, method: str = "auto", n_perm: int = N_PERM,
              cknna_perm: int = CKNNA_PERM, seed: int = 0, cache: dict[Any, Any] | None = None, sharded: bool = False,
              **kwargs: Any) -> Calibration:
    """Null mean and sd, calibrated score z, p-value and Holm-corrected p-value of a pair metric, all pairs.

    Args:
        xs, ys: the vision and text embeddings ((n, d) each, same rows).
        metric: a pair metric name (``cka_linear``, ``cka_linear_debiased``, ``cka_rbf``, ``cka_rbf_debiased``,
            ``mutual_knn``, ``cknna``).
        observed: the metric's (m, t) values if already computed (else computed here).
        method: ``auto`` (closed-form moments for CKA and mutual k-NN, permutations for CKNNA) or ``permutation``.
        n_perm: Monte-Carlo permutations (CKNNA; every metric with ``method="permutation"``).
        cknna_perm: cap on CKNNA's permutations.
        cache: a dict to share per-model summaries between calls on the same embeddings (biased + debiased CKA).
        kwargs: the metric's own settings (``k``, ``preprocess``, ``sigma_frac``).
        sharded: ``xs``, ``ys`` are this rank's rows under torch.distributed (``observed`` required). The
            neighbour lists come from the sharded search (:func:`~pairscout.metrics.sharded_rows.sharded_neighbours`,
            the single-process lists); each model's CKA moment summary comes from this rank's rows and all-reduced
            sums (linear: feature-space sums; RBF: two passes over every rank's rows in blocks, the n row means of
            K shared between them), the same numbers as one process; ``method="permutation"`` gathers every model.

    Example:
        >>> import torch
        >>> x, y = torch.randn(200, 8), torch.randn(200, 6)
        >>> c = calibrate([x], [y], "cka_linear_debiased")
        >>> abs(float(c.z[0, 0])) < 5
        True
    """
    from pairscout.metrics.registry import pair_metric

    if method not in ("auto", "permutation"):
        raise MetricError(f"null method {method!r} is unknown.", fix="use 'auto' or 'permutation'.")
    if metric not in (*CKA_METRICS, *NEIGHBOUR_METRICS):
        raise MetricError(f"no calibration for metric {metric!r}.", fix=f"use one of {', '.join((*CKA_METRICS, *NEIGHBOUR_METRICS))}.")
    xs_t = as_matrices(xs, "xs")
    ys_t = as_matrices(ys, "ys", device=xs_t[0].device)
    full = None
    if sharded:
        from pairscout.metrics import sharded_rows as R

        counts = R.shard_counts(check_same_rows({"xs": xs_t, "ys": ys_t}), xs_t[0].device)
        n = sum(counts)
        if n < 5 or observed is None:
            raise MetricError(f"a sharded calibrated null needs the observed values and >= 5 rows (got {n}).",
                              fix="pass observed= and use more rows.")
        full = lambda z: R.gather_all(z, counts)  # noqa: E731 - method="permutation" and measures without a null of their own
    else:
        n = check_same_rows({"xs": xs_t, "ys": ys_t}, min_rows=5, why="a calibrated null")
    if observed is None:
        observed = pair_metric(metric, xs_t, ys_t, **kwargs)
    observed = observed.to(F64).cpu()
    used = 0
    p_mc = None
    if metric in CKA_METRICS and method == "auto":
        kernel = "linear" if metric.startswith("cka_linear") else "rbf"
        mean, sd, p = _cka_moments(xs_t, ys_t, kernel, metric.endswith("_debiased"), float(kwargs.get("sigma_frac", 1.0)),
                                   observed, cache, counts if sharded else None, kwargs.get("precision"))
        how = CKA_HOW
    elif metric in NEIGHBOUR_METRICS:
        k = int(kwargs.get("k", 10))
        pre = kwargs.get("preprocess", _knn.Preprocess())
        used = n_perm if metric == "mutual_knn" else min(n_perm, cknna_perm)
        if sharded:
            nxs, nys = [[R.sharded_neighbours(z, counts, k, pre) for z in side] for side in (xs_t, ys_t)]
        else:
            nxs, nys, _ = _knn._neighbours_all(xs_t, ys_t, k, pre, 4 if metric == "cknna" else 2)
        return neighbour_null(metric, nxs, nys, n, observed, n_perm=used, seed=seed, method=method)
    else:
        used = n_perm
        perms = _perms(n, used, seed)
        if full is not None:
            xs_t, ys_t = [full(x) for x in xs_t], [full(y) for y in ys_t]
        null = torch.stack([pair_metric(metric, xs_t, [y[p.to(y.device)] for y in ys_t], **kwargs).cpu() for p in perms])
        mean, sd, p, p_mc = _from_samples(observed, null)
        how = f"{used} Monte-Carlo permutations; p beyond their resolution from a Pearson III tail fitted to them"
    return finish(metric, observed, mean, sd, p, how, used, seed, p_mc)


NEIGHBOUR_HOW = "Monte-Carlo permutations of the neighbour lists; p beyond their resolution from a Pearson III tail fitted to them"
CKA_HOW = "exact permutation moments (closed form) + gamma approximation (Gretton et al. 2008)"
MUTUAL_KNN_HOW = "exact permutation moments of the neighbour overlap (closed form) + gamma approximation"


def neighbour_null(metric: str, nxs: Sequence[_knn.Neighbours], nys: Sequence[_knn.Neighbours], n: int,
                   observed: torch.Tensor, *, n_perm: int, seed: int, method: str = "auto") -> Calibration:
    """The null of mutual k-NN or CKNNA from every model's neighbour lists of all n rows (module docstring):
    mutual k-NN's exact moments and gamma tail (``method="auto"``), else ``n_perm`` permutations."""
    if metric == "mutual_knn" and method == "auto":
        mean, sd = mutual_knn_moments(list(nxs), list(nys), n)
        obs = observed.to(F64).cpu()
        p = torch.from_numpy(_gamma_sf(obs.numpy().copy(), mean.numpy(), (sd * sd).numpy()))
        return finish(metric, obs, mean, sd, p, MUTUAL_KNN_HOW, 0, seed)
    perms = _perms(n, n_perm, seed).to(nxs[0].indices.device)  # the null runs where the lists are
    null = _mutual_knn_null(list(nxs), list(nys), perms) if metric == "mutual_knn" else _cknna_null(list(nxs), list(nys), perms, n)
    mean, sd, p, p_mc = _from_samples(observed.to(F64).cpu(), null)
    return finish(metric, observed, mean, sd, p, f"{n_perm} {NEIGHBOUR_HOW}", n_perm, seed, p_mc)


def finish(metric: str, observed: torch.Tensor, mean: torch.Tensor, sd: torch.Tensor, p: torch.Tensor, how: str,
           used: int, seed: int, p_mc: torch.Tensor | None = None) -> Calibration:
    """A :class:`Calibration` from a null's mean, sd and p: the calibrated score and Holm's correction."""
    observed = observed.to(F64).cpu()
    mean, sd = mean.to(F64).cpu(), sd.to(F64).cpu()
    p = torch.as_tensor(p, dtype=F64).cpu().clamp(min=P_FLOOR)  # NaN stays NaN
    with torch.no_grad():
        z = (observed - mean) / sd
        z = torch.where(sd > 0, z, torch.full_like(z, float("nan")))
    return Calibration(metric, observed, mean, sd, z, p, holm(p), how, used, seed,
                       None if p_mc is None else p_mc.to(F64).cpu())


def debiased_cka_null_sd(n: int) -> float:
    """Exact permutation sd of debiased CKA (any kernel), ``sqrt(2 / (n (n - 3)))``; its null mean is 0."""
    if n < 5:
        raise MetricError(f"n = {n} rows: the debiased null needs at least 5.", fix="use more data.")
    return math.sqrt(2.0 / (n * (n - 3)))


__all__ = ["Calibration", "CKA_METRICS", "NEIGHBOUR_METRICS", "N_PERM", "P_FLOOR", "calibrate", "cka_null",
           "debiased_cka_null_sd", "finish", "holm", "neighbour_null"]
