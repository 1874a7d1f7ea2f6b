"""Layer sweep inside ``rank``: each encoder pair scored at its best (vision layer, text layer), corrected for the search.

An encoder whose zoo entry has ``layers`` (or any encoder that can read hidden layers, under
``rank --layers``) has several *views*: its final features and the pooled output of each chosen block, all
from one forward pass and one cache entry. For every encoder pair:

1. **Choice.** :func:`pairscout.metrics.layers.sweep_pairs` computes the primary statistic (linear CKA,
   debiased below 10,000 rows, as the primary metric) of every (vision view, text view) pair with one product
   for all views, on ``layer_rows`` rows, and keeps each encoder pair's best view pair.
2. **Correction.** The same permutations of the caption rows, applied to every text view at once, give the
   null distribution of each encoder pair's *maximum*; ``<primary>_z``, ``<primary>_p`` and
   ``<primary>_p_holm`` (Holm across pairs) then come from it, not from the chosen pair's own null, which would
   ignore the search (the naive values are kept as ``<primary>_p_naive`` and ``<primary>_z_naive``). p is the
   tail of a Gumbel law fitted to the null maxima (``layer_p_mc``: the Monte-Carlo p, which cannot go below
   1 / (permutations + 1)); a pair with one view on each side keeps its usual closed-form calibration. A maximum
   of many null values sits above one null value, so a pair that only looks good because many layers were
   tried stays near chance (Gröger, Wen & Brbić 2026 on the Platonic Representation Hypothesis).
3. **Every other number** (all metrics, their intervals and nulls, the verdict's paired tests) is computed on
   the chosen views, on all rows, by the usual all-pairs code: the distinct chosen views are the "models".

Columns added to the pairs table: ``vision_layer``, ``text_layer`` (``final`` or a 0-based block index),
``layers_searched`` (view pairs compared), ``layer_max_null`` (mean of the null maxima) and ``layer_excess``
(maximum minus that mean). ``rank.json["meta"]["layers"]`` holds the views and every view pair's CKA.
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

    def gather(self, values: dict[str, np.ndarray], reps: np.ndarray | None, primary: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Metric matrices over the chosen views -> (A, B) matrices over encoder pairs; the primary metric's
        z / p / Holm p replaced by the selection-corrected ones (naive kept as ``_z_naive`` / ``_p_naive``)."""
        from pairscout.metrics.calibration import holm

        out = {k: np.asarray(v)[self.ix, self.iy] for k, v in values.items()}
        for k in list(out):  # Holm across the encoder pairs of the table, not across every chosen-view pair
            if k.endswith("_p_holm") and k[: -len("_holm")] in out:
                p = out[k[: -len("_holm")]]
                out[k] = holm(p.ravel()).numpy().reshape(p.shape)
        sw = self.sweep
        for k in (f"{primary}_z", f"{primary}_p"):
            if k in out:
                out[f"{k}_naive"] = out[k]
        searched = np.array([[len(a) * len(b) for b in self.t_views] for a in self.v_views])
        swept = searched > 1  # a pair with one view each has no search to correct: its usual null stays
        naive_p = out.get(f"{primary}_p", np.full(searched.shape, np.nan))
        out[f"{primary}_z"] = np.where(swept, np.asarray(sw.z_max, dtype=np.float64), out.get(f"{primary}_z", np.nan))
        out[f"{primary}_p"] = p = np.where(swept, np.asarray(sw.p_max_gumbel, dtype=np.float64), naive_p)
        out["layer_p_mc"] = np.asarray(sw.p_max, dtype=np.float64)
        out[f"{primary}_p_holm"] = holm(p.ravel()).numpy().reshape(p.shape)
        out["layer_max_null"] = np.asarray(sw.null_max_mean, dtype=np.float64)
        out["layer_excess"] = np.asarray(sw.excess_max, dtype=np.float64)
        out["layers_searched"] = searched.astype(np.float64)
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
            "rows": sw.rows, "permutations": sw.permutations,
            "views": {**dict(zip(self.v_names, self.v_views, strict=True)), **dict(zip(self.t_names, self.t_views, strict=True))},
            "cka": {f"{v} x {t}": cka[ox[a]:ox[a + 1], oy[b]:oy[b + 1]].round(6).tolist()
                    for a, v in enumerate(self.v_names) for b, t in enumerate(self.t_names)},
        }


def choose(x_views: list[list[tuple[str, torch.Tensor]]], y_views: list[list[tuple[str, torch.Tensor]]],
           v_names: Sequence[str], t_names: Sequence[str], primary: str, settings: RankSettings) -> LayerChoice:
    """Run the sweep (:func:`~pairscout.metrics.layers.sweep_pairs`) and collect the distinct chosen views."""
    from pairscout.metrics.layers import sweep_pairs

    if primary not in SWEEP_METRICS:
        raise PairscoutError(f"a layer sweep chooses layers by linear CKA, but the primary metric is {primary!r}.",
                             fix="pass --primary cka_linear or cka_linear_debiased with --layers.")
    sw = sweep_pairs([[t for _, t in v] for v in x_views], [[t for _, t in v] for v in y_views],
                     debiased=primary == "cka_linear_debiased", permutations=max(settings.permutations, 19),
                     seed=settings.seed + 7, max_rows=settings.layer_rows)
    lc = LayerChoice(list(v_names), list(t_names), [[n for n, _ in v] for v in x_views], [[n for n, _ in v] for v in y_views],
                     sw.best, sweep=sw)
    xkeys = list(dict.fromkeys((a, i) for a, row in enumerate(sw.best) for i, _ in row))
    ykeys = list(dict.fromkeys((b, j) for row in sw.best for b, (_, j) in enumerate(row)))
    lc.xs = [x_views[a][i][1] for a, i in xkeys]
    lc.ys = [y_views[b][j][1] for b, j in ykeys]
    xpos, ypos = {k: r for r, k in enumerate(xkeys)}, {k: r for r, k in enumerate(ykeys)}
    A, B = len(v_names), len(t_names)
    lc.ix = np.array([[xpos[(a, sw.best[a][b][0])] for b in range(B)] for a in range(A)], dtype=int)
    lc.iy = np.array([[ypos[(b, sw.best[a][b][1])] for b in range(B)] for a in range(A)], dtype=int)
    return lc


__all__ = ["FINAL", "LayerChoice", "choose", "views", "with_layers"]
