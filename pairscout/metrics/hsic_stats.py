"""Sufficient statistics of linear and RBF HSIC for all model pairs (see :mod:`pairscout.metrics.cka`).

Feature form (linear kernel): one chunked product of the centred features per vision model; tiled Gram form
(any kernel): upper-triangle Gram tiles, off-diagonal sums accumulated directly (no cancellation), float64
reductions. The CKA estimators (:mod:`.cka`) are the public face; the tile helpers (:func:`kernel_tiles`,
:func:`rbf_tile`, :data:`TILE_BYTES`) also serve the nulls and the estimation pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from pairscout.errors import MetricError

Kernel = Literal["linear", "rbf"]
F64 = torch.float64

#: Bytes the float64 stack of Gram tiles may use in the tiled path (all models at once).
TILE_BYTES = 512 * 2**20
#: Rows per chunk when accumulating feature-space products.
CHUNK_ROWS = 16384


@dataclass
class _Stats:
    cross: torch.Tensor  # (m, t) <K_i, L_j>
    self_: torch.Tensor  # (m + t,) <K_k, K_k>
    rows: torch.Tensor  # (m + t, n) K_k 1
    diag: torch.Tensor  # (m + t, n) diag(K_k)
    # the same over off-diagonal entries, where accumulated directly (Gram tiles): <K~_i, L~_j>, <K~, K~>, K~1
    cross_off: torch.Tensor | None = None
    self_off: torch.Tensor | None = None
    rows_off: torch.Tensor | None = None


def _column_sums(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Float64 column sums of x: blocks of ``block`` rows summed in x's dtype, the block sums in float64.

    Eight times faster than ``x.sum(0, dtype=float64)`` on CPU for float32 data, with a relative error of a
    few float32 ulps of the column's magnitude; the HSIC formulas do not assume exact centring (a residual
    mean enters through the row sums K1 exactly), so this only moves rounding, never the estimator.
    """
    if x.dtype == F64:
        return x.sum(0)
    m = x.shape[0] // block * block
    out = x[:m].reshape(-1, block, x.shape[1]).sum(1).sum(0, dtype=F64) if m else torch.zeros(x.shape[1], dtype=F64, device=x.device)
    return out + x[m:].sum(0, dtype=F64)


def _center_into(mats: Sequence[torch.Tensor], dtype: torch.dtype, names: Sequence[str],
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Column-centre each matrix with float64 means into one (n, sum d) buffer; return it and per-model views.

    With row ``weights`` w (sum n), centre with the weighted mean and scale row a by sqrt(w_a), so that
    ``Xw^T Yw = X^T (W - w w^T / n) Y`` (a bootstrap resample as a reweighting).

    Raises:
        MetricError: a model's features are constant (every column has zero variance).
    """
    n = mats[0].shape[0]
    dims = [m.shape[1] for m in mats]
    buf = torch.empty(n, sum(dims), dtype=dtype, device=mats[0].device)
    views, off = [], 0
    for x, d, name in zip(mats, dims, names, strict=True):
        if torch.equal(x, x[:1].expand_as(x)):  # every row equal to the first: stops at the first difference
            raise MetricError(f"{name} has constant features (every column has zero variance); CKA is undefined.",
                              fix="drop that model or check that its encoder produced real embeddings.")
        view = buf[:, off:off + d]
        if weights is None:
            # float64 means; x - mu is exact where it matters (Sterbenz) and any sub-ulp residual mean is
            # handled exactly by the HSIC formula, which does not assume K is centred.
            mu = _column_sums(x) / n
            view.copy_(x).sub_(mu.to(dtype))
        else:
            w64 = weights.to(F64)
            mu = (w64 @ x.to(F64)) / w64.sum()
            sw = w64.sqrt()[:, None]
            for s in range(0, n, CHUNK_ROWS):
                view[s:s + CHUNK_ROWS] = (x[s:s + CHUNK_ROWS].to(F64) - mu) * sw[s:s + CHUNK_ROWS]
        views.append(buf[:, off:off + d])
        off += d
    return buf, views


def _power_of_two_scale(views: Sequence[torch.Tensor]) -> list[int]:
    """Scale each (centred) view in place by 2^e so that its max |value| lies in [0.5, 1); return the e's."""
    out = []
    for v in views:
        peak = float(v.abs().max())
        e = 0 if peak == 0.0 or not math.isfinite(peak) else -math.frexp(peak)[1]
        if e:
            v.mul_(2.0**e)
        out.append(e)
    return out


def _feature_stats(xc: Sequence[torch.Tensor], yc: Sequence[torch.Tensor], ybuf: torch.Tensor) -> _Stats:
    """Linear-kernel statistics from centred features: <K_i, L_j> = ||X_i^T Y_j||_F^2, no n x n matrix."""
    n = xc[0].shape[0]
    m, t = len(xc), len(yc)
    # yc are column slices of ybuf (n, Dy): one product per vision model covers every text model
    yoff = [0]
    for y in yc:
        yoff.append(yoff[-1] + y.shape[1])
    dev = xc[0].device
    cross = torch.zeros(m, t, dtype=F64, device=dev)
    self_ = torch.zeros(m + t, dtype=F64, device=dev)

    def gram_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Elementwise square of a^T b, the product accumulated over row chunks in float64."""
        if n <= CHUNK_ROWS:
            return (a.T @ b).square_()
        acc = torch.zeros(a.shape[1], b.shape[1], dtype=F64, device=dev)
        for s in range(0, n, CHUNK_ROWS):
            acc += (a[s:s + CHUNK_ROWS].T @ b[s:s + CHUNK_ROWS]).to(F64)
        return acc.square_()

    for i, x in enumerate(xc):
        colsq = _column_sums(gram_sq(x, ybuf))
        for j in range(t):
            cross[i, j] = colsq[yoff[j]:yoff[j + 1]].sum()
    for k, z in enumerate([*xc, *yc]):
        self_[k] = gram_sq(z, z).sum(dtype=F64)
    mats = [*xc, *yc]
    rows = torch.stack([(z @ z.sum(0, dtype=z.dtype)).to(F64) for z in mats])
    diag = torch.stack([z.square().sum(1, dtype=F64) for z in mats])
    return _Stats(cross, self_, rows, diag)


def rbf_tile(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor, gamma: float) -> torch.Tensor:
    """``exp(-gamma ||a_i - b_j||^2)`` for rows a, b with squared norms ``a_sq``, ``b_sq``: one product, the distance
    clamped at 0 (rounding), in the rows' dtype. Rows that are the same row get a distance of rounding size, not 0:
    callers that hold both set those entries themselves (1 for K, 0 for the off-diagonal part)."""
    return (a @ b.T).mul_(-2.0).add_(a_sq[:, None]).add_(b_sq[None, :]).clamp_min_(0).mul_(-gamma).exp_()


def kernel_tiles(zc: Sequence[torch.Tensor], kernel: Kernel, gammas: Sequence[float] | None,
                 tile: int) -> Iterator[tuple[int, int, int, int, list[torch.Tensor]]]:
    """Upper-triangle Gram tiles of every model: yields ``(a, ea, b, eb, [K_k[a:ea, b:eb] for k])``, b >= a.

    Linear kernel: ``z_a z_b^T``; RBF: ``exp(-gamma_k ||z_i - z_j||^2)`` with an exact 1 on the diagonal.
    Tiles stay in the features' dtype; callers promote to float64 before reducing. Never n x n.
    """
    n = zc[0].shape[0]
    sq = [z.square().sum(1) for z in zc] if kernel == "rbf" else None
    starts = list(range(0, n, tile))
    for a in starts:
        ea = min(a + tile, n)
        for b in starts:
            if b < a:
                continue
            eb = min(b + tile, n)
            tiles = []
            for k, z in enumerate(zc):
                if kernel == "rbf":
                    assert sq is not None and gammas is not None
                    g = rbf_tile(z[a:ea], sq[k][a:ea], z[b:eb], sq[k][b:eb], gammas[k])
                    if a == b:
                        g.fill_diagonal_(1.0)  # exactly exp(0)
                else:
                    g = z[a:ea] @ z[b:eb].T
                tiles.append(g)
            yield a, ea, b, eb, tiles


def _gram_stats(zc: Sequence[torch.Tensor], m: int, kernel: Kernel, gammas: Sequence[float] | None,
                tile: int | None) -> _Stats:
    """Statistics from Gram tiles: only upper-triangle tiles are formed (K is symmetric), never n x n.

    ``zc``: centred features of all models (xs first, m of them). Tile products run in the features' dtype;
    every tile is promoted to float64 before it is paired, so <K, L> sums and row sums are exact to float64
    and the centring cancellation in the formula is harmless.
    """
    n = zc[0].shape[0]
    nz = len(zc)
    dev = zc[0].device
    if tile is None:
        tile = max(256, int(math.sqrt(TILE_BYTES / (8 * nz))) // 128 * 128)
    tile = min(tile, n)
    gsum = torch.zeros(nz, nz, dtype=F64, device=dev)  # off-diagonal <K~_k, K~_l>
    rows_off = torch.zeros(nz, n, dtype=F64, device=dev)
    for a, ea, b, eb, tiles in kernel_tiles(zc, kernel, gammas, tile):
        stack = torch.empty(nz, (ea - a) * (eb - b), dtype=F64, device=dev)
        for k, g in enumerate(tiles):
            if a == b:
                g.fill_diagonal_(0)  # the diagonal is added back exactly below
            if kernel == "rbf":
                rows_off[k, a:ea] += g.sum(1, dtype=F64)
                if a != b:
                    rows_off[k, b:eb] += g.sum(0, dtype=F64)
            stack[k] = g.view(-1)
        del tiles
        # one float64 product gives every <K~_k, K~_l> on this tile (cross pairs and self terms)
        gsum.addmm_(stack, stack.T, alpha=1.0 if a == b else 2.0)
        del stack
    if kernel == "linear":
        diag = torch.stack([z.square().sum(1, dtype=F64) for z in zc])
        rows = torch.stack([(z @ z.sum(0)).to(F64) for z in zc])  # K1 = X (X^T 1), ~0 for centred X
        rows_off = rows - diag
    else:
        diag = torch.ones(nz, n, dtype=F64, device=dev)
        rows = rows_off + diag
    full = gsum + diag @ diag.T
    return _Stats(full[:m, m:].clone(), full.diagonal().clone(), rows, diag,
                  gsum[:m, m:].clone(), gsum.diagonal().clone(), rows_off)


def _pick_method(n: int, dx: Sequence[int], dy: Sequence[int]) -> str:
    """Feature form costs n (Dx Dy + sum d^2) multiply-adds; Gram tiles n^2/2 sum d (+ float64 pairing).

    The Gram-tile products count double: many (tile x tile x d) products, each tile then copied to float64
    and paired, ran at about half the rate of the feature form's few large products (CPU, n = 5,000,
    6 + 6 models of widths 384..1,536: feature 2.9 s, tiles 3.8 s for 1.6x fewer multiply-adds).
    """
    dsum = sum(dx) + sum(dy)
    feature = n * (sum(dx) * sum(dy) + sum(d * d for d in [*dx, *dy]))
    gram = 2 * (0.5 * n * n * dsum + n * n * (len(dx) * len(dy) + len(dx) + len(dy)))
    return "feature" if feature <= gram else "gram"


