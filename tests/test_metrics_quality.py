"""Unimodal quality (weighted k-NN, clustering) and published-score look-ups."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from pairscout.errors import MetricError
from pairscout.metrics import (
    clustering_quality,
    knn_accuracy,
    mteb_tasks,
    published_mteb,
    published_scores,
    published_vision,
)

TABLES = Path(__file__).resolve().parents[1] / "pairscout" / "metrics" / "tables"


def clusters(n_per: int = 40, n_cls: int = 4, spread: float = 0.15, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_cls, 16, generator=g) * 3
    y = torch.arange(n_cls).repeat_interleave(n_per)
    x = centres[y] + spread * torch.randn(len(y), 16, generator=g)
    return x, y


def ref_dino_knn(q: np.ndarray, bank: np.ndarray, by: np.ndarray, k: int, t: float, n_cls: int) -> np.ndarray:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    sim = q @ bank.T
    out = []
    for row in sim:
        top = np.argsort(-row)[:k]
        votes = np.zeros(n_cls)
        for j in top:
            votes[by[j]] += np.exp(row[j] / t)
        out.append(int(np.argmax(votes)))
    return np.array(out)


def test_knn_accuracy_separable_and_random():
    x, y = clusters()
    assert knn_accuracy(x, y) == 1.0
    assert knn_accuracy(x, y, folds=5) == 1.0
    g = torch.Generator().manual_seed(1)
    xr = torch.randn(400, 16, generator=g)
    yr = torch.randint(0, 4, (400,), generator=g)
    assert abs(knn_accuracy(xr, yr) - 0.25) < 0.08


def test_knn_accuracy_matches_reference_with_bank():
    x, y = clusters(spread=6.0, seed=2)  # overlapping clusters: accuracy strictly between chance and 1
    q, qy, bank, by = x[::2], y[::2], x[1::2], y[1::2]
    acc = knn_accuracy(q, qy, bank=bank, bank_labels=by, k=20)
    pred = ref_dino_knn(q.double().numpy(), bank.double().numpy(), by.numpy(), 20, 0.07, 4)
    assert acc == pytest.approx(float((pred == qy.numpy()).mean()), abs=1e-12)
    assert 0.3 < acc < 1.0
    labels = [["cat", "dog", "emu", "fox"][i] for i in qy]  # string labels work too
    assert knn_accuracy(q, labels, bank=bank, bank_labels=[["cat", "dog", "emu", "fox"][i] for i in by]) == acc


def test_knn_accuracy_errors():
    x, y = clusters(n_per=3)
    with pytest.raises(MetricError, match="k=20 neighbours but the bank has 11 rows"):
        knn_accuracy(x, y)
    with pytest.raises(MetricError, match="one label per row"):
        knn_accuracy(x, y[:-1], k=3)
    with pytest.raises(MetricError, match="together"):
        knn_accuracy(x, y, bank=x, k=3)


def test_clustering_quality():
    x, y = clusters()
    q = clustering_quality(x, y)
    assert q["nmi"] == pytest.approx(1.0) and q["ari"] == pytest.approx(1.0) and q["silhouette"] > 0.5
    g = torch.Generator().manual_seed(3)
    r = clustering_quality(torch.randn(200, 8, generator=g), torch.randint(0, 4, (200,), generator=g))
    assert r["nmi"] < 0.1 and abs(r["ari"]) < 0.05
    assert "nmi" not in clustering_quality(x, n_clusters=4)
    with pytest.raises(MetricError, match="labels or n_clusters"):
        clustering_quality(x)


# ---------------------------------------------------------------- published scores
def _csv(name: str) -> list[dict[str, str]]:
    with open(TABLES / name, encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("query", ["st:sentence-transformers/all-MiniLM-L6-v2",
                                   "sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2",
                                   "ALL-MINILM-L6-V2"])
def test_published_mteb_flexible_ids(query):
    row = next(r for r in _csv("mteb_scores.csv") if r["model_id"] == "sentence-transformers/all-MiniLM-L6-v2")
    rec = published_mteb(query)
    assert rec is not None
    assert rec.score == float(row["score"]) and rec.source == row["source"]
    assert rec.model_id == row["model_id"] and "MTEB(eng, v1)" in rec.metric and rec.query == query


def test_published_mteb_unknown_and_non_mteb():
    assert published_mteb("acme/never-heard-of-it") is None
    assert published_mteb("other-org/all-MiniLM-L6-v2") is None  # an org that is not the table's
    assert published_mteb("all-roberta-large-v1") is None  # only an SBERT 14-dataset row: not MTEB
    sbert = published_mteb("all-roberta-large-v1", benchmark=None)
    assert sbert is not None and sbert.metric.startswith("SBERT") and sbert.score == 70.23


def test_published_vision():
    rows = _csv("vision_knn_scores.csv")
    knn_row = next(r for r in rows if r["model_id"] == "vit_small_patch14_dinov2.lvd142m" and "k-NN" in r["metric"])
    for q in ("vit_small_patch14_dinov2.lvd142m", "timm:vit_small_patch14_dinov2.lvd142m",
              "vit_small_patch14_dinov2", "facebook/dinov2-small"):
        rec = published_vision(q)
        assert rec is not None and rec.score == float(knn_row["score"]) and rec.source == knn_row["source"]
    lin = published_vision("vit_small_patch14_dinov2", metric="linear")
    assert lin is not None and "linear probe" in lin.metric and lin.score != float(knn_row["score"])
    # tagless timm name resolves to timm's default tag (augreg), which is not the DINO row
    assert published_vision("vit_small_patch16_224") is None
    assert published_vision("vit_small_patch16_224.dino").score == 74.5
    assert published_vision("unknown_vit_patch16") is None
    assert published_vision("vit_base_patch16_224.mae", metric="knn") is None  # MAE row is a linear probe only
    assert len(published_scores("facebook/dinov2-small")) == 3


def test_mteb_tasks_table():
    tasks = mteb_tasks()
    assert len(tasks) == 56 and tasks[0]["task"] == "AmazonCounterfactualClassification"
