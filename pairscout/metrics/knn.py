"""Neighbourhood alignment: mutual k-NN (Huh et al. 2024, Platonic Representation Hypothesis) and CKNNA.

* Mutual k-NN: with N_X(i) the k nearest neighbours of row i by inner product in X (self excluded),
  ``MkNN(X, Y) = 1/n sum_i |N_X(i) & N_Y(i)| / k``. Chance level is about k / (n - 1).
* CKNNA (platonic-rep ``cknna``, unbiased branch): CKA restricted to mutual neighbours. With ``K = X X^T``,
  ``L = Y Y^T`` and the mask ``M_ij = 1[j in N_X(i) and j in N_Y(i)]`` (never the diagonal),
  ``CKNNA = HSIC_1(M*K, M*L) / sqrt(HSIC_1(M_X*K, M_X*K) HSIC_1(M_Y*L, M_Y*L))`` where M_X (M_Y) is X's (Y's)
  own k-NN mask and ``HSIC_1(A, B) = [tr(A B) + (1^T A 1)(1^T B 1)/((n-1)(n-2)) - 2/(n-2) 1^T A B 1]/(n(n-3))``.
  Computed sparsely from the n x k neighbour lists (O(n k^2), no n x n mask). platonic-rep adds 1e-6 to the
  denominator; we do not: a self term <= 0 gives 0.0 with a logged warning, as in :mod:`.cka`. The sparse
  unbiased ratio is not bounded by Cauchy-Schwarz; at small n with few distinct rows it can leave [-1, 1]
  (e.g. 11.96 on 12 rows, k = 10): such a value is reported as NaN with a warning, never as a number.

Ties (identical rows, e.g. duplicate captions) follow one documented, deterministic rule that does not depend
on row order: a row's neighbour set is every row strictly closer than its k-th nearest one, plus the rows tied
with the k-th (similarity within ``TIE_TOL`` times max(1, |s_k|)), which **share the remaining slots equally**
(weight ``(k - #strict) / #tied`` each; weight 1 without ties). This is the expected value of the metric under
uniformly random tie-breaking, so a row shuffle cannot change mutual k-NN or CKNNA. Mutual k-NN then counts
``sum_j w_X(i, j) w_Y(i, j) / k`` and CKNNA uses the soft mask ``M_ij = w_X(i, j) w_Y(i, j)`` (1/0 without ties).

Preprocessing is explicit: a :class:`Preprocess` record (clip at a quantile of |x|, then L2-normalise rows)
whose ``to_dict()`` belongs in every result. platonic-rep's pipeline is ``Preprocess.platonic()``.
Neighbours come from ``torch.topk`` on row tiles of the similarity matrix (memory O(tile * n)), never a sort. The
similarities kept in the lists are recomputed per entry with float64 sums (:func:`entry_dots`) and each row is put
in one canonical order (:func:`canonical_order`), so lists found on row shards (:mod:`.sharded_rows`) are equal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from pairscout.errors import MetricError
from pairscout.metrics.neighbour_order import canonical_order, entry_dots
from pairscout.metrics.validate import (
    ArrayLike,
    as_matrices,
    as_matrix,
    check_not_constant,
    check_same_rows,
    unit_rows,
)

log = logging.getLogger(__name__)

F64 = torch.float64
#: Bytes one tile of similarities may use when finding neighbours.
SIM_TILE_BYTES = 256 * 2**20
#: Relative tolerance under which two similarities count as tied (float32 rounding of identical rows).
TIE_TOL = 1e-5


@dataclass(frozen=True)
class Preprocess:
    """Row preprocessing before neighbourhood metrics, recorded with the results.

    Attributes:
        clip_quantile: if set (e.g. 0.95), clamp features to [-q, q] where q is the mean over rows of the
            per-row ``clip_quantile`` quantile of |x| (platonic-rep ``remove_outliers``, non-exact branch).
        l2_normalize: L2-normalise rows (after clipping), so inner products are cosine similarities.
    """

    clip_quantile: float | None = None
    l2_normalize: bool = True

    @classmethod
    def platonic(cls) -> Preprocess:
        """platonic-rep's default: clip at the 0.95 quantile of |x|, then L2-normalise."""
        return cls(clip_quantile=0.95, l2_normalize=True)

    def to_dict(self) -> dict[str, float | bool | None]:
        return asdict(self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to an (n, d) tensor; returns a new float tensor (float32 unless x is float64)."""
        x = self.cast(x)
        return self.finish(x, self.row_thresholds(x).mean() if self.clips else None)

    @property
    def clips(self) -> bool:
        if self.clip_quantile is not None and not 0 < self.clip_quantile <= 1:
            raise MetricError(f"clip_quantile={self.clip_quantile} must be in (0, 1].", fix="use e.g. 0.95, or None for no clipping.")
        return self.clip_quantile is not None and self.clip_quantile < 1

    @staticmethod
    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(F64 if x.dtype == F64 else torch.float32)

    def row_thresholds(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row ``clip_quantile`` quantile of |x|; their mean over all rows is the clip threshold."""
        assert self.clip_quantile is not None
        return _row_quantile(x.abs(), self.clip_quantile)

    def finish(self, x: torch.Tensor, thr: torch.Tensor | None) -> torch.Tensor:
        """Clip at ``thr`` (if given), then L2-normalise rows (if asked)."""
        if thr is not None:
            x = x.clamp(-thr, thr)
        if self.l2_normalize:
            x = unit_rows(x)  # exact power-of-two rescale first: 1e20 or 1e-20 rows neither overflow nor underflow
        return x


def _row_quantile(a: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile with linear interpolation (torch.quantile's default), without its size limit."""
    d = a.shape[1]
    pos = q * (d - 1)
    lo = int(pos)
    frac = pos - lo
    vals = torch.kthvalue(a, lo + 1, dim=1).values
    if frac > 0 and lo + 1 < d:
        vals = vals + frac * (torch.kthvalue(a, lo + 2, dim=1).values - vals)
    return vals


@dataclass(frozen=True)
class Neighbours:
    """k nearest neighbours of every row (self excluded): ``indices`` (n, w) int64, ``sims`` (n, w) float.

    Without ties w = k and ``weights`` is None. With ties (module docstring) w >= k holds the strict
    neighbours and every tied candidate, ``weights`` (n, w) float64 their share of the k slots, and unused
    positions have index -1 and weight 0.
    """

    indices: torch.Tensor
    sims: torch.Tensor
    weights: torch.Tensor | None = None
    n_neighbours: int | None = None

    @property
    def k(self) -> int:
        return self.n_neighbours if self.n_neighbours is not None else self.indices.shape[1]

    def weight_matrix(self) -> torch.Tensor:
        """(n, w) float64 weights (ones without ties)."""
        if self.weights is not None:
            return self.weights
        return torch.ones(self.indices.shape, dtype=F64, device=self.indices.device)


def to_cpu(nb: Neighbours) -> Neighbours:
    return Neighbours(nb.indices.cpu(), nb.sims.cpu(), None if nb.weights is None else nb.weights.cpu(), nb.n_neighbours)


def permute_neighbours(nb: Neighbours, perm: torch.Tensor, inv: torch.Tensor) -> Neighbours:
    """Neighbours of Y[perm] from those of Y: row i is old row perm[i]; old index j becomes inv[j] (-1 kept)."""
    ind = nb.indices[perm]
    ind = torch.where(ind >= 0, inv[ind.clamp_min(0)], ind)
    return Neighbours(ind, nb.sims[perm], None if nb.weights is None else nb.weights[perm], nb.n_neighbours)


def weighted_overlap(ia: torch.Tensor, wa: torch.Tensor | None, ib: torch.Tensor, wb: torch.Tensor | None,
                     tile: int = 4096) -> torch.Tensor:
    """``sum_{p,q} [ia[..., i, p] == ib[..., i, q]] wa wb`` per row (float64), -1 entries never match.

    Leading batch dimensions broadcast (permutation batches in the null).
    """
    n = ia.shape[-2]
    out = torch.empty(torch.broadcast_shapes(ia.shape[:-1], ib.shape[:-1]), dtype=F64, device=ia.device)
    for s in range(0, n, tile):
        a, b = ia[..., s:s + tile, :, None], ib[..., s:s + tile, None, :]
        eq = (a == b) & (a >= 0)
        if wa is None and wb is None:
            out[..., s:s + tile] = eq.sum((-1, -2)).to(F64)
        else:
            w = eq.to(F64)
            if wa is not None:
                w = w * wa[..., s:s + tile, :, None]
            if wb is not None:
                w = w * wb[..., s:s + tile, None, :]
            out[..., s:s + tile] = w.sum((-1, -2))
    return out


def nearest_neighbours(x: ArrayLike, k: int = 10, preprocess: Preprocess = Preprocess(), tile: int | None = None) -> Neighbours:
    """k nearest neighbours by inner product of the preprocessed rows, self excluded, via ``torch.topk``.

    Raises:
        MetricError: k < 1 or k > n - 1; NaN/inf in x.
    """
    _check_int("k", k)
    if tile is not None:
        _check_int("tile", tile)
    x = preprocess(as_matrix(x, "x"))
    n = x.shape[0]
    if not 1 <= k <= n - 1:
        raise MetricError(f"k={k} neighbours requested but there are only {n} rows.", fix=f"use 1 <= k <= {n - 1}.")
    if tile is None:
        tile = max(1, min(n, SIM_TILE_BYTES // (x.element_size() * n)))
    rel = TIE_TOL if x.dtype != F64 else 1e-10
    idx_t, val_t, w_t = [], [], []
    any_tie = False
    for s in range(0, n, tile):
        e = min(s + tile, n)
        sim = x[s:e] @ x.T
        sim[torch.arange(e - s, device=x.device), torch.arange(s, e, device=x.device)] = float("-inf")
        v, i = torch.topk(sim, k, dim=1)
        kth = v[:, -1:]
        tol = rel * kth.abs().clamp_min(1.0)
        strict = (sim > kth + tol).sum(1)
        cand = (sim >= kth - tol).sum(1)  # strict + tied
        if bool((cand == k).all()):
            r, c = (i >= 0).nonzero(as_tuple=True)
            v[r, c] = entry_dots(x, r + s, x, i[r, c])
            i, v = canonical_order(i, v)
            idx_t.append(i)
            val_t.append(v)
            w_t.append(None)
            continue
        any_tie = True
        width = int(cand.max())
        v, i = torch.topk(sim, width, dim=1)
        pos = torch.arange(width, device=x.device)[None, :]
        inside = pos < cand[:, None]
        tied = inside & (v <= kth + tol)
        share = ((k - strict).to(F64) / (cand - strict).to(F64))[:, None]
        w = torch.where(tied, share, torch.ones_like(share)).where(inside, torch.zeros((), dtype=F64, device=x.device))
        i, v = torch.where(inside, i, torch.full_like(i, -1)), torch.where(inside, v, torch.zeros_like(v))
        r, c = inside.nonzero(as_tuple=True)
        v[r, c] = entry_dots(x, r + s, x, i[r, c])
        i, v, w = canonical_order(i, v, w)
        idx_t.append(i)
        val_t.append(v)
        w_t.append(w)
    if not any_tie:
        return Neighbours(torch.cat(idx_t), torch.cat(val_t))
    width = max(t.shape[1] for t in idx_t)

    def pad(t: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)

    weights = torch.cat([pad(w if w is not None else torch.ones(t.shape, dtype=F64, device=x.device), 0.0)
                         for t, w in zip(idx_t, w_t, strict=True)])
    return Neighbours(torch.cat([pad(t, -1) for t in idx_t]), torch.cat([pad(t, 0.0) for t in val_t]), weights, k)


def _check_int(name: str, value: object, low: int = 1) -> None:
    """Integer parameters (k, tile) must be ints >= ``low``: 2.5, 0, -1 or True are errors, never rounded."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MetricError(f"{name}={value!r} must be an integer >= {low}.", fix=f"pass a whole number >= {low} as {name}.")


def mutual_knn_rows(nx: Neighbours, ny: Neighbours) -> torch.Tensor:
    """Per-row overlap ``|N_X(i) & N_Y(i)| / k`` (n,) float64 (tie weights as in the module docstring);
    its mean is :func:`mutual_knn`."""
    if nx.indices.shape[0] != ny.indices.shape[0] or nx.k != ny.k:
        raise MetricError(f"neighbour lists differ: n = {nx.indices.shape[0]} vs {ny.indices.shape[0]}, k = {nx.k} vs {ny.k}.",
                          fix="compute both with the same n and k.")
    return weighted_overlap(nx.indices, nx.weights, ny.indices, ny.weights) / nx.k


def mutual_knn(x: ArrayLike, y: ArrayLike, k: int = 10, preprocess: Preprocess = Preprocess()) -> float:
    """Mutual k-NN alignment ``1/n sum_i |N_X(i) & N_Y(i)| / k`` (self excluded, topk, default k=10)."""
    return float(all_pairs_mutual_knn([x], [y], k, preprocess)[0, 0])


def _neighbours_all(xs: ArrayLike | Sequence[ArrayLike], ys: ArrayLike | Sequence[ArrayLike], k: int,
                    preprocess: Preprocess, min_rows: int) -> tuple[list[Neighbours], list[Neighbours], int]:
    _check_int("k", k)
    xs_t = as_matrices(xs, "xs")
    ys_t = as_matrices(ys, "ys", device=xs_t[0].device)
    n = check_same_rows({"xs": xs_t, "ys": ys_t}, min_rows=max(min_rows, k + 1), why=f"k={k} neighbours")
    names = [f"xs[{i}]" for i in range(len(xs_t))] + [f"ys[{j}]" for j in range(len(ys_t))]
    check_not_constant([*xs_t, *ys_t], names, "a neighbourhood (every row ties with every other)")
    return [nearest_neighbours(x, k, preprocess) for x in xs_t], [nearest_neighbours(y, k, preprocess) for y in ys_t], n


def all_pairs_mutual_knn(xs: ArrayLike | Sequence[ArrayLike], ys: ArrayLike | Sequence[ArrayLike], k: int = 10,
                         preprocess: Preprocess = Preprocess()) -> torch.Tensor:
    """Mutual k-NN of every pair (xs[i], ys[j]): each model's neighbour lists are computed once.

    Returns:
        (m, t) float64 CPU tensor.
    """
    nxs, nys, n = _neighbours_all(xs, ys, k, preprocess, 2)
    return pair_values(nxs, nys, n, ["mutual_knn"])["mutual_knn"]


# ----------------------------------------------------------------------------------------------------------
# CKNNA
# ----------------------------------------------------------------------------------------------------------
def entries(nx: Neighbours) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every used entry of the lists in row order: (rows, columns, the entry's place in its row's list)."""
    ok = nx.indices >= 0
    rows, slot = ok.nonzero(as_tuple=True)
    return rows, nx.indices[rows, slot], slot


def transposes(nx: Neighbours, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For entries (r, c): whether (c, r) is an entry too (r in c's own list) and its place in that list, by comparing
    r with c's list (O(k) per entry, no sort)."""
    hit = nx.indices[cols] == rows[:, None]
    return hit.any(1), hit.to(torch.int8).argmax(1)


def _cknna_self(n: int, nx: Neighbours) -> float:
    rows, cols, slot = entries(nx)
    vm = nx.sims.to(F64) if nx.weights is None else nx.sims.to(F64) * nx.weights
    v = vm[rows, slot]
    has, pos = transposes(nx, rows, cols)
    vt = vm[cols[has], pos[has]]
    h = _hsic1_sums(n, 1, torch.zeros_like(rows), rows, cols, v, v, (v[has] * vt).sum()[None])[0].item()
    # a self term lost in rounding (e.g. identical rows: a constant masked kernel) counts as 0, never a tiny
    # positive that would blow the ratio up
    return 0.0 if h <= 1e-9 * float((v * v).sum()) / (n * (n - 3)) else h


def _ratio(cross: float, sx: float, sy: float, label: str, quiet: bool = False) -> float:
    if sx <= 0 or sy <= 0:
        if not quiet:
            log.warning("CKNNA self term <= 0 for %s (too few rows or k too small?); value set to 0.0", label)
        return 0.0
    v = cross / (sx * sy) ** 0.5
    if abs(v) > 1.0 + 1e-9:  # the sparse unbiased estimator is not bounded by Cauchy-Schwarz: no value, not a wrong one
        if not quiet:
            log.warning("CKNNA of %s is %.3f, outside [-1, 1] (unstable at this n and k: few distinct rows?); "
                        "reported as NaN", label, v)
        return float("nan")
    return v


def _side_by_side(nys: Sequence[Neighbours]) -> tuple[torch.Tensor, ...]:
    """Every text model's lists side by side: indices, weights, similarities (n, sum w) and each column's model."""
    dev = nys[0].indices.device
    return (torch.cat([b.indices for b in nys], 1), torch.cat([b.weight_matrix() for b in nys], 1),
            torch.cat([b.sims.to(F64) for b in nys], 1),
            torch.cat([torch.full((b.indices.shape[1],), j, dtype=torch.long, device=dev) for j, b in enumerate(nys)]))


def _shared_entries(nx: Neighbours, nys: Sequence[Neighbours] | tuple[torch.Tensor, ...],
                    tile: int = 4096) -> tuple[torch.Tensor, ...]:
    """The entries of X's lists that each Y's lists hold too: (pair j, row, column, soft mask ``w_X w_Y``, X's
    similarity, Y's similarity), from one comparison of X's lists with every Y's side by side (row tiles;
    ``nys``: the lists or :func:`_side_by_side` of them)."""
    ib, wb, sb, jcol = nys if isinstance(nys, tuple) else _side_by_side(nys)
    wa, sa = nx.weight_matrix(), nx.sims.to(F64)
    parts = []
    for s in range(0, nx.indices.shape[0], tile):
        ia = nx.indices[s:s + tile]
        eq = (ia[:, :, None] == ib[s:s + tile, None, :]) & (ia[:, :, None] >= 0)
        r, p, q = eq.nonzero(as_tuple=True)
        r = r + s
        parts.append((jcol[q], r, nx.indices[r, p], wa[r, p] * wb[r, q], sa[r, p], sb[r, q]))
    return tuple(torch.cat(c) for c in zip(*parts, strict=True))


def pair_values(nxs: Sequence[Neighbours], nys: Sequence[Neighbours], n: int, metrics: Sequence[str],
                self_x: Sequence[float] | None = None, self_y: Sequence[float] | None = None,
                quiet: bool = False) -> dict[str, torch.Tensor]:
    """(m, t) float64 CPU mutual k-NN and / or CKNNA of every pair from the models' neighbour lists of the same n
    rows: each vision model's lists are compared with every text model's at once and the sparse HSIC of all its
    pairs is one sort (the one implementation every path uses: single process, row shards, subsets, nulls).
    ``self_x``, ``self_y``: CKNNA's self terms if known (:func:`cknna_self_term`)."""
    m, t = len(nxs), len(nys)
    out = {name: torch.empty(m, t, dtype=F64) for name in metrics}
    if "cknna" in metrics:
        sx = list(self_x) if self_x is not None else [_cknna_self(n, a) for a in nxs]
        sy = list(self_y) if self_y is not None else [_cknna_self(n, b) for b in nys]
    ys = _side_by_side(nys)
    for i, a in enumerate(nxs):
        j, r, c, w, va, vb = _shared_entries(a, ys)
        dev = r.device
        if "mutual_knn" in metrics:
            rows = torch.zeros(t * n, dtype=F64, device=dev).index_add_(0, j * n + r, w).view(t, n)
            out["mutual_knn"][i] = (rows / a.k).mean(1).cpu()
        if "cknna" in metrics:
            cross = _cknna_cross(n, a, nys, ys, (j, r, c, w, va, vb))
            for jj in range(t):
                out["cknna"][i, jj] = _ratio(float(cross[jj]), sx[i], sy[jj], f"xs[{i}], ys[{jj}]", quiet)
    return out


def _cknna_cross(n: int, nx: Neighbours, nys: Sequence[Neighbours], ys: tuple[torch.Tensor, ...] | None = None,
                 shared: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """(t,) ``HSIC_1(M*K, M*L)`` of X against every Y, M the soft mutual mask (module docstring): the shared
    entries of every pair, their transposes found by one sort (:func:`_sparse_hsic1_pairs`)."""
    j, r, c, w, va, vb = _shared_entries(nx, _side_by_side(nys) if ys is None else ys) if shared is None else shared
    return _sparse_hsic1_pairs(n, len(nys), j, r, c, va * w, vb * w)


def _hsic1_sums(n: int, t: int, pair: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor, tr: torch.Tensor) -> torch.Tensor:
    """(t,) HSIC_1 of t pairs of sparse matrices on the same entries (entry e of pair ``pair[e]``) given tr(A B)."""
    dev = a.device
    sa = torch.zeros(t, dtype=F64, device=dev).index_add_(0, pair, a)
    sb = torch.zeros(t, dtype=F64, device=dev).index_add_(0, pair, b)
    colsum_a = torch.zeros(t * n, dtype=F64, device=dev).index_add_(0, pair * n + cols, a).view(t, n)
    rowsum_b = torch.zeros(t * n, dtype=F64, device=dev).index_add_(0, pair * n + rows, b).view(t, n)
    num = tr + sa * sb / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (colsum_a * rowsum_b).sum(1)
    return (num / (n * (n - 3))).cpu()


def _sparse_hsic1_pairs(n: int, t: int, pair: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, a: torch.Tensor,
                        b: torch.Tensor) -> torch.Tensor:
    """(t,) float64 HSIC_1 of t pairs of sparse matrices on the same entries (entry e of pair ``pair[e]``, values a[e],
    b[e], no diagonal): tr(A B) sums A_ij B_ji over the entries whose transpose is an entry too, found by one sort
    (the entries are the pairs' shared entries, not one model's lists as in :func:`transposes`); the rest is
    :func:`_hsic1_sums`."""
    dev = a.device
    nn = n * n
    keys = pair * nn + rows * n + cols
    order = torch.argsort(keys)
    skeys = keys[order]
    tkeys = pair * nn + cols * n + rows
    tr = torch.zeros(t, dtype=F64, device=dev)
    if skeys.numel():
        pos = torch.searchsorted(skeys, tkeys).clamp_max(skeys.numel() - 1)
        hit = skeys[pos] == tkeys
        tr.index_add_(0, pair[hit], a[hit] * b[order[pos[hit]]])
    return _hsic1_sums(n, t, pair, rows, cols, a, b, tr)


def cknna(x: ArrayLike, y: ArrayLike, k: int = 10, preprocess: Preprocess = Preprocess()) -> float:
    """CKNNA (Huh et al. 2024): CKA (unbiased HSIC) restricted to mutual k-NN pairs. Formula in the module
    docstring. Needs k >= 2 and n >= 4.
    """
    return float(all_pairs_cknna([x], [y], k, preprocess)[0, 0])


def all_pairs_cknna(xs: ArrayLike | Sequence[ArrayLike], ys: ArrayLike | Sequence[ArrayLike], k: int = 10,
                    preprocess: Preprocess = Preprocess()) -> torch.Tensor:
    """CKNNA of every pair; neighbour lists and self terms computed once per model. (m, t) float64 CPU."""
    if k < 2:
        raise MetricError(f"CKNNA needs k >= 2 neighbours (got k={k}).", fix="use k >= 2 (default 10).")
    nxs, nys, n = _neighbours_all(xs, ys, k, preprocess, 4)
    return pair_values(nxs, nys, n, ["cknna"])["cknna"]


# ----------------------------------------------------------------------------------------------------------
# Building blocks for the permutation null and the bootstrap (:mod:`pairscout.metrics.stats`)
# ----------------------------------------------------------------------------------------------------------
def neighbour_lists(xs: ArrayLike | Sequence[ArrayLike], ys: ArrayLike | Sequence[ArrayLike], k: int = 10,
                    preprocess: Preprocess = Preprocess(), min_rows: int = 2) -> tuple[list[Neighbours], list[Neighbours], int]:
    """Neighbour lists of every model of both sides (checked: same rows, n > k): ``(nxs, nys, n)``."""
    return _neighbours_all(xs, ys, k, preprocess, min_rows)


def cknna_self_term(n: int, nx: Neighbours) -> float:
    """``HSIC_1(M_X*K, M_X*K)``: one model's CKNNA self term (invariant under a permutation of the pairing)."""
    return _cknna_self(n, nx)


def cknna_from_neighbours(n: int, nx: Neighbours, ny: Neighbours, self_x: float, self_y: float, label: str = "") -> float:
    """CKNNA of one pair from its neighbour lists and both self terms (:func:`cknna_self_term`)."""
    return _ratio(float(_cknna_cross(n, nx, [ny])[0]), self_x, self_y, label)
