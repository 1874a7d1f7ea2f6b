"""Layer sweep: the best layer pair and its selection-corrected calibration."""

from __future__ import annotations

import pytest
import torch

from pairscout.errors import MetricError
from pairscout.metrics.layers import layer_sweep

F64 = torch.float64


def planted(n: int = 300, seed: int = 0, signal_layer: int = 2, strength: float = 0.35):
    """Five 'vision layers' of which only one carries a weak shared signal; four 'text layers', one shares it."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, 3, generator=g, dtype=F64)
    xs = []
    for layer in range(5):
        z = torch.randn(n, 16, generator=g, dtype=F64)
        if layer == signal_layer:
            z = z + strength * s @ torch.randn(3, 16, generator=g, dtype=F64)
        xs.append(z)
    ys = [torch.randn(n, 12, generator=g, dtype=F64) for _ in range(4)]
    ys[-1] = ys[-1] + strength * s @ torch.randn(3, 12, generator=g, dtype=F64)
    return xs, ys


def test_middle_layer_found_and_correction_is_lower():
    xs, ys = planted()
    res = layer_sweep(xs, ys, permutations=200, layers_x=[f"block{i}" for i in range(5)],
                      layers_y=[f"t{j}" for j in range(4)])
    assert res.best == (2, 3)
    assert res.best_layers == ("block2", "t3")
    assert res.best_value == pytest.approx(max(max(r) for r in res.cka))
    # the planted signal is real: both calibrations call it significant ...
    assert res.p_max < 0.01 and res.p_pair < 0.01
    # ... but the search costs something: the corrected excess over chance is below the naive one and the raw max
    assert res.excess_max < res.excess_pair < res.best_value
    assert res.null_max_mean > res.best_value - res.excess_pair  # null of the max sits above one pair's null


def test_cka_matrix_matches_linear_cka():
    from pairscout.metrics import linear_cka

    xs, ys = planted(n=120, seed=1)
    res = layer_sweep(xs, ys, permutations=5)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            assert res.cka[i][j] == pytest.approx(linear_cka(x, y), abs=1e-10)


def test_no_signal_is_not_significant_after_correction():
    """Independent layers: the raw maximum over 20 pairs looks like a hit for the naive p, not the corrected."""
    hits_naive, hits_corr = 0, 0
    for seed in range(10):
        g = torch.Generator().manual_seed(100 + seed)
        xs = [torch.randn(80, 8, generator=g, dtype=F64) for _ in range(5)]
        ys = [torch.randn(80, 8, generator=g, dtype=F64) for _ in range(4)]
        res = layer_sweep(xs, ys, permutations=100, seed=seed)
        hits_naive += res.p_pair <= 0.05
        hits_corr += res.p_max <= 0.05
    assert hits_corr <= 2  # about 5 % false positives after correction
    assert hits_naive >= 4  # the maximum of 20 null pairs passes a per-pair test far more often


def test_errors_and_subset():
    xs, ys = planted(n=60)
    with pytest.raises(MetricError, match="permutations"):
        layer_sweep(xs, ys, permutations=0)
    with pytest.raises(MetricError, match="names"):
        layer_sweep(xs, ys, permutations=3, layers_x=["a"])
    assert layer_sweep(xs, ys, permutations=3, max_rows=40).rows == 40


# --- many encoders at once (what rank --layers runs) ---------------------------------------------------
def test_sweep_pairs_equals_the_all_pairs_kernel_and_layer_sweep():
    from pairscout.metrics.cka import all_pairs_cka
    from pairscout.metrics.layers import sweep_pairs

    xs, ys = planted(n=150)
    other = [torch.randn(150, 7, generator=torch.Generator().manual_seed(5), dtype=F64) + 100.0]  # an offset
    for debiased in (False, True):
        sw = sweep_pairs([xs, other], [ys], debiased=debiased, permutations=49, max_rows=None)
        ref = all_pairs_cka(xs + other, ys, debiased=debiased)
        torch.testing.assert_close(torch.tensor(sw.cka, dtype=F64), ref, atol=1e-8, rtol=0)
        assert sw.best[0][0] == (2, 3)  # the planted middle layer
        assert sw.value[0][0] == pytest.approx(float(ref[:5].max()))
        assert sw.best[1][0] == tuple(divmod(int(torch.argmax(ref[5:])), 4))
    one = layer_sweep(xs, ys, permutations=49, max_rows=None)
    sw = sweep_pairs([xs], [ys], permutations=49, max_rows=None)
    assert (one.p_max, one.z_max, one.excess_max) == (sw.p_max[0][0], sw.z_max[0][0], sw.excess_max[0][0])


def test_sweep_pairs_corrects_a_search_over_noise():
    """Pure noise in 8 x 8 layers: the best layer pair looks significant on its own, not after the correction."""
    from pairscout.metrics.layers import sweep_pairs

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(60, 5, generator=g, dtype=F64) for _ in range(8)]
    ys = [torch.randn(60, 5, generator=g, dtype=F64) for _ in range(8)]
    sw = sweep_pairs([xs], [ys], debiased=True, permutations=199, seed=1, max_rows=None)
    assert sw.p_pair[0][0] < 0.05  # what a search that keeps the maximum would report
    assert sw.p_max[0][0] > 0.2  # the null of the maximum: chance
    assert sw.excess_max[0][0] < sw.value[0][0] - sw.null_pair_mean[0][0]


def test_gumbel_tail_agrees_with_the_permutations_and_resolves_small_p():
    from pairscout.metrics.layers import sweep_pairs

    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(80, 6, generator=g, dtype=F64) for _ in range(4)]
    ys = [torch.randn(80, 6, generator=g, dtype=F64) for _ in range(3)]
    s = torch.randn(80, 2, generator=g, dtype=F64)
    weak = [xs[0] + 0.25 * s @ torch.randn(2, 6, generator=g, dtype=F64), *xs[1:]]
    strong = [xs[0] + 2.0 * s @ torch.randn(2, 6, generator=g, dtype=F64), *xs[1:]]
    y = [ys[0] + 0.25 * s @ torch.randn(2, 6, generator=g, dtype=F64), *ys[1:]]
    sw = sweep_pairs([xs, weak, strong], [y], debiased=True, permutations=499, seed=2, max_rows=None)
    for a in (0, 1):  # chance and a weak signal: the fitted tail matches the Monte-Carlo p within its error
        assert abs(sw.p_max_gumbel[a][0] - sw.p_max[a][0]) < 0.08
    assert sw.p_max[2][0] == pytest.approx(1 / 500)  # the permutations cannot see further ...
    assert sw.p_max_gumbel[2][0] < 1e-6  # ... the fitted tail can
