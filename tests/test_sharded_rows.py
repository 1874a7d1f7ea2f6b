"""RBF CKA and the k-NN metrics on rows sharded over torch.distributed ranks (gloo, CPU) equal one process."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pairscout import distributed
from pairscout.estimation import Engine
from pairscout.metrics import (
    MEASURES,
    Preprocess,
    all_pairs_cka,
    all_pairs_cknna,
    all_pairs_mutual_knn,
    pair_metric,
)
from pairscout.metrics.knn import nearest_neighbours
from pairscout.metrics.sharded_rows import shard_counts, sharded_neighbours

F64 = torch.float64


def _data(n: int = 157):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(n, 4, generator=g)

    def mk(d: int, a: float) -> torch.Tensor:
        return a * s @ torch.randn(4, d, generator=g) + torch.randn(n, d, generator=g) + 3.0

    xs, ys = [mk(9, 1.0), mk(20, 0.4)], [mk(6, 2.0), mk(11, 0.0)]
    dup = ys[0].clone()
    dup[1::5] = dup[0::5][: len(dup[1::5])]  # duplicated rows: tied neighbours
    return xs, [*ys, dup]


def _single(name: str, xs, ys, **kw) -> torch.Tensor:
    if name.startswith("cka_rbf"):
        return all_pairs_cka(xs, ys, "rbf", name.endswith("_debiased"), precision="float64")
    if name == "mutual_knn":
        return all_pairs_mutual_knn(xs, ys, **kw)
    return all_pairs_cknna(xs, ys, **kw)


CASES = [("cka_rbf", {}), ("cka_rbf_debiased", {}), ("mutual_knn", {"k": 5}), ("cknna", {"k": 5}),
         ("mutual_knn", {"k": 4, "preprocess": Preprocess(clip_quantile=0.9)})]


MASKED = ("cka_linear", "svcca")


def _mask(n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(5)) > 0.3


def _worker(rank: int, world: int, tmp: str, cuts: list[int], tiny: bool) -> None:
    if tiny:  # similarity blocks recomputed in every pass, in tiles of a few rows; RBF blocks in chunks of 16 rows
        import pairscout.metrics.knn as knn
        import pairscout.metrics.sharded_rows as R

        knn.SIM_TILE_BYTES = 16 * 1024  # < 78 x 157 x 4 bytes: nothing kept
        R.CHUNK_ROWS = 16
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        xs, ys = _data()
        lo, hi = cuts[rank], cuts[rank + 1]
        xl, yl = [x[lo:hi] for x in xs], [y[lo:hi] for y in ys]
        eng = Engine(torch.device("cpu"), "float64", cuts[-1], lo, hi, world)
        out = [pair_metric(name, xl, yl, engine=eng, **kw) for name, kw in CASES]
        # a global row mask (a jackknife subset) is cut to this process's rows; a measure without a sharded form gathers
        masked = [pair_metric(name, xl, yl, engine=eng, rows=_mask(cuts[-1])) for name in MASKED]
        nb = sharded_neighbours(yl[2], shard_counts(hi - lo, torch.device("cpu")), 5)
        torch.save({"values": out, "masked": masked, "nb": (nb.indices, nb.sims, nb.weights)}, f"{tmp}/r{rank}.pt")
    finally:
        distributed.shutdown(clean=sys.exc_info()[0] is None)  # a barrier first: no peer torn down mid-transfer


@pytest.mark.parametrize(("cuts", "tiny"), [([0, 78, 157], False), ([0, 150, 157], False), ([0, 157, 157], False),
                                           ([0, 78, 157], True), ([0, 40, 97, 157], True), ([0, 50, 50, 157], True)])
def test_ranks_equal_one_process(tmp_path, cuts, tiny):
    """2 and 3 processes, even, uneven and empty shards: the RBF blocks of two ranks are formed once (by one rank, or
    split in half for ranks W / 2 apart) and the neighbour lists are the single process's."""
    world = len(cuts) - 1
    mp.spawn(_worker, args=(world, str(tmp_path), cuts, tiny), nprocs=world, join=True)
    xs, ys = _data()
    want = [_single(name, xs, ys, **kw) for name, kw in CASES]
    ref = nearest_neighbours(ys[2], 5)
    assert ref.weights is not None  # the duplicated rows do tie
    for rank in range(world):
        got = torch.load(tmp_path / f"r{rank}.pt")
        for (name, _), g, w in zip(CASES, got["values"], want, strict=True):
            if name.startswith("cka"):
                assert float((g - w).abs().max()) < 1e-10, (name, g, w)
            else:
                assert torch.equal(g, w), (name, g, w)  # neighbour metrics: exactly
        for name, g in zip(MASKED, got["masked"], strict=True):
            keep = _mask(cuts[-1])
            w = pair_metric(name, [x[keep] for x in xs], [y[keep] for y in ys], precision="float64")
            assert float((g - w).abs().max()) < 1e-10, (name, g, w)
        idx, sims, weights = got["nb"]
        assert torch.equal(idx, ref.indices) and torch.equal(sims, ref.sims) and torch.equal(weights, ref.weights)


def test_one_process_is_the_plain_metric():
    xs, ys = _data(60)
    for name, kw in CASES:
        g = MEASURES[name].sharded(xs, ys, **kw)  # the record's sharded form, outside a process group
        w = _single(name, xs, ys, **kw)
        assert float((g - w).abs().max()) < 1e-10, name


def _dup_models(n: int = 600):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(n, 12, generator=g)
    return {"a": a, "a2": 2.0 * a + 1e-4 * torch.randn(n, 12, generator=g), "b": torch.randn(n, 7, generator=g)}


# the CKA nulls' summaries come from each rank's rows and all-reduced sums (nothing gathered): float64 products, as
# rank uses on CPU, make them equal one process to rounding; float32 ones (rank's GPU default) to float32 rounding
NULL_METRICS = [("cka_linear", {"precision": "float64"}), ("cka_linear_debiased", {"precision": "float64"}),
                ("cka_rbf", {"sigma_frac": 1.0, "precision": "float64"}), ("cka_rbf_debiased", {"sigma_frac": 0.7, "precision": "float64"}),
                ("cka_linear", {"precision": "float32"}), ("cka_rbf", {"sigma_frac": 1.0, "precision": "float32"}),
                ("mutual_knn", {"k": 5, "preprocess": Preprocess()}), ("cknna", {"k": 5, "preprocess": Preprocess()})]


def _worker_null(rank: int, world: int, tmp: str) -> None:
    from pairscout.metrics.calibration import calibrate
    from pairscout.ranking.verdict import near_duplicates

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        xs, ys = _data()
        n = xs[0].shape[0]
        lo, hi = rank * n // world, (rank + 1) * n // world
        xl, yl = [x[lo:hi] for x in xs], [y[lo:hi] for y in ys]
        import pairscout.metrics.sharded_rows as R

        gathered, plain_gather = [], R.gather_all

        def spy(z, counts=None):
            gathered.append(tuple(z.shape))
            return plain_gather(z, counts)

        R.gather_all = spy  # what the CKA nulls gather: at most the n row means of an RBF Gram, never features
        eng = Engine(torch.device("cpu"), "float64", n, lo, hi, world)
        obs = [pair_metric(m, xl, yl, engine=eng, **kw) for m, kw in NULL_METRICS]
        cals = [calibrate(xl, yl, m, o, n_perm=19, cknna_perm=9, seed=3, sharded=True, **kw)
                for (m, kw), o in zip(NULL_METRICS, obs, strict=True) if m.startswith("cka")]
        cka_gathered = list(gathered)
        R.gather_all = plain_gather
        cals += [calibrate(xl, yl, m, o, n_perm=19, cknna_perm=9, seed=3, sharded=True, **kw)
                 for (m, kw), o in zip(NULL_METRICS, obs, strict=True) if not m.startswith("cka")]
        dm = _dup_models()
        n2 = dm["a"].shape[0]
        dups = near_duplicates({k: v[rank * n2 // world:(rank + 1) * n2 // world] for k, v in dm.items()},
                               engine=Engine(torch.device("cpu"), "float64", n2, rank * n2 // world, (rank + 1) * n2 // world, world))
        torch.save({"cal": [(c.null_mean, c.null_sd, c.p_value, c.z) for c in cals], "dups": dups, "cka_gathered": cka_gathered},
                   f"{tmp}/n{rank}.pt")
    finally:
        distributed.shutdown(clean=sys.exc_info()[0] is None)  # a barrier first: no peer torn down mid-transfer


def test_sharded_nulls_and_duplicate_check_equal_one_process(tmp_path):
    from pairscout.metrics.calibration import calibrate
    from pairscout.ranking.verdict import near_duplicates

    mp.spawn(_worker_null, args=(2, str(tmp_path)), nprocs=2, join=True)
    xs, ys = _data()
    want = [calibrate(xs, ys, m, n_perm=19, cknna_perm=9, seed=3, **kw) for m, kw in NULL_METRICS]
    dups = near_duplicates(_dup_models())
    assert [d[:2] for d in dups] == [("a", "a2")]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"n{rank}.pt")
        for (m, kw), w, g in zip(NULL_METRICS, want, got["cal"], strict=True):
            tol = 2e-5 if kw.get("precision") == "float32" else 1e-9
            for a, b in zip((w.null_mean, w.null_sd, w.p_value, w.z), g, strict=True):
                assert torch.allclose(a, b, rtol=tol, atol=1e-12, equal_nan=True), (m, kw, a, b)
        assert got["cka_gathered"] and all(shape[1] == 1 for shape in got["cka_gathered"])  # row means only
        assert [d[:2] for d in got["dups"]] == [("a", "a2")] and abs(got["dups"][0][2] - dups[0][2]) < 1e-9


@pytest.mark.parametrize("counts", [[78, 79], [40, 57, 60], [30, 30, 30, 30], [16, 0, 50, 33, 20], [0, 100]])
def test_rbf_blocks_are_formed_once_and_evenly(counts):
    """Every ordered pair of rows (a, b) of different ranks is covered by exactly one formed tile, in one of its two
    orders; every rank forms its own block; no rank forms much more than the others."""
    from pairscout.metrics.sharded_rows import block_rows

    chunk, n = 16, sum(counts)
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
    cover = torch.zeros(n, n, dtype=torch.long)
    work = []
    for me in range(len(counts)):
        formed = 0
        for src in range(len(counts)):
            for at in range(0, counts[src], chunk):
                first = block_rows(me, src, at, counts, chunk)
                if first is None:
                    continue
                rows = slice(starts[me] + first, starts[me + 1])
                cols = slice(starts[src] + at, starts[src] + min(at + chunk, counts[src]))
                cover[rows, cols] += 1
                if src != me:
                    cover[cols, rows] += 1
                formed += (rows.stop - rows.start) * (cols.stop - cols.start)
        work.append(formed)
    assert torch.equal(cover, torch.ones(n, n, dtype=torch.long))
    if len(set(counts)) == 1:  # equal shards: equal work, within one chunk's rows
        assert max(work) - min(work) <= chunk * counts[0]
