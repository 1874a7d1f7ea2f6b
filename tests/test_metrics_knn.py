"""Mutual k-NN and CKNNA against dense references written after platonic-rep's code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pairscout.errors import MetricError
from pairscout.metrics import (
    Preprocess,
    all_pairs_cknna,
    all_pairs_mutual_knn,
    cknna,
    mutual_knn,
    nearest_neighbours,
)

F64 = torch.float64


def ref_knn(f: torch.Tensor, k: int) -> torch.Tensor:
    return (f @ f.T).fill_diagonal_(-1e8).argsort(dim=1, descending=True)[:, :k]


def ref_mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    ka, kb = ref_knn(a, k), ref_knn(b, k)
    n = a.shape[0]
    ma, mb = torch.zeros(n, n, dtype=F64), torch.zeros(n, n, dtype=F64)
    r = torch.arange(n)[:, None]
    ma[r, ka] = 1
    mb[r, kb] = 1
    return float(((ma * mb).sum(1) / k).mean())


def ref_hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    m = k.shape[0]
    kt, lt = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    v = (kt * lt.T).sum() + kt.sum() * lt.sum() / ((m - 1) * (m - 2)) - 2 * (kt @ lt).sum() / (m - 2)
    return float(v / (m * (m - 3)))


def ref_cknna(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    kk, ll = a @ a.T, b @ b.T
    n = a.shape[0]

    def sim(k_: torch.Tensor, l_: torch.Tensor) -> float:
        ik = torch.topk(k_.clone().fill_diagonal_(float("-inf")), k, dim=1).indices
        il = torch.topk(l_.clone().fill_diagonal_(float("-inf")), k, dim=1).indices
        mask = torch.zeros(n, n, dtype=F64).scatter_(1, ik, 1) * torch.zeros(n, n, dtype=F64).scatter_(1, il, 1)
        return ref_hsic_unbiased(mask * k_, mask * l_)

    return sim(kk, ll) / np.sqrt(sim(kk, kk) * sim(ll, ll))


def models(n: int = 80, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, 4, generator=g, dtype=F64)
    return [s @ torch.randn(4, d, generator=g, dtype=F64) + 0.7 * torch.randn(n, d, generator=g, dtype=F64)
            for d in (6, 10, 8, 12)]


def test_neighbours_exclude_self_and_match_sort():
    x = models()[0]
    nb = nearest_neighbours(x, k=5, tile=7)
    n = x.shape[0]
    assert not bool((nb.indices == torch.arange(n)[:, None]).any())
    ref = ref_knn(torch.nn.functional.normalize(x, dim=1), 5)
    assert torch.equal(nb.indices, ref)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_mutual_knn_matches_reference(k):
    zs = models()
    assert mutual_knn(zs[0], zs[2], k) == pytest.approx(ref_mutual_knn(zs[0], zs[2], k), abs=1e-12)


def test_mutual_knn_known_values():
    zs = models()
    assert mutual_knn(zs[0], zs[0]) == 1.0
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64))
    assert mutual_knn(zs[0], 3 * zs[0] @ q) == 1.0  # rotation + scale keep cosine neighbours
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(500, 16, generator=g), torch.randn(500, 16, generator=g)
    assert mutual_knn(a, b, 10) < 0.06  # chance is k / (n - 1) = 0.02


def test_all_pairs_equal_loop():
    zs = models()
    xs, ys = zs[:2], zs[2:]
    mk = all_pairs_mutual_knn(xs, ys, k=7)
    ck = all_pairs_cknna(xs, ys, k=7)
    for i in range(2):
        for j in range(2):
            assert float(mk[i, j]) == mutual_knn(xs[i], ys[j], 7)
            assert float(ck[i, j]) == pytest.approx(cknna(xs[i], ys[j], 7), abs=1e-12)
    assert float(mk.std()) > 0


@pytest.mark.parametrize("k", [2, 10])
def test_cknna_matches_reference(k):
    zs = models()
    assert cknna(zs[1], zs[3], k) == pytest.approx(ref_cknna(zs[1], zs[3], k), abs=1e-10)
    assert cknna(zs[1], zs[1], k) == pytest.approx(1.0, abs=1e-12)


def test_preprocess_is_explicit_and_recorded():
    pre = Preprocess.platonic()
    assert pre.to_dict() == {"clip_quantile": 0.95, "l2_normalize": True}
    x = models()[1].clone()
    x[0, 0] = 1e4  # one huge outlier coordinate
    y = pre(x)
    raw = x.abs()
    thr = float(torch.quantile(raw, 0.95, dim=1).mean())
    clipped = x.clamp(-thr, thr)
    torch.testing.assert_close(y, torch.nn.functional.normalize(clipped, dim=1))
    assert mutual_knn(x, x, 5, pre) == 1.0
    assert Preprocess(l2_normalize=False)(x).norm(dim=1).std() > 0  # off means off
    with pytest.raises(MetricError, match="clip_quantile"):
        Preprocess(clip_quantile=1.5)(x)


def test_knn_degenerate_input():
    x = torch.randn(10, 3)
    with pytest.raises(MetricError, match="k=10 neighbours"):
        mutual_knn(x, x, k=10)
    with pytest.raises(MetricError, match="rows must be the same pairs"):
        mutual_knn(x, torch.randn(11, 3))
    bad = x.clone()
    bad[2, 2] = float("nan")
    with pytest.raises(MetricError, match=r"ys\[0\] contains NaN"):
        all_pairs_mutual_knn([x], [bad], k=3)
    with pytest.raises(MetricError, match="k >= 2"):
        cknna(x, x, k=1)
