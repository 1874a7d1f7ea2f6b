"""Unimodal quality of one encoder's embeddings: weighted k-NN accuracy and clustering quality.

* Weighted k-NN (DINO ``eval_knn.py`` protocol): L2-normalise, cosine similarity to a labelled bank, the k=20
  most similar bank rows vote for their label with weight ``exp(sim / T)``, T = 0.07; prediction = argmax of
  ``score_c = sum_{j in top-k} exp(s_j / T) 1[label_j = c]``. Without a separate bank it is cross-validated:
  leave-self-out (every other row is the bank) or ``folds``-fold.
* Clustering (SAIL: alignment grows with clustering quality): k-means with as many clusters as labels,
  NMI and ARI of the clusters against the labels, silhouette (cosine geometry after L2 normalisation)
  of the k-means partition, which needs no labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pairscout.errors import MetricError
from pairscout.metrics.validate import ArrayLike, as_matrix, unit_rows

F64 = torch.float64


def _labels(labels: ArrayLike | Sequence[Any], n: int, name: str) -> tuple[torch.Tensor, int]:
    arr = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise MetricError(f"{name} has shape {arr.shape}, expected ({n},), one label per row.",
                          fix="pass one class label per embedding row.")
    _, inv = np.unique(arr, return_inverse=True)
    return torch.from_numpy(inv.astype(np.int64)), int(inv.max()) + 1


def _vote(q: torch.Tensor, bank: torch.Tensor, bank_y: torch.Tensor, n_cls: int, k: int, temperature: float,
          exclude_offset: int | None = None, tile: int = 1024) -> torch.Tensor:
    """Predicted class per query row (DINO weighted vote). ``exclude_offset``: query row r is bank row r+offset."""
    preds = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
    bank_y = bank_y.to(q.device)
    for s in range(0, q.shape[0], tile):
        e = min(s + tile, q.shape[0])
        sim = q[s:e] @ bank.T
        if exclude_offset is not None:
            r = torch.arange(e - s, device=q.device)
            sim[r, r + s + exclude_offset] = float("-inf")
        v, i = torch.topk(sim, k, dim=1)
        w = (v.to(F64) / temperature).exp()
        scores = torch.zeros(e - s, n_cls, dtype=F64, device=q.device)
        scores.scatter_add_(1, bank_y[i], w)
        preds[s:e] = scores.argmax(1)
    return preds


def knn_accuracy(x: ArrayLike, labels: ArrayLike | Sequence[Any], *, bank: ArrayLike | None = None,
                 bank_labels: ArrayLike | Sequence[Any] | None = None, k: int = 20, temperature: float = 0.07,
                 folds: int | None = None, seed: int = 0) -> float:
    """Weighted k-NN top-1 accuracy (DINO protocol; formula in the module docstring), in [0, 1].

    Args:
        x, labels: query embeddings (n, d) and their labels (any hashable values).
        bank, bank_labels: a separate labelled bank (e.g. the train split). If omitted, cross-validate on x:
            ``folds=None`` leave-self-out (bank = all other rows), ``folds=f`` f-fold with a seeded split.
        k: neighbours (DINO: 20). temperature: T in exp(sim / T) (DINO: 0.07).

    Raises:
        MetricError: k larger than the bank, mismatched labels, NaN/inf.
    """
    xq = as_matrix(x, "x")
    xq = unit_rows(xq.to(F64 if xq.dtype == F64 else torch.float32))
    n = xq.shape[0]
    if (bank is None) != (bank_labels is None):
        raise MetricError("bank and bank_labels must be given together.", fix="pass both, or neither to cross-validate.")
    if bank is not None:
        b = unit_rows(as_matrix(bank, "bank").to(xq.dtype).to(xq.device))
        if b.shape[1] != xq.shape[1]:
            raise MetricError(f"bank has {b.shape[1]} dims, x has {xq.shape[1]}.", fix="use the same encoder for both.")
        all_y, n_cls = _labels(np.concatenate([np.asarray(_np(labels)), np.asarray(_np(bank_labels))]),
                               n + b.shape[0], "labels + bank_labels")
        y, by = all_y[:n], all_y[n:]
        _check_k(k, b.shape[0])
        pred = _vote(xq, b, by, n_cls, k, temperature)
        return float((pred.cpu() == y).double().mean())
    y, n_cls = _labels(labels, n, "labels")
    if folds is None:
        _check_k(k, n - 1)
        pred = _vote(xq, xq, y, n_cls, k, temperature, exclude_offset=0)
        return float((pred.cpu() == y).double().mean())
    if not 2 <= folds <= n:
        raise MetricError(f"folds={folds} must be in [2, {n}].", fix="use e.g. folds=5, or folds=None for leave-self-out.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    correct = 0
    for part in torch.tensor_split(perm, folds):
        mask = torch.ones(n, dtype=torch.bool)
        mask[part] = False
        _check_k(k, int(mask.sum()))
        pred = _vote(xq[part.to(xq.device)], xq[mask.to(xq.device)], y[mask], n_cls, k, temperature)
        correct += int((pred.cpu() == y[part]).sum())
    return correct / n


def _np(a: Any) -> Any:
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else a


def _check_k(k: int, bank_rows: int) -> None:
    if not 1 <= k <= bank_rows:
        raise MetricError(f"k={k} neighbours but the bank has {bank_rows} rows.", fix=f"use 1 <= k <= {bank_rows}.")


def clustering_quality(x: ArrayLike, labels: ArrayLike | Sequence[Any] | None = None, *,
                       n_clusters: int | None = None, seed: int = 0, n_init: int = 4,
                       silhouette_sample: int | None = 5000) -> dict[str, float]:
    """k-means clustering quality: ``{"nmi", "ari", "silhouette", "n_clusters"}`` (nmi/ari only with labels).

    Rows are L2-normalised first (cosine geometry, as for k-NN). ``n_clusters`` defaults to the number of
    distinct labels. NMI = ``sklearn.metrics.normalized_mutual_info_score`` (arithmetic mean normalisation),
    ARI = ``adjusted_rand_score``, silhouette = ``silhouette_score`` of the k-means partition (euclidean on
    normalised rows, on a seeded sample of ``silhouette_sample`` rows when n is larger).

    Raises:
        MetricError: fewer than 2 clusters, more clusters than rows, NaN/inf, neither labels nor n_clusters.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    xt = as_matrix(x, "x")
    feats = unit_rows(xt.to(F64)).cpu().numpy()
    n = feats.shape[0]
    y = None
    if labels is not None:
        y_t, n_lab = _labels(labels, n, "labels")
        y = y_t.numpy()
        n_clusters = n_clusters or n_lab
    if n_clusters is None:
        raise MetricError("clustering_quality needs labels or n_clusters.", fix="pass labels=... or n_clusters=...")
    if not 2 <= n_clusters < n:
        if y is not None and n_clusters >= n:  # the clusters come from the labels: every row its own class
            raise MetricError(f"the labels give {n_clusters} classes for {n} rows (each row its own class): nothing to cluster.",
                              fix="use labels that group rows into classes (or none: the label column is then not read), or more rows.")
        raise MetricError(f"n_clusters={n_clusters} must be in [2, {n - 1}] for {n} rows.",
                          fix="use more rows, or pass n_clusters= between 2 and the rows - 1." if y is None else
                          "use labels with at least 2 classes.")
    pred = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit_predict(feats)
    out: dict[str, float] = {"n_clusters": float(n_clusters)}
    if y is not None:
        out["nmi"] = float(normalized_mutual_info_score(y, pred))
        out["ari"] = float(adjusted_rand_score(y, pred))
    if len(np.unique(pred)) >= 2:
        sample = silhouette_sample if silhouette_sample and n > silhouette_sample else None
        out["silhouette"] = float(silhouette_score(feats, pred, sample_size=sample, random_state=seed))
    else:  # k-means put every row in one cluster: silhouette undefined, report the neutral 0.0
        out["silhouette"] = 0.0
    return out
