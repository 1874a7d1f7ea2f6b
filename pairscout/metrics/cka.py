"""Centered Kernel Alignment (CKA): linear and RBF, biased and debiased, single pair, all pairs, streaming.

Notation (X: n x d1, Y: n x d2, rows are the same n pairs; H = I - 11^T/n, never formed):

* Gram matrices ``K = k(X, X)``, ``L = k(Y, Y)``; linear ``k(a, b) = a.b``, RBF
  ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))``.
* Biased HSIC: ``HSIC_0(K, L) = tr(K H L H) / (n-1)^2``
  ``= [<K, L> - (2/n) (K1).(L1) + (1^T K 1)(1^T L 1)/n^2] / (n-1)^2`` (O(n^2), no n x n product).
* Debiased HSIC (Song et al. 2012), with K~, L~ = K, L with zeroed diagonals:
  ``HSIC_1 = [<K~, L~> + (1^T K~ 1)(1^T L~ 1)/((n-1)(n-2)) - 2/(n-2) (K~1).(L~1)] / (n(n-3))``.
* ``CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``. Linear, feature space:
  ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred Xc, Yc.

Every quantity above is a function of four sufficient statistics per kernel pair: ``<K, L>``, the row sums
``K1``, ``L1`` and the diagonals. :func:`all_pairs_hsic` collects them for every (vision, text) pair in one
sweep (one product of the centred features, or one tiled pass over Gram tiles) and reduces in float64.

Conventions (tested):

* Constant features (every column constant, so K is constant after centring) make CKA 0/0: raise :class:`MetricError` naming the model.
* Debiased HSIC can be negative. A negative cross term is reported as a negative CKA. If a self term
  ``HSIC_1(K, K)`` is <= 0 the pair's CKA is defined as 0.0 and a warning is logged (no sqrt of a negative).
* NaN / inf, mismatched rows, n < 2 (biased) or n < 4 (debiased): :class:`MetricError`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from pairscout.errors import MetricError
from pairscout.metrics.hsic_stats import (
    _center_into,
    _feature_stats,
    _gram_stats,
    _pick_method,
    _power_of_two_scale,
)
from pairscout.metrics.validate import ArrayLike, as_matrices, as_matrix, check_same_rows, pow2_unit

log = logging.getLogger(__name__)

Kernel = Literal["linear", "rbf"]
F64 = torch.float64


Precision = Literal["float64", "float32", "tf32"]
#: The precisions of the large products (see :func:`all_pairs_cka`). Reductions are float64 in every case.
PRECISIONS: tuple[str, ...] = ("float64", "float32", "tf32")


def _product_dtype(precision: str | None, dtype: torch.dtype | None, mats: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype the large products run in: ``dtype`` if given (legacy), else from ``precision``."""
    if dtype is not None:
        if precision is not None:
            raise MetricError("pass either precision= or dtype=, not both.", fix="use precision='float32' or 'float64'.")
        return dtype
    if precision is None:
        precision = "float64"
    if precision not in PRECISIONS:
        raise MetricError(f"unknown precision {precision!r}.", fix=f"use one of {', '.join(PRECISIONS)}.")
    return torch.float64 if precision == "float64" else torch.float32


@contextlib.contextmanager
def matmul_precision(precision: str | None, device: torch.device) -> Iterator[None]:
    """TF32 products for ``precision="tf32"`` on CUDA inside the block; float32 products are IEEE otherwise.

    The global switch is restored on exit. On CPU "tf32" runs plain float32 products.
    """
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# ----------------------------------------------------------------------------------------------------------
# Kernels and bandwidth
# ----------------------------------------------------------------------------------------------------------
def linear_gram(x: ArrayLike) -> torch.Tensor:
    """Linear Gram matrix ``K = X X^T`` (n x n, x's dtype). For small n and tests; the metrics never need it."""
    x = as_matrix(x, "x")
    return x @ x.T


def rbf_gram(x: ArrayLike, sigma: float) -> torch.Tensor:
    """RBF Gram matrix ``K_ab = exp(-||x_a - x_b||^2 / (2 sigma^2))`` (n x n, float64)."""
    x = as_matrix(x, "x").to(F64)
    x = x - x.mean(0)
    sq = x.square().sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min_(0).fill_diagonal_(0)
    return torch.exp(-d2 / (2 * sigma**2))


def median_sigma(x: ArrayLike, sigma_frac: float = 1.0, max_rows: int = 2048, seed: int = 0) -> float:
    """Median-heuristic RBF bandwidth ``sigma = sigma_frac * sqrt(median of non-zero squared distances)``.

    The median is exact (numpy's definition: mean of the two middle values) over all pairs a < b when
    n <= ``max_rows``; above that it is taken over the pairs of ``max_rows`` rows drawn without replacement
    with ``seed`` (deterministic). Kornblith et al. 2019 use a fraction of the median distance; freeze-align
    uses the median itself (``sigma_frac=1``).

    Raises:
        MetricError: every pairwise distance is zero (all rows identical).
    """
    return median_sigma_tensor(as_matrix(x, "x"), sigma_frac, max_rows, seed)


@functools.lru_cache(maxsize=4)
def _upper_pairs(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every pair a < b in row-major order (as boolean-mask selection of the upper triangle)."""
    iu = torch.triu_indices(n, n, 1, device=device)
    return iu[0], iu[1]


def median_sigma_tensor(x: torch.Tensor, sigma_frac: float, max_rows: int = 2048, seed: int = 0) -> float:
    if not sigma_frac > 0:
        raise MetricError(f"sigma_frac={sigma_frac} must be > 0.", fix="pass a positive fraction such as 1.0 or 0.5.")
    n = x.shape[0]
    if n > max_rows:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=g)[:max_rows].to(x.device)
        x = x[idx]
    x = x.to(F64)
    x = x - x.mean(0)
    sq = x.square().sum(1)
    a, b = _upper_pairs(x.shape[0], x.device)
    # the same float64 operations as (sq[:, None] + sq[None, :] - 2 x x^T) on the upper triangle only
    v = ((sq[a] + sq[b]) - 2 * (x @ x.T).view(-1)[a * x.shape[0] + b]).clamp_min_(0)
    v = v[v > 0]
    if v.numel() == 0:
        raise MetricError("all rows of x are identical, so the RBF median bandwidth is 0.",
                          fix="check the encoder output or pass an explicit sigma.")
    k = v.numel()
    if v.device.type == "cpu":  # both middle values from one partial sort (the same order statistics as kthvalue)
        mid = np.partition(v.numpy(), [max(k // 2 - 1, 0), k // 2])
        hi_f = float(mid[k // 2])
        med_f = hi_f if k % 2 else 0.5 * (float(mid[k // 2 - 1]) + hi_f)
        return float(sigma_frac * math.sqrt(med_f))
    hi = torch.kthvalue(v, k // 2 + 1).values
    med = hi if k % 2 else 0.5 * (torch.kthvalue(v, k // 2).values + hi)
    return float(sigma_frac * math.sqrt(float(med)))


# ----------------------------------------------------------------------------------------------------------
# HSIC from sufficient statistics
# ----------------------------------------------------------------------------------------------------------
def hsic_from_stats(s: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor, da: torch.Tensor, db: torch.Tensor,
                     n: int, debiased: bool, outer: bool, s_off: torch.Tensor | None = None,
                     ra_off: torch.Tensor | None = None, rb_off: torch.Tensor | None = None) -> torch.Tensor:
    """HSIC from ``s = <K, L>``, row sums ``ra = K1``, ``rb = L1`` and diagonals ``da``, ``db`` (all float64).

    ``outer=True``: ra (m, n), rb (t, n), s (m, t) -> (m, t). ``outer=False``: matched rows -> (m,).
    ``s_off``, ``ra_off``, ``rb_off``: the same sums over off-diagonal entries (<K~, L~>, K~1, L~1), when they
    were accumulated directly; the debiased estimator then uses them instead of subtracting the diagonal
    (no cancellation when the diagonal dominates, e.g. an RBF kernel with a small bandwidth).
    """
    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b.T if outer else (a * b).sum(-1)

    def prod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a[:, None] * b[None, :] if outer else a * b

    if not debiased:
        num = s - (2.0 / n) * dot(ra, rb) + prod(ra.sum(-1), rb.sum(-1)) / n**2
        return num / (n - 1) ** 2
    st = s - dot(da, db) if s_off is None else s_off
    rat = ra - da if ra_off is None else ra_off
    rbt = rb - db if rb_off is None else rb_off
    num = st + prod(rat.sum(-1), rbt.sum(-1)) / ((n - 1) * (n - 2)) - (2.0 / (n - 2)) * dot(rat, rbt)
    return num / (n * (n - 3))


def cka_from_hsic(cross: torch.Tensor, self_x: torch.Tensor, self_y: torch.Tensor) -> torch.Tensor:
    """``cross / sqrt(self_x self_y)``; 0.0 (with a warning) where a self term is <= 0 (debiased only)."""
    ok = (self_x > 0)[:, None] & (self_y > 0)[None, :]
    denom = torch.sqrt((self_x[:, None] * self_y[None, :]).clamp_min(torch.finfo(F64).tiny))
    out = torch.where(ok, cross / denom, torch.zeros_like(cross))
    if not bool(ok.all()):
        bad_x = [i for i, v in enumerate(self_x.tolist()) if v <= 0]
        bad_y = [j for j, v in enumerate(self_y.tolist()) if v <= 0]
        log.warning("debiased HSIC(K, K) <= 0 for xs%s ys%s (too few rows for this estimator?); "
                    "CKA of those pairs set to 0.0", bad_x, bad_y)
    return out


@dataclass(frozen=True)
class HSICResult:
    """HSIC of every (x, y) pair and of every model with itself (float64), with the settings that made it."""

    cross: torch.Tensor
    """(m, t) HSIC(K_i, L_j)."""
    self_x: torch.Tensor
    """(m,) HSIC(K_i, K_i)."""
    self_y: torch.Tensor
    """(t,) HSIC(L_j, L_j)."""
    n: int
    kernel: str
    debiased: bool
    method: str
    """"feature" (linear only) or "gram" (tiled Gram form)."""
    sigmas: tuple[float, ...] | None = None
    """RBF bandwidths used, xs first then ys; None for the linear kernel."""

    def cka(self) -> torch.Tensor:
        """CKA matrix (m, t): ``cross / sqrt(self_x self_y)``; see the module docstring for <= 0 self terms."""
        return cka_from_hsic(self.cross, self.self_x, self.self_y)


def _prepare(xs: ArrayLike | Sequence[ArrayLike], ys: ArrayLike | Sequence[ArrayLike],
             debiased: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    xs_t = as_matrices(xs, "xs")
    ys_t = as_matrices(ys, "ys", device=xs_t[0].device)
    min_rows = 4 if debiased else 2
    why = "the debiased (unbiased HSIC) estimator" if debiased else "CKA"
    n = check_same_rows({"xs": xs_t, "ys": ys_t}, min_rows=min_rows, why=why)
    return xs_t, ys_t, n


def all_pairs_hsic(xs: ArrayLike | Sequence[ArrayLike], ys: ArrayLike | Sequence[ArrayLike],
                   kernel: Kernel = "linear", debiased: bool = False, *, sigma_frac: float = 1.0,
                   sigmas: Sequence[float] | None = None, method: Literal["auto", "feature", "gram"] = "auto",
                   dtype: torch.dtype | None = None, tile: int | None = None,
                   weights: torch.Tensor | None = None, precision: Precision | None = None) -> HSICResult:
    """HSIC of every pair (xs[i], ys[j]) and of every model with itself, in one sweep. See :func:`all_pairs_cka`.

    ``weights``: optional non-negative row weights summing to n (biased estimator only); the result equals
    HSIC on the data with row a repeated w_a times (how :func:`~pairscout.metrics.stats.bootstrap_ci` resamples).
    """
    if kernel not in ("linear", "rbf"):
        raise MetricError(f"unknown kernel {kernel!r}.", fix="use kernel='linear' or kernel='rbf'.")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
        raise MetricError(f"tile={tile!r} must be an integer >= 1 (rows per Gram tile).", fix="pass tile=None for the default.")
    xs_t, ys_t, n = _prepare(xs, ys, debiased)
    m, t = len(xs_t), len(ys_t)
    if weights is not None and debiased:
        raise MetricError("row weights are only defined for the biased estimator (duplicated rows break HSIC_1).",
                          fix="use debiased=False for weighted / bootstrapped CKA.")
    cdt = _product_dtype(precision, dtype, [*xs_t, *ys_t])
    names = [f"xs[{i}]" for i in range(m)] + [f"ys[{j}]" for j in range(t)]
    w = None if weights is None else torch.as_tensor(weights, device=xs_t[0].device)
    _, xc = _center_into(xs_t, cdt, names[:m], w)
    ybuf, yc = _center_into(ys_t, cdt, names[m:], w)
    zc = xc + yc
    # each model scaled by an exact power of two to max |value| in [0.5, 1): float32 products neither under- nor
    # overflow for data of any magnitude (1e-20 or 1e20); undone exactly on the linear HSIC values below
    expo = _power_of_two_scale(zc)
    used_sigmas: tuple[float, ...] | None = None
    with matmul_precision(precision, xs_t[0].device):
        if kernel == "rbf":
            if method == "feature":
                raise MetricError("method='feature' exists only for the linear kernel.", fix="use method='auto' or 'gram'.")
            method = "gram"
            if sigmas is None:
                used_sigmas = tuple(median_sigma_tensor(z, sigma_frac) for z in [*xs_t, *ys_t])
            else:
                if len(sigmas) != m + t or not all(math.isfinite(s) and s > 0 for s in sigmas):  # inf: every K = 1
                    raise MetricError(f"sigmas has {len(sigmas)} values; need {m + t} finite positive ones (xs then ys).",
                                      fix="pass one bandwidth per model or sigmas=None for the median heuristic.")
                used_sigmas = tuple(float(s) for s in sigmas)
            # the RBF kernel of the scaled data with gamma / 4^e is the kernel of the data with gamma
            gammas = [1.0 / (2.0 * s * s) * 4.0 ** -e for s, e in zip(used_sigmas, expo, strict=True)]
            st = _gram_stats(zc, m, "rbf", gammas, tile)
        else:
            if method == "auto":
                method = _pick_method(n, [x.shape[1] for x in xs_t], [y.shape[1] for y in ys_t])
            if method == "feature":
                st = _feature_stats(xc, yc, ybuf)
            elif method == "gram":
                st = _gram_stats(zc, m, "linear", None, tile)
            else:
                raise MetricError(f"unknown method {method!r}.", fix="use 'auto', 'feature' or 'gram'.")
    ro = st.rows_off
    cross = hsic_from_stats(st.cross, st.rows[:m], st.rows[m:], st.diag[:m], st.diag[m:], n, debiased, True,
                             st.cross_off, None if ro is None else ro[:m], None if ro is None else ro[m:])
    selfs = hsic_from_stats(st.self_, st.rows, st.rows, st.diag, st.diag, n, debiased, False,
                             st.self_off, ro, ro)
    # A self term lost in rounding is treated as 0, so no ratio blows up on noise. "Lost" is relative to the
    # sum it was computed from: <K~, K~> (off-diagonal entries only) for the debiased estimator, whose
    # formula never uses the diagonal, and <K, K> for the biased one; the tolerance follows the products' dtype.
    if debiased:
        base = st.self_off if st.self_off is not None else st.self_ - (st.diag * st.diag).sum(1)
    else:
        base = st.self_
    tol = 1e-10 if cdt == F64 else 1e-5
    selfs = torch.where(selfs <= tol * base.abs() / (n * n), torch.zeros_like(selfs), selfs)
    if kernel == "linear":  # K of the scaled data is 4^e K: undo it (exact, float64, no overflow for |e| < 250)
        f = torch.tensor([4.0 ** -e for e in expo], dtype=F64, device=cross.device)
        cross = cross * f[:m, None] * f[None, m:]
        selfs = selfs * f * f
    return HSICResult(cross.cpu(), selfs[:m].cpu(), selfs[m:].cpu(), n, kernel, debiased, method, used_sigmas)


def all_pairs_cka(xs: ArrayLike | Sequence[ArrayLike], ys: ArrayLike | Sequence[ArrayLike],
                  kernel: Kernel = "linear", debiased: bool = False, *, sigma_frac: float = 1.0,
                  sigmas: Sequence[float] | None = None, method: Literal["auto", "feature", "gram"] = "auto",
                  dtype: torch.dtype | None = None, tile: int | None = None,
                  precision: Precision | None = None) -> torch.Tensor:
    """CKA of every pair (xs[i], ys[j]) in one call: an (m, t) float64 tensor on the CPU.

    ``CKA_ij = HSIC(K_i, L_j) / sqrt(HSIC(K_i, K_i) HSIC(L_j, L_j))`` (biased HSIC_0 or, with
    ``debiased=True``, Song et al.'s unbiased HSIC_1; formulas in the module docstring).

    How: every model is column-centred once with float64 means (a common offset such as mean 1e3 in float32
    does not leak into the products). Linear kernel, ``method="feature"``: one chunked product X_i^T [Y_1|...|Y_t]
    per vision model, ``<K_i, L_j> = ||X_i^T Y_j||_F^2``, cost n (Dx Dy + sum d^2). ``method="gram"``: Gram tiles
    (upper triangle only, memory bounded by :data:`TILE_BYTES`), cost n^2/2 sum d. ``"auto"`` picks the cheaper.
    The RBF kernel always takes the tiled Gram path: one pass that accumulates <K_i, L_j>, row sums and
    diagonals in float64 (the centring is applied to those sums, which is exact algebra, so no second pass).

    Args:
        xs, ys: lists of (n, d_k) embeddings (torch or numpy; a single matrix is a list of one), same n rows.
        kernel: "linear" or "rbf".
        debiased: use the unbiased HSIC_1 estimator (needs n >= 4).
        sigma_frac: RBF bandwidth = sigma_frac * sqrt(median non-zero squared distance) (:func:`median_sigma`).
        sigmas: explicit RBF bandwidths, xs first then ys (overrides ``sigma_frac``).
        method: "auto", "feature" (linear only) or "gram".
        precision: the large products' precision. ``"float64"`` (default): exact to float64 rounding.
            ``"float32"``: products in IEEE float32 over row chunks of :data:`CHUNK_ROWS`, every sum across
            chunks and every final reduction in float64 (features are centred with float64 means first);
            relative error below 1e-5 on real embeddings (widths to 4,096, offsets), 2x faster on CPU and
            far faster on GPUs. ``"tf32"``: float32 on CUDA's TF32 tensor cores (10-bit mantissa
            inputs, float32 accumulation; error about 1e-4 to 1e-3), plain float32 on CPU.
        dtype: legacy override of the product dtype (float32 or float64); excludes ``precision``.
        tile: Gram tile size (default from :data:`TILE_BYTES`).

    Returns:
        (m, t) float64 CPU tensor. Debiased values can be slightly negative (reported as is).

    Raises:
        MetricError: NaN/inf (names the model), mismatched rows, too few rows, constant features.

    Example:
        >>> import torch
        >>> x = torch.randn(100, 8, dtype=torch.float64)
        >>> float(all_pairs_cka([x], [2 * x])[0, 0])
        1.0
    """
    if sigmas is None:  # CKA is scale-invariant: exact power-of-two rescaling keeps its sums in float range
        xs_t, ys_t = as_matrices(xs, "xs"), as_matrices(ys, "ys")
        xs, ys = [pow2_unit(x.detach()) for x in xs_t], [pow2_unit(y.detach()) for y in ys_t]
    return all_pairs_hsic(xs, ys, kernel, debiased, sigma_frac=sigma_frac, sigmas=sigmas, method=method,
                          dtype=dtype, tile=tile, precision=precision).cka()
