"""Row-sharded RBF CKA and k-nearest-neighbour lists over torch.distributed ranks (the single-process values).

Under ``torchrun`` each rank holds a contiguous block of the rows of every model (any split; a rank may hold
none). The other ranks' rows are seen only in passing: :func:`row_blocks` sends every rank's block in turn,
``chunk`` rows at a time, with ``torch.distributed.broadcast`` from its owner, so a rank holds its own rows plus
one chunk of someone else's at any moment (no home-made transport; NCCL on GPUs, gloo on CPUs).

* **RBF CKA** (:func:`sharded_rbf_hsic`): HSIC needs, per pair of models k, l, the off-diagonal Gram-tile sums
  ``<K~_k, K~_l> = sum_{a != b} K_k[a, b] K_l[a, b]`` and, per row a, the off-diagonal row sums
  ``r_k[a] = sum_{b != a} K_k[a, b]`` (the RBF diagonal is exactly 1). Each rank forms the tiles of its rows
  against every row (``K[a, b] = exp(-gamma ||z_a - z_b||^2)``, products in the chosen precision, every sum in
  float64), accumulates both, and one ``all_reduce`` of ``<K~_k, K~_l>``, ``sum_a r_k[a] r_l[a]`` and
  ``sum_a r_k[a]`` gives every HSIC formula of :mod:`pairscout.metrics.cka` (biased: ``<K, L> = <K~, L~> + n``,
  ``K1 = r + 1``). Each block of two ranks' rows is formed once, by one of them, and stands for its transpose
  too (:func:`block_rows` divides the blocks evenly); the row sums it gives to the other rank's rows go into an
  n-vector per model that one ``all_reduce`` completes. Bandwidths: the median heuristic on the same rows as
  one process (:func:`sharded_median_sigma`, at most 2,048 rows gathered).
* **Neighbour lists** (:func:`sharded_neighbours`): the preprocessing's clip threshold is the mean of the
  per-row quantiles of all rows (n numbers exchanged); each rank finds the k nearest rows of its own rows among
  all rows in passes over the blocks (a running ``topk``; then the tie counts against the k-th similarity; then,
  only if some row has ties, the tied candidates, exactly as :func:`pairscout.metrics.knn.nearest_neighbours`;
  last, the kept similarities recomputed per entry with float64 sums, so no GEMM's shape-dependent rounding stays;
  the similarity blocks are kept between passes when a shard's fit ``SIM_TILE_BYTES``),
  and the (n, w) lists, the k-NN metrics' sufficient statistic (O(n k), not O(n d)), are gathered on every rank.
  Mutual k-NN and CKNNA then run on the gathered lists with the single-process code: equal to one process
  exactly (tested), except if a row's k-th and (k+1)-th similarities differ by the tie tolerance to within a
  float32 rounding of the block products (the selection still uses them).

Outside a process group every function runs on the local rows alone (world = 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from pairscout.distributed import rank_world
from pairscout.errors import MetricError
from pairscout.metrics import knn as _knn
from pairscout.metrics.cka import HSICResult, matmul_precision, median_sigma_tensor
from pairscout.metrics.hsic_stats import TILE_BYTES, rbf_tile

F64 = torch.float64
#: Rows of another rank's block received at a time.
CHUNK_ROWS = 4096


def reduce_across_ranks(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if rank_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def shard_counts(n_local: int, device: torch.device) -> list[int]:
    """Rows held by every rank, in rank order (one ``all_reduce``)."""
    r, w = rank_world()
    t = torch.zeros(w, dtype=torch.long, device=device)
    t[r] = n_local
    return [int(v) for v in reduce_across_ranks(t).tolist()]


def row_blocks(z: torch.Tensor, counts: Sequence[int], chunk: int = CHUNK_ROWS) -> Iterator[tuple[int, torch.Tensor]]:
    """``(global offset, rows)`` of every rank's block in turn, ``chunk`` rows at a time (broadcast by the owner).

    Collective: every rank must consume the whole iterator."""
    r, w = rank_world()
    off = 0
    for src, c in enumerate(counts):
        for s in range(0, c, chunk):
            e = min(s + chunk, c)
            if w == 1:
                buf = z[s:e]
            else:
                buf = z[s:e].contiguous() if src == r else torch.empty(e - s, z.shape[1], dtype=z.dtype, device=z.device)
                dist.broadcast(buf, src=src)
            yield off + s, buf
        off += c


def gather_rows(z: torch.Tensor, idx: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Rows ``idx`` (global indices, any order) of the sharded matrix ``z``, on every rank: each rank writes the
    rows it holds into a zero buffer and one ``all_reduce`` (SUM) fills it (adding zeros is exact)."""
    r, _ = rank_world()
    lo = sum(counts[:r])
    idx = idx.to(z.device)
    out = torch.zeros(idx.numel(), *z.shape[1:], dtype=z.dtype, device=z.device)
    mine = (idx >= lo) & (idx < lo + z.shape[0])
    out[mine] = z[idx[mine] - lo]
    return reduce_across_ranks(out)


def gather_all(z: torch.Tensor, counts: Sequence[int] | None = None) -> torch.Tensor:
    """Every row of the sharded matrix ``z`` on every rank (global order)."""
    counts = counts if counts is not None else shard_counts(z.shape[0], z.device)
    return gather_rows(z, torch.arange(sum(counts)), counts)


def sharded_median_sigma(z: torch.Tensor, counts: Sequence[int], sigma_frac: float = 1.0, max_rows: int = 2048,
                         seed: int = 0) -> float:
    """:func:`pairscout.metrics.cka.median_sigma` of the sharded rows: the same (at most ``max_rows``) rows as one
    process, gathered in the same order, so the same bandwidth."""
    n = sum(counts)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows] if n > max_rows else torch.arange(n)
    return median_sigma_tensor(gather_rows(z, idx, counts), sigma_frac, max_rows=max_rows, seed=seed)


def block_rows(me: int, src: int, at: int, counts: Sequence[int], chunk: int) -> int | None:
    """Which of this rank's rows form tiles with the chunk of rank ``src``'s rows starting ``at`` rows into its block:
    the first of them (``0``: all; the rest of this rank's rows follow), or None.

    Every unordered pair of rows is formed once over all ranks, and each rank forms about as many as the others:
    a rank forms its own block against itself, and the block of ranks r and s (r != s) is formed by r when
    ``(s - r) mod W < W / 2``, by s when it is > W / 2, and, for ``W / 2`` (W even), half by each: the lower rank
    forms its rows against the first half of the higher rank's chunks, the higher rank forms its rows from that
    same boundary on against all of the lower rank's rows."""
    world = len(counts)
    if src == me:
        return 0
    delta = (src - me) % world
    if 2 * delta < world:
        return 0
    if 2 * delta > world:
        return None

    def boundary(r: int) -> int:  # the first row of rank r's second half of chunks
        chunks = -(-counts[r] // chunk)
        return chunk * -(-chunks // 2)

    if me < src:
        return 0 if at < boundary(src) else None
    b = boundary(me)
    return b if b < counts[me] else None


def sharded_rbf_hsic(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], debiased: bool = False, *,
                     sigma_frac: float = 1.0, precision: str = "float64", chunk: int | None = None) -> HSICResult:
    """RBF HSIC of every (x, y) pair and every model with itself from this rank's rows (module docstring).

    Args:
        xs, ys: this rank's rows of every vision / text model (same global rows across models).
        precision: ``float64`` (default), ``float32`` or ``tf32`` tile products; sums are float64 in every case.

    Raises:
        MetricError: too few rows over all ranks, constant features, an unknown precision.
    """
    if precision not in ("float64", "float32", "tf32"):
        raise MetricError(f"unknown precision {precision!r}.", fix="use 'float64', 'float32' or 'tf32'.")
    mats = [*xs, *ys]
    m, nz = len(xs), len(mats)
    dev = mats[0].device
    n_local = mats[0].shape[0]
    counts = shard_counts(n_local, dev)
    n = sum(counts)
    lo = sum(counts[: rank_world()[0]])
    if n < (4 if debiased else 2):
        raise MetricError(f"only {n} rows over all ranks; {'the debiased estimator' if debiased else 'CKA'} needs "
                          f"at least {4 if debiased else 2}.", fix="use more rows.")
    sigmas = [sharded_median_sigma(z, counts, sigma_frac) for z in mats]
    cdt = F64 if precision == "float64" else torch.float32
    mus = reduce_across_ranks(torch.cat([z.sum(0, dtype=F64) for z in mats])) / n
    dims = [z.shape[1] for z in mats]
    offs = [0, *torch.tensor(dims).cumsum(0).tolist()]
    zc = [(z.to(F64) - mus[offs[k]:offs[k + 1]]).to(cdt) for k, z in enumerate(mats)]
    peak = reduce_across_ranks(torch.tensor([float(z.abs().max()) if n_local else 0.0 for z in zc], dtype=F64, device=dev), "max")
    expo = [0 if p == 0.0 or not math.isfinite(p) else -math.frexp(p)[1] for p in peak.tolist()]
    zc = [z * 2.0**e for z, e in zip(zc, expo, strict=True)]
    gammas = [1.0 / (2.0 * s * s) * 4.0 ** -e for s, e in zip(sigmas, expo, strict=True)]
    zall = torch.cat(zc, 1) if n_local else torch.zeros(0, offs[-1], dtype=cdt, device=dev)
    sq = [z.square().sum(1) for z in zc]
    tile = max(256, int(math.sqrt(TILE_BYTES / (8 * nz))) // 128 * 128)
    ch = min(chunk or CHUNK_ROWS, tile)
    gsum = torch.zeros(nz, nz, dtype=F64, device=dev)
    rows_off = torch.zeros(nz, n, dtype=F64, device=dev)  # every row's off-diagonal row sum, filled by whoever forms it
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
    me = rank_world()[0]
    with matmul_precision(precision, dev):
        for off, blk in row_blocks(zall, counts, ch):
            bs = blk.shape[0]
            src = max(i for i in range(len(counts)) if starts[i] <= off and counts[i])
            mine = block_rows(me, src, off - starts[src], counts, ch)
            if mine is None:
                continue
            twice = src != me  # a block of two ranks is formed once and stands for its transpose too
            parts = [blk[:, offs[k]:offs[k + 1]] for k in range(nz)]
            part_sq = [b.square().sum(1) for b in parts]
            for a in range(mine, n_local, tile):
                ea = min(a + tile, n_local)
                stack = torch.empty(nz, (ea - a) * bs, dtype=F64, device=dev)
                same = torch.arange(lo + a, lo + ea, device=dev)[:, None] == torch.arange(off, off + bs, device=dev)[None, :]
                for k in range(nz):
                    g = rbf_tile(zc[k][a:ea], sq[k][a:ea], parts[k], part_sq[k], gammas[k])
                    g.masked_fill_(same, 0.0)  # off-diagonal entries only; K_aa = 1 added below
                    rows_off[k, lo + a:lo + ea] += g.sum(1, dtype=F64)
                    if twice:
                        rows_off[k, off:off + bs] += g.sum(0, dtype=F64)
                    stack[k] = g.reshape(-1)
                gsum.addmm_(stack, stack.T, alpha=2.0 if twice else 1.0)
    reduce_across_ranks(gsum)
    reduce_across_ranks(rows_off)
    first = gather_rows(torch.cat(list(mats), 1) if n_local else torch.zeros(0, offs[-1], device=dev), torch.zeros(1, dtype=torch.long), counts)
    const = torch.tensor([bool((z == first[:, offs[k]:offs[k + 1]].to(z.dtype)).all()) if n_local else True
                          for k, z in enumerate(mats)], dtype=torch.long, device=dev)
    const = reduce_across_ranks(const) == len(counts)
    for k in range(nz):
        if bool(const[k]):
            side, pos = ("xs", k) if k < m else ("ys", k - m)
            raise MetricError(f"{side}[{pos}] has constant features (every column has zero variance); CKA is undefined.",
                              fix="drop that model or check that its encoder produced real embeddings.")
    dot_off, s_off = rows_off @ rows_off.T, rows_off.sum(1)  # global rows on every rank: no further sum

    def hsic(ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
        so, ra, rb = dot_off[ia][:, ib], s_off[ia], s_off[ib]
        if debiased:
            num = gsum[ia][:, ib] + ra[:, None] * rb[None, :] / ((n - 1) * (n - 2)) - (2.0 / (n - 2)) * so
            return num / (n * (n - 3))
        full = gsum[ia][:, ib] + n
        dot = so + ra[:, None] + rb[None, :] + n  # (r_a + 1).(r_b + 1)
        return (full - (2.0 / n) * dot + (ra + n)[:, None] * (rb + n)[None, :] / n**2) / (n - 1) ** 2

    ix, iy, iall = torch.arange(m), torch.arange(m, nz), torch.arange(nz)
    cross = hsic(ix, iy)
    selfs = hsic(iall, iall).diagonal().clone()
    base = gsum.diagonal() if debiased else gsum.diagonal() + n
    tol = 1e-10 if cdt == F64 else 1e-5
    selfs = torch.where(selfs <= tol * base.abs() / (n * n), torch.zeros_like(selfs), selfs)
    return HSICResult(cross.cpu(), selfs[:m].cpu(), selfs[m:].cpu(), n, "rbf", debiased, "gram", tuple(sigmas))


def sharded_neighbours(x: torch.Tensor, counts: Sequence[int], k: int, preprocess: _knn.Preprocess = _knn.Preprocess(),
                       chunk: int = CHUNK_ROWS) -> _knn.Neighbours:
    """The (n, w) neighbour lists of all rows, on every rank, from this rank's rows ``x`` (module docstring);
    equal to :func:`pairscout.metrics.knn.nearest_neighbours` on the concatenated rows."""
    _knn._check_int("k", k)
    r, _ = rank_world()
    n, lo, n_local = sum(counts), sum(counts[:r]), x.shape[0]
    if not 1 <= k <= n - 1:
        raise MetricError(f"k={k} neighbours requested but there are only {n} rows.", fix=f"use 1 <= k <= {n - 1}.")
    x = preprocess.cast(x)
    thr = None
    if preprocess.clips:  # the mean over ALL rows of the per-row quantile, summed in the same order as one process
        per_row = torch.zeros(n, dtype=x.dtype, device=x.device)
        per_row[lo:lo + n_local] = preprocess.row_thresholds(x)
        thr = reduce_across_ranks(per_row).mean()
    x = preprocess.finish(x, thr)
    dev, rel = x.device, (_knn.TIE_TOL if x.dtype != F64 else 1e-10)
    tile = max(1, min(max(n_local, 1), _knn.SIM_TILE_BYTES // (x.element_size() * max(chunk, 1))))
    rows = torch.arange(lo, lo + n_local, device=dev)

    # the (local x n) similarities are kept between passes when the largest shard's fit SIM_TILE_BYTES (the same
    # decision on every rank, so every rank takes part in the same broadcasts); else each pass recomputes them
    keep = max(counts) * n * x.element_size() <= _knn.SIM_TILE_BYTES
    store: list[tuple[int, int, int, torch.Tensor]] = []
    filled = False

    def sims() -> Iterator[tuple[int, int, int, torch.Tensor]]:
        nonlocal filled
        if filled:
            yield from store
            return
        for off, blk in row_blocks(x, counts, chunk):
            for a in range(0, n_local, tile):
                ea = min(a + tile, n_local)
                s = x[a:ea] @ blk.T
                s[rows[a:ea, None] == torch.arange(off, off + blk.shape[0], device=dev)[None, :]] = float("-inf")
                if keep:
                    store.append((a, ea, off, s))
                yield a, ea, off, s
        filled = keep

    def running_top(width: int) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.full((n_local, width), float("-inf"), dtype=x.dtype, device=dev)
        i = torch.zeros(n_local, width, dtype=torch.long, device=dev)
        for a, ea, off, s in sims():
            cv = torch.cat([v[a:ea], s], 1)
            ci = torch.cat([i[a:ea], torch.arange(off, off + s.shape[1], device=dev).expand(ea - a, -1)], 1)
            tv, ti = torch.topk(cv, min(width, cv.shape[1]), dim=1)
            v[a:ea, : tv.shape[1]], i[a:ea, : tv.shape[1]] = tv, ci.gather(1, ti)
        return v, i

    def exact_sims(i: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The kept similarities recomputed per entry (:func:`~pairscout.metrics.knn.entry_dots`), one more pass."""
        v = v.clone()
        for off, blk in row_blocks(x, counts, chunk):
            r, c = ((i >= off) & (i < off + blk.shape[0])).nonzero(as_tuple=True)
            v[r, c] = _knn.entry_dots(x, r, blk, i[r, c] - off)
        return v

    v, i = running_top(k)
    kth = v[:, -1:]
    tol = rel * kth.abs().clamp_min(1.0)
    strict = torch.zeros(n_local, dtype=torch.long, device=dev)
    cand = torch.zeros(n_local, dtype=torch.long, device=dev)
    for a, ea, _, s in sims():
        strict[a:ea] += (s > kth[a:ea] + tol[a:ea]).sum(1)
        cand[a:ea] += (s >= kth[a:ea] - tol[a:ea]).sum(1)
    width = int(reduce_across_ranks(torch.tensor([int(cand.max()) if n_local else k], device=dev), "max"))
    if width == k:  # no ties anywhere: the k nearest, as one process lists them
        idx, val = _knn.canonical_order(i, exact_sims(i, v))[:2]
        return _knn.Neighbours(gather_rows(idx, torch.arange(n), counts), gather_rows(val, torch.arange(n), counts))
    v, i = running_top(width)
    pos = torch.arange(width, device=dev)[None, :]
    inside = pos < cand[:, None]
    tied = inside & (v <= kth + tol)
    share = ((k - strict).to(F64) / (cand - strict).to(F64))[:, None]
    w = torch.where(tied, share, torch.ones_like(share)).where(inside, torch.zeros((), dtype=F64, device=dev))
    i = torch.where(inside, i, torch.full_like(i, -1))
    idx, val, w = _knn.canonical_order(i, exact_sims(i, torch.where(inside, v, torch.zeros_like(v))), w)
    every = torch.arange(n)
    return _knn.Neighbours(gather_rows(idx + 1, every, counts) - 1, gather_rows(val, every, counts),
                           gather_rows(w, every, counts), k)
