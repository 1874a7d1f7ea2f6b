"""Which measure predicts the probe: the correlation table (Holm, Fisher z, orientation, twins), the measures the
probe adds, the unimodal predictors, ProbeResult's round trip through the shared result helper, and the probe's
terminal tables at 100 columns."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pairscout import statistics as S
from pairscout.evaluation import predictors as P
from pairscout.evaluation.result import ProbeResult
from pairscout.metrics import registry


def _frame() -> pd.DataFrame:
    """Six pairs: a perfect predictor, a reversed one, a noisy one, a constant one and a twin of the first."""
    target = [0.10, 0.20, 0.35, 0.50, 0.70, 0.90]
    return pd.DataFrame({
        "vision": list("abcdef"), "text": list("uvwxyz"), "mean_r1": target,
        "cka_linear_debiased": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06],
        "mutual_knn": [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
        "cknna": [0.3, 0.1, 0.4, 0.2, 0.6, 0.5],
        "vision_knn_acc": [0.5] * 6,
        "score": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06],
    })  # fmt: skip


def test_holm_interval_and_order_against_hand_computation():
    from scipy import stats

    df = _frame()
    cols = ["cka_linear_debiased", "mutual_knn", "cknna", "vision_knn_acc", "score"]
    c = P.correlations(df, cols).set_index("metric")
    raw = {m: S.spearman(df[m].to_numpy(), df["mean_r1"].to_numpy())[1] for m in ("cka_linear_debiased", "mutual_knn", "cknna")}
    assert raw["cka_linear_debiased"] == pytest.approx(2 / 720)  # a perfect order of 6: exact, 2 of 6! orderings
    assert stats.spearmanr(df["cka_linear_debiased"], df["mean_r1"]).pvalue == 0.0  # (scipy's t approximation says 0)
    # Holm by hand over the three that have a p (the constant column has none, the score twin is not counted)
    order = sorted(raw, key=raw.get)
    m = len(order)
    expect, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * raw[name]))
        expect[name] = running
    for name in raw:
        assert c.loc[name, "spearman_p_holm"] == pytest.approx(expect[name])
        assert c.loc[name, "spearman_p_holm"] >= c.loc[name, "spearman_p"]
    assert c.attrs["family_size"] == 3 if hasattr(c, "attrs") else True
    assert c.loc["score", "spearman_p_holm"] == pytest.approx(c.loc["cka_linear_debiased", "spearman_p_holm"])  # the twin's
    assert c.loc["cka_linear_debiased", "spearman"] == pytest.approx(1.0) and c.loc["mutual_knn", "spearman"] == pytest.approx(-1.0)
    assert c.loc["cka_linear_debiased", "answer"] == "yes" and c.loc["mutual_knn", "answer"] == "reversed"
    assert math.isnan(c.loc["vision_knn_acc", "spearman"]) and c.loc["vision_knn_acc", "answer"] == "too few values"
    # rho = 0.6 of the noisy one: Fisher z with the Bonett-Wright se, by hand
    rho = c.loc["cknna", "spearman"]
    half = 1.959964 * math.sqrt((1 + rho**2 / 2) / 3)
    assert (c.loc["cknna", "spearman_lo"], c.loc["cknna", "spearman_hi"]) == pytest.approx((math.tanh(math.atanh(rho) - half),
                                                                                             math.tanh(math.atanh(rho) + half)))  # fmt: skip
    assert c.loc["cka_linear_debiased", "label"] == "linear CKA (debiased)" and c.loc["vision_knn_acc", "label"] == "vision k-NN accuracy"
    ordered = P.correlations(df, cols)["metric"].tolist()
    assert ordered.index("cka_linear_debiased") < ordered.index("cknna") < ordered.index("vision_knn_acc")  # NaN last


def test_fisher_interval_known_values_and_limits():
    lo, hi = S.fisher_interval(0.5, 10)
    assert (lo, hi) == pytest.approx((-0.2322, 0.8706), abs=2e-4)
    assert all(math.isnan(v) for v in S.fisher_interval(0.5, 3)) and all(math.isnan(v) for v in S.fisher_interval(1.0, 20))


def test_a_lower_is_better_measure_is_negated(monkeypatch):
    monkeypatch.setitem(registry.MEASURES, "procrustes", dataclasses.replace(registry.MEASURES["procrustes"], direction="lower"))
    df = _frame().assign(procrustes=[6, 5, 4, 3, 2, 1])  # a distance: smaller = more similar = better read-out
    c = P.correlations(df, ["procrustes"]).set_index("metric")
    assert c.loc["procrustes", "spearman"] == pytest.approx(1.0) and c.loc["procrustes", "direction"] == "lower (negated)"


def test_blank_removes_every_statistic():
    out = P.blank(P.correlations(_frame(), ["cka_linear_debiased", "cknna"]))
    assert out[P.STATS].isna().all().all() and set(out["answer"]) == {"probe at chance"}


def test_add_measures_computes_every_missing_measure_on_the_given_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    embs = {"v": x, "t1": x @ torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0], "t2": torch.randn(60, 5, generator=g, dtype=torch.float64)}
    chosen = pd.DataFrame({"vision": ["v", "v"], "text": ["t1", "t2"], "cka_linear": [0.9, 0.1]})
    seen = []

    def rows(v, t):
        seen.append((v, t))
        return embs[v], embs[t]

    opts = {"k": 5, "preprocess": None, "sigma_frac": 1.0}
    opts["preprocess"] = P.measure_options({"settings": {"knn_k": 5}})["preprocess"]
    out, failed = P.add_measures(chosen, rows, opts)
    assert set(registry.MEASURES) <= set(out.columns) and failed == {}
    assert out["cka_linear"].tolist() == [0.9, 0.1]  # what rank computed is kept, not recomputed
    for m in ("svcca", "procrustes", "rsa", "cycle_knn", "cka_rbf_debiased"):
        assert out.loc[0, m] == pytest.approx(registry.measure(m, embs["v"], embs["t1"], **opts))
    assert out.loc[0, "procrustes"] == pytest.approx(1.0) and out.loc[0, "procrustes"] > out.loc[1, "procrustes"]  # a rotation
    assert ("v", "t2") in seen and ("v", "t1") in seen


def test_add_measures_records_a_measure_that_fails(monkeypatch):
    def boom(*a, **k):
        raise ValueError("no")

    monkeypatch.setitem(registry.MEASURES, "rsa", dataclasses.replace(registry.MEASURES["rsa"], all_pairs=boom))
    x = torch.randn(30, 4, dtype=torch.float64)
    out, failed = P.add_measures(pd.DataFrame({"vision": ["v"], "text": ["t"]}), lambda v, t: (x, x), P.measure_options({}))
    assert out["rsa"].isna().all() and "ValueError: no" in failed["rsa"] and out["cka_linear"].iloc[0] == pytest.approx(1.0)


def test_measure_options_use_the_adapted_k():
    meta = {"settings": {"knn_k": 10, "clip_quantile": 0.95, "rbf_sigma_frac": 0.5}, "adapted": {"knn_k": {"asked": 10, "used": 4}}}
    o = P.measure_options(meta)
    assert o["k"] == 4 and o["preprocess"].clip_quantile == 0.95 and o["sigma_frac"] == 0.5


def test_add_unimodal_maps_each_side_and_skips_columns_with_few_values():
    chosen = pd.DataFrame({"vision": ["a", "b", "c"], "text": ["x", "x", "y"]})
    models = pd.DataFrame({"name": ["a", "b", "c", "x", "y"], "modality": ["vision"] * 3 + ["text"] * 2,
                           "knn_acc": [0.1, 0.2, 0.3, 0.9, 0.8], "published_score": [np.nan, np.nan, 50.0, 60.0, np.nan]})  # fmt: skip
    out = P.add_unimodal(chosen, models)
    assert out["vision_knn_acc"].tolist() == [0.1, 0.2, 0.3] and out["text_knn_acc"].tolist() == [0.9, 0.9, 0.8]
    assert "vision_published_score" not in out and "text_published_score" not in out  # 1 and 2 values: nothing to correlate
    assert P.predictor_columns(out) == ["vision_knn_acc", "text_knn_acc"]


def test_probe_result_round_trip_through_the_result_helper(tmp_path):
    pairs = pd.DataFrame({"rank": [1, 7, 12], "group": ["top", "middle", "bottom"], "vision": ["a", "b", "c"], "text": ["x", "y", "z"],
                          "cka_linear": [0.5, np.nan, 0.1], "zs_top1": [0.6, 0.3, 0.1]})  # fmt: skip
    corr = P.correlations(pairs.assign(cka_linear=[0.5, 0.3, 0.1]), ["cka_linear"], "zs_top1")
    res = ProbeResult(pairs=pairs, correlations=corr, meta={"kind": "pairscout.probe", "target": "zs_top1", "metrics": ["cka_linear"]})
    res.save(tmp_path)
    for f in ("probe.json", "probe.parquet", "probe.csv", "probe_correlations.parquet", "probe_correlations.csv"):
        assert (tmp_path / f).is_file(), f
    back = ProbeResult.load(tmp_path)
    pd.testing.assert_frame_equal(back.pairs, pairs)
    pd.testing.assert_frame_equal(back.correlations, corr.reset_index(drop=True), check_dtype=False)
    assert back.meta == res.meta and back.metrics == ["cka_linear"]
    payload = json.loads((tmp_path / "probe.json").read_text())
    assert payload["pairs"][1]["cka_linear"] is None and payload["correlations"][0]["metric"] == "cka_linear"  # NaN -> null
    # a folder written before probe_correlations.parquet existed still loads, from probe.json
    (tmp_path / "probe_correlations.parquet").unlink()
    old = ProbeResult.load(tmp_path)
    assert old.correlations["metric"].tolist() == ["cka_linear"] and old.correlations["spearman"].iloc[0] == pytest.approx(1.0)
    with pytest.raises(Exception, match="holds no probe result"):
        ProbeResult.load(tmp_path / "nothing")


def test_probe_prints_tables_that_fit_100_columns_to_a_file(tmp_path, tiny_run):
    """`pairscout probe` with COLUMNS=100 and stderr to a file: every table line fits, full names, the rest in --wide."""
    run, cache = tiny_run
    args = [sys.executable, "-m", "pairscout", "probe", str(run), "--cache-dir", str(cache), "--top-k", "2", "--middle-k", "1",
            "--bottom-k", "1", "--steps", "10", "--out-dim", "16", "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path / "p"),
            "--target", "zs_top1"]  # fmt: skip  (a proportion: the table shows its binomial half-width)
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for extra, name in (([], "narrow.txt"), (["--wide"], "wide.txt")):
        with open(tmp_path / name, "w") as f:
            r = subprocess.run([*args, *extra], env=env, stdout=subprocess.DEVNULL, stderr=f, timeout=600)
        assert r.returncode == 0, (tmp_path / name).read_text()[-2000:]
    text = (tmp_path / "narrow.txt").read_text()
    table = [line for line in text.splitlines() if line[:1] in "┏┃┡│└" or "━" in line]
    assert len(table) > 8 and max(len(line) for line in table) <= 100
    for name in ("random-vision", "random-text", "tfidf", "pixels"):
        assert name in text  # never cut to "random-vi…"
    assert "…" not in "\n".join(table)
    assert "did the metric predict" in text and "R@1" in text and "SVCCA" in text and "Holm" in text
    import re

    words = r"read-out ± 95 % half-width \(binomial, \d+ held-out images\), chance 0\.\d{3}".split(" ")
    assert re.search(r"\s+".join(words), text)  # the caption may wrap anywhere
    assert len(re.findall(r"│ +\d\.\d\d ± \d\.\d\d │", text)) == 4  # every probed pair's read-out with its half-width
    assert "CKNNA" not in "\n".join(line for line in table[:14])  # the probe table shows the primary measure only
    wide = (tmp_path / "wide.txt").read_text()
    assert "CKNNA" in wide and "computed by" in wide


def test_rank_rows_reads_the_rows_and_layers_rank_compared(monkeypatch):
    """Text per row by the run's caption_reduce; after a layer sweep, each pair's chosen layers; each view loaded once."""
    from types import SimpleNamespace

    from pairscout.align import pairdata

    class Emb:
        def __init__(self, pooled, layers=None):
            self.pooled, self.layers = pooled, layers or {}

        def layer(self, name):
            return Emb(self.layers[name])

        def per_row(self, n, reduce):
            return self.pooled[:n] * (10 if reduce == "mean" else 1)

    embs = {"v": Emb(torch.zeros(4, 2), {"block3": torch.ones(4, 2)}), "t": Emb(torch.full((6, 2), 2.0))}
    loads = []
    monkeypatch.setattr(pairdata, "load_embeddings", lambda src, spec, **k: loads.append(spec) or embs[spec])
    src = SimpleNamespace(dataset=[0] * 4, rank=SimpleNamespace(meta={"settings": {"caption_reduce": "mean"}}),
                          spec=lambda name, modality: name, chosen_layers=lambda v, t: ("block3", "final"))  # fmt: skip
    rows = P.rank_rows(src)
    x, y = rows("v", "t")
    assert torch.equal(x, torch.ones(4, 2)) and torch.equal(y, torch.full((4, 2), 20.0))
    rows("v", "t")
    assert loads == ["v", "t"]


def test_one_encoder_scores_are_correlated_over_encoders_not_pairs():
    """9 pairs of 3 vision encoders: a vision-only score has 3 independent values, so it is correlated with each
    encoder's mean read-out (3 points: too few for a p-value), never as 9 points with an overstated p."""
    from pairscout.evaluation.predictors import correlations

    v, t = ["a", "a", "a", "b", "b", "b", "c", "c", "c"], ["x", "y", "z"] * 3
    readout = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    pairs = pd.DataFrame({"vision": v, "text": t, "zs_top1": readout, "vision_knn_acc": [0.9] * 3 + [0.5] * 3 + [0.1] * 3,
                          "cka_linear": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]})
    c = correlations(pairs, ["cka_linear", "vision_knn_acc"], "zs_top1").set_index("metric")
    assert c.loc["cka_linear", "n_pairs"] == 9 and c.loc["cka_linear", "spearman_p"] < 1e-3
    assert c.loc["vision_knn_acc", "n_pairs"] == 3  # encoders, not pairs
    assert c.loc["vision_knn_acc", "spearman"] == pytest.approx(1.0)  # the encoders' order is the read-out's ...
    assert not c.loc["vision_knn_acc", "spearman_p"] < 0.05  # ... but 3 points prove nothing
    pairs4 = pd.concat([pairs, pd.DataFrame({"vision": ["d"] * 3, "text": ["x", "y", "z"], "zs_top1": [0.05] * 3,
                                             "vision_knn_acc": [0.05] * 3, "cka_linear": [0.05] * 3})])
    c4 = correlations(pairs4, ["vision_knn_acc"], "zs_top1").set_index("metric")
    assert c4.loc["vision_knn_acc", "n_pairs"] == 4


def test_answer_never_contradicts_its_interval():
    """p < 0.05 beside a 95 % interval that crosses 0 (two approximations disagreeing at the margin) is no claim."""
    assert P._answer(0.68, 0.04, 0.5, -0.05, 0.94) == "no"
    assert P._answer(0.68, 0.04, 0.5, 0.02, 0.94) == "yes (uncorrected)"
    assert P._answer(-0.9, 0.001, 0.01, -0.99, -0.5) == "reversed"
    assert P._answer(0.9, 0.001, 0.01, -0.1, 0.99) == "no"
    assert P._answer(1.0, 0.003, 0.01) == "yes"  # |rho| = 1: no Fisher interval, the exact p decides
