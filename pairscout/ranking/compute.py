"""The numbers of a ranking: pair metrics with uncertainty, and unimodal quality per model.

A thin layer over :mod:`pairscout.metrics` (pure functions) that decides which estimator gets a
jackknife interval and a permutation null, and turns everything into plain columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pairscout import metrics as M
from pairscout.errors import PairscoutError
from pairscout.metrics import registry
from pairscout.ranking.engine import Engine, plain
from pairscout.zoo.spec import EncoderSpec

if TYPE_CHECKING:
    from pairscout.ranking.core import RankSettings

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


def _kwargs(metric: str, settings: RankSettings) -> dict[str, Any]:
    """The options of ``metric`` (per its registry record) from the run's settings."""
    opts = {"k": settings.knn_k, "preprocess": M.Preprocess(clip_quantile=settings.clip_quantile), "sigma_frac": settings.rbf_sigma_frac}
    kw = registry.get(metric).kwargs(opts)
    if metric.startswith("cka_") and getattr(settings, "precision", "auto") not in (None, "auto"):
        kw["precision"] = settings.precision  # the CKA products' precision (rank resolves "auto" per device)
    return kw


def jackknife_ci(
    xs: list[torch.Tensor], ys: list[torch.Tensor], metric: str, *, groups: int = 10, level: float = 0.95, seed: int = 0,
    progress: Callable[[int, int], None] | None = None, engine: Engine | None = None, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Estimate, normal-theory interval and standard error of a pair metric by the delete-a-group jackknife.

    The rows are split into ``groups`` seeded random groups; each replicate leaves one group out
    (no row is ever duplicated, so this is valid for the debiased, U-statistic estimators and for
    CKNNA, which a with-replacement bootstrap breaks, and it does not inherit the upward shift that
    duplicated rows give biased CKA). ``se^2 = (G-1)/G * sum_g (theta_(g) - mean)^2``;
    interval ``theta_hat +- z_(1+level)/2 * se``. ``progress(done, total)`` after each evaluation.
    ``engine``: the device / row shard the evaluations run on (:mod:`pairscout.ranking.engine`; default: one
    process, where the tensors are); the groups are drawn over the global rows.
    """
    eng = engine or plain(xs[0].device)
    n = eng.n if eng.sharded else xs[0].shape[0]
    est = eng.value(metric, xs, ys, **kw)
    g = torch.Generator().manual_seed(seed)
    parts = torch.randperm(n, generator=g).chunk(groups)
    total = 1 + len(parts)
    if progress is not None:
        progress(1, total)
    reps = []
    for i, part in enumerate(parts):
        keep = torch.ones(n, dtype=torch.bool)
        keep[part] = False
        reps.append(eng.value(metric, xs, ys, keep, **kw))
        if progress is not None:
            progress(i + 2, total)
    r = torch.stack(reps)
    se = ((len(parts) - 1) / len(parts) * ((r - r.mean(0)) ** 2).sum(0)).sqrt()
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return est, est - z * se, est + z * se, se


def pair_metrics(
    xs: list[torch.Tensor], ys: list[torch.Tensor], metrics: Sequence[str], settings: RankSettings, primary: str | None = None,
    progress: Callable[[str, int, int], None] | None = None, engine: Engine | None = None,
) -> dict[str, np.ndarray]:
    """``{metric: (m, t)}`` plus ``<metric>_lo/_hi/_se`` (jackknife interval) and, for the primary
    metric, ``_null`` (mean under shuffled pairings) and ``_p`` (permutation p-value).

    ``progress(phase, done, total)``: phases ``"<label>: value + interval"`` and ``"<label>: null"``."""
    out: dict[str, np.ndarray] = {}

    def phase(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    for i, metric in enumerate(metrics):
        kw = _kwargs(metric, settings)
        seed = settings.seed + 1000 * i
        label = registry.label(metric)
        if settings.ci_groups > 1:
            est, lo, hi, se = jackknife_ci(xs, ys, metric, groups=settings.ci_groups, seed=seed, progress=phase(f"{label}: value + interval"),
                                           engine=engine, **kw)
            out[metric], out[f"{metric}_lo"], out[f"{metric}_hi"], out[f"{metric}_se"] = est.numpy(), lo.numpy(), hi.numpy(), se.numpy()
        else:
            out[metric] = (engine or plain(xs[0].device)).value(metric, xs, ys, **kw).numpy()
            if progress is not None:
                progress(f"{label}: value", 1, 1)
        if settings.permutations > 0 and metric == (primary or metrics[0]):
            null = M.permutation_null(xs, ys, metric, n_perm=settings.permutations, seed=seed, progress=phase(f"{label}: null"), **kw)
            out[f"{metric}_null"] = null.null_mean.numpy()
            out[f"{metric}_p"] = null.p_value.numpy()
    return out


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
