"""Which measure predicts the probe? Every registered measure and every unimodal score against the read-out.

The predictors of a probe (:func:`predictor_columns`):

* **every pair measure** of :data:`pairscout.metrics.MEASURES`, not only those the rank run computed: the ones it
  left out (``svcca``, ``pwcca``, ``procrustes``, ``rsa``, ``cycle_knn``, ``matching``, ...) are computed for the
  probed pairs here (:func:`add_measures`) with :func:`pairscout.metrics.measure` on the cached embeddings, on the
  rows rank used (vision: one vector per row; text: the run's ``caption_reduce``) and with the run's options
  (k after small-data adaptation, clipping quantile, RBF bandwidth);
* **the unimodal scores** of both encoders of a pair (``vision_knn_acc``, ``text_nmi``, ..., from the rank run's
  ``models`` table, :func:`add_unimodal`): does a better encoder on its own make a better pair? (SAIL, fig. 2);
* the ranking ``score`` (with ``--score primary`` it repeats the primary measure: such a twin is kept out of
  the correction family and shares its twin's corrected p, :func:`duplicates`).

:func:`correlations` correlates each with the read-out across the probed pairs: Spearman rho and Kendall tau
(scipy.stats; two-sided p-values), an approximate 95 % interval of rho (Fisher z with the Bonett-Wright standard
error ``sqrt((1 + rho^2 / 2) / (n - 3))``, n >= 4, undefined at |rho| = 1), and **Holm's step-down correction**
across the predictors compared (``*_p_holm``; :func:`pairscout.statistics.holm`, the same correction rank
applies across pairs; statsmodels is not a dependency). Orientation: every predictor is read so that higher means
more similar / better; a measure whose registry record says ``direction="lower"`` is negated first (``direction``
column). The table is sorted by corrected strength: Holm-corrected Spearman p, then rho.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pairscout.metrics import registry
from pairscout.statistics import fisher_interval, spearman

ProgressFn = Callable[[str, int, int], None]

COLUMNS = ["metric", "label", "kind", "direction", "computed_by", "n_pairs", "spearman", "spearman_lo", "spearman_hi",
           "spearman_p", "spearman_p_holm", "kendall", "kendall_p", "kendall_p_holm", "answer"]  # fmt: skip
"""Columns of the correlation table (``probe_correlations.csv``), in order."""
STATS = ["spearman", "spearman_lo", "spearman_hi", "spearman_p", "spearman_p_holm", "kendall", "kendall_p", "kendall_p_holm"]
SIDES = ("vision", "text")
ALPHA = 0.05
CORRECTION = ("Holm step-down across the predictors compared (pairscout.statistics.holm); "
              "95 % interval of Spearman rho: Fisher z with the Bonett-Wright standard error")  # fmt: skip


def describe(name: str) -> dict[str, str]:
    """Label, kind and direction of a predictor column (a measure, ``<side>_<unimodal column>``, ``score``)."""
    if name in registry.MEASURES:
        rec = registry.MEASURES[name]
        return {"label": rec.label, "kind": "pair measure", "direction": rec.direction}
    side, _, col = name.partition("_")
    if side in SIDES and col in registry.UNIMODAL_LABELS:
        return {"label": f"{side} {registry.UNIMODAL_LABELS[col]}", "kind": f"{side} encoder alone", "direction": "higher"}
    if name == "score":
        return {"label": "ranking score", "kind": "ranking score", "direction": "higher"}
    return {"label": registry.label(name), "kind": "column", "direction": "higher"}


def measure_options(rank_meta: dict[str, Any]) -> dict[str, Any]:
    """The options rank's measures ran with (``k`` as adapted to small data, clipping, RBF bandwidth)."""
    from pairscout.metrics.knn import Preprocess

    st = rank_meta.get("settings", {})
    k = (rank_meta.get("adapted", {}).get("knn_k") or {}).get("used", st.get("knn_k", 10))
    return {"k": int(k), "preprocess": Preprocess(clip_quantile=st.get("clip_quantile")), "sigma_frac": float(st.get("rbf_sigma_frac", 1.0))}


def add_measures(chosen: pd.DataFrame, rows: Callable[[str, str], tuple[Any, Any]], options: dict[str, Any],
                 progress: ProgressFn | None = None) -> tuple[pd.DataFrame, dict[str, str]]:
    """``chosen`` with a column for every registered measure it lacks, computed per pair on ``rows(v, t)``
    (the two (n, d) embeddings rank compared); returns it and ``{measure: why}`` for measures that failed."""
    out = chosen.copy()
    missing = [m for m in registry.MEASURES if m not in out or out[m].isna().all()]
    failed: dict[str, str] = {}
    total = len(missing) * len(out)
    done = 0
    from pairscout.metrics.measures import shared_sides

    with shared_sides():  # each encoder's SVD once for every pair it is in (same values)
        done = _add(out, missing, rows, options, failed, progress, done, total)
    return out, failed


def _add(out: pd.DataFrame, missing: Sequence[str], rows: Callable[[str, str], tuple[Any, Any]], options: dict[str, Any],
         failed: dict[str, str], progress: ProgressFn | None, done: int, total: int) -> int:
    for m in missing:
        vals = []
        for v, t in zip(out["vision"], out["text"], strict=True):
            try:
                vals.append(registry.measure(m, *rows(str(v), str(t)), **options))
            except Exception as e:  # noqa: BLE001 - one measure that cannot run on this data must not stop the probe
                failed[m] = f"{type(e).__name__}: {e}"
                vals.append(float("nan"))
            done += 1
            if progress is not None:
                progress(f"measures not in the rank run: {registry.label(m)}", done, total)
        out[m] = vals
    return done


def rank_rows(src: Any) -> Callable[[str, str], tuple[Any, Any]]:
    """``rows(vision, text)``: the two cached embeddings of a :class:`~pairscout.align.pairdata.PairSource` as rank
    compared them: the rows (vision: one vector per row; text: per row by the run's ``caption_reduce``) and, after a
    layer sweep, the layers rank chose for that pair (``src.chosen_layers``) on the estimation rows rank measured
    them on (:func:`pairscout.ranking.layered.split_rows`); each view loaded once."""
    from pairscout.align.pairdata import load_embeddings
    from pairscout.ranking.layered import split_rows

    n = len(src.dataset)
    meta = src.rank.meta if src.rank is not None else {}
    reduce = meta.get("settings", {}).get("caption_reduce", "first")
    lm = meta.get("layers") or {}
    held = split_rows(n, lm["selection_rows"], lm["split_seed"])[1] if "split_seed" in lm else None
    memo: dict[tuple[str, str, str], Any] = {}

    def get(name: str, modality: str, layer: str) -> Any:
        if (name, modality, layer) not in memo:
            emb = load_embeddings(src, src.spec(name, modality))
            if layer != "final":
                emb = emb.layer(layer)
            z = emb.pooled if modality == "vision" else emb.per_row(n, reduce)
            memo[name, modality, layer] = z if held is None else z[held]
        return memo[name, modality, layer]

    def rows(v: str, t: str) -> tuple[Any, Any]:
        chosen = getattr(src, "chosen_layers", None)
        vl, tl = chosen(v, t) if chosen is not None else ("final", "final")
        return get(v, "vision", vl), get(t, "text", tl)

    return rows


def add_unimodal(chosen: pd.DataFrame, models: pd.DataFrame | None) -> pd.DataFrame:
    """``chosen`` with ``<side>_<column>`` for each unimodal quality column of the rank run that has a value."""
    out = chosen.copy()
    if models is None or models.empty or "name" not in models:
        return out
    for side in SIDES:
        own = models[models["modality"] == side].set_index("name") if "modality" in models else models.set_index("name")
        for col in registry.UNIMODAL_LABELS:
            if col in own and side in out:
                vals = pd.to_numeric(out[side].map(own[col]), errors="coerce")
                if vals.notna().sum() >= 3:  # fewer values cannot be correlated
                    out[f"{side}_{col}"] = vals
    return out


def predictor_columns(pairs: pd.DataFrame) -> list[str]:
    """Every predictor column present in ``pairs``: measures in registry order, unimodal scores, the ranking score."""
    cols = [m for m in registry.MEASURES if m in pairs]
    cols += [f"{s}_{c}" for s in SIDES for c in registry.UNIMODAL_LABELS if f"{s}_{c}" in pairs]
    return cols + (["score"] if "score" in pairs else [])


def _answer(rho: float, p: float, p_holm: float, lo: float = float("nan"), hi: float = float("nan")) -> str:
    """``yes`` / ``reversed`` (Holm-corrected p < 0.05), ``yes (uncorrected)`` / ``reversed (uncorrected)``, ``no``.

    A claim also needs the 95 % interval to stay on its side of 0 (where there is one): the test's p and the
    Fisher-z interval are different approximations, and a row reading "yes" beside an interval that crosses 0
    contradicts itself."""
    if not math.isfinite(rho):
        return "too few values"
    clear = not (math.isfinite(lo) and math.isfinite(hi)) or (lo > 0 if rho > 0 else hi < 0)
    if p_holm < ALPHA and clear:
        return "yes" if rho > 0 else "reversed"
    if p < ALPHA and clear:
        return "yes (uncorrected)" if rho > 0 else "reversed (uncorrected)"
    return "no"


def duplicates(pairs: pd.DataFrame, metrics: Sequence[str]) -> dict[str, str]:
    """``{column: earlier column with the same values}`` (e.g. ``score`` is the primary measure under ``--score primary``)."""
    seen: list[str] = []
    out: dict[str, str] = {}
    for m in metrics:
        if m not in pairs:
            continue
        twin = next((s for s in seen if pairs[m].equals(pairs[s])), None)
        if twin is None:
            seen.append(m)
        else:
            out[m] = twin
    return out


def correlations(pairs: pd.DataFrame, metrics: Sequence[str], target: str = registry.PROBE_TARGET, *,
                 computed_here: Sequence[str] = ()) -> pd.DataFrame:
    """Spearman and Kendall correlation of each predictor column with ``target``, intervals and Holm-corrected p.

    Rows with a NaN in either column are left out; fewer than 3 rows or a constant column give NaN. A score of one
    encoder alone (``vision_knn_acc``, ...) is correlated over the encoders, with each encoder's mean read-out over
    its probed pairs (``n_pairs`` then counts encoders): its pairs share one value and are not independent. Holm's family:
    every predictor with a p-value, except a column that repeats an earlier one (:func:`duplicates`), which takes
    its twin's corrected p; ``df.attrs["family_size"]`` says how many. ``computed_here``: predictors this probe
    computed (``computed_by`` column: ``probe``; the others ``rank run``). Sorted by corrected strength.
    """
    from scipy import stats

    from pairscout.statistics import holm

    rows = []
    for m in metrics:
        if m not in pairs:
            continue
        info = describe(m)
        side = m.partition("_")[0]
        if info["kind"] == f"{side} encoder alone" and side in pairs:
            # one value per encoder, repeated over its pairs: the encoders are the independent units, so it is
            # correlated with each encoder's mean read-out (9 pairs of 3 vision encoders are 3 points, not 9)
            sub = pairs[[side, m, target]].assign(**{m: pd.to_numeric(pairs[m], errors="coerce"),
                                                     target: pd.to_numeric(pairs[target], errors="coerce")}).dropna()
            sub = sub.groupby(side, sort=False)[[m, target]].mean().astype(float)
        else:
            sub = pairs[[m, target]].apply(pd.to_numeric, errors="coerce").astype(float).dropna()
        if info["direction"] == "lower":
            sub[m] = -sub[m]
        n = len(sub)
        rho = rho_p = tau = tau_p = float("nan")
        if n >= 3 and sub[m].nunique() > 1 and sub[target].nunique() > 1:
            rho, rho_p = spearman(sub[m].to_numpy(), sub[target].to_numpy())
            k = stats.kendalltau(sub[m], sub[target])
            tau, tau_p = float(k.statistic), float(k.pvalue)
        lo, hi = fisher_interval(rho, n)
        rows.append({"metric": m, **info, "direction": "higher" if info["direction"] == "higher" else "lower (negated)",
                     "computed_by": "probe" if m in computed_here else "rank run", "n_pairs": n, "spearman": rho, "spearman_lo": lo, "spearman_hi": hi, "spearman_p": rho_p,
                     "kendall": tau, "kendall_p": tau_p})  # fmt: skip
    df = pd.DataFrame(rows, columns=COLUMNS)
    twins = duplicates(pairs, list(df["metric"]))
    fam = ~df["metric"].isin(list(twins))
    for col in ("spearman", "kendall"):
        df[f"{col}_p_holm"] = float("nan")
        if fam.any():
            df.loc[fam, f"{col}_p_holm"] = holm(np.array(df.loc[fam, f"{col}_p"], dtype=float)).numpy()
        corrected = dict(zip(df["metric"], df[f"{col}_p_holm"], strict=True))
        df.loc[~fam, f"{col}_p_holm"] = [corrected[twins[m]] for m in df.loc[~fam, "metric"]]
    df["answer"] = [_answer(r, p, ph, lo, hi) for r, p, ph, lo, hi in
                    zip(df["spearman"], df["spearman_p"], df["spearman_p_holm"], df["spearman_lo"], df["spearman_hi"], strict=True)]
    out = sort(df)
    out.attrs["family_size"] = int((fam & df["spearman_p"].notna()).sum())
    return out




def sort(df: pd.DataFrame) -> pd.DataFrame:
    """By corrected strength: Holm-corrected Spearman p (NaN last), then rho (highest first)."""
    key = pd.DataFrame({"p": df["spearman_p_holm"].fillna(np.inf), "rho": -df["spearman"].fillna(-np.inf)})
    return df.loc[key.sort_values(["p", "rho"], kind="stable").index].reset_index(drop=True)


def blank(df: pd.DataFrame, order: Sequence[str] | None = None, answer: str = "probe at chance") -> pd.DataFrame:
    """The table with every statistic removed (a probe not above chance, or whose read-outs do not separate the pairs,
    correlates nothing), in ``order`` (the predictors' own order: sorted by p it would still rank noise)."""
    out = df.copy()
    if order is not None:
        pos = {m: i for i, m in enumerate(order)}
        out = out.iloc[sorted(range(len(out)), key=lambda i: pos.get(out["metric"].iloc[i], len(pos)))].reset_index(drop=True)
    out[STATS] = float("nan")
    out["answer"] = answer
    return out
