"""Similarity and quality metrics on embeddings: pure, device-agnostic functions on torch tensors (numpy too).

- :mod:`.cka` - linear / RBF CKA, biased and debiased, all pairs in one call, streaming (minibatch) CKA.
- :mod:`.knn` - mutual k-NN and CKNNA with explicit, recorded :class:`Preprocess`.
- :mod:`.quality` - weighted k-NN accuracy (DINO protocol) and k-means clustering quality.
- :mod:`.published` - published MTEB / ImageNet scores with their sources.
- :mod:`.registry` - :data:`MEASURES`: one record per pair measure (label, range, cost, null, interval,
  reference) and :func:`measure` to compute one by name.
- :mod:`.stats` - permutation null and bootstrap confidence intervals.

Degenerate input raises :class:`pairscout.errors.MetricError` with a one-line message and fix.
"""

from __future__ import annotations

from pairscout.metrics.cka import (
    HSICResult,
    StreamingCKA,
    all_pairs_cka,
    all_pairs_hsic,
    cka_from_grams,
    hsic,
    linear_cka,
    linear_gram,
    median_sigma,
    pair_cka,
    rbf_cka,
    rbf_gram,
)
from pairscout.metrics.knn import (
    Neighbours,
    Preprocess,
    all_pairs_cknna,
    all_pairs_mutual_knn,
    cknna,
    mutual_knn,
    mutual_knn_rows,
    nearest_neighbours,
)
from pairscout.metrics.published import (
    PublishedScore,
    mteb_tasks,
    published_mteb,
    published_scores,
    published_vision,
)
from pairscout.metrics.quality import clustering_quality, knn_accuracy
from pairscout.metrics.registry import MEASURES, Measure, measure
from pairscout.metrics.stats import (
    BootstrapCI,
    NullResult,
    bootstrap_ci,
    linear_cka_null_mean,
    pair_metric,
    permutation_null,
)

__all__ = [
    "MEASURES",
    "BootstrapCI",
    "HSICResult",
    "Measure",
    "Neighbours",
    "NullResult",
    "Preprocess",
    "PublishedScore",
    "StreamingCKA",
    "all_pairs_cka",
    "all_pairs_cknna",
    "all_pairs_hsic",
    "all_pairs_mutual_knn",
    "bootstrap_ci",
    "cka_from_grams",
    "cknna",
    "clustering_quality",
    "hsic",
    "knn_accuracy",
    "linear_cka",
    "linear_cka_null_mean",
    "linear_gram",
    "measure",
    "median_sigma",
    "mteb_tasks",
    "mutual_knn",
    "mutual_knn_rows",
    "nearest_neighbours",
    "pair_cka",
    "pair_metric",
    "permutation_null",
    "published_mteb",
    "published_scores",
    "published_vision",
    "rbf_cka",
    "rbf_gram",
]
