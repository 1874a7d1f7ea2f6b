"""Similarity and quality metrics on embeddings: pure, device-agnostic functions on torch tensors (numpy too).

- :mod:`.cka` - linear / RBF CKA, biased and debiased, all pairs in one call; :mod:`.cka_pair` - one pair,
  Gram form, streaming (minibatch) CKA.
- :mod:`.knn` - mutual k-NN and CKNNA with explicit, recorded :class:`Preprocess`.
- :mod:`.quality` - weighted k-NN accuracy (DINO protocol) and k-means clustering quality.
- :mod:`.published` - published MTEB / ImageNet scores with their sources.
- :mod:`.registry` - :data:`MEASURES`: one record per pair measure (label, range, cost, null, interval,
  reference), :func:`pair_metric`, the one function that computes a measure by name (all pairs; one process or
  row-sharded per its engine), and :func:`measure` (one pair).
- :mod:`.stats` - permutation null and bootstrap confidence intervals.

Names are imported lazily (PEP 562). Degenerate input raises :class:`pairscout.errors.MetricError` with a one-line message and fix.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BootstrapCI": "stats",
    "HSICResult": "cka",
    "MEASURES": "registry",
    "Measure": "registry",
    "Neighbours": "knn",
    "NullResult": "stats",
    "Preprocess": "knn",
    "PublishedScore": "published",
    "StreamingCKA": "cka_pair",
    "all_pairs_cka": "cka",
    "all_pairs_cknna": "knn",
    "all_pairs_hsic": "cka",
    "all_pairs_mutual_knn": "knn",
    "bootstrap_ci": "stats",
    "cka_from_grams": "cka_pair",
    "cknna": "knn",
    "clustering_quality": "quality",
    "hsic": "cka_pair",
    "knn_accuracy": "quality",
    "linear_cka": "cka_pair",
    "linear_cka_null_mean": "stats",
    "linear_gram": "cka",
    "measure": "registry",
    "median_sigma": "cka",
    "mteb_tasks": "published",
    "mutual_knn": "knn",
    "mutual_knn_rows": "knn",
    "nearest_neighbours": "knn",
    "pair_cka": "cka_pair",
    "pair_metric": "registry",
    "permutation_null": "stats",
    "published_mteb": "published",
    "published_scores": "published",
    "published_vision": "published",
    "rbf_cka": "cka_pair",
    "rbf_gram": "cka",
}
"""Name -> submodule. Imported lazily (PEP 562): reading the registry does not import torch."""

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


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pairscout.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pairscout.metrics.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
