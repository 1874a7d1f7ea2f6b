"""RBF CKA (biased and debiased) of every pair on all rows and on every delete-a-group subset, from one pass over
upper-triangle Gram tiles (never n x n; :mod:`pairscout.estimation`).

Rows are sorted by jackknife group, so every tile holds one group's rows against one group's rows. For every pair
of models k, l and groups g, h the pass accumulates ``B[g, h, k, l] = sum_{a in g, b in h, a != b} K_k[a, b] K_l[a, b]``
(one float64 product of the stacked tiles, as the single-value path does) and for every row a and group h the
off-diagonal row sum ``R[k, h, a] = sum_{b in h, b != a} K_k[a, b]``. The subset "all but group g" then has
``<K~_k, K~_l> = sum_{g', h' != g} B`` and row sums ``sum_{h != g} R`` over its rows: every HSIC formula of
:mod:`pairscout.metrics.cka` (the RBF diagonal is exactly 1). The bandwidth is the median heuristic of all rows,
held fixed in every replicate (the jackknife of CKA at the run's kernel). The closed-form null needs only the
all-rows sums (:func:`null_sums`).

Under torchrun each process forms its rows' tiles against every process's rows in broadcast chunks (the blocks
divided as in :func:`pairscout.metrics.sharded_rows.sharded_rbf_hsic`), ``B`` and ``R`` are all-reduced.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from pairscout.metrics.cka import hsic_from_stats
from pairscout.metrics.hsic_stats import TILE_BYTES, rbf_tile

F64 = torch.float64


@dataclass
class GramSums:
    """``B`` (G, G, nz, nz) and ``R`` (nz, G, n) of the module docstring; ``group`` (n,) the group of every row in
    R's column order."""

    B: torch.Tensor
    R: torch.Tensor
    group: torch.Tensor


def _tiles(seg: Sequence[int], tile: int) -> list[tuple[int, int, int]]:
    """(start, stop, group) of row tiles of at most ``tile`` rows that never cross a group boundary."""
    out = []
    for g in range(len(seg) - 1):
        for a in range(seg[g], seg[g + 1], tile):
            out.append((a, min(a + tile, seg[g + 1]), g))
    return out


def tile_rows(nz: int) -> int:
    return max(256, int(math.sqrt(TILE_BYTES / (8 * nz))) // 128 * 128)


def _one_process(zc: Sequence[torch.Tensor], sq: Sequence[torch.Tensor], gammas: Sequence[float], seg: Sequence[int],
                 tile: int) -> Iterator[tuple[torch.Tensor, int, torch.Tensor, int, list[torch.Tensor], bool]]:
    """Upper-triangle tile pairs of one process: (row positions, row group, column positions, column group, tiles
    of every model with the diagonal zeroed, whether the pair stands for its transpose too)."""
    dev = zc[0].device
    tiles = _tiles(seg, tile)
    for ia, (a, ea, ga) in enumerate(tiles):
        for b, eb, gb in tiles[ia:]:
            out = []
            for k, z in enumerate(zc):
                g = rbf_tile(z[a:ea], sq[k][a:ea], z[b:eb], sq[k][b:eb], gammas[k])
                if a == b:
                    g.fill_diagonal_(0.0)
                out.append(g)
            yield (torch.arange(a, ea, device=dev), ga, torch.arange(b, eb, device=dev), gb, out, a != b)


def _sharded(zc: Sequence[torch.Tensor], sq: Sequence[torch.Tensor], gammas: Sequence[float], seg: Sequence[int],
             tile: int, counts: Sequence[int], ids: Sequence[torch.Tensor], groups_of: Sequence[torch.Tensor],
             chunk: int) -> Iterator[tuple[torch.Tensor, int, torch.Tensor, int, list[torch.Tensor], bool]]:
    """Tile pairs of this process's rows against every process's broadcast chunks (each block pair formed once
    over all processes); positions are global row ids. ``ids[r]``, ``groups_of[r]``: process r's rows in its
    group-sorted order (global ids, groups)."""
    from pairscout.distributed import rank_world
    from pairscout.metrics.sharded_rows import block_rows, row_blocks

    me = rank_world()[0]
    dev = zc[0].device
    n_local = zc[0].shape[0]
    dims = [z.shape[1] for z in zc]
    offs = [0]
    for d in dims:
        offs.append(offs[-1] + d)
    zall = torch.cat(list(zc), 1) if n_local else torch.zeros(0, offs[-1], dtype=zc[0].dtype, device=dev)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    my_tiles = _tiles(seg, tile)
    for off, blk in row_blocks(zall, counts, chunk):
        src = max(i for i in range(len(counts)) if starts[i] <= off and counts[i])
        at = off - starts[src]
        mine = block_rows(me, src, at, counts, chunk)
        if mine is None:
            continue
        twice = src != me
        bid = ids[src][at:at + blk.shape[0]].to(dev)
        bgr = groups_of[src][at:at + blk.shape[0]]
        parts = [blk[:, offs[k]:offs[k + 1]] for k in range(len(zc))]
        psq = [p.square().sum(1) for p in parts]
        # the chunk's rows are group-sorted: one column segment per group
        cuts = [0, *(torch.nonzero(bgr[1:] != bgr[:-1]).flatten() + 1).tolist(), blk.shape[0]]
        for a0, ea, ga in my_tiles:
            a = max(a0, mine)
            if a >= ea:
                continue
            rid = ids[me][a:ea].to(dev)
            for c0, c1 in zip(cuts[:-1], cuts[1:], strict=True):
                gb = int(bgr[c0])
                cid = bid[c0:c1]
                same = rid[:, None] == cid[None, :]
                out = []
                for k in range(len(zc)):
                    g = rbf_tile(zc[k][a:ea], sq[k][a:ea], parts[k][c0:c1], psq[k][c0:c1], gammas[k])
                    out.append(g.masked_fill_(same, 0.0))
                yield rid, ga, cid, gb, out, twice


def gram_sums(zc: Sequence[torch.Tensor], gammas: Sequence[float], seg: Sequence[int], n: int, G: int,
              group: torch.Tensor, sharded: dict | None = None) -> GramSums:
    """The sums ``B`` and ``R`` of the module docstring in one pass over the tiles.

    ``zc``: this process's centred rows of every model, sorted by group (``seg``); ``group``: the group of every
    row in R's column order (one process: the sorted order; torchrun: global row ids). ``sharded``: under torchrun,
    ``counts``, ``ids``, ``groups_of`` and ``chunk`` of :func:`_sharded`."""
    nz = len(zc)
    dev = zc[0].device
    sq = [z.square().sum(1) for z in zc]
    tile = tile_rows(nz)
    B = torch.zeros(G, G, nz, nz, dtype=F64, device=dev)
    R = torch.zeros(nz, G, n, dtype=F64, device=dev)
    it = _one_process(zc, sq, gammas, seg, tile) if sharded is None else _sharded(zc, sq, gammas, seg, tile, **sharded)
    for rid, ga, cid, gb, tiles, twice in it:
        stack = torch.empty(nz, tiles[0].numel(), dtype=F64, device=dev)
        for k, g in enumerate(tiles):
            R[k, gb].index_add_(0, rid, g.sum(1, dtype=F64))
            if twice:
                R[k, ga].index_add_(0, cid, g.sum(0, dtype=F64))
            stack[k] = g.reshape(-1)
        s = stack @ stack.T
        B[ga, gb] += s
        if twice:
            B[gb, ga] += s
    if sharded is not None:
        from pairscout.metrics.sharded_rows import reduce_across_ranks

        reduce_across_ranks(B)
        reduce_across_ranks(R)
    return GramSums(B, R, group)


def subset_hsic(s: GramSums, m: int, debiased: Sequence[bool], tol: float,
                subsets: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each entry of ``debiased``: (cross (S, m, t), self (S, nz) after the zero tolerance of
    :func:`pairscout.metrics.cka.all_pairs_hsic`) on the first S = ``subsets`` of [all rows, all but group 0, ...]."""
    G = s.B.shape[0]
    nz = s.B.shape[2]
    outs = [(torch.empty(subsets, m, nz - m, dtype=F64), torch.empty(subsets, nz, dtype=F64)) for _ in debiased]
    for r in range(subsets):
        keep_g = torch.ones(G, dtype=torch.bool, device=s.B.device)
        if r:
            keep_g[r - 1] = False
        gsum = s.B[keep_g][:, keep_g].sum((0, 1))
        rows_mask = keep_g[s.group]
        rows_off = s.R[:, keep_g].sum(1)[:, rows_mask]
        n = int(rows_mask.sum())
        rows = rows_off + 1.0
        diag = torch.ones_like(rows)
        full = gsum + n
        for (cross, selfs), deb in zip(outs, debiased, strict=True):
            c = hsic_from_stats(full[:m, m:], rows[:m], rows[m:], diag[:m], diag[m:], n, deb, True,
                                 gsum[:m, m:], rows_off[:m], rows_off[m:])
            sf = hsic_from_stats(full.diagonal(), rows, rows, diag, diag, n, deb, False,
                                  gsum.diagonal(), rows_off, rows_off)
            base = gsum.diagonal() if deb else full.diagonal()
            sf = torch.where(sf <= tol * base.abs() / (n * n), torch.zeros_like(sf), sf)
            cross[r], selfs[r] = c.cpu(), sf.cpu()
    return outs


def null_sums(s: GramSums, k: int) -> tuple[torch.Tensor, float]:
    """:meth:`~pairscout.metrics.calibration._GramSummary.sums` of model k's centred Gram ``Kc = H K H`` on all
    rows and ``||Kc||_F^2``, from the same pass: ``Kc_aa = 1 - 2 r_a / n + s / n^2`` and
    ``||Kc||^2 = ||K||^2 - (2/n) ||r||^2 + s^2 / n^2`` with r = K 1, s = 1^T K 1."""
    n = s.R.shape[2]
    r = s.R[k].sum(0) + 1.0
    tot = r.sum()
    d = 1.0 - 2.0 * r / n + tot / (n * n)
    kk = s.B[:, :, k, k].sum() + n
    f2 = kk - 2.0 / n * (r @ r) + tot * tot / (n * n)
    dd = (d * d).sum()
    sums = torch.stack([torch.tensor(float(n), dtype=F64, device=d.device), d.sum(), dd, -d.sum(), f2 - dd,
                        2 * dd - f2, -dd, dd])
    return sums, float(f2)
