"""Permutation null and bootstrap confidence intervals."""

from __future__ import annotations

import pytest
import torch

from pairscout.errors import MetricError
from pairscout.metrics import (
    all_pairs_cka,
    all_pairs_mutual_knn,
    bootstrap_ci,
    linear_cka_null_mean,
    median_sigma,
    pair_metric,
    permutation_null,
)
from pairscout.metrics.stats import _bootstrap_cka, bootstrap_weights

F64 = torch.float64


def models(n: int = 150, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, 4, generator=g, dtype=F64)
    zs = [s @ torch.randn(4, d, generator=g, dtype=F64) + torch.randn(n, d, generator=g, dtype=F64) for d in (5, 9, 7)]
    noise = torch.randn(n, 6, generator=g, dtype=F64)  # unrelated to the others
    return zs[:2], [zs[2], noise]


def test_permutation_null_linear_cka():
    xs, ys = models()
    r = permutation_null(xs, ys, "cka_linear", n_perm=60, seed=1)
    torch.testing.assert_close(r.observed, all_pairs_cka(xs, ys))
    # shared signal: far above the null, smallest possible p; noise column: not significant
    assert bool((r.p_value[:, 0] == 1 / 61).all())
    assert bool((r.p_value[:, 1] > 0.05).all())
    # Monte Carlo null mean agrees with the exact permutation expectation
    exact = linear_cka_null_mean(xs, ys)
    assert bool(((r.null_mean - exact).abs() < 4 * r.null_std / 60**0.5 + 1e-3).all())
    again = permutation_null(xs, ys, "cka_linear", n_perm=60, seed=1)
    assert torch.equal(again.null_mean, r.null_mean)  # seeded
    assert r.to_dict()["n_perm"] == 60


@pytest.mark.parametrize("metric", ["mutual_knn", "cknna"])
def test_permutation_null_neighbour_metrics_equal_recompute(metric):
    xs, ys = models(n=80)
    r = permutation_null(xs, ys, metric, n_perm=3, seed=2, k=5)
    # permuting the neighbour lists must equal recomputing the metric on permuted rows
    g = torch.Generator().manual_seed(2)
    perms = [torch.randperm(80, generator=g) for _ in range(3)]
    rec = torch.stack([pair_metric(metric, xs, [y[p] for y in ys], k=5) for p in perms])
    torch.testing.assert_close(r.null_mean, rec.mean(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(r.observed, pair_metric(metric, xs, ys, k=5))
    assert float(r.observed[0, 0]) > float(r.null_mean[0, 0]) + 0.05


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_bootstrap_reweighting_equals_explicit_resample(kernel):
    xs, ys = models(n=60)
    w = bootstrap_weights(60, 3, seed=5)
    reps = _bootstrap_cka(xs, ys, kernel, w, tile=17)
    sig = [median_sigma(z) for z in [*xs, *ys]]
    for b in range(3):
        idx = torch.repeat_interleave(torch.arange(60), w[:, b].long())
        ref = all_pairs_cka([x[idx] for x in xs], [y[idx] for y in ys], kernel,
                            sigmas=sig if kernel == "rbf" else None)
        torch.testing.assert_close(reps[b], ref, atol=1e-10, rtol=0)


def test_bootstrap_ci():
    xs, ys = models()
    ci = bootstrap_ci(xs, ys, "cka_linear", n_boot=100, seed=3)
    assert bool((ci.low <= ci.high).all()) and bool((ci.std > 0).all())
    assert bool((ci.low < ci.estimate + 0.05).all()) and bool((ci.estimate - 0.05 < ci.high).all())
    assert float(ci.high[0, 0] - ci.low[0, 0]) < 0.3
    assert torch.equal(bootstrap_ci(xs, ys, "cka_linear", n_boot=100, seed=3).low, ci.low)
    mk = bootstrap_ci(xs, ys, "mutual_knn", n_boot=100, seed=3, k=5)
    torch.testing.assert_close(mk.estimate, all_pairs_mutual_knn(xs, ys, k=5))
    assert bool((mk.low <= mk.estimate).all()) and bool((mk.estimate <= mk.high).all())
    assert ci.to_dict()["method"]


def test_stats_errors():
    xs, ys = models(n=30)
    with pytest.raises(MetricError, match="no bootstrap for 'cka_linear_debiased'"):
        bootstrap_ci(xs, ys, "cka_linear_debiased")
    with pytest.raises(MetricError, match="unknown pair metric"):
        permutation_null(xs, ys, "cosine")
    with pytest.raises(MetricError, match="level"):
        bootstrap_ci(xs, ys, level=1.5)
