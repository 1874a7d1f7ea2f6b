"""The measures of pairscout.metrics.measures: invariances, null behaviour, known values, a peer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pairscout.errors import MetricError
from pairscout.metrics.measures import chance_level, cycle_knn, matching, procrustes, pwcca, rsa, svcca

F64 = torch.float64
ALL = {"svcca": svcca, "pwcca": pwcca, "procrustes": procrustes, "rsa": rsa, "cycle_knn": cycle_knn,
       "matching": matching}
# which transformations of y leave each measure unchanged (rotation, isotropic scale, offset)
INVARIANT = {"svcca": "rso", "pwcca": "rso", "procrustes": "rso", "rsa": "rso", "cycle_knn": "rs", "matching": "rso"}


def signal(n: int = 300, d: int = 12, noise: float = 0.6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    """x = a 4-dim latent seen through a random map, plus noise; y = the same clean signal placed isometrically
    in d + 3 dims, plus independent noise (so K and L share structure up to the noise)."""
    s = torch.randn(n, 4, generator=g, dtype=F64)
    clean = s @ torch.randn(4, d, generator=g, dtype=F64)
    iso, _ = torch.linalg.qr(torch.randn(d + 3, d, generator=g, dtype=F64))  # (d+3, d), orthonormal columns
    x = clean + noise * torch.randn(n, d, generator=g, dtype=F64)
    y = clean @ iso.T + noise * torch.randn(n, d + 3, generator=g, dtype=F64)
    return x, y


def small(name: str):
    fn = ALL[name]
    if name == "matching":
        return lambda a, b: fn(a, b, max_rows=80, repeats=1)
    return fn


@pytest.mark.parametrize("name", [n for n in ALL if n != "cycle_knn"])
def test_identity_is_maximal(name):
    x, _ = signal()
    assert small(name)(x, x) == pytest.approx(1.0, abs=1e-9)


def test_cycle_knn_of_identity_is_the_reciprocity_of_neighbours():
    """cycle k-NN(x, x) is not 1: it counts rows that are a neighbour of one of their own neighbours."""
    x, _ = signal()
    val = cycle_knn(x, x)
    assert 0.8 < val <= 1.0


@pytest.mark.parametrize("name", list(ALL))
def test_invariances(name):
    x, y = signal(seed=1)
    q, _ = torch.linalg.qr(torch.randn(y.shape[1], y.shape[1], generator=torch.Generator().manual_seed(5), dtype=F64))
    fn = small(name)
    base = fn(x, y)
    assert 0.2 < base < 1.0  # a real, partial similarity (the checks below are not on a degenerate value)
    if "r" in INVARIANT[name]:
        assert fn(x, y @ q) == pytest.approx(base, abs=1e-7)
    if "s" in INVARIANT[name]:
        assert fn(x, 1e-20 * y) == pytest.approx(base, abs=1e-7)
        assert fn(x, 1e20 * y) == pytest.approx(base, abs=1e-7)
    if "o" in INVARIANT[name]:
        assert fn(x, y + 1e3) == pytest.approx(base, abs=1e-7)


@pytest.mark.parametrize("name", list(ALL))
def test_independent_data_reads_near_chance(name):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(400, 8, generator=g, dtype=F64), torch.randn(400, 8, generator=g, dtype=F64)
    fn = small(name)
    val, hi = fn(x, y), fn(*signal(400, 8, 0.3, seed=3))
    near = {"svcca": 0.2, "pwcca": 0.2, "procrustes": 0.3, "rsa": 0.1, "cycle_knn": 0.35, "matching": 0.1}[name]
    assert abs(val) < near
    assert hi > val + 0.2  # and planted signal reads clearly higher


def test_procrustes_known_value():
    # x = diag-ish 2-D points; y = x rotated by 90 degrees then one axis squashed by 1/2
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]], dtype=F64)
    y = x @ torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64) @ torch.diag(torch.tensor([1.0, 0.5], dtype=F64))
    # y rows: [0, .5], [0, -.5], [-2, 0], [2, 0]; x^T y = [[0, 1], [-8, 0]], singular values 8 and 1;
    # ||x||_F = sqrt(10), ||y||_F = sqrt(8.5): similarity 9 / sqrt(85)
    assert procrustes(x, y) == pytest.approx(9 / np.sqrt(85), abs=1e-12)


def test_svcca_known_value_two_directions():
    # x has two columns; y repeats column 0 exactly and column 1 with independent noise of equal variance
    g = torch.Generator().manual_seed(4)
    a, b, e = (torch.randn(20000, generator=g, dtype=F64) for _ in range(3))
    x = torch.stack([a, b], 1)
    y = torch.stack([a, (b + e) / np.sqrt(2)], 1)
    # canonical correlations 1 and corr(b, b + e) = 1/sqrt(2): SVCCA = (1 + 0.7071) / 2
    assert svcca(x, y, keep=1.0) == pytest.approx((1 + 2**-0.5) / 2, abs=5e-3)


def test_rsa_against_scipy_spearman():
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    x, y = signal(120, 6, 0.8, seed=6)
    want = spearmanr(pdist(x.numpy()), pdist(y.numpy())).statistic
    assert rsa(x, y) == pytest.approx(want, abs=1e-10)
    want_c = spearmanr(pdist(x.numpy() - x.numpy().mean(0), "cosine"), pdist(y.numpy() - y.numpy().mean(0), "cosine")).statistic
    assert rsa(x, y, distance="cosine") == pytest.approx(want_c, abs=1e-10)


def test_rsa_against_rsatoolbox():
    rsatoolbox = pytest.importorskip("rsatoolbox")
    x, y = signal(80, 6, 0.8, seed=7)
    rdms = [rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(z.numpy()), method="euclidean") for z in (x, y)]
    want = float(rsatoolbox.rdm.compare(rdms[0], rdms[1], method="spearman")[0, 0])
    assert rsa(x, y) == pytest.approx(want, abs=1e-8)


def test_cycle_knn_matches_platonic_definition():
    """Reference: platonic-rep's cycle_knn, knn_A[knn_B] then 'is i among them' (written out here)."""
    x, y = signal(150, 10, 1.0, seed=8)
    xn, yn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    k = 5

    def knn(z):
        return (z @ z.T).fill_diagonal_(-1e8).argsort(dim=1, descending=True)[:, :k]
    ka, kb = knn(xn), knn(yn)
    want = (ka[kb] == torch.arange(150).view(-1, 1, 1)).float().view(150, -1).max(1).values.mean()
    assert cycle_knn(x, y, k=k) == pytest.approx(float(want), abs=1e-6)


def test_matching_recovers_a_rotated_copy_and_reports_chance():
    x, _ = signal(60, 8, 0.05, seed=9)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=F64))
    assert matching(x, x @ q, repeats=2) == pytest.approx(1.0)
    assert chance_level("matching", 1000) == pytest.approx(1 / 200)


def test_bad_parameters_are_one_line_errors():
    x, y = signal(40, 30, seed=0)
    with pytest.raises(MetricError, match="over-fits"):
        svcca(x, y, max_dims=None)
    assert 0 < svcca(x, y) <= 1  # "auto" caps the kept directions at n // 10
    assert 0 < svcca(x, y, max_dims=5) <= 1
    for call in (lambda: svcca(x, y, keep=0), lambda: cycle_knn(x, y, k=2.5), lambda: cycle_knn(x, y, k=40),
                 lambda: rsa(x, y, method="kendall"), lambda: rsa(x, y, distance="l7"),
                 lambda: matching(x, y, max_rows=1), lambda: procrustes(x, torch.zeros(40, 3))):
        with pytest.raises(MetricError):
            call()


def test_registered_by_name_with_all_pairs_forms():
    from pairscout.metrics import MEASURES, measure
    from pairscout.metrics.registry import pair_metric

    x, y = signal(120, 6, 0.8, seed=10)
    for name, fn in ALL.items():
        assert name in MEASURES and not MEASURES[name].default
        if name == "matching":
            continue  # same code path, slower: checked through matching() above
        assert measure(name, x, y) == pytest.approx(fn(x, y), abs=1e-12)
        grid = pair_metric(name, [x, y], [y], scale_free=True)
        assert grid.shape == (2, 1) and grid[1, 0] == pytest.approx(fn(y, y), abs=1e-9)
