"""CKA family against plain numpy references (explicit centring matrix H, float64)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pairscout.errors import MetricError
from pairscout.metrics import (
    StreamingCKA,
    all_pairs_cka,
    all_pairs_hsic,
    cka_from_grams,
    hsic,
    linear_cka,
    median_sigma,
    pair_cka,
    rbf_cka,
    rbf_gram,
)

F64 = torch.float64


# ---------------------------------------------------------------- references
def ref_hsic(k: np.ndarray, l: np.ndarray, debiased: bool) -> float:  # noqa: E741
    n = k.shape[0]
    if not debiased:
        h = np.eye(n) - np.ones((n, n)) / n
        return float(np.trace(k @ h @ l @ h) / (n - 1) ** 2)
    k, l = k.copy(), l.copy()  # noqa: E741
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return float((np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * one @ k @ l @ one) / (n * (n - 3)))


def ref_cka(k: np.ndarray, l: np.ndarray, debiased: bool = False) -> float:  # noqa: E741
    return ref_hsic(k, l, debiased) / np.sqrt(ref_hsic(k, k, debiased) * ref_hsic(l, l, debiased))


def ref_rbf(x: np.ndarray, sigma: float) -> np.ndarray:
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2))


def ref_sigma(x: np.ndarray, frac: float = 1.0) -> float:
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    v = d2[np.triu_indices(x.shape[0], 1)]
    return frac * float(np.sqrt(np.median(v[v > 0])))


def structured(n: int, dims: list[int], seed: int, shared: int = 6, dtype=F64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, shared, generator=g, dtype=F64)
    return [(s @ torch.randn(shared, d, generator=g, dtype=F64) + torch.randn(n, d, generator=g, dtype=F64)).to(dtype)
            for d in dims]


@pytest.fixture(scope="module")
def pairs() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    zs = structured(60, [5, 9, 30, 7, 12], seed=1)
    return zs[:3], zs[3:]


# ---------------------------------------------------------------- against the reference
@pytest.mark.parametrize("debiased", [False, True])
def test_linear_matches_reference(pairs, debiased):
    xs, ys = pairs
    x, y = xs[0].numpy(), ys[1].numpy()
    ref = ref_cka(x @ x.T, y @ y.T, debiased)
    assert linear_cka(xs[0], ys[1], debiased) == pytest.approx(ref, abs=1e-12)
    for method in ("feature", "gram"):
        got = all_pairs_cka(xs, ys, debiased=debiased, method=method, tile=16)
        assert float(got[0, 1]) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("frac", [1.0, 0.5])
def test_rbf_matches_reference(pairs, debiased, frac):
    xs, ys = pairs
    x, y = xs[2].numpy(), ys[0].numpy()
    assert median_sigma(xs[2], frac) == pytest.approx(ref_sigma(x, frac), rel=1e-12)
    ref = ref_cka(ref_rbf(x, ref_sigma(x, frac)), ref_rbf(y, ref_sigma(y, frac)), debiased)
    assert rbf_cka(xs[2], ys[0], debiased, sigma_frac=frac) == pytest.approx(ref, abs=1e-10)


def test_gram_form_and_hsic_match_reference(pairs):
    xs, ys = pairs
    x, y = xs[1].numpy(), ys[1].numpy()
    k, l = ref_rbf(x, 3.0), y @ y.T  # noqa: E741
    for debiased in (False, True):
        assert hsic(torch.from_numpy(k), torch.from_numpy(l), debiased) == pytest.approx(ref_hsic(k, l, debiased), rel=1e-10)
        assert cka_from_grams(k, l, debiased) == pytest.approx(ref_cka(k, l, debiased), abs=1e-12)


# ---------------------------------------------------------------- all pairs == loop
@pytest.mark.parametrize("kernel,debiased,method", [("linear", False, "feature"), ("linear", False, "gram"),
                                                    ("linear", True, "auto"), ("rbf", False, "auto"),
                                                    ("rbf", True, "auto")])
def test_all_pairs_equals_loop(pairs, kernel, debiased, method):
    xs, ys = pairs
    got = all_pairs_cka(xs, ys, kernel, debiased, method=method, tile=23)
    assert got.shape == (3, 2) and got.dtype == F64
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            assert float(got[i, j]) == pytest.approx(pair_cka(x, y, kernel, debiased), abs=1e-12)
    assert float(got.std()) > 0.01  # the pairs differ, so a broadcasting slip would show


def test_float32_large_offset_equals_centred():
    (x, y) = structured(500, [40, 30], seed=2)
    ref = linear_cka(x, y)
    off_x = (x + 1e3).float()
    off_y = (y - 1e3).float()
    for method in ("feature", "gram"):
        got = float(all_pairs_cka([off_x], [off_y], method=method)[0, 0])
        assert got == pytest.approx(ref, abs=1e-5)
    got_rbf = float(all_pairs_cka([off_x], [off_y], "rbf")[0, 0])
    assert got_rbf == pytest.approx(rbf_cka(x, y), abs=1e-5)


# ---------------------------------------------------------------- invariances and known values
def test_invariances():
    (x, y) = structured(200, [20, 15], seed=3)
    base = linear_cka(x, y)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(0), dtype=F64))
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(7.5 * x, y) == pytest.approx(base, abs=1e-12)
    assert rbf_cka(x @ q, 3 * y) == pytest.approx(rbf_cka(x, y), abs=1e-10)  # median bandwidth scales along
    aniso = torch.ones(20, dtype=F64)
    aniso[:3] = 25.0
    assert abs(linear_cka(x * aniso, y) - base) > 1e-3


def test_identical_gives_one_and_independent_gives_about_zero():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 50, generator=g, dtype=F64)
    for kernel in ("linear", "rbf"):
        for deb in (False, True):
            assert pair_cka(x, x, kernel, deb) == pytest.approx(1.0, abs=1e-12)
    biased, debiased = [], []
    for _ in range(10):
        a = torch.randn(32, 6, generator=g, dtype=F64)
        b = torch.randn(32, 6, generator=g, dtype=F64)
        biased.append(linear_cka(a, b))
        debiased.append(linear_cka(a, b, debiased=True))
    assert 0.1 < np.mean(biased) < 0.35  # biased CKA is inflated at n = 32 (~0.2 for 6 dims)
    assert abs(np.mean(debiased)) < 0.05
    a, b = torch.randn(2000, 20, generator=g, dtype=F64), torch.randn(2000, 20, generator=g, dtype=F64)
    assert linear_cka(a, b) < 0.02


def test_debiased_can_be_negative_and_is_reported():
    g = torch.Generator().manual_seed(5)
    vals = [linear_cka(torch.randn(12, 4, generator=g, dtype=F64), torch.randn(12, 4, generator=g, dtype=F64), True)
            for _ in range(20)]
    assert min(vals) < 0  # reported as negative, not clipped
    assert all(np.isfinite(vals))


def test_nonpositive_self_hsic_gives_zero(caplog):
    # n = 4, one outlier row: the unbiased HSIC_1(K, K) is 0 -> CKA defined as 0.0, with a warning
    x = torch.tensor([[0.0], [0.0], [0.0], [1.0]], dtype=F64)
    y = torch.tensor([[0.3], [0.1], [-0.2], [0.5]], dtype=F64)
    h = all_pairs_hsic([x], [y], debiased=True)
    assert float(h.self_x[0]) <= 0
    with caplog.at_level(logging.WARNING):
        assert linear_cka(x, y, debiased=True) == 0.0
    assert "set to 0.0" in caplog.text


# ---------------------------------------------------------------- streaming
def test_streaming_equals_minibatch_definition():
    zs = structured(300, [8, 6, 10], seed=6)
    xs, ys = zs[:2], zs[2:]
    acc = StreamingCKA()
    hx = np.zeros(2)
    hy = 0.0
    hxy = np.zeros(2)
    for s in range(0, 300, 50):
        acc.update([x[s:s + 50] for x in xs], [ys[0][s:s + 50]])
        b = ys[0][s:s + 50].numpy()
        lb = b @ b.T
        for i, x in enumerate(xs):
            a = x[s:s + 50].numpy()
            hxy[i] += ref_hsic(a @ a.T, lb, True)
            hx[i] += ref_hsic(a @ a.T, a @ a.T, True)
        hy += ref_hsic(lb, lb, True)
    ref = hxy / np.sqrt(hx * hy)
    assert acc.n_batches == 6 and acc.n_rows == 300
    np.testing.assert_allclose(acc.compute()[:, 0].numpy(), ref, atol=1e-12)
    # it estimates the full-data debiased CKA (not equal, but close)
    full = all_pairs_cka(xs, ys, debiased=True)
    np.testing.assert_allclose(acc.compute().numpy(), full.numpy(), atol=0.1)


def test_streaming_rbf_fixed_bandwidth_and_errors():
    zs = structured(120, [5, 5], seed=7)
    acc = StreamingCKA("rbf", sigmas=[2.0, 2.0])
    acc.update(zs[0][:60], zs[1][:60])
    acc.update(zs[0][60:], zs[1][60:])
    assert 0 < float(acc.compute()[0, 0]) < 1
    with pytest.raises(MetricError, match="before any update"):
        StreamingCKA().compute()
    lin = StreamingCKA()
    lin.update(zs[0][:10], zs[1][:10])
    with pytest.raises(MetricError, match="same models"):
        lin.update([zs[0][:10], zs[0][:10]], zs[1][:10])


# ---------------------------------------------------------------- degenerate input
def test_constant_features_raise():
    x = torch.randn(20, 3, dtype=F64)
    c = torch.full((20, 4), 2.5)
    with pytest.raises(MetricError, match=r"ys\[1\] has constant features"):
        all_pairs_cka([x], [x, c])
    with pytest.raises(MetricError, match="constant features"):
        rbf_cka(c, x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_named(bad):
    x = torch.randn(20, 3)
    y = x.clone()
    y[4, 1] = bad
    with pytest.raises(MetricError, match=r"xs\[1\] contains NaN or inf in 1 of 20 rows"):
        all_pairs_cka([x, y], [x])


def test_mismatched_rows_and_too_few_rows():
    with pytest.raises(MetricError, match="rows must be the same pairs"):
        linear_cka(torch.randn(10, 3), torch.randn(11, 3))
    with pytest.raises(MetricError, match="at least 4"):
        linear_cka(torch.randn(3, 3), torch.randn(3, 2), debiased=True)
    with pytest.raises(MetricError, match="at least 4"):
        StreamingCKA().update(torch.randn(3, 3), torch.randn(3, 2))
    with pytest.raises(MetricError, match="2-D"):
        linear_cka(torch.randn(10), torch.randn(10, 2))
    with pytest.raises(MetricError, match="unknown kernel"):
        all_pairs_cka([torch.randn(10, 2)], [torch.randn(10, 2)], "poly")  # type: ignore[arg-type]


def test_numpy_input_and_message_is_one_line():
    x = np.random.default_rng(0).normal(size=(30, 4))
    assert linear_cka(x, x) == pytest.approx(1.0)
    with pytest.raises(MetricError) as err:
        linear_cka(x, x[:5])
    assert "\n" not in str(err.value) and "Fix:" in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(pairs):
    xs, ys = pairs
    for kernel in ("linear", "rbf"):
        cpu = all_pairs_cka(xs, ys, kernel)
        gpu = all_pairs_cka([x.cuda() for x in xs], [y.cuda() for y in ys], kernel)
        torch.testing.assert_close(gpu, cpu, atol=1e-9, rtol=0)


@pytest.mark.slow
def test_against_ckatorch():
    ckatorch = pytest.importorskip("ckatorch")
    zs = structured(300, [16, 24], seed=8, dtype=torch.float32)
    x, y = zs
    assert linear_cka(x, y) == pytest.approx(float(ckatorch.cka_base(x, y, kernel="linear")), abs=1e-6)
    assert linear_cka(x, y, True) == pytest.approx(float(ckatorch.cka_base(x, y, kernel="linear", unbiased=True)),
                                                   abs=1e-6)
    # ckatorch's bandwidth: median over all n^2 squared distances (zeros included, lower median)
    sig = []
    for z in (x, y):
        z64 = z.double()
        d2 = (z64.square().sum(1)[:, None] + z64.square().sum(1)[None] - 2 * z64 @ z64.T)
        sig.append(float(torch.median(d2)) ** 0.5)
    ours = float(all_pairs_cka([x], [y], "rbf", sigmas=sig)[0, 0])
    assert ours == pytest.approx(float(ckatorch.cka_base(x, y, kernel="rbf")), abs=1e-6)


def test_debiased_rbf_small_bandwidth_regression():
    """Issue 9: the self-term cut-off compared HSIC_1(L, L) with <L, L> including the diagonal (which the
    debiased estimator never uses), so an RBF kernel dominated by its diagonal read CKA 0.0 instead of 0.622."""
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 10, (100,), generator=g)
    x = torch.randn(10, 16, generator=g, dtype=F64)[lab] * 2 + torch.randn(100, 16, generator=g, dtype=F64)
    y = torch.randn(10, 1024, generator=g, dtype=F64)[lab] * 2 + 1.5 * torch.randn(100, 1024, generator=g, dtype=F64)
    s = median_sigma(x)
    k, l = rbf_gram(x, s), rbf_gram(y, s)  # noqa: E741

    def h1(a, b):  # plain off-diagonal HSIC_1 (Song et al. 2012)
        n = a.shape[0]
        a, b = a.clone().fill_diagonal_(0), b.clone().fill_diagonal_(0)
        o = torch.ones(n, dtype=F64)
        return ((a * b).sum() + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (a @ o) @ (b @ o)) / (n * (n - 3))

    ref = float(h1(k, l) / torch.sqrt(h1(k, k) * h1(l, l)))
    assert ref == pytest.approx(0.6224, abs=1e-3)
    assert rbf_cka(x, y, debiased=True, sigma_x=s, sigma_y=s) == pytest.approx(ref, rel=1e-9)
    assert cka_from_grams(k, l, debiased=True) == pytest.approx(ref, rel=1e-9)
    stream = StreamingCKA("rbf", sigmas=[s, s])
    stream.update([x], [y])
    assert float(stream.compute()[0, 0]) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_float32_precision_within_1e5_of_float64(kernel, debiased):
    """precision='float32': float32 products, float64 reductions; error <= 1e-5 on embeddings with offsets,
    widths up to 4,096 and n above one product chunk."""
    import pairscout.metrics.hsic_stats as cka_mod

    g = torch.Generator().manual_seed(3)
    n = 600 if kernel == "rbf" else 1200
    shared = torch.randn(n, 8, generator=g)
    def model(d: int, snr: float) -> torch.Tensor:
        return snr * shared @ torch.randn(8, d, generator=g) + torch.randn(n, d, generator=g) + 1e3

    xs = [model(64, 0.3), model(4096, 1.5)]
    ys = [model(512, 1.0), model(1024, 0.5)]
    old = cka_mod.CHUNK_ROWS
    cka_mod.CHUNK_ROWS = 500  # several chunks, so the float64 accumulation across chunks is exercised
    try:
        exact = all_pairs_cka(xs, ys, kernel, debiased, precision="float64")
        fast = all_pairs_cka(xs, ys, kernel, debiased, precision="float32")
        tf = all_pairs_cka(xs, ys, kernel, debiased, precision="tf32")  # plain float32 on CPU
    finally:
        cka_mod.CHUNK_ROWS = old
    assert exact.dtype == F64 and fast.dtype == F64
    assert float((fast - exact).abs().max()) <= 1e-5
    assert torch.equal(tf, fast)
    assert float(exact.abs().max()) > 0.05  # the check is not on values that are all ~0


def test_precision_argument_errors():
    x = torch.randn(50, 4)
    with pytest.raises(MetricError, match="unknown precision"):
        all_pairs_cka([x], [x], precision="float16")
    with pytest.raises(MetricError, match="either precision= or dtype="):
        all_pairs_cka([x], [x], precision="float32", dtype=torch.float32)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_scale_invariant_over_the_float_range(precision, kernel):
    """Issue 14: data scaled by 1e-20 / 1e20 gave 0.0 in float32 products; each model is now scaled by a power
    of two before the products, so CKA is the same at any magnitude."""
    g = torch.Generator().manual_seed(11)
    s = torch.randn(300, 3, generator=g)
    x = s @ torch.randn(3, 20, generator=g) + torch.randn(300, 20, generator=g)
    y = s @ torch.randn(3, 30, generator=g) + 2 * torch.randn(300, 30, generator=g)
    base = all_pairs_cka([x], [y], kernel, precision=precision)
    assert 0.05 < float(base[0, 0]) < 0.95
    for sx, sy in ((1e-20, 1.0), (1e20, 1e-20), (1.0, 3e15)):
        got = all_pairs_cka([x * sx], [y * sy], kernel, precision=precision)
        assert float((got - base).abs().max()) < 1e-6
    # and HSIC itself keeps its scale (K = X X^T grows by the square of the data's scale)
    h1 = all_pairs_hsic([x], [y], precision="float64")
    h2 = all_pairs_hsic([x * 1024.0], [y], precision="float64")
    assert float(h2.cross[0, 0]) == pytest.approx(float(h1.cross[0, 0]) * 1024.0**2, rel=1e-12)
