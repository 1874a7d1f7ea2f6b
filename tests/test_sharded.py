"""Linear CKA on rows sharded over torch.distributed ranks (gloo on CPU) equals the single-process value."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pairscout import distributed
from pairscout.metrics import all_pairs_hsic
from pairscout.metrics.sharded import sharded_all_pairs_cka, sharded_all_pairs_hsic

F64 = torch.float64


def _data(n: int = 203):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, 5, generator=g, dtype=F64)
    def mk(d: int, a: float) -> torch.Tensor:  # offsets of 50, so the global centring matters
        return a * s @ torch.randn(5, d, generator=g, dtype=F64) + torch.randn(n, d, generator=g, dtype=F64) + 50.0

    return [mk(7, 1.0), mk(30, 0.3)], [mk(12, 2.0), mk(5, 0.7), mk(9, 0.0)]


def _worker(rank: int, world: int, tmp: str, cuts: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        xs, ys = _data()
        lo, hi = cuts[rank], cuts[rank + 1]  # unequal shards, one of them possibly empty
        out = {deb: sharded_all_pairs_hsic([x[lo:hi] for x in xs], [y[lo:hi] for y in ys], deb)
               for deb in (False, True)}
        torch.save({deb: (h.cross, h.self_x, h.self_y, h.cka()) for deb, h in out.items()}, f"{tmp}/r{rank}.pt")
    finally:
        distributed.shutdown(clean=sys.exc_info()[0] is None)  # a barrier first: no peer torn down mid-transfer


@pytest.mark.parametrize("cuts", [[0, 101, 203], [0, 3, 203], [0, 203, 203]])
def test_two_ranks_equal_one_process(tmp_path, cuts):
    mp.spawn(_worker, args=(2, str(tmp_path), cuts), nprocs=2, join=True)
    xs, ys = _data()
    for deb in (False, True):
        ref = all_pairs_hsic(xs, ys, "linear", deb, precision="float64")
        for rank in (0, 1):
            cross, sx, sy, cka = torch.load(tmp_path / f"r{rank}.pt")[deb]
            torch.testing.assert_close(cross, ref.cross, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(sx, ref.self_x, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(sy, ref.self_y, rtol=1e-9, atol=1e-12)
            assert float((cka - ref.cka()).abs().max()) < 1e-8


def test_single_process_equals_all_pairs():
    xs, ys = _data()
    for deb in (False, True):
        want = all_pairs_hsic(xs, ys, "linear", deb, precision="float64").cka()
        assert float((sharded_all_pairs_cka(xs, ys, deb) - want).abs().max()) < 1e-10
        assert float((sharded_all_pairs_cka(xs, ys, deb, precision="float32") - want).abs().max()) < 1e-5
