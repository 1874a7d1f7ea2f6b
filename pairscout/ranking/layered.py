"""Layer sweep inside ``rank``: each encoder pair scored at its best (vision layer, text layer), chosen on
rows that no reported number uses.

An encoder whose zoo entry has ``layers`` (or any encoder that can read hidden layers, under
``rank --layers``) has several *views*: its final features and the pooled output of each chosen block, all
from one forward pass and one cache entry. For every encoder pair:

1. **Split.** The rows are split once, seeded (:func:`split_rows`): ``min(layer_rows, n // 2)`` *selection*
   rows choose the layers; the other *estimation* rows measure them.
2. **Choice.** :func:`pairscout.metrics.layers.sweep_pairs` computes the primary statistic (linear CKA,
   debiased below 10,000 rows, as the primary metric) of every (vision view, text view) pair with one product
   for all views, on the selection rows, and keeps each encoder pair's best view pair.
3. **Every reported number** (all metrics, their intervals, their nulls and p-values, the verdict's paired
   tests) is computed on the chosen views **on the estimation rows**, by the usual all-pairs code (the distinct
   chosen views are the "models"). Because the choice never saw those rows, the maximum's winner's curse does
   not reach them: a pair with many layers is not ranked above a pair with one, nor declared distinguishably
   better, only because more layers were tried. Measured (``tests/test_rank_layers.py``, 100 seeded trials,
   240 rows): with 16 views of equal true CKA against one, scoring the maximum on the rows that chose it puts
   the many-view pair 0.014 ahead on average and the paired jackknife test calls it better in 17 of 100 trials
   (nominal: 2.5); scored on the held-out rows the gap is 0.002 +- 0.002 and the test calls it in 0.
4. **The search itself** is also calibrated on the selection rows: the same permutations of the caption rows,
   applied to every text view at once, give the null distribution of each encoder pair's *maximum*
   (``layer_z_max``, ``layer_p_max``: the tail of a Gumbel law fitted to the null maxima; ``layer_p_mc``: the
   Monte-Carlo p, which cannot go below 1 / (permutations + 1)). A maximum of many null values sits above one
   null value (Gröger, Wen & Brbić 2026 on the Platonic Representation Hypothesis); these columns say whether
   the search found more than the best of noise.

Columns added to the pairs table: ``vision_layer``, ``text_layer`` (``final`` or a 0-based block index),
``layers_searched`` (view pairs compared), ``layer_cka_selection`` (the maximum on the selection rows),
``layer_max_null`` (mean of the null maxima), ``layer_excess`` (maximum minus that mean), ``layer_z_max``,
``layer_p_max``, ``layer_p_mc``. ``rank.json["meta"]["layers"]`` holds the views, the row split and every view
pair's CKA on the selection rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from pairscout.errors import PairscoutError
from pairscout.estimation.engine import Engine
from pairscout.ranking.settings import RankSettings, parse_layers

FINAL = "final"
SWEEP_METRICS = ("cka_linear", "cka_linear_debiased")


def with_layers(specs: Sequence[Any], layers: str | None) -> tuple[list[Any], list[str]]:
    """``specs`` with ``layers`` set on every encoder that can read hidden layers and has none of its own
    (``rank --layers``); also the names of the encoders that cannot (they keep their final features only)."""
    from pairscout.encoders import can_sweep

    if layers is None:
        return list(specs), []
    value = parse_layers(layers)
    out, skipped = [], []
    for s in specs:
        if s.layers is None and s.layer is None and can_sweep(s):
            s = dataclasses.replace(s, layers=value)
        elif s.layers is None:
            skipped.append(s.name)
        out.append(s)
    return out, skipped


def views(emb: Any, n_rows: int | None = None, reduce: str = "first") -> list[tuple[str, torch.Tensor]]:
    """An encoder's views, final features first: ``[("final", X), ("3", X_3), ...]`` (text: one row per image)."""
    def row(t: torch.Tensor) -> torch.Tensor:
        return t if n_rows is None else emb.per_row(n_rows, reduce, values=t)

    out = [(FINAL, row(emb.pooled))]
    for name, t in sorted((emb.layers or {}).items(), key=lambda kv: int(kv[0])):
        out.append((name, row(t)))
    return out


@dataclass
class LayerChoice:
    """The chosen view of every encoder pair, and the distinct chosen views the metrics run on."""

    v_names: list[str]
    t_names: list[str]
    v_views: list[list[str]]
    t_views: list[list[str]]
    choice: list[list[tuple[int, int]]]
    """(A, B): positions of the chosen views in ``v_views[a]`` / ``t_views[b]``."""
    xs: list[torch.Tensor] = field(default_factory=list)
    """Distinct chosen vision views (the rows of every metric matrix computed on them)."""
    ys: list[torch.Tensor] = field(default_factory=list)
    ix: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=int))
    """(A, B) -> row of the chosen vision view in :attr:`xs`."""
    iy: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=int))
    sweep: Any = None
    selection_rows: int = 0
    """Rows the layers were chosen on (:func:`split_rows`)."""
    estimation_rows: int = 0
    """The other rows: every reported number is measured on them."""
    split_seed: int = 0
    engine: Any = None
    """Where the metrics on :attr:`xs` / :attr:`ys` run (:class:`~pairscout.estimation.engine.Engine`; sharded under
    torchrun over the estimation rows)."""

    def gather(self, values: dict[str, np.ndarray], reps: np.ndarray | None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Metric matrices over the chosen views (estimation rows) -> (A, B) matrices over encoder pairs, Holm
        re-done across the encoder pairs of the table, and the search's own columns (module docstring)."""
        from pairscout.statistics import holm

        out = {k: np.asarray(v)[self.ix, self.iy] for k, v in values.items()}
        for k in list(out):  # Holm across the encoder pairs of the table, not across every chosen-view pair
            if k.endswith("_p_holm") and k[: -len("_holm")] in out:
                p = out[k[: -len("_holm")]]
                out[k] = holm(p.ravel()).numpy().reshape(p.shape)
        sw = self.sweep
        searched = np.array([[len(a) * len(b) for b in self.t_views] for a in self.v_views])
        out["layers_searched"] = searched.astype(np.float64)
        out["layer_cka_selection"] = np.asarray(sw.value, dtype=np.float64)
        out["layer_max_null"] = np.asarray(sw.null_max_mean, dtype=np.float64)
        out["layer_excess"] = np.asarray(sw.excess_max, dtype=np.float64)
        out["layer_z_max"] = np.asarray(sw.z_max, dtype=np.float64)
        out["layer_p_max"] = np.asarray(sw.p_max_gumbel, dtype=np.float64)
        out["layer_p_mc"] = np.asarray(sw.p_max, dtype=np.float64)
        return out, (None if reps is None else reps[:, self.ix, self.iy])

    def annotate(self, pairs: pd.DataFrame) -> pd.DataFrame:
        """Add ``vision_layer`` / ``text_layer`` (after the names) to a pairs table."""
        vi, ti = {v: a for a, v in enumerate(self.v_names)}, {t: b for b, t in enumerate(self.t_names)}
        vl = [self.v_views[vi[v]][self.choice[vi[v]][ti[t]][0]] for v, t in zip(pairs["vision"], pairs["text"], strict=True)]
        tl = [self.t_views[ti[t]][self.choice[vi[v]][ti[t]][1]] for v, t in zip(pairs["vision"], pairs["text"], strict=True)]
        pairs = pairs.copy()
        pairs.insert(pairs.columns.get_loc("text") + 1, "vision_layer", vl)
        pairs.insert(pairs.columns.get_loc("vision_layer") + 1, "text_layer", tl)
        pairs["layers_searched"] = pairs["layers_searched"].astype(int)
        return pairs

    def meta(self) -> dict[str, Any]:
        sw = self.sweep
        cka = np.asarray(sw.cka)
        ox = np.cumsum([0, *[len(v) for v in self.v_views]])
        oy = np.cumsum([0, *[len(v) for v in self.t_views]])
        return {
            "statistic": "cka_linear_debiased" if sw.debiased else "cka_linear",
            "rows": sw.rows, "selection_rows": self.selection_rows, "estimation_rows": self.estimation_rows,
            "split_seed": self.split_seed, "permutations": sw.permutations,
            "views": {**dict(zip(self.v_names, self.v_views, strict=True)), **dict(zip(self.t_names, self.t_views, strict=True))},
            "cka": {f"{v} x {t}": cka[ox[a]:ox[a + 1], oy[b]:oy[b + 1]].round(6).tolist()
                    for a, v in enumerate(self.v_names) for b, t in enumerate(self.t_names)},
        }


MIN_SPLIT_ROWS = 8


def split_rows(n: int, layer_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint (selection, estimation) row indices of a layer sweep, each sorted: the layers are chosen
    on ``min(layer_rows, n // 2)`` rows and every reported number is measured on the others.

    Raises:
        PairscoutError: fewer than :data:`MIN_SPLIT_ROWS` rows (4 to choose on, 4 to measure on).
    """
    if n < MIN_SPLIT_ROWS:
        raise PairscoutError(f"a layer sweep chooses layers on half of the rows and measures them on the other half; "
                             f"{n} rows are too few (it needs {MIN_SPLIT_ROWS}).",
                             fix="rank more rows (--n), or leave out --layers.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    s = min(layer_rows, n // 2)
    return perm[:s].sort().values, perm[s:].sort().values


def choose(x_views: list[list[tuple[str, torch.Tensor]]], y_views: list[list[tuple[str, torch.Tensor]]],
           v_names: Sequence[str], t_names: Sequence[str], primary: str, settings: RankSettings,
           engine: Engine | None = None) -> LayerChoice:
    """Split the rows (:func:`split_rows`), run the sweep (:func:`~pairscout.metrics.layers.sweep_pairs`) on the
    selection rows and collect the distinct chosen views on the estimation rows (:attr:`LayerChoice.xs` /
    :attr:`LayerChoice.ys`, the matrices every metric then reads).

    ``engine`` sharded (torchrun): the views are this process's rows; the selection rows (at most
    ``layer_rows`` per view) are gathered on every process, which all run the same sweep, and each process keeps
    its own estimation rows, a contiguous block of the estimation rows in rank order
    (:attr:`LayerChoice.engine` shards the metrics over them)."""
    from pairscout.metrics.layers import sweep_pairs

    if primary not in SWEEP_METRICS:
        raise PairscoutError(f"a layer sweep chooses layers by linear CKA, but the primary metric is {primary!r}.",
                             fix="pass --primary cka_linear or cka_linear_debiased with --layers.")
    sharded = engine is not None and engine.sharded
    n = engine.n if sharded else x_views[0][0][1].shape[0]
    split_seed = settings.seed + 7
    sel, held = split_rows(n, settings.layer_rows, split_seed)
    if sharded:
        from pairscout.metrics import sharded_rows as R

        counts = R.shard_counts(x_views[0][0][1].shape[0], x_views[0][0][1].device)
        is_held = torch.zeros(n, dtype=torch.bool)
        is_held[held] = True
        mine = is_held[engine.lo:engine.hi]
        lo = int(is_held[:engine.lo].sum())
        est_engine = dataclasses.replace(engine, n=len(held), lo=lo, hi=lo + int(mine.sum()))

        def selected(t: torch.Tensor) -> torch.Tensor:  # every selection row, on every process
            return R.gather_rows(t, sel, counts)

        def estimated(t: torch.Tensor) -> torch.Tensor:  # this process's estimation rows
            return t[mine.to(t.device)]
    else:
        est_engine = engine

        def selected(t: torch.Tensor) -> torch.Tensor:
            return t[sel.to(t.device)]

        def estimated(t: torch.Tensor) -> torch.Tensor:
            return t[held.to(t.device)]

    sw = sweep_pairs([[selected(t) for _, t in v] for v in x_views], [[selected(t) for _, t in v] for v in y_views],
                     debiased=primary == "cka_linear_debiased", permutations=max(settings.permutations, 19),
                     seed=settings.seed + 8, max_rows=None)
    lc = LayerChoice(list(v_names), list(t_names), [[k for k, _ in v] for v in x_views], [[k for k, _ in v] for v in y_views],
                     sw.best, sweep=sw, selection_rows=len(sel), estimation_rows=len(held), split_seed=split_seed,
                     engine=est_engine)
    xkeys = list(dict.fromkeys((a, i) for a, row in enumerate(sw.best) for i, _ in row))
    ykeys = list(dict.fromkeys((b, j) for row in sw.best for b, (_, j) in enumerate(row)))
    lc.xs = [estimated(x_views[a][i][1]) for a, i in xkeys]
    lc.ys = [estimated(y_views[b][j][1]) for b, j in ykeys]
    xpos, ypos = {k: r for r, k in enumerate(xkeys)}, {k: r for r, k in enumerate(ykeys)}
    A, B = len(v_names), len(t_names)
    lc.ix = np.array([[xpos[(a, sw.best[a][b][0])] for b in range(B)] for a in range(A)], dtype=int)
    lc.iy = np.array([[ypos[(b, sw.best[a][b][1])] for b in range(B)] for a in range(A)], dtype=int)
    return lc


__all__ = ["FINAL", "MIN_SPLIT_ROWS", "LayerChoice", "choose", "split_rows", "views", "with_layers"]
