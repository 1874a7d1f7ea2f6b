"""One estimation pass (values, delete-a-group replicates, nulls) equals the metrics recomputed on every subset, in
one process and under torch.distributed (2 gloo processes)."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pairscout import distributed
from pairscout.estimation import Engine, estimate, jackknife_groups
from pairscout.estimation.neighbours import search
from pairscout.metrics import Preprocess, pair_metric
from pairscout.metrics.calibration import calibrate
from pairscout.metrics.cka import median_sigma
from pairscout.metrics.knn import all_pairs_cknna, all_pairs_mutual_knn

F64 = torch.float64
METRICS = ["cka_linear_debiased", "cka_linear", "cka_rbf", "cka_rbf_debiased", "mutual_knn", "cknna"]
OPTS = {"mutual_knn": {"k": 5}, "cknna": {"k": 5}}


def _data(n: int = 157, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(n, 4, generator=g, dtype=dtype)

    def mk(d: int, a: float) -> torch.Tensor:
        return a * s @ torch.randn(4, d, generator=g, dtype=dtype) + torch.randn(n, d, generator=g, dtype=dtype) + 3.0

    xs, ys = [mk(9, 1.0), mk(20, 0.4)], [mk(6, 2.0), mk(11, 0.0)]
    dup = ys[0].clone()
    dup[1::5] = dup[0::5][: len(dup[1::5])]  # duplicated rows: tied neighbours
    return xs, [*ys, dup]


def reference(xs, ys, metric: str, groups: int, seed: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The old way: the metric recomputed on all rows and on the rows of every subset (RBF at the bandwidth of all
    rows, which the one pass holds fixed)."""
    n = xs[0].shape[0]
    gid = jackknife_groups(n, groups, seed)
    if metric.startswith("cka_rbf"):
        kw = {**kw, "sigmas": [median_sigma(z) for z in [*xs, *ys]]}
    if metric.startswith("cka"):
        kw["precision"] = "float64"
    value = pair_metric(metric, xs, ys, **kw)
    reps = torch.stack([pair_metric(metric, [x[gid != g] for x in xs], [y[gid != g] for y in ys], **kw)
                        for g in range(groups)])
    return value, reps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_pass_equals_recomputing_every_subset(dtype):
    xs, ys = _data(dtype=dtype)
    est = estimate(xs, ys, METRICS, groups=10, seed=3, permutations=49, options=OPTS)
    for i, m in enumerate(METRICS):
        value, reps = reference(xs, ys, m, 10, 3, **OPTS.get(m, {}))
        assert est.values[m].shape == (2, 3) and est.replicates[m].shape == (10, 2, 3)
        if m in ("mutual_knn", "cknna"):
            assert torch.equal(est.values[m], value), m  # the neighbour metrics: exactly
            assert torch.equal(est.replicates[m], reps), m
        else:
            assert float((est.values[m] - value).abs().max()) < 1e-10, m
            assert float((est.replicates[m] - reps).abs().max()) < 1e-10, m
        # the intervals: the jackknife formula on these replicates
        lo, hi, se = est.interval(m)
        g = reps.shape[0]
        want_se = ((g - 1) / g * ((reps - reps.mean(0)) ** 2).sum(0)).sqrt()
        assert float((se - want_se).abs().max()) < 1e-10
        assert torch.allclose(hi - lo, 2 * 1.959963984540054 * se, atol=1e-12)
        # the nulls: calibrate() on the rows, with the seed metric i always had (seed + 1000 i)
        prec = {"precision": "float64"} if m.startswith("cka") else {}  # what rank passed on the CPU
        cal = calibrate(xs, ys, m, value, n_perm=49, seed=3 + 1000 * i, **OPTS.get(m, {}), **prec)
        got = est.nulls[m]
        for f in ("null_mean", "null_sd", "z", "p_value", "p_holm"):
            a, b = getattr(got, f), getattr(cal, f)
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-10, equal_nan=True), (m, f, a, b)
        assert est.null_methods[m] == cal.method
    cols = est.columns()
    assert {f"{m}_{s}" for m in METRICS for s in ("lo", "hi", "se", "null", "null_sd", "z", "p", "p_holm")} <= set(cols)
    assert all(isinstance(v, np.ndarray) and v.shape == (2, 3) for v in cols.values())


def test_without_groups_or_permutations_only_values():
    xs, ys = _data(60)
    est = estimate(xs, ys, ["cka_linear", "cka_rbf", "mutual_knn"], groups=0, permutations=0, options=OPTS)
    assert est.replicates == {} and est.nulls == {}
    for m in ("cka_linear", "cka_rbf", "mutual_knn"):
        value, _ = reference(xs, ys, m, 2, 0, **OPTS.get(m, {}))
        assert float((est.values[m] - value).abs().max()) < 1e-10
    assert set(est.columns()) == {"cka_linear", "cka_rbf", "mutual_knn"}


def test_other_measures_and_clipping_are_evaluated_on_every_subset():
    xs, ys = _data(80)
    opts = {"mutual_knn": {"k": 4, "preprocess": Preprocess(clip_quantile=0.9)}}
    est = estimate(xs, ys, ["procrustes", "mutual_knn"], groups=4, seed=0, permutations=0, options=opts)
    for m in ("procrustes", "mutual_knn"):
        value, reps = reference(xs, ys, m, 4, 0, **opts.get(m, {}))
        assert float((est.values[m] - value).abs().max()) < 1e-10
        assert float((est.replicates[m] - reps).abs().max()) < 1e-10


def test_a_list_that_runs_out_is_searched_again(caplog):
    """Deleting a row's nearest rows exhausts its top-2k list: that row is searched again on the kept rows, and the
    lists equal a search on the kept rows alone."""
    xs, ys = _data(120)
    x, y = xs[0], ys[2]
    k = 4
    lx, ly = search(x, 2 * k, Preprocess()), search(y, 2 * k, Preprocess())
    keep = torch.ones(120, dtype=torch.bool)
    keep[lx.idx[0, :7]] = False  # 7 of row 0's 8 nearest rows: fewer than k left in its list
    keep[ly.idx[5, :2 * k]] = False
    nx, ny = lx.subset(keep, k), ly.subset(keep, k)
    assert lx.recomputed >= 1 and ly.recomputed >= 1
    from pairscout.metrics.knn import cknna_from_neighbours, cknna_self_term, mutual_knn_rows

    n = int(keep.sum())
    assert float(mutual_knn_rows(nx, ny).mean()) == float(all_pairs_mutual_knn([x[keep]], [y[keep]], k)[0, 0])
    want = float(all_pairs_cknna([x[keep]], [y[keep]], k)[0, 0])
    assert cknna_from_neighbours(n, nx, ny, cknna_self_term(n, nx), cknna_self_term(n, ny)) == want


def test_progress_names_every_phase_and_timings_add_up():
    xs, ys = _data(60)
    seen = []
    est = estimate(xs, ys, METRICS, groups=5, permutations=19, options=OPTS, progress=lambda p, d, t: seen.append((p, d)))
    starts = [p for p, d in seen if d == 0]
    assert starts[0].startswith("metrics: prepare") and any("Gram tiles" in p for p in starts)
    assert any("top-2k" in p for p in starts) and any(p.startswith("metrics: null") for p in starts)
    phases = {k: v for k, v in est.timings.items() if k != "total"}
    assert len(phases) == len(starts) and sum(phases.values()) <= est.timings["total"] + 1e-3


def _worker(rank: int, world: int, tmp: str, cuts: list[int]) -> None:
    import pairscout.metrics.sharded_rows as R

    R.CHUNK_ROWS = 32  # several broadcast chunks per process
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        xs, ys = _data(dtype=F64)
        lo, hi = cuts[rank], cuts[rank + 1]
        eng = Engine(torch.device("cpu"), "float64", cuts[-1], lo, hi, world)
        est = estimate([x[lo:hi] for x in xs], [y[lo:hi] for y in ys], METRICS, groups=6, seed=2, permutations=19,
                       options=OPTS, engine=eng)
        torch.save({"values": est.values, "reps": est.replicates,
                    "nulls": {m: (c.null_mean, c.null_sd, c.p_value) for m, c in est.nulls.items()}}, f"{tmp}/r{rank}.pt")
    finally:
        distributed.shutdown(clean=sys.exc_info()[0] is None)


@pytest.mark.parametrize("cuts", [[0, 78, 157], [0, 150, 157]])
def test_two_processes_equal_one(tmp_path, cuts):
    world = len(cuts) - 1
    mp.spawn(_worker, args=(world, str(tmp_path), cuts), nprocs=world, join=True)
    xs, ys = _data(dtype=F64)
    one = estimate(xs, ys, METRICS, groups=6, seed=2, permutations=19, options=OPTS)
    for rank in range(world):
        got = torch.load(tmp_path / f"r{rank}.pt")
        for m in METRICS:
            if m in ("mutual_knn", "cknna"):
                assert torch.equal(got["values"][m], one.values[m]) and torch.equal(got["reps"][m], one.replicates[m]), m
            else:
                assert float((got["values"][m] - one.values[m]).abs().max()) < 1e-10, m
                assert float((got["reps"][m] - one.replicates[m]).abs().max()) < 1e-10, m
            for a, b in zip(got["nulls"][m], (one.nulls[m].null_mean, one.nulls[m].null_sd, one.nulls[m].p_value), strict=True):
                assert torch.allclose(a, b, rtol=1e-8, atol=1e-10, equal_nan=True), m


def test_rank_logs_rows_searched_again(caplog):
    """Recomputed rows are counted per model and logged (here: none at the default list length)."""
    xs, ys = _data(100)
    with caplog.at_level(logging.INFO, logger="pairscout.estimation"):
        est = estimate(xs, ys, ["mutual_knn"], groups=5, permutations=0, options=OPTS)
    assert set(est.recomputed) == {"xs[0]", "xs[1]", "ys[0]", "ys[1]", "ys[2]"}
    assert all(isinstance(v, int) and v >= 0 for v in est.recomputed.values())
    assert any("metrics phase" in r.message for r in caplog.records)
