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

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from pairscout.errors import MetricError
from pairscout.metrics._validate import ArrayLike, as_matrices, check_same_rows

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


def _centred_grams(zs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(L, n, n) double-centred linear Gram matrices, each scaled to unit Frobenius norm."""
    out = []
    for z in zs:
        z = z.to(F64)
        z = z - z.mean(0)
        z = z / z.abs().max().clamp_min(torch.finfo(F64).tiny)  # scale first: 1e-20 or 1e20 data stay exact
        k = z @ z.T  # centred columns -> K is already double-centred
        norm = torch.linalg.norm(k)
        if float(norm) == 0.0:
            raise MetricError("a layer's features are constant, so its CKA is undefined.",
                              fix="drop that layer from the sweep.")
        out.append(k / norm)
    return torch.stack(out)


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
    n = check_same_rows({"xs": xt, "ys": yt}, min_rows=4, why="a layer sweep")
    for names, mats, what in ((layers_x, xt, "layers_x"), (layers_y, yt, "layers_y")):
        if names is not None and len(names) != len(mats):
            raise MetricError(f"{what} names {len(names)} layers but {len(mats)} were given.",
                              fix="pass one name per layer.")
    if max_rows is not None and n > max_rows:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows].to(xt[0].device)
        xt, yt, n = [x[idx] for x in xt], [y[idx] for y in yt], max_rows
    kx, ky = _centred_grams(xt), _centred_grams(yt)
    lx, ly = kx.shape[0], ky.shape[0]
    fx, fy = kx.reshape(lx, -1), ky.reshape(ly, -1)
    obs = fx @ fy.T  # (L_x, L_y): unit-norm centred Grams, so the inner product is CKA
    g = torch.Generator().manual_seed(seed + 1)
    null = torch.empty(permutations, lx, ly, dtype=F64, device=kx.device)
    for p in range(permutations):
        perm = torch.randperm(n, generator=g).to(kx.device)
        null[p] = fx @ ky[:, perm][:, :, perm].reshape(ly, -1).T
    flat = int(torch.argmax(obs))
    bi, bj = divmod(flat, ly)
    best = float(obs[bi, bj])
    null_max = null.flatten(1).max(1).values
    sd_max = float(null_max.std())
    pair_null = null[:, bi, bj]
    sd_pair = float(pair_null.std())
    return LayerSweep(
        cka=obs.cpu().tolist(), best=(bi, bj), best_value=best,
        z_max=(best - float(null_max.mean())) / sd_max if sd_max > 0 else float("inf"),
        p_max=(1 + int((null_max >= best).sum())) / (1 + permutations),
        z_pair=(best - float(pair_null.mean())) / sd_pair if sd_pair > 0 else float("inf"),
        p_pair=(1 + int((pair_null >= best).sum())) / (1 + permutations),
        excess_max=best - float(null_max.mean()), excess_pair=best - float(pair_null.mean()),
        null_max_mean=float(null_max.mean()), null_max_sd=sd_max, permutations=permutations, rows=n,
        layers_x=None if layers_x is None else list(layers_x), layers_y=None if layers_y is None else list(layers_y),
    )
