"""Nulls of the neighbour metrics (mutual k-NN, CKNNA) from the neighbour lists, never recomputing neighbours.

Mutual k-NN's default null is exact and drawn from no permutation: its overlap is a quadratic assignment
statistic of the two weighted adjacencies, whose permutation mean and variance come from seven sums per model
(:func:`overlap_sums`, :func:`overlap_moments`). The Monte-Carlo permutations below serve CKNNA and
``method="permutation"``.

A permutation of the text rows relabels the text models' entries, which are looked up among the vision model's
entries (CKNNA: a bitmap of a chunk of rows at a time; mutual k-NN's Monte-Carlo null: a bitmap, a dense table
within :data:`DENSE_BYTES` or sorted keys, by size), batched over permutations. Tie weights
(:mod:`pairscout.metrics.knn`) are carried along. Used by :mod:`pairscout.metrics.calibration`; tested against
recomputing the metric on permuted rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import pairscout.metrics.knn as _knn

F64 = torch.float64
#: Memory the dense lookup table of mutual k-NN's null may use (all vision models, float32 n x n each).
DENSE_BYTES = 256 * 2**20
#: Memory the bitmaps of CKNNA's null may use at once (n / 8 bytes per row of each vision model; rows in chunks).
BITMAP_ROW_BYTES = 64 * 2**20
#: Memory the bitmaps of mutual k-NN's Monte-Carlo null may use (all vision models, n^2 / 8 bytes each).
BITMAP_BYTES = 4 * 2**30


def _perms(n: int, n_perm: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(n_perm)]) if n_perm else torch.zeros(0, n, dtype=torch.long)


@dataclass(frozen=True)
class _Sparse:
    """One model's neighbour entries as sorted keys ``row * n + col`` with their similarity and tie weight."""

    keys: torch.Tensor
    sims: torch.Tensor
    weights: torch.Tensor


def _batches(perms: torch.Tensor, batch: int):
    """``(start, p, inv)`` for every batch of ``batch`` permutations: the permutations and their inverses."""
    n = perms.shape[1]
    for s in range(0, perms.shape[0], batch):
        p = perms[s:s + batch]
        inv = torch.empty_like(p)
        inv.scatter_(1, p, torch.arange(n, device=p.device).expand(len(p), n).contiguous())
        yield s, p, inv


def _sparse(nb: _knn.Neighbours, n: int) -> _Sparse:
    ok = nb.indices >= 0
    rows = torch.arange(n, device=nb.indices.device)[:, None].expand_as(nb.indices)
    keys = (rows * n + nb.indices)[ok]
    order = torch.argsort(keys)
    return _Sparse(keys[order], nb.sims.to(F64)[ok][order], nb.weight_matrix().to(F64)[ok][order])


def _permuted_entries(nb: _knn.Neighbours, perms: torch.Tensor, inv: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Entries of Y's neighbour lists after each permutation: (rows, cols, sims, weights), each (B, n * w)."""
    b = perms.shape[0]
    raw = nb.indices[perms].reshape(b, -1)  # row r of permuted Y is old row perms[r]
    ok = raw >= 0
    cols = torch.gather(inv, 1, raw.clamp_min(0))
    rows = torch.arange(n, device=perms.device).repeat_interleave(nb.indices.shape[1])[None, :].expand(b, -1)
    sims = nb.sims.to(F64)[perms].reshape(b, -1)
    w = nb.weight_matrix().to(F64)[perms].reshape(b, -1) * ok
    return rows, cols, sims, w


def _lookup(sp: _Sparse, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.searchsorted(sp.keys, q).clamp_max(sp.keys.numel() - 1)
    return sp.keys[pos] == q, pos


def _mutual_knn_null(nxs: list[_knn.Neighbours], nys: list[_knn.Neighbours], perms: torch.Tensor,
                     batch: int = 64) -> torch.Tensor:
    """(n_perm, m, t) mutual k-NN of every pair with the text rows permuted: each permuted Y entry (i, j) is
    looked up among X's sorted entry keys ``i * n + j`` (no n x n matrix, O(n k log(n k)) per permutation)."""
    n_perm, n = perms.shape
    dev = nxs[0].indices.device
    perms = perms.to(dev)
    out = torch.empty(n_perm, len(nxs), len(nys), dtype=F64, device=dev)
    if n * n // 8 * len(nxs) <= BITMAP_BYTES:
        # each vision model's neighbour entries as a bitmap of the n x n entries (n^2 / 8 bytes): a lookup is one
        # gather and a shift, O(1) per entry at any n; the few hits on tied entries (weight < 1) take their weight
        # from a short sorted list of those entries
        bits, ties = [], []
        for a in nxs:
            ok = a.indices >= 0
            keys = (torch.arange(n, device=dev)[:, None] * n + a.indices)[ok]
            w = a.weight_matrix()[ok]
            bits.append(_entry_bits(a, n))
            odd = w != 1.0
            order = torch.argsort(keys[odd])
            ties.append((keys[odd][order], w[odd][order]))
        for s, p, inv in _batches(perms, batch):
            for j, b in enumerate(nys):
                rows, cols, _, wb = _permuted_entries(b, p, inv, n)
                q = rows * n + cols.clamp_min(0)
                hi, lo = q >> 3, (q & 7).to(torch.uint8)
                for i, t in enumerate(bits):
                    wa = ((t[hi] >> lo) & 1).to(F64)
                    tk, tw = ties[i]
                    if tk.numel():
                        r, c = wa.nonzero(as_tuple=True)
                        pos = torch.searchsorted(tk, q[r, c]).clamp_max(tk.numel() - 1)
                        hit = tk[pos] == q[r, c]
                        wa[r[hit], c[hit]] = tw[pos[hit]]
                    out[s:s + len(p), i, j] = (wa * wb).sum(1) / (n * nxs[i].k)
        return out.cpu()
    if len(nxs) * n * n * 4 <= DENSE_BYTES:
        # small n: every X model's weighted adjacency as one dense (m, n * n) table; a lookup is one gather
        dense = torch.zeros(len(nxs), n * n, dtype=torch.float32, device=dev)
        for i, a in enumerate(nxs):
            sp = _sparse(a, n)
            dense[i, sp.keys] = sp.weights.float()
        kk = torch.tensor([float(a.k) for a in nxs], dtype=F64, device=dev)[:, None]
        for s, p, inv in _batches(perms, batch):
            for j, b in enumerate(nys):
                rows, cols, _, wb = _permuted_entries(b, p, inv, n)
                q = (rows * n + cols.clamp_min(0)).reshape(-1)
                got = dense[:, q].view(len(nxs), len(p), -1).to(F64)  # (m, B, n * w)
                out[s:s + len(p), :, j] = ((got * wb[None]).sum(-1) / (n * kk)).T
        return out.cpu()
    sx = [_sparse(a, n) for a in nxs]
    for s, p, inv in _batches(perms, batch):
        for j, b in enumerate(nys):
            rows, cols, _, wb = _permuted_entries(b, p, inv, n)
            q = rows * n + cols
            for i, a in enumerate(sx):
                hit, pos = _lookup(a, q)
                out[s:s + len(p), i, j] = (hit * a.weights[pos] * wb).sum(1) / (n * nxs[i].k)
    return out.cpu()


def overlap_sums(nb: _knn.Neighbours, n: int) -> torch.Tensor:
    """What the exact permutation moments of the neighbour overlap need from one model's lists, O(n k).

    The lists are the weighted adjacency A (``A_ij`` = the tie weight of j in row i's list, zero diagonal, not
    symmetric). Returns float64 ``[n, S, A2, At, R, C, P]``: the entry sum, ``sum A_ij^2``, ``sum A_ij A_ji``,
    ``sum_i (r_i^2) - A2`` (pairs of entries sharing a row), ``sum_j (c_j^2) - A2`` (sharing a column) and
    ``sum_j c_j r_j - At`` (paths i -> j -> l, l != i), with r and c the row and column sums."""
    dev = nb.indices.device
    rows, cols, slot = _knn.entries(nb)
    wm = nb.weight_matrix().to(F64)
    w = wm[rows, slot]
    r = torch.zeros(n, dtype=F64, device=dev).index_add_(0, rows, w)
    c = torch.zeros(n, dtype=F64, device=dev).index_add_(0, cols, w)
    has, pos = _knn.transposes(nb, rows, cols)
    a2 = (w * w).sum()
    at = (w[has] * wm[cols[has], pos[has]]).sum()
    return torch.stack([torch.tensor(float(n), dtype=F64, device=dev), w.sum(), a2, at, (r * r).sum() - a2,
                        (c * c).sum() - a2, (r * c).sum() - at]).cpu()


def overlap_moments(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Exact mean and variance over uniform permutations pi of ``T = sum_ij A_ij B_pi(i)pi(j)`` for two
    zero-diagonal, not necessarily symmetric matrices, from their :func:`overlap_sums`.

    Split ``E[T^2]`` by how the two entries (i, j), (k, l) share indices (Mantel 1967, Hubert 1987): the same
    entry (A2), its transpose (At), a shared row (R), a shared column (C), a path (k = j or l = i: P, twice) and
    four distinct indices (``A4 = S^2 - A2 - At - R - C - 2P``); with ``(n)_k`` the falling factorial::

        E[T]   = S_A S_B / (n)_2
        E[T^2] = (A2_A A2_B + At_A At_B) / (n)_2 + (R_A R_B + C_A C_B + 2 P_A P_B) / (n)_3 + A4_A A4_B / (n)_4

    For symmetric matrices this is the off-diagonal part of
    :func:`pairscout.metrics.calibration._quadratic_assignment_moments`."""
    n_, sa, a2a, ata, ra, ca, pa = (float(v) for v in a)
    _, sb, a2b, atb, rb, cb, pb = (float(v) for v in b)
    n = int(round(n_))
    n2, n3, n4 = n * (n - 1), n * (n - 1) * (n - 2), n * (n - 1) * (n - 2) * (n - 3)
    a4a = sa * sa - a2a - ata - ra - ca - 2 * pa
    a4b = sb * sb - a2b - atb - rb - cb - 2 * pb
    mean = sa * sb / n2
    et2 = (a2a * a2b + ata * atb) / n2 + (ra * rb + ca * cb + 2 * pa * pb) / n3 + a4a * a4b / n4
    return mean, max(et2 - mean * mean, 0.0)


def mutual_knn_moments(nxs: list[_knn.Neighbours], nys: list[_knn.Neighbours], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, t) exact permutation mean and sd of mutual k-NN, ``T / (n k)`` with T the weighted overlap
    (:func:`overlap_moments`): O(n k log(n k)) per model, O(1) per pair, no permutation drawn."""
    sx = [overlap_sums(a, n) for a in nxs]
    sy = [overlap_sums(b, n) for b in nys]
    mean = torch.empty(len(nxs), len(nys), dtype=F64)
    sd = torch.empty_like(mean)
    for i, a in enumerate(sx):
        for j, b in enumerate(sy):
            mu, var = overlap_moments(a, b)
            scale = n * nxs[i].k
            mean[i, j], sd[i, j] = mu / scale, math.sqrt(var) / scale
    return mean, sd


def _entry_bits(nb: _knn.Neighbours, n: int, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """One model's neighbour entries of rows ``r0:r1`` (all rows by default) as a bitmap of those rows' n entries
    each (``(r1 - r0) n / 8`` bytes; entry (r, c) is bit ``(r - r0) n + c``)."""
    dev = nb.indices.device
    r1 = n if r1 is None else r1
    idx = nb.indices[r0:r1]
    ok = idx >= 0
    keys = (torch.arange(r1 - r0, device=dev)[:, None] * n + idx)[ok]
    bits = torch.zeros(((r1 - r0) * n + 7) // 8, dtype=torch.uint8, device=dev)
    return bits.index_put_((keys >> 3,), (1 << (keys & 7)).to(torch.uint8), accumulate=True)  # distinct bits: a sum is an or


def _cknna_null(nxs: list[_knn.Neighbours], nys: list[_knn.Neighbours], perms: torch.Tensor, n: int,
                budget: int = 256 * 2**20) -> torch.Tensor:
    """(n_perm, m, t) CKNNA with the text rows permuted.

    The rows are walked in chunks: every vision model's entries of a chunk's rows become a bitmap (:func:`_entry_bits`,
    built once; all models' bitmaps of a chunk together take at most :data:`BITMAP_ROW_BYTES`, so memory stays linear
    in n), each permutation relabels the chunk's rows of every text model's lists (side by side), and finding which
    permuted entries a vision model shares is one bit lookup per entry (O(n k) per permutation and pair, no search).
    The rare shared entries are kept (in one canonical order, whatever the chunks), find their place in the vision
    row's list, and the sparse HSIC of every (permutation, text model) of a vision model is one sort
    (:func:`pairscout.metrics.knn._sparse_hsic1_pairs`). A batch of permuted rows takes about ``budget`` bytes."""
    sx_self = torch.tensor([_knn.cknna_self_term(n, a) for a in nxs], dtype=F64)
    sy_self = torch.tensor([_knn.cknna_self_term(n, b) for b in nys], dtype=F64)
    n_perm, m, t = perms.shape[0], len(nxs), len(nys)
    dev = nxs[0].indices.device
    perms = perms.to(dev)
    out = torch.empty(n_perm, m, t, dtype=F64)
    if n_perm == 0:
        return out
    inv = torch.empty_like(perms).scatter_(1, perms, torch.arange(n, device=dev).expand(n_perm, n).contiguous())
    yi, yw, ys, jcol = _knn._side_by_side(nys)  # every text model's lists side by side
    W = yi.shape[1]
    span = min(n, max(8, BITMAP_ROW_BYTES * 8 // (n * m) // 8 * 8))  # rows per chunk: a multiple of 8 (whole bytes)
    batch = max(1, min(n_perm, budget // (32 * span * W)))
    found: list[list[torch.Tensor]] = [[] for _ in range(m)]  # per vision model: (permutation, row, entry) keys
    for r0 in range(0, n, span):
        r1 = min(r0 + span, n)
        end = ((r1 - r0) * n + 7) // 8  # unused list slots point at a zero byte past the bitmap's end
        bits = [torch.cat([_entry_bits(a, n, r0, r1), torch.zeros(1, dtype=torch.uint8, device=dev)]) for a in nxs]
        rows = torch.arange(r0, r1, device=dev)[None, :, None]
        for s in range(0, n_perm, batch):
            p, iv = perms[s:s + batch, r0:r1], inv[s:s + batch]
            raw = yi[p]  # (B, rows, W): row r of permuted Y is old row p[r]
            cols = torch.gather(iv, 1, raw.clamp_min(0).reshape(len(p), -1)).view_as(raw)
            q = rows * n + cols
            at = torch.where(raw >= 0, (q >> 3) - r0 * n // 8, end)
            bit = (q & 7).to(torch.uint8)
            for i in range(m):
                bi, r, e = ((bits[i][at] >> bit) & 1).nonzero(as_tuple=True)
                found[i].append(((bi + s) * n + r + r0) * W + e)
    for i, a in enumerate(nxs):
        key = torch.sort(torch.cat(found[i])).values  # one order of the shared entries, whatever the chunks
        e, pr = key % W, key // W
        r, pi = pr % n, pr // n
        old = perms[pi, r]
        w = yw[old, e]
        keep = w > 0
        pi, r, e, old, w = pi[keep], r[keep], e[keep], old[keep], w[keep]
        c = inv[pi, yi[old, e]]
        pa = (a.indices[r] == c[:, None]).to(torch.int8).argmax(1)  # the entry's place in the vision row's list
        w = a.weight_matrix().to(F64)[r, pa] * w
        cross = _knn._sparse_hsic1_pairs(n, n_perm * t, pi * t + jcol[e], r, c, a.sims.to(F64)[r, pa] * w, ys[old, e] * w)
        v = cross.view(n_perm, t) / (sx_self[i] * sy_self).clamp_min(0.0).sqrt()
        v = torch.where(v.abs() > 1 + 1e-9, torch.full_like(v, float("nan")), v)
        out[:, i] = torch.where((sx_self[i] > 0) & (sy_self > 0)[None, :], v, torch.zeros_like(v))
    return out


#: Exceedances of the observed value among the permutations from which the Monte-Carlo p is used as it is;
#: below, its resolution (1 / (permutations + 1)) is too coarse and the fitted tail is used.
MC_EXCEEDANCES = 10


def _from_samples(observed: torch.Tensor, null: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, sd, p and Monte-Carlo p of the observed values from permutation samples ``null`` (B, m, t).

    ``p_mc = (1 + #{null >= observed}) / (1 + B)`` (Phipson & Smyth 2010) cannot go below 1 / (B + 1), so Holm's
    correction over m t pairs floors it at m t / (B + 1) (42 pairs, 199 permutations: 0.21 however strong the
    pair). Where at least :data:`MC_EXCEEDANCES` permutations reach the observed value, p is ``p_mc``; further
    out p is the tail of a Pearson type III law (a gamma law, shifted and scaled, or its mirror for negative
    skew) fitted to the permutation mean, sd and skewness: the same kind of fitted tail as the CKA nulls'
    gamma approximation (Gretton et al. 2008), and Knijnenburg et al. (2009)'s remedy for permutation p-values
    that the permutations cannot resolve."""
    from scipy import stats

    n_perm = null.shape[0]
    mean = null.mean(0)
    sd = null.std(0) if n_perm > 1 else torch.full_like(observed, float("nan"))
    count = (null >= observed - 1e-12).sum(0)
    p_mc = (1 + count).to(F64) / (1 + n_perm)
    if n_perm < 20:  # too few samples to fit a tail
        return mean, sd, p_mc, p_mc
    a = null.to(F64).cpu().numpy()
    skew = torch.from_numpy(stats.skew(a, axis=0, bias=False)).nan_to_num(0.0)
    tail = torch.from_numpy(stats.pearson3.sf(observed.cpu().numpy(), skew.numpy(), loc=mean.cpu().numpy(),
                                              scale=sd.cpu().numpy())).to(F64)
    fit = (count.cpu() < MC_EXCEEDANCES) & (sd.cpu() > 0) & torch.isfinite(tail)
    p = torch.where(fit, tail.clamp(0.0, 1.0), p_mc.cpu())
    return mean, sd, p.to(p_mc.device), p_mc
