"""Nulls of the neighbour metrics (mutual k-NN, CKNNA) from the neighbour lists, never recomputing neighbours.

Mutual k-NN's default null is exact and drawn from no permutation: its overlap is a quadratic assignment
statistic of the two weighted adjacencies, whose permutation mean and variance come from seven sums per model
(:func:`overlap_sums`, :func:`overlap_moments`). The Monte-Carlo permutations below serve CKNNA and
``method="permutation"``.

Each model's neighbour lists become sorted entry keys ``row * n + col``; a permutation of the text rows
relabels the text model's entries, which are looked up among the vision model's keys with ``searchsorted``
(no n x n matrix), batched over permutations. Tie weights (:mod:`pairscout.metrics.knn`) are carried along.
Used by :mod:`pairscout.metrics.calibration`; tested against recomputing the metric on permuted rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import pairscout.metrics.knn as _knn

F64 = torch.float64
#: Memory the dense lookup table of mutual k-NN's null may use (all vision models, float32 n x n each).
DENSE_BYTES = 256 * 2**20
#: Memory one bitmap of CKNNA's null may use (n / 8 bytes per row of a vision model's entries; rows in chunks).
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
    ok = nb.indices >= 0
    rows = torch.arange(n, device=dev)[:, None].expand_as(nb.indices)[ok]
    cols = nb.indices[ok]
    w = nb.weight_matrix().to(F64)[ok]
    r = torch.zeros(n, dtype=F64, device=dev).index_add_(0, rows, w)
    c = torch.zeros(n, dtype=F64, device=dev).index_add_(0, cols, w)
    keys = rows * n + cols
    order = torch.argsort(keys)
    sk = keys[order]
    tk = cols * n + rows
    pos = torch.searchsorted(sk, tk).clamp_max(max(sk.numel() - 1, 0))
    hit = sk[pos] == tk if sk.numel() else torch.zeros(0, dtype=torch.bool, device=dev)
    a2 = (w * w).sum()
    at = (w[hit] * w[order[pos[hit]]]).sum()
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
                batch: int = 16, budget: int = 256 * 2**20) -> torch.Tensor:
    """(n_perm, m, t) CKNNA with the text rows permuted, batched over permutations.

    A batch of permutations relabels every text model's lists once (side by side); each vision model's entries
    are then a bitmap of the n x n entries (:func:`_entry_bits`, rebuilt per batch in O(n k), one model and at most
    :data:`BITMAP_ROW_BYTES` of rows at a time: memory linear in n), so finding which permuted entries it shares is one bit lookup per entry (O(n k) per
    permutation and pair, no search); the rare shared entries find their place in the vision row's list, and the
    sparse HSIC of every (permutation, text model) of the batch is one sort
    (:func:`pairscout.metrics.knn._sparse_hsic1_pairs`). A batch's permuted lists take about ``budget`` bytes."""
    sx_self = torch.tensor([_knn.cknna_self_term(n, a) for a in nxs], dtype=F64)
    sy_self = torch.tensor([_knn.cknna_self_term(n, b) for b in nys], dtype=F64)
    n_perm, t = perms.shape[0], len(nys)
    dev = nxs[0].indices.device
    perms = perms.to(dev)
    out = torch.empty(n_perm, len(nxs), t, dtype=F64)
    yi = torch.cat([b.indices for b in nys], 1)  # every text model's lists side by side
    yw = torch.cat([b.weight_matrix().to(F64) for b in nys], 1)
    ys = torch.cat([b.sims.to(F64) for b in nys], 1)
    W = yi.shape[1]
    jcol = torch.cat([torch.full((b.indices.shape[1],), j, dtype=torch.long, device=dev) for j, b in enumerate(nys)])
    batch = max(1, min(batch, budget // (32 * n * W)))
    denom = (sx_self[:, None] * sy_self[None, :]).clamp_min(0.0).sqrt()
    ok = (sx_self[:, None] > 0) & (sy_self[None, :] > 0)
    rows = torch.arange(n, device=dev)[None, :, None]
    span = max(8, BITMAP_ROW_BYTES * 8 // n // 8 * 8)
    for s, p, inv in _batches(perms, batch):
        bsz = len(p)
        raw = yi[p]  # (B, n, W): row r of permuted Y is old row p[r]
        cols = torch.gather(inv, 1, raw.clamp_min(0).reshape(bsz, -1)).view_as(raw)
        q = rows * n + cols
        # per chunk of ``span`` rows (a multiple of 8: whole bytes), each entry's byte in that chunk's bitmap (unused
        # slots: a zero byte past its end) and bit, shared by every vision model
        chunks = []
        for r0 in range(0, n, span):
            r1 = min(r0 + span, n)
            qc = q[:, r0:r1]
            chunks.append((r0, r1, torch.where(raw[:, r0:r1] >= 0, (qc >> 3) - r0 * n // 8, ((r1 - r0) * n + 7) // 8),
                           (qc & 7).to(torch.uint8)))
        del q
        for i, a in enumerate(nxs):
            found = []
            for r0, r1, at, bit in chunks:
                bits = torch.cat([_entry_bits(a, n, r0, r1), torch.zeros(1, dtype=torch.uint8, device=dev)])
                bi, r, e = ((bits[at] >> bit) & 1).nonzero(as_tuple=True)
                found.append((bi, r + r0, e))
            bi, r, e = (torch.cat(x) for x in zip(*found, strict=True))
            old = p[bi, r]
            m = yw[old, e]
            keep = m > 0
            bi, r, e, old, m = bi[keep], r[keep], e[keep], old[keep], m[keep]
            c = cols[bi, r, e]
            pa = (a.indices[r] == c[:, None]).to(torch.int8).argmax(1)  # the entry's place in the vision row's list
            m = a.weight_matrix().to(F64)[r, pa] * m
            cross = _knn._sparse_hsic1_pairs(n, bsz * t, bi * t + jcol[e], r, c, a.sims.to(F64)[r, pa] * m, ys[old, e] * m)
            v = cross.view(bsz, t) / denom[i]
            v = torch.where(v.abs() > 1 + 1e-9, torch.full_like(v, float("nan")), v)
            out[s:s + bsz, i] = torch.where(ok[i], v, torch.zeros_like(v))
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
