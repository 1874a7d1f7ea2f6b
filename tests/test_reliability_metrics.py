"""Issue 14, metrics: degenerate inputs are errors naming the model, impossible parameters are errors, and
scale-invariant measures stay scale-invariant over the whole float range."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pairscout.errors import MetricError
from pairscout.metrics import all_pairs_cka, linear_cka
from pairscout.metrics.knn import all_pairs_mutual_knn, cknna, mutual_knn, nearest_neighbours
from pairscout.metrics.quality import clustering_quality, knn_accuracy


@pytest.fixture(scope="module")
def xy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 32, generator=g)
    y = x[:, :16] @ torch.randn(16, 24, generator=g) + 2 * torch.randn(200, 24, generator=g)
    return x, y


def test_mutual_knn_of_zeros_is_an_error_not_one():
    z = torch.zeros(50, 8)
    with pytest.raises(MetricError, match=r"xs\[0\] is all-zero"):
        mutual_knn(z, z)
    with pytest.raises(MetricError, match=r"ys\[1\] is constant"):
        all_pairs_mutual_knn([torch.randn(50, 4)], [torch.randn(50, 4), torch.ones(50, 4)])
    with pytest.raises(MetricError, match="all-zero"):
        cknna(torch.randn(50, 4), z)


@pytest.mark.parametrize(("scale_x", "scale_y"), [(1e20, 1e20), (1e-20, 1e-20), (1e20, 1e-20), (1e-30, 1e30)])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_scale_invariant_over_the_float32_range(xy, scale_x, scale_y, debiased):
    x, y = xy
    ref = float(all_pairs_cka([x], [y], debiased=debiased)[0, 0])
    got = float(all_pairs_cka([x * scale_x], [y * scale_y], debiased=debiased)[0, 0])
    assert ref > 0.4
    assert got == pytest.approx(ref, rel=1e-5)
    assert linear_cka((x * scale_x).numpy(), (y * scale_y).numpy(), debiased=debiased) == pytest.approx(ref, rel=1e-5)


def test_cka_small_signal_value_survives_1e20_scaling():
    """The fuzz case: a weakly related pair (CKA about 0.1) read 0.0 once scaled by 1e20 or 1e-20."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 64, generator=g)
    y = 0.2 * x[:, :8] @ torch.randn(8, 48, generator=g) + torch.randn(300, 48, generator=g) * 1.5
    ref = float(all_pairs_cka([x], [y])[0, 0])
    assert 0.05 < ref < 0.3
    for s in (1e20, 1e-20):
        assert float(all_pairs_cka([x * s], [y * s])[0, 0]) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("s", [1e20, 1e-25])
def test_neighbourhood_metrics_are_scale_invariant(xy, s):
    x, y = xy
    assert mutual_knn(x * s, y / s) == pytest.approx(mutual_knn(x, y))
    assert cknna(x * s, y) == pytest.approx(cknna(x, y), rel=1e-5)
    labels = (x[:, 0] > 0).long()
    assert knn_accuracy(x * s, labels, k=5) == pytest.approx(knn_accuracy(x, labels, k=5))
    q, r = clustering_quality(x * s, labels), clustering_quality(x, labels)
    assert q["nmi"] == pytest.approx(r["nmi"])


@pytest.mark.parametrize("sigmas", [[math.inf, 1.0], [1.0, math.nan], [0.0, 1.0], [-1.0, 1.0]])
def test_impossible_rbf_bandwidths_are_errors(xy, sigmas):
    x, y = xy
    with pytest.raises(MetricError, match="finite positive"):
        all_pairs_cka([x], [y], kernel="rbf", sigmas=sigmas)


@pytest.mark.parametrize("tile", [-1, 0, 2.5, True])
def test_impossible_tiles_are_errors(xy, tile):
    x, y = xy
    with pytest.raises(MetricError, match="tile"):
        all_pairs_cka([x], [y], method="gram", tile=tile)
    with pytest.raises(MetricError, match="tile"):
        nearest_neighbours(x, 5, tile=tile)


@pytest.mark.parametrize("k", [2.5, 0, -3, True])
def test_impossible_k_is_an_error(xy, k):
    x, y = xy
    with pytest.raises(MetricError, match="k="):
        mutual_knn(x, y, k=k)


def test_odd_arrays_are_one_line_errors_or_read_right(xy):
    x, y = xy
    with pytest.raises(MetricError, match="object"):
        linear_cka(np.array([[object()] * 3] * 10), y[:10].numpy())
    with pytest.raises(MetricError, match="complex"):
        linear_cka(x.numpy() + 1j, y.numpy())
    with pytest.raises(MetricError, match="meta tensor"):
        linear_cka(torch.empty(200, 32, device="meta"), y)
    big_endian = x.numpy().astype(">f4")
    assert linear_cka(big_endian, y.numpy()) == pytest.approx(linear_cka(x, y), rel=1e-6)
