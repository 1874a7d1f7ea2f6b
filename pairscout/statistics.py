"""The statistics helpers every stage shares: multiple-testing correction (Holm), the standard error of a proportion,
and Spearman's rho with an exact p for few points and a Fisher-z interval. Pure functions; numpy / torch / scipy only.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch

F64 = torch.float64
EXACT_BELOW = 9
"""Below this many points Spearman's p is exact over all orderings (:func:`spearman`)."""


def holm(p: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Holm's step-down adjusted p-values (same shape): ``p_(i) -> max_{j<=i} min(1, (m - j + 1) p_(j))``.

    Controls the family-wise error rate under any dependence. NaNs stay NaN and do not count in m.
    """
    t = torch.as_tensor(p, dtype=F64)
    flat = t.reshape(-1)
    out = torch.full_like(flat, float("nan"))
    ok = ~torch.isnan(flat)
    vals = flat[ok]
    m = vals.numel()
    if m:
        order = torch.argsort(vals)
        adj = (vals[order] * torch.arange(m, 0, -1, dtype=F64)).clamp(max=1.0)
        adj = torch.cummax(adj, 0).values
        res = torch.empty_like(vals)
        res[order] = adj
        out[ok] = res
    return out.reshape(t.shape)


def binomial_se(p: float, n: int) -> float:
    """Standard error of a proportion ``p`` measured on ``n`` held-out items (0.5 / n floor away from 0 and 1)."""
    p = min(max(p, 0.5 / max(n, 1)), 1 - 0.5 / max(n, 1))
    return math.sqrt(p * (1 - p) / max(n, 1))


def fisher_interval(rho: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Approximate interval of Spearman's rho: ``tanh(atanh(rho) +- z sqrt((1 + rho^2/2) / (n - 3)))`` (Bonett & Wright
    2000); NaN for n < 4 or |rho| = 1 (where the transform is undefined): also for a rho that is 1 up to rounding
    (scipy gives 0.9999999999999999 for a perfect order), which would read as a zero-width "[+1.00, +1.00]"."""
    if n < 4 or not math.isfinite(rho) or abs(rho) >= 1 - 1e-9:
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    half = z * math.sqrt((1 + rho * rho / 2) / (n - 3))
    return math.tanh(math.atanh(rho) - half), math.tanh(math.atanh(rho) + half)


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman's rho and its two-sided p: exact over all n! orderings below :data:`EXACT_BELOW` points (the t
    approximation scipy uses gives p = 0 for a perfect order of 3 points, whose exact p is 2 / 6), else scipy's."""
    from scipy import stats

    r = stats.spearmanr(x, y)
    rho = float(r.statistic)
    if len(x) >= EXACT_BELOW:
        return rho, float(r.pvalue)
    res = stats.permutation_test((x,), lambda a: stats.spearmanr(a, y).statistic, permutation_type="pairings",
                                 n_resamples=math.inf)
    return rho, float(res.pvalue)
