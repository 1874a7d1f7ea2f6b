"""Layer sweep: the best (vision layer, text layer) pair of two encoders, with the search corrected for.

platonic-rep searches every layer pair and keeps the maximum; ckatorch computes layer x layer matrices.
Taking a maximum over L_x x L_y candidates inflates the score: under independence the maximum of many null
values sits well above the null of one pair (Gröger, Wen, Brbić 2026 show much of the apparent convergence of
models goes away after such calibration). :func:`layer_sweep` therefore reports, beside the raw maximum,

* the **selection-corrected** calibration: the null distribution of the *maximum over all layer pairs*, from
  the same row permutations (one permutation of the caption rows is applied to every text layer at once,
  so the dependence between layers is kept), giving ``z_max = (max - mean(max_null)) / sd(max_null)`` and
  ``p_max = (1 + #{max_null >= max}) / (1 + permutations)``;
* the naive calibration of the chosen pair alone (``z_pair``, ``p_pair``), which ignores the search.

The score to rank by is the corrected excess over chance, ``excess_max = max - mean(max_null)``, which is
never above the naive ``max - mean(pair_null)``; near chance the corrected p-value is the honest one (a
per-pair test of the maximum of 20 independent pairs passes far more often than 5 %). For strong signals
``z_max`` can exceed ``z_pair`` (the maximum of many nulls is less spread than one), so z is reported, not
ranked by.

Statistic: biased linear CKA on the centred Gram matrices, ``<Kc, Lc> / (||Kc||_F ||Lc||_F)``. Permuting the
rows of y turns ``Lc`` into ``P Lc P^T``, so one permutation costs a gather and one (L_x, n^2) x (n^2, L_y)
product for all layer pairs; nothing is re-encoded. Memory is O((L_x + L_y) n^2): above ``max_rows`` rows a
seeded subset is used (and recorded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from pairscout.errors import MetricError
from pairscout.metrics.validate import ArrayLike, as_matrices, check_same_rows

F64 = torch.float64


@dataclass(frozen=True)
class LayerSweep:
    """Result of :func:`layer_sweep` (float64 values; layer positions index the lists passed in)."""

    cka: list[list[float]]
    """(L_x, L_y) linear CKA of every layer pair."""
    best: tuple[int, int]
    """Positions of the best pair in the x and y layer lists."""
    best_value: float
    """Raw maximum CKA (what a search that keeps the maximum reports)."""
    z_max: float
    """Selection-corrected calibrated score: (max - mean of the null maxima) / their SD."""
    p_max: float
    """Selection-corrected permutation p-value of the maximum."""
    z_pair: float
    """Naive calibrated score of the best pair alone, ignoring the search."""
    p_pair: float
    """Naive permutation p-value of the best pair alone."""
    excess_max: float
    """Selection-corrected excess over chance: max - mean of the null maxima (the score ranks use)."""
    excess_pair: float
    """Naive excess of the best pair over its own null mean (ignores the search; >= excess_max)."""
    null_max_mean: float
    null_max_sd: float
    permutations: int
    rows: int
    """Rows used (a seeded subset above ``max_rows``)."""
    layers_x: list[str] | None = None
    layers_y: list[str] | None = None

    @property
    def best_layers(self) -> tuple[str, str] | tuple[int, int]:
        """The chosen layers by name where names were given, else by position."""
        if self.layers_x and self.layers_y:
            return self.layers_x[self.best[0]], self.layers_y[self.best[1]]
        return self.best

    def to_dict(self) -> dict:
        return asdict(self)


def layer_sweep(xs: Sequence[ArrayLike], ys: Sequence[ArrayLike], permutations: int = 200, seed: int = 0,
                max_rows: int | None = 2000, layers_x: Sequence[str] | None = None,
                layers_y: Sequence[str] | None = None) -> LayerSweep:
    """Linear CKA of every (x layer, y layer) pair, the best pair, and its selection-corrected calibration.

    Args:
        xs, ys: per-layer embeddings of the same n rows (lists of (n, d_l) matrices).
        permutations: row permutations for both nulls (the same ones; p resolves to 1 / (permutations + 1)).
        seed: seeds the permutations and the row subset.
        max_rows: use a seeded subset of this many rows above it (memory (L_x + L_y) n^2 float64); None: all.
        layers_x, layers_y: names of the layers (reported with the result).

    Raises:
        MetricError: fewer than 4 rows, permutations < 1, mismatched rows or names, constant layers.
    """
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise MetricError(f"permutations={permutations!r} must be a positive int.", fix="use e.g. 200.")
    xt, yt = as_matrices(list(xs), "xs"), as_matrices(list(ys), "ys")
    yt = [y.to(xt[0].device) for y in yt]
    check_same_rows({"xs": xt, "ys": yt}, min_rows=4, why="a layer sweep")
    for names, mats, what in ((layers_x, xt, "layers_x"), (layers_y, yt, "layers_y")):
        if names is not None and len(names) != len(mats):
            raise MetricError(f"{what} names {len(names)} layers but {len(mats)} were given.",
                              fix="pass one name per layer.")
    sw = sweep_pairs([xt], [yt], debiased=False, permutations=permutations, seed=seed, max_rows=max_rows)
    best = sw.value[0][0]
    return LayerSweep(
        cka=sw.cka, best=sw.best[0][0], best_value=best, z_max=sw.z_max[0][0], p_max=sw.p_max[0][0],
        z_pair=sw.z_pair[0][0], p_pair=sw.p_pair[0][0], excess_max=sw.excess_max[0][0],
        excess_pair=best - sw.null_pair_mean[0][0],
        null_max_mean=sw.null_max_mean[0][0], null_max_sd=sw.null_max_sd[0][0], permutations=permutations, rows=sw.rows,
        layers_x=None if layers_x is None else list(layers_x), layers_y=None if layers_y is None else list(layers_y),
    )


# ----------------------------------------------------------------------------------------------------------
# Many encoders at once: every (vision view, text view) pair in one product per permutation
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairSweep:
    """Result of :func:`sweep_pairs` for A x B encoder pairs (numpy-free: nested lists of floats)."""

    cka: list[list[float]]
    """(V_x, V_y) CKA of every view pair (views of all encoders, in order; the sweep's rows)."""
    best: list[list[tuple[int, int]]]
    """(A, B): positions of the best view pair of each encoder pair within its encoders' view lists."""
    value: list[list[float]]
    """(A, B) the raw maximum over each encoder pair's view pairs."""
    null_max_mean: list[list[float]]
    null_max_sd: list[list[float]]
    z_max: list[list[float]]
    p_max: list[list[float]]
    """Selection-corrected permutation p-value of each encoder pair's maximum (resolves 1 / (permutations + 1))."""
    p_max_gumbel: list[list[float]]
    """The same tail from a Gumbel law fitted to the null maxima by their moments (extreme-value limit of a
    maximum; scale ``sd sqrt(6) / pi``, location ``mean - 0.5772 scale``): resolves p below 1 / (permutations + 1),
    as the gamma approximation does for one CKA value."""
    z_pair: list[list[float]]
    p_pair: list[list[float]]
    """Naive p-value of the chosen view pair alone (ignores the search)."""
    excess_max: list[list[float]]
    """max - mean of the null maxima: the selection-corrected excess over chance."""
    null_pair_mean: list[list[float]]
    """Mean of the chosen view pair's own null (the naive excess is value - this)."""
    permutations: int
    rows: int
    debiased: bool


def _view_stats(zs: Sequence[torch.Tensor], debiased: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per view: its Gram matrix of centred features (zero diagonal for the debiased estimator; unit
    Frobenius norm for the biased one), row sums, total sums, and HSIC(K, K) (debiased; 1 for biased)."""
    grams, rows, tots, selfs = [], [], [], []
    for z in zs:
        z = z.to(F64)
        z = z - z.mean(0)
        z = z / z.abs().max().clamp_min(torch.finfo(F64).tiny)  # scale first: 1e-20 or 1e20 data stay exact
        k = z @ z.T
        n = k.shape[0]
        if debiased:
            k.fill_diagonal_(0.0)
            r = k.sum(1)
            h = ((k * k).sum() + r.sum() ** 2 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (r @ r)) / (n * (n - 3))
            if float(h) <= 0:
                raise MetricError("a layer's debiased HSIC(K, K) is <= 0, so its debiased CKA is undefined.",
                                  fix="drop that layer from the sweep, or use more rows.")
        else:
            norm = torch.linalg.norm(k)
            if float(norm) == 0.0:
                raise MetricError("a layer's features are constant, so its CKA is undefined.", fix="drop that layer from the sweep.")
            k, r, h = k / norm, torch.zeros(n, dtype=F64, device=k.device), torch.ones((), dtype=F64, device=k.device)
        grams.append(k)
        rows.append(r)
        tots.append(r.sum())
        selfs.append(h)
    return torch.stack(grams), torch.stack(rows), torch.stack(tots), torch.stack(selfs)


def _gumbel_sf(x: torch.Tensor, mean: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """P(M >= x) for a Gumbel law with this mean and SD (method of moments); 0 / 1 where the SD is 0."""
    beta = sd * math.sqrt(6.0) / math.pi
    mu = mean - 0.5772156649015329 * beta
    z = (x - mu) / beta.clamp_min(1e-300)
    sf = -torch.expm1(-torch.exp(-z))  # 1 - exp(-exp(-z)), accurate in the far tail
    from pairscout.metrics.calibration import (
        P_FLOOR,  # a fitted tail, like the calibrated nulls': not read below the floor
    )

    return torch.where(sd > 0, sf.clamp(min=P_FLOOR), (x <= mean).to(F64))


def sweep_pairs(x_views: Sequence[Sequence[ArrayLike]], y_views: Sequence[Sequence[ArrayLike]], *, debiased: bool = False,
                permutations: int = 199, seed: int = 0, max_rows: int | None = 1000) -> PairSweep:
    """The best view pair of every (x encoder, y encoder) pair, with the selection-corrected null of the maximum.

    ``x_views[a]`` lists encoder a's views (its final features and the blocks of a layer sweep), each (n, d_l);
    the same for ``y_views[b]``. Statistic: linear CKA of centred features, biased
    (``<Kc, Lc> / (||Kc|| ||Lc||)``) or debiased (unbiased HSIC of Song et al. 2012, zero-diagonal Grams:
    ``[<K~, L~> + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) (K~1)'(L~1)] / (n(n-3))``, normalised by the self terms).

    One permutation of the y rows is applied to every y view at once (``L~ -> P L~ P'``, row sums ``-> P L~1``),
    and one (V_x, n^2) x (n^2, V_y) product gives every view pair's CKA under it; each encoder pair's null
    maximum is the maximum of its block. p = (1 + #{null max >= max}) / (1 + permutations) (Phipson & Smyth 2010).

    Args:
        max_rows: a seeded subset of this many rows above it (memory (V_x + V_y) n^2 float64); None: all rows.

    Raises:
        MetricError: fewer than 4 rows, permutations < 1, an encoder without views, a degenerate view.
    """
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise MetricError(f"permutations={permutations!r} must be a positive int.", fix="use e.g. 199.")
    if not x_views or not y_views or any(len(v) == 0 for v in (*x_views, *y_views)):
        raise MetricError("every encoder needs at least one view.", fix="pass each encoder's final features at least.")
    xt = [as_matrices(list(v), "x_views") for v in x_views]
    yt = [as_matrices(list(v), "y_views") for v in y_views]
    dev = xt[0][0].device
    flat_x, flat_y = [z for v in xt for z in v], [z.to(dev) for v in yt for z in v]
    n = check_same_rows({"x_views": flat_x, "y_views": flat_y}, min_rows=4 if debiased else 2, why="a layer sweep")
    if max_rows is not None and n > max_rows:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows].to(dev)
        flat_x, flat_y, n = [z[idx] for z in flat_x], [z[idx] for z in flat_y], max_rows
    kx, rx, sx, hx = _view_stats(flat_x, debiased)
    ky, ry, sy, hy = _view_stats(flat_y, debiased)
    fx = kx.reshape(len(flat_x), -1)
    denom = torch.sqrt(hx[:, None] * hy[None, :])
    const = sx[:, None] * sy[None, :] / ((n - 1) * (n - 2)) if debiased else None

    def cka(perm: torch.Tensor | None) -> torch.Tensor:
        k2 = ky if perm is None else ky[:, perm][:, :, perm]
        t = fx @ k2.reshape(k2.shape[0], -1).T
        if not debiased:
            return t
        r2 = ry if perm is None else ry[:, perm]
        return (t + const - 2.0 / (n - 2) * (rx @ r2.T)) / (n * (n - 3)) / denom

    ox = [0, *torch.tensor([len(v) for v in xt]).cumsum(0).tolist()]
    oy = [0, *torch.tensor([len(v) for v in yt]).cumsum(0).tolist()]
    obs = cka(None)
    A, B = len(xt), len(yt)
    best, value = [[(0, 0)] * B for _ in range(A)], torch.empty(A, B, dtype=F64)
    cells = torch.empty(A, B, 2, dtype=torch.long)
    for a in range(A):
        for b in range(B):
            block = obs[ox[a]:ox[a + 1], oy[b]:oy[b + 1]]
            i, j = divmod(int(torch.argmax(block)), block.shape[1])
            best[a][b], value[a, b], cells[a, b] = (i, j), block[i, j], torch.tensor([ox[a] + i, oy[b] + j])
    g = torch.Generator().manual_seed(seed + 1)
    null_max = torch.empty(permutations, A, B, dtype=F64)
    null_pair = torch.empty(permutations, A, B, dtype=F64)
    for p in range(permutations):
        m = cka(torch.randperm(n, generator=g).to(dev)).cpu()
        for a in range(A):
            null_max[p, a] = torch.stack([m[ox[a]:ox[a + 1], oy[b]:oy[b + 1]].max() for b in range(B)])
        null_pair[p] = m[cells[..., 0], cells[..., 1]]
    mm, sm = null_max.mean(0), null_max.std(0)
    mp, sp = null_pair.mean(0), null_pair.std(0)
    inf = torch.full_like(value, float("inf"))

    def tl(t: torch.Tensor) -> list[list[float]]:
        return t.tolist()

    return PairSweep(
        cka=obs.cpu().tolist(), best=best, value=tl(value), null_max_mean=tl(mm), null_max_sd=tl(sm),
        z_max=tl(torch.where(sm > 0, (value - mm) / sm.clamp_min(1e-300), inf)),
        p_max=tl((1 + (null_max >= value).sum(0)).double() / (1 + permutations)),
        p_max_gumbel=tl(_gumbel_sf(value, mm, sm)),
        z_pair=tl(torch.where(sp > 0, (value - mp) / sp.clamp_min(1e-300), inf)),
        p_pair=tl((1 + (null_pair >= value).sum(0)).double() / (1 + permutations)),
        excess_max=tl(value - mm), null_pair_mean=tl(mp), permutations=permutations, rows=n, debiased=debiased,
    )
