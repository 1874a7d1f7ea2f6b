"""The neighbour lists of every delete-a-group subset from one neighbour search per model (:mod:`pairscout.estimation`);
mutual k-NN and CKNNA of each subset then come from :func:`pairscout.metrics.knn.pair_values`.

Each model's rows get one list of their ``W = 2k`` nearest rows (similarities from the tiles' products, then every
kept similarity recomputed per entry as :func:`pairscout.metrics.knn.nearest_neighbours` does). The neighbours of a
row among the rows of a subset (all rows but one group) are the first entries of its list that are not in the
deleted group, selected by the same rule as a search on the subset's rows (the k-th similarity, the rows tied with
it sharing the remaining slots). That is exact whenever the list reaches below the subset's k-th similarity minus
the tie tolerance; a row whose list runs out (more than W - k of its W nearest rows in the deleted group, or a tie
reaching the list's end) is searched again on all the subset's rows: :attr:`Lists.recomputed` counts them.

Under torchrun each process searches its own rows against every process's rows in broadcast chunks and the
(n, W) lists are gathered (the k-NN metrics' sufficient statistic, O(n k)); the few rows searched again are
gathered, compared with every process's rows and their similarity rows all-reduced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pairscout.metrics import knn as _knn
from pairscout.metrics.neighbour_order import canonical_order, entry_dots, row_dots

F64 = torch.float64


@dataclass
class Lists:
    """One model's top-W lists of all rows (on every process): products' similarities ``vg`` (descending), row
    ids ``idx``, exact similarities ``ve``; ``recomputed`` counts the rows searched again over all subsets."""

    vg: torch.Tensor
    idx: torch.Tensor
    ve: torch.Tensor
    rel: float
    x: torch.Tensor
    counts: Sequence[int] | None
    recomputed: int = 0

    @property
    def n(self) -> int:
        return self.idx.shape[0]

    def _full_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(r, n) similarities of ``rows`` against every row (self -inf), products as in the search."""
        n, dev = self.n, self.x.device
        if self.counts is None:
            s = self.x[rows.to(dev)] @ self.x.T
        else:
            from pairscout.distributed import rank_world
            from pairscout.metrics.sharded_rows import gather_rows, reduce_across_ranks

            lo = sum(self.counts[: rank_world()[0]])
            feats = gather_rows(self.x, rows, self.counts)
            s = torch.zeros(rows.numel(), n, dtype=self.x.dtype, device=dev)
            s[:, lo:lo + self.x.shape[0]] = feats @ self.x.T
            s = reduce_across_ranks(s)
        s[torch.arange(rows.numel(), device=dev), rows.to(dev)] = float("-inf")
        return s

    def _exact(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.counts is None:
            return entry_dots(self.x, r, self.x, c)
        from pairscout.metrics.sharded_rows import gather_rows

        u, inv = torch.unique(torch.cat([r, c]), return_inverse=True)
        feats = gather_rows(self.x, u, self.counts)
        return entry_dots(feats, inv[: r.numel()], feats, inv[r.numel():])

    def subset(self, keep: torch.Tensor, k: int) -> _knn.Neighbours:
        """The k-NN lists of the rows where ``keep`` is true, among those rows (indices renumbered 0..n_S-1), equal to
        :func:`pairscout.metrics.knn.nearest_neighbours` on those rows."""
        dev = self.idx.device
        keep = keep.to(dev)
        rows = keep.nonzero().flatten()
        n_s = rows.numel()
        W = self.idx.shape[1]
        vg, idx, ve = self.vg[rows], self.idx[rows], self.ve[rows]
        valid = keep[idx]
        parts, runout = _select(vg, idx, ve, valid, k, self.rel, complete=W >= self.n - 1)
        if bool(runout.any()):
            bad = rows[runout]
            self.recomputed += bad.numel()
            s = self._full_rows(bad)
            s[:, ~keep] = float("-inf")
            v2, i2 = torch.topk(s, n_s - 1, dim=1)
            sel2, _ = _select(v2, i2, None, torch.ones_like(i2, dtype=torch.bool), k, self.rel, complete=True)
            ii, vv, ww, cand = sel2
            r2, c2 = (ii >= 0).nonzero(as_tuple=True)
            vv[r2, c2] = self._exact(bad[r2], ii[r2, c2])
            parts = _merge(parts, (ii, vv, ww, cand), runout)
        ii, vv, ww, cand = parts
        newpos = torch.cumsum(keep.long(), 0) - 1
        ii = torch.where(ii >= 0, newpos[ii.clamp_min(0)], ii)
        if bool((cand == k).all()) and ii.shape[1] == k:
            ii, vv = canonical_order(ii, vv)[:2]
            return _knn.Neighbours(ii, vv)
        ii, vv, ww = canonical_order(ii, vv, ww)
        return _knn.Neighbours(ii, vv, ww, k)


def _select(vg: torch.Tensor, idx: torch.Tensor, ve: torch.Tensor | None, valid: torch.Tensor, k: int, rel: float,
            complete: bool) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Rows' neighbours among the ``valid`` entries of their descending lists, by the rule of
    :func:`~pairscout.metrics.knn.nearest_neighbours`: (indices, exact values, tie weights, candidates) compacted to the
    widest row, and which rows' lists run out."""
    W = idx.shape[1]
    cnt = valid.cumsum(1)
    has_k = cnt[:, -1] >= k
    posk = (cnt < k).sum(1).clamp_max(W - 1)
    kth = vg.gather(1, posk[:, None])
    tol = rel * kth.abs().clamp_min(1.0)
    chosen = valid & (vg >= kth - tol)
    strict = (valid & (vg > kth + tol)).sum(1)
    cand = chosen.sum(1)
    runout = ~has_k
    if not complete:
        runout = runout | (vg[:, -1] >= (kth - tol)[:, 0])
    ok = ~runout
    width = int(cand[ok].max()) if bool(ok.any()) else k
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :width]
    ii = idx.gather(1, order)
    vv = (ve if ve is not None else vg).gather(1, order)
    inside = torch.arange(width, device=idx.device)[None, :] < cand[:, None]
    tied = inside & (vg.gather(1, order) <= kth + tol)
    share = ((k - strict).to(F64) / (cand - strict).clamp_min(1).to(F64))[:, None]
    ww = torch.where(tied, share, torch.ones_like(share)).where(inside, torch.zeros((), dtype=F64, device=idx.device))
    ii = torch.where(inside, ii, torch.full_like(ii, -1))
    vv = torch.where(inside, vv, torch.zeros_like(vv))
    return (ii, vv, ww, cand), runout


def _merge(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], where: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows ``where`` of ``a`` replaced by the rows of ``b`` (padded to one width: index -1, weight 0)."""
    width = max(a[0].shape[1], b[0].shape[1])

    def pad(t: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)

    out = [pad(a[0], -1), pad(a[1], 0.0), pad(a[2], 0.0), a[3].clone()]
    out[0][where], out[1][where], out[2][where], out[3][where] = pad(b[0], -1), pad(b[1], 0.0), pad(b[2], 0.0), b[3]
    return tuple(out)


def search(x: torch.Tensor, width: int, preprocess: _knn.Preprocess, counts: Sequence[int] | None = None,
           chunk: int = 4096) -> Lists:
    """One model's top-``width`` lists of all rows (``x``: this process's rows under torchrun, ``counts`` rows
    per process)."""
    xn = preprocess.finish(preprocess.cast(x), None)
    rel = _knn.TIE_TOL if xn.dtype != F64 else 1e-10
    dev = xn.device
    if counts is None:
        n = xn.shape[0]
        tile = max(1, min(n, _knn.SIM_TILE_BYTES // (xn.element_size() * n)))
        vs, is_ = [], []
        for s in range(0, n, tile):
            e = min(s + tile, n)
            sim = xn[s:e] @ xn.T
            sim[torch.arange(e - s, device=dev), torch.arange(s, e, device=dev)] = float("-inf")
            v, i = torch.topk(sim, width, dim=1)
            vs.append(v)
            is_.append(i)
        vg, idx = torch.cat(vs), torch.cat(is_)
        ve = row_dots(xn, idx)
        return Lists(vg, idx, ve, rel, xn, None)
    from pairscout.distributed import rank_world
    from pairscout.metrics.sharded_rows import gather_rows, row_blocks

    n, lo, n_local = sum(counts), sum(counts[: rank_world()[0]]), xn.shape[0]
    tile = max(1, min(max(n_local, 1), _knn.SIM_TILE_BYTES // (xn.element_size() * max(chunk, 1))))
    own = torch.arange(lo, lo + n_local, device=dev)
    v = torch.full((n_local, width), float("-inf"), dtype=xn.dtype, device=dev)
    i = torch.zeros(n_local, width, dtype=torch.long, device=dev)
    for off, blk in row_blocks(xn, counts, chunk):
        for a in range(0, n_local, tile):
            ea = min(a + tile, n_local)
            s = xn[a:ea] @ blk.T
            s[own[a:ea, None] == torch.arange(off, off + blk.shape[0], device=dev)[None, :]] = float("-inf")
            cv = torch.cat([v[a:ea], s], 1)
            ci = torch.cat([i[a:ea], torch.arange(off, off + s.shape[1], device=dev).expand(ea - a, -1)], 1)
            tv, ti = torch.topk(cv, min(width, cv.shape[1]), dim=1)
            v[a:ea, : tv.shape[1]], i[a:ea, : tv.shape[1]] = tv, ci.gather(1, ti)
    ve = v.clone()
    for off, blk in row_blocks(xn, counts, chunk):
        r, c = ((i >= off) & (i < off + blk.shape[0])).nonzero(as_tuple=True)
        ve[r, c] = entry_dots(xn, r, blk, i[r, c] - off)
    every = torch.arange(n)
    return Lists(gather_rows(v, every, counts), gather_rows(i, every, counts), gather_rows(ve, every, counts), rel, xn,
                 list(counts))
