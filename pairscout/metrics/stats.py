"""Chance level and uncertainty for the pair metrics: permutation null and bootstrap confidence intervals.

Metric names are those of :data:`pairscout.metrics.registry.MEASURES` (each record says which null and
interval applies to it). Every function works on all (vision, text) pairs at once and is seeded.

* Permutation null: shuffle the pairing of rows (one permutation applied to every text model, so the text
  models keep their rows together) and recompute; ``p = (1 + #{null >= observed}) / (1 + n_perm)``.
  Neighbour metrics permute the neighbour lists instead of recomputing them (exact, O(n k) per permutation).
  For biased linear CKA the null mean is also known in closed form (:func:`linear_cka_null_mean`).
* Bootstrap (percentile interval over ``n_boot`` resamples of the rows with replacement):
  biased CKA (linear and RBF) treats a resample as row weights w (counts, sum n); with
  ``A = W - w w^T / n`` the resampled ``tr(K H L H) = tr(A K A L)
  = w^T (K*L) w - (2/n) (Kw)^T W (Lw) + (w^T K w)(w^T L w) / n^2``, so all resamples and pairs come from one
  tiled pass over the Gram tiles (no n x n matrix, no re-encoding, the kernel bandwidth held fixed).
  Mutual k-NN resamples the per-row overlaps (neighbour lists fixed from the full data).
  Debiased CKA and CKNNA are not bootstrapped (duplicated rows break the unbiased estimator): MetricError.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pairscout.errors import MetricError
from pairscout.metrics import cka as _cka
from pairscout.metrics import hsic_stats, registry
from pairscout.metrics import knn as _knn
from pairscout.metrics.validate import ArrayLike, as_matrices, check_same_rows, compute_dtype

F64 = torch.float64
Matrices = ArrayLike | Sequence[ArrayLike]


# ----------------------------------------------------------------------------------------------------------
# Permutation null
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NullResult:
    """Observed all-pairs values and their permutation null, each (m, t) float64."""

    metric: str
    observed: torch.Tensor
    null_mean: torch.Tensor
    null_std: torch.Tensor
    p_value: torch.Tensor
    n_perm: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "n_perm": self.n_perm, "seed": self.seed,
                **{k: getattr(self, k).tolist() for k in ("observed", "null_mean", "null_std", "p_value")}}


def _permuted_neighbours(nb: _knn.Neighbours, perm: torch.Tensor, inv: torch.Tensor) -> _knn.Neighbours:
    """Neighbours of Y[perm] from those of Y: row i is old row perm[i]; old index j becomes inv[j]."""
    return _knn.permute_neighbours(nb, perm, inv)


def permutation_null(xs: Matrices, ys: Matrices, metric: str = "cka_linear", n_perm: int = 100, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None, **kwargs: Any) -> NullResult:
    """Permutation null of a pair metric for all pairs (formula and p-value in the module docstring).

    Args:
        metric: a name from :data:`pairscout.metrics.MEASURES`. kwargs go to that metric (e.g. ``k``, ``preprocess``).
        n_perm: permutations (each one costs one metric evaluation for CKA, O(n k) for neighbour metrics).
        progress: ``progress(done, n_perm)`` after each permutation.
    """
    rec = registry.get(metric)
    if n_perm < 1:
        raise MetricError(f"n_perm={n_perm} must be >= 1.", fix="use e.g. n_perm=100.")
    xs_t = as_matrices(xs, "xs")
    ys_t = as_matrices(ys, "ys", device=xs_t[0].device)
    n = check_same_rows({"xs": xs_t, "ys": ys_t})
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=g) for _ in range(n_perm)]
    if rec.null_kind == "neighbours":
        k = kwargs.get("k", 10)
        pre = kwargs.get("preprocess", _knn.Preprocess())
        if metric == "cknna" and k < 2:
            raise MetricError(f"CKNNA needs k >= 2 neighbours (got k={k}).", fix="use k >= 2 (default 10).")
        nxs, nys, _ = _knn.neighbour_lists(xs_t, ys_t, k, pre, rec.min_rows)
        sx = [_knn.cknna_self_term(n, a) for a in nxs] if metric == "cknna" else None
        sy = [_knn.cknna_self_term(n, b) for b in nys] if metric == "cknna" else None  # permutation invariant

        def score(nys_p: list[_knn.Neighbours]) -> torch.Tensor:
            return _knn.pair_values(nxs, nys_p, n, [metric], sx, sy)[metric]
        observed = score(nys)
        null = []
        for p in perms:
            p = p.to(nxs[0].indices.device)
            inv = torch.empty_like(p)
            inv[p] = torch.arange(n, device=p.device)
            null.append(score([_permuted_neighbours(b, p, inv) for b in nys]))
            if progress is not None:
                progress(len(null), n_perm)
    else:
        observed = registry.pair_metric(metric, xs_t, ys_t, **kwargs)
        null = []
        for p in perms:
            p = p.to(ys_t[0].device)
            null.append(registry.pair_metric(metric, xs_t, [y[p] for y in ys_t], **kwargs))
            if progress is not None:
                progress(len(null), n_perm)
    stack = torch.stack(null)
    p_value = (1 + (stack >= observed).sum(0)).to(F64) / (1 + n_perm)
    return NullResult(metric, observed, stack.mean(0), stack.std(0) if n_perm > 1 else torch.zeros_like(observed),
                      p_value, n_perm, seed)


def linear_cka_null_mean(xs: Matrices, ys: Matrices) -> torch.Tensor:
    """Exact mean of biased linear CKA over all row permutations, (m, t) float64.

    For centred K, L: ``E_pi tr(K P L P^T) = tr(K) tr(L) / (n - 1)``, hence
    ``E[CKA] = ||Xc||_F^2 ||Yc||_F^2 / ((n - 1) ||Xc^T Xc||_F ||Yc^T Yc||_F)``. It grows with the effective rank
    of both sides and shrinks with n: the chance level a raw CKA value should be read against.
    """
    xs_t = as_matrices(xs, "xs")
    ys_t = as_matrices(ys, "ys", device=xs_t[0].device)
    n = check_same_rows({"xs": xs_t, "ys": ys_t}, min_rows=2, why="CKA")
    h = _cka.all_pairs_hsic(xs_t, ys_t, "linear", False)
    tr = []
    for z in [*xs_t, *ys_t]:
        zc = z.to(F64) - z.to(F64).mean(0)
        tr.append(float(zc.square().sum()))
    # HSIC_0(K, K) = ||K||_F^2 / (n-1)^2 for centred K, so ||K||_F = (n-1) sqrt(HSIC_0)
    fx = (n - 1) * h.self_x.sqrt()
    fy = (n - 1) * h.self_y.sqrt()
    trx = torch.tensor(tr[:len(xs_t)], dtype=F64)
    tr_y = torch.tensor(tr[len(xs_t):], dtype=F64)
    return (trx[:, None] * tr_y[None, :]) / ((n - 1) * fx[:, None] * fy[None, :])


# ----------------------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BootstrapCI:
    """Percentile bootstrap interval for all pairs, each tensor (m, t) float64."""

    metric: str
    estimate: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    std: torch.Tensor
    level: float
    n_boot: int
    seed: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "level": self.level, "n_boot": self.n_boot, "seed": self.seed,
                "method": self.method, **{k: getattr(self, k).tolist() for k in ("estimate", "low", "high", "std")}}


def bootstrap_weights(n: int, n_boot: int, seed: int = 0) -> torch.Tensor:
    """(n, n_boot) float64 resampling counts: column b counts how often each row is drawn in resample b."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    w = torch.zeros(n_boot, n, dtype=F64)
    w.scatter_add_(1, idx, torch.ones(n_boot, n, dtype=F64))
    return w.T.contiguous()


def _centre(x: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Column-centred copy (float64 means) in ``dtype``; constant features are a MetricError (CKA undefined)."""
    lo, hi = torch.aminmax(x, dim=0)
    if bool((lo == hi).all()):
        raise MetricError(f"{name} has constant features (every column has zero variance); CKA is undefined.",
                          fix="drop that model or check that its encoder produced real embeddings.")
    return (x.to(dtype) - (x.sum(0, dtype=F64) / x.shape[0]).to(dtype)).contiguous()


def _bootstrap_cka(xs_t: list[torch.Tensor], ys_t: list[torch.Tensor], kernel: str, w: torch.Tensor,
                   sigma_frac: float = 1.0, sigmas: Sequence[float] | None = None, dtype: torch.dtype | None = None,
                   tile: int | None = None) -> torch.Tensor:
    """(n_boot, m, t) biased CKA of every resample, by the weighted quadratic forms of the module docstring."""
    m, t = len(xs_t), len(ys_t)
    n, nb = w.shape
    dev = xs_t[0].device
    w = w.to(dev)
    cdt = compute_dtype([*xs_t, *ys_t], dtype)
    names = [f"xs[{i}]" for i in range(m)] + [f"ys[{j}]" for j in range(t)]
    zc = [_centre(z, cdt, name) for z, name in zip([*xs_t, *ys_t], names, strict=True)]
    nz = m + t
    if tile is None:
        tile = max(128, int(math.sqrt(hsic_stats.TILE_BYTES / (8 * (nz + 2)))) // 128 * 128)
    tile = min(tile, n)
    gammas = None
    centre = None
    if kernel == "rbf":
        sig = sigmas if sigmas is not None else [_cka.median_sigma(z, sigma_frac) for z in [*xs_t, *ys_t]]
        gammas = [1.0 / (2.0 * s * s) for s in sig]
        rows = torch.zeros(nz, n, dtype=F64, device=dev)
        for a, ea, b, eb, raw in hsic_stats.kernel_tiles(zc, "rbf", gammas, tile):
            for k, g in enumerate(raw):
                rows[k, a:ea] += g.sum(1, dtype=F64)
                if a != b:
                    rows[k, b:eb] += g.sum(0, dtype=F64)
        r = rows / n  # row means of each K; centre tiles exactly: K~ = K - r 1^T - 1 r^T + mean(r)
        centre = (r, r.mean(1))
    pairs = [(i, m + j) for i in range(m) for j in range(t)] + [(k, k) for k in range(nz)]
    t1 = torch.zeros(len(pairs), nb, dtype=F64, device=dev)
    u = torch.zeros(nz, n, nb, dtype=F64, device=dev)
    for a, ea, b, eb, raw in hsic_stats.kernel_tiles(zc, kernel, gammas, tile):  # type: ignore[arg-type]
        tiles = []
        for k, g in enumerate(raw):
            g = g.to(F64)
            if centre is not None:
                g = g - centre[0][k, a:ea, None] - centre[0][k, None, b:eb] + centre[1][k]
            tiles.append(g)
            u[k, a:ea] += g @ w[b:eb]
            if a != b:
                u[k, b:eb] += g.T @ w[a:ea]
        del raw
        f = 1.0 if a == b else 2.0
        for p, (i, j) in enumerate(pairs):
            t1[p] += f * (w[a:ea] * ((tiles[i] * tiles[j]) @ w[b:eb])).sum(0)
        del tiles
    q = (w[None] * u).sum(1)  # (nz, nb): w^T K w
    vals = torch.empty(len(pairs), nb, dtype=F64, device=dev)
    for p, (i, j) in enumerate(pairs):
        t2 = (u[i] * w * u[j]).sum(0)
        vals[p] = t1[p] - (2.0 / n) * t2 + q[i] * q[j] / n**2
    cross = vals[: m * t].view(m, t, nb)
    selfs = vals[m * t:]
    denom = torch.sqrt((selfs[:m, None, :] * selfs[None, m:, :]).clamp_min(torch.finfo(F64).tiny))
    return (cross / denom).permute(2, 0, 1).cpu()


def bootstrap_ci(xs: Matrices, ys: Matrices, metric: str = "cka_linear", n_boot: int = 200, level: float = 0.95,
                 seed: int = 0, **kwargs: Any) -> BootstrapCI:
    """Percentile bootstrap CI for all pairs (resampling rows; method per metric in the module docstring).

    Caveat: duplicated rows act like a smaller n, so the resampled values of biased CKA sit above the
    estimate and the percentile interval can exclude it at small n. ``pairscout rank`` therefore uses
    the delete-a-group jackknife (:func:`pairscout.ranking.compute.jackknife_ci`) for its intervals.

    Args:
        metric: "cka_linear", "cka_rbf" or "mutual_knn". kwargs go to the metric (``sigma_frac``, ``k``, ...).
        level: two-sided coverage, e.g. 0.95 -> the 2.5 % and 97.5 % quantiles of the resampled values.

    Raises:
        MetricError: a debiased CKA or CKNNA (not bootstrappable by row resampling), bad level / n_boot.
    """
    if not registry.get(metric).bootstrap:
        raise MetricError(f"no bootstrap for {metric!r}: resampled (duplicated) rows break that estimator.",
                          fix="bootstrap cka_linear, cka_rbf or mutual_knn; use permutation_null for the rest.")
    if not 0 < level < 1 or n_boot < 2:
        raise MetricError(f"level={level}, n_boot={n_boot}: need 0 < level < 1 and n_boot >= 2.",
                          fix="use e.g. level=0.95, n_boot=200.")
    xs_t = as_matrices(xs, "xs")
    ys_t = as_matrices(ys, "ys", device=xs_t[0].device)
    n = check_same_rows({"xs": xs_t, "ys": ys_t}, min_rows=2, why="a bootstrap")
    w = bootstrap_weights(n, n_boot, seed)
    if metric == "mutual_knn":
        k = kwargs.get("k", 10)
        nxs, nys, _ = _knn.neighbour_lists(xs_t, ys_t, k, kwargs.get("preprocess", _knn.Preprocess()), 2)
        rows = torch.stack([torch.stack([_knn.mutual_knn_rows(a, b).cpu() for b in nys]) for a in nxs])  # (m, t, n)
        estimate = rows.mean(-1)
        reps = torch.einsum("mtn,nb->bmt", rows, w) / n
        method = "per-row overlaps resampled; neighbour lists from the full data"
    else:
        kernel = "linear" if metric == "cka_linear" else "rbf"
        estimate = _cka.all_pairs_cka(xs_t, ys_t, kernel, False, **kwargs)
        reps = _bootstrap_cka(xs_t, ys_t, kernel, w, **kwargs)
        method = "row resampling as weights on Gram tiles (bandwidth fixed)" if kernel == "rbf" else \
            "row resampling as weights on Gram tiles"
    alpha = (1 - level) / 2
    qs = torch.quantile(reps, torch.tensor([alpha, 1 - alpha], dtype=F64), dim=0)
    return BootstrapCI(metric, estimate, qs[0], qs[1], reps.std(0), level, n_boot, seed, method)
