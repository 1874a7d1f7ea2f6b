"""Calibrated scores and p-values (pairscout.metrics.calibration): exact null moments, z, Holm."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pairscout import statistics as S
from pairscout.metrics import calibration as C
from pairscout.metrics import knn as K
from pairscout.metrics import pair_metric


def _summary(a: np.ndarray) -> dict:
    m = torch.tensor(a)
    d = m.diagonal().clone()
    off = m - torch.diag(d)
    return C._GramSummary(d, off.sum(1), off.square().sum(1)).parts()


def test_quadratic_assignment_moments_equal_enumeration():
    rng = np.random.default_rng(0)
    n = 6
    a = rng.normal(size=(n, n))
    b = rng.normal(size=(n, n))
    a, b = a + a.T, b + b.T
    vals = np.array([(a * b[np.ix_(p, p)]).sum() for p in itertools.permutations(range(n))])
    mean, var = C._quadratic_assignment_moments(_summary(a), _summary(b))
    assert mean == pytest.approx(vals.mean(), rel=1e-10)
    assert var == pytest.approx(vals.var(), rel=1e-10)


@pytest.mark.parametrize("metric", ["cka_linear", "cka_linear_debiased", "cka_rbf"])
def test_null_moments_and_p_match_brute_force_permutations(metric):
    g = torch.Generator().manual_seed(1)
    n = 40
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = 0.5 * x[:, :3] + torch.randn(n, 3, generator=g, dtype=torch.float64)
    auto = C.calibrate([x], [y], metric)
    mc = C.calibrate([x], [y], metric, method="permutation", n_perm=1500, seed=3)
    sd = float(mc.null_sd)
    assert float(auto.null_mean) == pytest.approx(float(mc.null_mean), abs=4 * sd / 1500**0.5)
    assert float(auto.null_sd) == pytest.approx(sd, rel=0.08)
    assert float(auto.p_value) == pytest.approx(float(mc.p_value), abs=0.01)
    assert float(auto.z) > 2  # a real dependence


def test_debiased_null_is_mean_zero_sd_closed_form():
    n = 50
    c = C.calibrate([torch.randn(n, 4)], [torch.randn(n, 7)], "cka_linear_debiased")
    assert float(c.null_mean) == 0.0
    assert float(c.null_sd) == pytest.approx(C.debiased_cka_null_sd(n))
    assert C.debiased_cka_null_sd(n) == pytest.approx((2 / (n * (n - 3))) ** 0.5)


def test_holm_known_answer():
    p = torch.tensor([0.01, 0.04, 0.03, 0.2], dtype=torch.float64)
    # sorted 0.01, 0.03, 0.04, 0.2 -> 0.04, 0.09, 0.09 (cummax of 0.08), 0.2
    assert S.holm(p).tolist() == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert torch.isnan(S.holm(torch.tensor([float("nan"), 0.5]))[0])


@pytest.mark.parametrize("metric", ["cka_linear_debiased", "cka_linear", "cka_rbf", "mutual_knn", "cknna"])
def test_independent_embeddings_centre_on_zero_and_p_uniform(metric):
    """Calibrated scores of independent embeddings centre on 0 with unit spread; p-values are uniform-ish."""
    from scipy import stats

    zs, ps, holms = [], [], []
    for seed in range(8):
        g = torch.Generator().manual_seed(100 + seed)
        n = 120
        xs = [torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) for d in (6, 20)]
        ys = [torch.randn(n, d, generator=g) for d in (3, 12)]
        kw = {"k": 5} if metric in ("mutual_knn", "cknna") else {}
        c = C.calibrate(xs, ys, metric, n_perm=99, seed=seed, **kw)
        zs += c.z.flatten().tolist()
        ps += c.p_value.flatten().tolist()
        holms += c.p_holm.flatten().tolist()
    zs = np.array(zs)
    assert abs(zs.mean()) < 0.45 and 0.6 < zs.std() < 1.5
    assert stats.kstest(ps, "uniform").pvalue > 0.01
    assert np.mean(np.array(holms) < 0.05) <= 0.1  # family-wise: rarely any rejection


def test_neighbour_null_equals_recomputation_with_ties():
    """The permuted neighbour lists (sorted keys) give exactly the recomputed metric, duplicate rows included."""

    g = torch.Generator().manual_seed(0)
    n = 60
    lab = torch.randint(0, 5, (n,), generator=g)
    xs = [torch.randn(n, 8, generator=g) + torch.randn(5, 8, generator=g)[lab] for _ in range(2)]
    ys = [torch.randn(5, 4, generator=g)[lab], torch.randn(n, 6, generator=g)]  # ys[0]: identical rows per class
    perms = C._perms(n, 4, 1)
    nxs, nys, _ = K._neighbours_all(xs, ys, 5, K.Preprocess(), 4)
    for metric, fn in (("mutual_knn", lambda: C._mutual_knn_null(nxs, nys, perms)), ("cknna", lambda: C._cknna_null(nxs, nys, perms, n))):
        slow = torch.stack([pair_metric(metric, xs, [y[p] for y in ys], k=5) for p in perms])
        assert torch.allclose(fn(), slow, atol=1e-12)


@pytest.mark.parametrize("metric", ["mutual_knn", "cknna"])
def test_monte_carlo_p_is_not_floored_by_the_permutations(metric):
    """A strong pair among many: its Monte-Carlo p sits at 1 / (B + 1), which Holm over the pairs would floor at
    pairs / (B + 1); the fitted tail resolves it, and where >= 10 permutations reach the value p is the MC p."""
    g = torch.Generator().manual_seed(0)
    n = 200
    s = torch.randn(n, 6, generator=g)
    xs = [s @ torch.randn(6, 16, generator=g) + 0.3 * torch.randn(n, 16, generator=g) for _ in range(3)]
    ys = [s @ torch.randn(6, 12, generator=g) + 0.3 * torch.randn(n, 12, generator=g) for _ in range(3)]
    ys += [torch.randn(n, 12, generator=g) for _ in range(3)]  # unrelated: p spread over (0, 1]
    c = C.calibrate(xs, ys, metric, n_perm=39, cknna_perm=39, k=5, method="permutation")
    strong = c.p_mc[:, :3]
    assert bool((strong == 1 / 40).all())  # the permutations cannot say more ...
    assert float(S.holm(c.p_mc).max()) >= 0.45  # ... and Holm over 18 pairs would call none of them significant
    assert bool((c.p_value[:, :3] < 1e-6).all()) and bool((c.p_holm[:, :3] < 1e-4).all())  # the fitted tail does
    resolved = (c.p_mc >= 11 / 40)  # >= 10 exceedances: the MC p is used as it is
    assert bool(resolved.any()) and torch.equal(c.p_value[resolved], c.p_mc[resolved])
    assert "Pearson III" in c.method


def _weighted_lists(n: int, k: int, seed: int) -> K.Neighbours:
    """Random lists of k + 1 entries (no self, one padded slot) with uneven weights: an asymmetric weighted
    adjacency, as tied lists give."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n - 1, generator=g)[: k + 1] for _ in range(n)])
    idx = idx + (idx >= torch.arange(n)[:, None]).long()
    w = torch.rand(n, k + 1, generator=g, dtype=torch.float64)
    idx[0, -1], w[0, -1] = -1, 0.0
    return K.Neighbours(idx, torch.rand(n, k + 1, dtype=torch.float64), w, k)


def test_overlap_moments_equal_every_permutation():
    """The closed-form mean and variance of sum_ij A_ij B_pi(i)pi(j) equal those over all 7! permutations, for
    asymmetric weighted lists with a padded slot."""
    from pairscout.metrics import neighbour_null as NN

    n = 7
    a, b = _weighted_lists(n, 2, 3), _weighted_lists(n, 3, 4)

    def dense(nb: K.Neighbours) -> torch.Tensor:
        out = torch.zeros(n, n, dtype=torch.float64)
        ok = nb.indices >= 0
        out[torch.arange(n)[:, None].expand_as(nb.indices)[ok], nb.indices[ok]] = nb.weights[ok]
        return out

    A, B = dense(a), dense(b)
    assert not torch.equal(A, A.T)
    ts = torch.tensor([float((A * B[list(p)][:, list(p)]).sum()) for p in itertools.permutations(range(n))],
                      dtype=torch.float64)
    mean, var = NN.overlap_moments(NN.overlap_sums(a, n), NN.overlap_sums(b, n))
    assert mean == pytest.approx(float(ts.mean()), rel=1e-12)
    assert var == pytest.approx(float(ts.var(unbiased=False)), rel=1e-10)


def test_mutual_knn_null_is_exact_and_matches_permutations():
    """Mutual k-NN's default null (closed form, no permutation) agrees with 2,000 Monte-Carlo permutations of the
    same lists: mean to the MC error, sd within 10 %; independent embeddings give |z| < 4 and p spread over (0, 1]."""
    g = torch.Generator().manual_seed(1)
    n = 300
    s = torch.randn(n, 4, generator=g)
    xs = [s @ torch.randn(4, 16, generator=g) + 0.5 * torch.randn(n, 16, generator=g), torch.randn(n, 8, generator=g)]
    ys = [s @ torch.randn(4, 12, generator=g) + 0.5 * torch.randn(n, 12, generator=g), torch.randn(n, 6, generator=g)]
    exact = C.calibrate(xs, ys, "mutual_knn", k=10)
    mc = C.calibrate(xs, ys, "mutual_knn", k=10, n_perm=2000, method="permutation", seed=5)
    assert exact.n_perm == 0 and exact.p_mc is None and "closed form" in exact.method
    assert torch.equal(exact.observed, mc.observed)
    assert torch.allclose(exact.null_mean, mc.null_mean, atol=4 * float(exact.null_sd.max()) / 2000**0.5)
    assert torch.allclose(exact.null_sd, mc.null_sd, rtol=0.1)
    assert float(exact.z[0, 0]) > 20 and float(exact.p_value[0, 0]) < 1e-9  # the shared signal
    unrelated = torch.tensor([[False, True], [True, True]])
    assert bool((exact.z[unrelated].abs() < 4).all()) and bool((exact.p_value[unrelated] > 1e-3).all())


def test_cknna_null_bitmap_in_row_chunks_equals_one_bitmap(monkeypatch):
    """CKNNA's null looks entries up in a bitmap of a few rows at a time (memory linear in n): 8-row chunks give
    the same null as one bitmap of all rows, tied lists included."""
    from pairscout.metrics import neighbour_null as NN

    g = torch.Generator().manual_seed(0)
    n = 203
    xs = [torch.randn(n, 8, generator=g) for _ in range(2)]
    ys = [torch.randn(n, 5, generator=g) for _ in range(3)]
    ys[0][1::5] = ys[0][0::5][: len(ys[0][1::5])]  # duplicated rows: tie weights
    nxs, nys = [K.nearest_neighbours(x, 6) for x in xs], [K.nearest_neighbours(y, 6) for y in ys]
    assert nys[0].weights is not None
    perms = C._perms(n, 7, 1)
    whole = NN._cknna_null(nxs, nys, perms, n)
    monkeypatch.setattr(NN, "BITMAP_ROW_BYTES", 40)  # 8 rows of 203 bits per chunk
    assert torch.equal(NN._cknna_null(nxs, nys, perms, n), whole)
    slow = torch.stack([pair_metric("cknna", xs, [y[p] for y in ys], k=6) for p in perms])
    assert torch.allclose(whole, slow, atol=1e-12, equal_nan=True)
