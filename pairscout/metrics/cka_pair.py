"""CKA of one pair, in Gram form, and streaming (minibatch) CKA, built on :mod:`pairscout.metrics.cka`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pairscout.errors import MetricError
from pairscout.metrics.cka import (
    F64,
    Kernel,
    all_pairs_cka,
    all_pairs_hsic,
    cka_from_hsic,
    hsic_from_stats,
    median_sigma,
)
from pairscout.metrics.validate import ArrayLike, as_matrix, check_same_rows


def linear_cka(x: ArrayLike, y: ArrayLike, debiased: bool = False) -> float:
    """Linear CKA in feature space, ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` (biased), or with the
    debiased HSIC_1 in its feature-space form (Kornblith et al.'s reference notebook):
    ``n(n-3) HSIC_1 = ||Xc^T Yc||^2 - n/(n-2) r_x.r_y + (sum r_x)(sum r_y)/((n-1)(n-2))`` with r = row squared norms.
    """
    return float(all_pairs_cka([x], [y], "linear", debiased, method="feature")[0, 0])


def rbf_cka(x: ArrayLike, y: ArrayLike, debiased: bool = False, sigma_frac: float = 1.0,
            sigma_x: float | None = None, sigma_y: float | None = None) -> float:
    """RBF CKA with bandwidth ``sigma = sigma_frac * sqrt(median non-zero squared distance)`` per side
    (or explicit ``sigma_x`` / ``sigma_y``); HSIC as in the module docstring, O(n^2) time, tiled memory."""
    sig = None
    if sigma_x is not None or sigma_y is not None:
        sig = [sigma_x if sigma_x is not None else median_sigma(x, sigma_frac),
               sigma_y if sigma_y is not None else median_sigma(y, sigma_frac)]
    return float(all_pairs_cka([x], [y], "rbf", debiased, sigma_frac=sigma_frac, sigmas=sig)[0, 0])


def pair_cka(x: ArrayLike, y: ArrayLike, kernel: Kernel = "linear", debiased: bool = False,
        sigma_frac: float = 1.0) -> float:
    """CKA of one pair: :func:`linear_cka` or :func:`rbf_cka`."""
    if kernel == "linear":
        return linear_cka(x, y, debiased)
    return rbf_cka(x, y, debiased, sigma_frac)


def _check_gram(k: ArrayLike, name: str) -> torch.Tensor:
    k = as_matrix(k, name)
    if k.shape[0] != k.shape[1]:
        raise MetricError(f"{name} has shape {tuple(k.shape)}; a Gram matrix is square.", fix="pass k(X, X), n x n.")
    return k


def hsic(k: ArrayLike, l: ArrayLike, debiased: bool = False) -> float:  # noqa: E741
    """HSIC of two n x n Gram matrices in O(n^2) (formulas in the module docstring; no centring matrix)."""
    kt = _check_gram(k, "K")
    lt = _check_gram(l, "L").to(kt.device)
    n = check_same_rows({"K": [kt], "L": [lt]}, min_rows=4 if debiased else 2,
                        why="the debiased estimator" if debiased else "HSIC")
    kt, lt = kt.to(F64), lt.to(F64)
    s = (kt * lt).sum().reshape(1, 1)
    ko, lo = kt.clone().fill_diagonal_(0), lt.clone().fill_diagonal_(0)  # off-diagonal sums, no cancellation
    out = hsic_from_stats(s, kt.sum(1)[None], lt.sum(1)[None], kt.diagonal()[None], lt.diagonal()[None],
                           n, debiased, True, (ko * lo).sum().reshape(1, 1), ko.sum(1)[None], lo.sum(1)[None])
    return float(out[0, 0])


def cka_from_grams(k: ArrayLike, l: ArrayLike, debiased: bool = False) -> float:  # noqa: E741
    """CKA in Gram form, ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``, for any kernel's Gram matrices.

    Raises:
        MetricError: HSIC(K, K) or HSIC(L, L) is 0 with the biased estimator (a constant kernel).
    """
    hkl, hkk, hll = hsic(k, l, debiased), hsic(k, k, debiased), hsic(l, l, debiased)
    if not debiased and (hkk <= 0 or hll <= 0):
        raise MetricError("a Gram matrix is constant after centring (HSIC(K, K) = 0); CKA is undefined.",
                          fix="check for constant features.")
    return float(cka_from_hsic(torch.tensor([[hkl]], dtype=F64), torch.tensor([hkk], dtype=F64),
                                torch.tensor([hll], dtype=F64))[0, 0])


# ----------------------------------------------------------------------------------------------------------
# Minibatch / streaming CKA
# ----------------------------------------------------------------------------------------------------------
class StreamingCKA:
    """Minibatch CKA (Nguyen et al. 2021) for n beyond memory, all pairs at once.

    ``CKA = sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) * sum_b HSIC_1(L_b, L_b))`` over minibatches b
    (the debiased HSIC_1 makes the average over batches unbiased). Each batch needs >= 4 rows. It estimates
    the same population quantity as full-data CKA but is not numerically equal to it.

    Args:
        kernel: "linear" or "rbf". For "rbf" give fixed ``sigmas`` (xs then ys) for a batch-independent kernel;
            with ``sigmas=None`` each batch uses its own median-heuristic bandwidth.

    Example:
        >>> acc = StreamingCKA()
        >>> for xb, yb in batches:          # doctest: +SKIP
        ...     acc.update([xb], [yb])
        >>> acc.compute()                    # doctest: +SKIP
    """

    def __init__(self, kernel: Kernel = "linear", *, sigmas: Sequence[float] | None = None,
                 sigma_frac: float = 1.0, dtype: torch.dtype | None = None) -> None:
        self.kernel = kernel
        self.sigmas = sigmas
        self.sigma_frac = sigma_frac
        self.dtype = dtype
        self.cross: torch.Tensor | None = None
        self.self_x: torch.Tensor | None = None
        self.self_y: torch.Tensor | None = None
        self.n_batches = 0
        self.n_rows = 0

    def update(self, xs: ArrayLike | Sequence[ArrayLike], ys: ArrayLike | Sequence[ArrayLike]) -> None:
        """Add one minibatch (the same rows of every model)."""
        h = all_pairs_hsic(xs, ys, self.kernel, True, sigma_frac=self.sigma_frac, sigmas=self.sigmas,
                           dtype=self.dtype)
        if self.cross is None:
            self.cross, self.self_x, self.self_y = h.cross.clone(), h.self_x.clone(), h.self_y.clone()
        else:
            if h.cross.shape != self.cross.shape:
                raise MetricError(f"batch has {tuple(h.cross.shape)} model pairs, earlier batches "
                                  f"{tuple(self.cross.shape)}.", fix="pass the same models in every update().")
            self.cross += h.cross
            self.self_x += h.self_x
            self.self_y += h.self_y
        self.n_batches += 1
        self.n_rows += h.n

    def compute(self) -> torch.Tensor:
        """(m, t) float64 minibatch CKA over all batches so far."""
        if self.cross is None:
            raise MetricError("StreamingCKA.compute() called before any update().", fix="call update() first.")
        assert self.self_x is not None and self.self_y is not None
        return cka_from_hsic(self.cross, self.self_x, self.self_y)

