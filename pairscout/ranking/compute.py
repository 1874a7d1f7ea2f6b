"""The numbers of a ranking: pair metrics with uncertainty, and unimodal quality per model.

A thin layer over :mod:`pairscout.estimation` (one pass: values, jackknife replicates, nulls) and
:mod:`pairscout.metrics` (unimodal scores).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pairscout import metrics as M
from pairscout.errors import PairscoutError
from pairscout.estimation import Engine, estimate
from pairscout.metrics import registry
from pairscout.zoo.spec import EncoderSpec

if TYPE_CHECKING:
    from pairscout.ranking.settings import RankSettings

DEFAULT_METRICS: tuple[str, ...] = registry.DEFAULT_MEASURES
"""Kept for imports; the registry (:mod:`pairscout.metrics.registry`) owns the list."""
UNIMODAL_COLUMNS = list(registry.UNIMODAL_LABELS)


def check_metrics(metrics: Sequence[str], n: int, knn_k: int = 10) -> None:
    """Refuse unknown metrics and a dataset too small for the chosen estimators, before any encoding."""
    unknown = [m for m in metrics if m not in registry.MEASURES]
    if unknown:
        raise PairscoutError(f"unknown metric(s) {', '.join(unknown)}.", fix=f"choose from {registry.names_help()}.")
    recs = [registry.get(m) for m in metrics]
    if any(r.min_rows >= 4 and r.name.endswith("_debiased") for r in recs) and n < 4:
        raise PairscoutError(f"the debiased CKA estimator needs at least 4 rows; the dataset has {n}.", fix="use more data (--n), or drop the *_debiased metrics.")
    if n < 2:
        raise PairscoutError(f"CKA needs at least 2 rows; the dataset has {n}.", fix="use more data.")
    if any("k" in r.options for r in recs) and n <= knn_k + 1:
        raise PairscoutError(f"mutual k-NN with k = {knn_k} needs more than {knn_k + 1} rows; the dataset has {n}.", fix="lower --knn-k or use more data.")


def jackknife_ci(
    xs: list[torch.Tensor], ys: list[torch.Tensor], metric: str, *, groups: int = 10, level: float = 0.95, seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None, engine: Engine | None = None, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Estimate, normal-theory interval and standard error of a pair metric by the delete-a-group jackknife.

    The rows are split into ``groups`` seeded random groups (:func:`pairscout.estimation.jackknife_groups`); each
    replicate leaves one group out (no row is ever duplicated, so this is valid for the debiased, U-statistic
    estimators and for CKNNA, which a with-replacement bootstrap breaks, and it does not inherit the upward shift
    that duplicated rows give biased CKA). ``se^2 = (G-1)/G * sum_g (theta_(g) - mean)^2``; interval
    ``theta_hat +- z_(1+level)/2 * se``. The replicates come from one pass (:func:`pairscout.estimation.estimate`).
    ``kw``: the metric's options (``k``, ``preprocess``, ``sigma_frac``).
    """
    est = estimate(xs, ys, [metric], groups=groups, seed=seed, permutations=0, options={metric: kw}, engine=engine,
                   progress=progress)
    lo, hi, se = est.interval(metric, level)
    return est.values[metric], lo, hi, se


def pair_metrics(
    xs: list[torch.Tensor], ys: list[torch.Tensor], metrics: Sequence[str], settings: RankSettings, primary: str | None = None,
    progress: Callable[[str, int, int], None] | None = None, engine: Engine | None = None,
) -> dict[str, np.ndarray]:
    """Every column ``rank`` reports for ``metrics`` (values, jackknife intervals, calibrated nulls): the columns of
    one :func:`pairscout.estimation.estimate` pass with the run's settings (``primary`` first when given)."""
    names = list(dict.fromkeys([primary, *metrics])) if primary else list(metrics)
    return estimate(xs, ys, names, groups=settings.ci_groups, seed=settings.seed, permutations=settings.permutations,
                    null_method=settings.null_method, options={m: settings.metric_options(m) for m in names},
                    engine=engine, progress=progress).columns()


def unimodal(spec: EncoderSpec, emb: torch.Tensor, labels: np.ndarray | None, settings: RankSettings) -> dict[str, Any]:
    """One model's row: k-NN accuracy and clustering against the labels (when present), published score."""
    row: dict[str, Any] = {
        "name": spec.name, "id": spec.id, "modality": spec.modality, "dim": int(emb.shape[1]),
        "params_m": spec.params_m, "revision": spec.revision,
    }
    counts = np.unique(labels, return_counts=True)[1] if labels is not None else np.array([])
    if len(counts) > 1 and counts.max() > 1:  # labels that group rows (one label per row is an id, not a class)
        n_cls = len(counts)
        k = min(20, max(1, len(labels) // (2 * n_cls)))
        row["knn_acc"] = M.knn_accuracy(emb, labels, k=k, seed=settings.seed)
        row["knn_k"] = k
        cq = M.clustering_quality(emb, labels, seed=settings.seed)
        row.update({"nmi": cq.get("nmi"), "ari": cq.get("ari"), "silhouette": cq.get("silhouette")})
    pub = M.published_mteb(spec.id) if spec.modality == "text" else M.published_vision(spec.id, "knn")
    row["published_score"] = pub.score if pub else math.nan
    row["published_metric"] = pub.metric if pub else "no published score"
    row["published_source"] = pub.source if pub else ""
    return row
