"""`pairscout rank`: the Python API, the CLI, result files, the baseline check, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import pairscout
from pairscout.cli import app
from pairscout.errors import PairscoutError
from pairscout.ranking import RankResult, RankSettings
from pairscout.ranking.compute import jackknife_ci

FAST = RankSettings(ci_groups=4, permutations=5)
SMALL = ["--vision-zoo", "baseline:pixels,baseline:random-vision", "--text-zoo", "baseline:random-text,baseline:tfidf",
         "--data", "generated:n=40,seed=0,size=32", "--device", "cpu", "--workers", "0", "--ci-groups", "4", "--permutations", "5"]


def test_python_api_ranks_all_pairs_and_round_trips(cpu, tmp_path):
    res = pairscout.rank("baseline:pixels,baseline:random-vision", "baseline:random-text,baseline:tfidf",
                         "generated:n=40,seed=0,size=32", settings=FAST, encode_settings=cpu,
                         cache_dir=tmp_path / "cache", out=tmp_path / "run")
    assert len(res.pairs) == 4
    assert res.primary == "cka_linear_debiased"  # n < 10,000
    assert list(res.pairs["rank"]) == [1, 2, 3, 4]
    assert res.pairs["score"].is_monotonic_decreasing
    assert (res.pairs["score"] == res.pairs["cka_linear_debiased"]).all()
    for m in res.metrics:
        assert (res.pairs[f"{m}_lo"] <= res.pairs[m] + 1e-12).all() and (res.pairs[m] <= res.pairs[f"{m}_hi"] + 1e-12).all()
    assert res.pairs["cka_linear_debiased_p"].between(0, 1).all()
    assert set(res.models["name"]) == {"pixels", "random-vision", "random-text", "tfidf"}
    assert res.models["knn_acc"].notna().all()  # the generated data has labels
    back = RankResult.load(tmp_path / "run")
    pd.testing.assert_frame_equal(back.pairs, res.pairs)
    pd.testing.assert_frame_equal(back.models, res.models)
    assert back.meta["settings"]["dataset_fingerprint"] == res.meta["settings"]["dataset_fingerprint"]
    assert back.meta["settings"]["vision_zoo"]["encoders"][0]["id"] == "baseline:pixels"
    assert "torch" in back.meta["versions"]
    assert (tmp_path / "run" / "pairs.csv").is_file()
    for stem in ("heatmap_cka_linear_debiased", "unimodal_quality", "scatter_cka_linear_debiased_vs_mutual_knn"):
        for ext in ("png", "svg"):
            assert (tmp_path / "run" / "plots" / f"{stem}.{ext}").stat().st_size > 1000
    assert back.matrix("cka_linear").shape == (2, 2)


def test_combined_score_is_mean_z(cpu, tmp_path):
    res = pairscout.rank("baseline:pixels,baseline:random-vision", "baseline:random-text,baseline:tfidf",
                         "generated:n=40,seed=0,size=32", settings=RankSettings(score="combined", ci_groups=0, permutations=0,
                                                                                metrics=["cka_linear", "mutual_knn"]),
                         encode_settings=cpu, cache_dir=tmp_path)
    p = res.pairs
    z = sum((p[m] - p[m].mean()) / p[m].std(ddof=0) for m in res.metrics) / len(res.metrics)
    assert np.allclose(p["score"], z)
    assert "cka_linear_lo" not in p  # intervals off


def test_jackknife_interval_covers_and_shrinks():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 5, generator=g)
    x = torch.cat([z, torch.randn(400, 20, generator=g)], 1)
    y = torch.cat([z @ torch.randn(5, 5, generator=g), torch.randn(400, 30, generator=g)], 1)
    est, lo, hi, se = jackknife_ci([x], [y], "cka_linear_debiased", groups=10)
    assert lo[0, 0] < est[0, 0] < hi[0, 0] and se[0, 0] > 0
    _, lo2, hi2, _ = jackknife_ci([x[:100]], [y[:100]], "cka_linear_debiased", groups=10)
    assert (hi2 - lo2)[0, 0] > (hi - lo)[0, 0]  # less data, wider interval


def test_cli_json_and_refusal_of_other_settings(runner, tmp_path):
    out = tmp_path / "run"
    args = ["rank", *SMALL, "--cache-dir", str(tmp_path / "c"), "--out", str(out)]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert len(payload["pairs"]) == 4 and payload["meta"]["settings"]["n"] == 40
    assert "top pairs" not in r.stdout  # the human table went to stderr
    assert runner.invoke(app, args).exit_code == 0  # same settings: refreshed in place
    r = runner.invoke(app, [*args, "--knn-k", "5"])
    assert r.exit_code == 2 and "other settings" in r.output and "--force" in r.output
    r = runner.invoke(app, [*args, "--knn-k", "5", "--force"])
    assert r.exit_code == 0
    assert RankResult.load(out).meta["settings"]["knn_k"] == 5


def test_a_model_failing_mid_run_is_reported_and_the_rest_ranked(runner, tmp_path):
    args = ["rank", "--vision-zoo", "baseline:pixels,baseline:random-vision", "--text-zoo", "baseline:random-text,hf:pairscout-tests/nope",
            "--data", "generated:n=30,seed=0,size=32", "--device", "cpu", "--workers", "0", "--ci-groups", "0", "--permutations", "0",
            "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "run")]
    r = runner.invoke(app, args)
    assert r.exit_code == 1
    assert "pairscout-tests/nope" in r.output
    res = RankResult.load(tmp_path / "run")
    assert len(res.pairs) == 2 and "nope" in " ".join(res.meta["failures"])


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--vision-zoo", "baseline:random-text"], "is a text encoder"),
        (["--metrics", "cka_cubic"], "unknown metric"),
        (["--data", "generated:n=3,seed=0,size=32", "--metrics", "cka_linear_debiased"], "at least 4 rows"),
        (["--data", "generated:n=4,seed=0,size=32", "--metrics", "cknna"], "CKNNA needs k >= 2 neighbours"),
        (["--score", "best"], "score 'best' is unknown"),
    ],
)
def test_rank_errors_are_one_line(runner, tmp_path, extra, needle):
    r = runner.invoke(app, ["rank", *SMALL, "--cache-dir", str(tmp_path), *extra])
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_small_data_runs_with_k_and_groups_adapted_and_said(runner, tmp_path):
    """12 rows (issue 9): k and the jackknife groups adapt, the output says so, and CKNNA stays in range."""
    r = runner.invoke(app, ["rank", *SMALL, "--cache-dir", str(tmp_path), "--data", "generated:n=12,seed=0,size=32",
                            "--metrics", "mutual_knn,cknna", "--out", str(tmp_path / "run"), "--no-plots"])
    assert r.exit_code == 0, r.output
    assert "small data: --knn-k 10 -> 2" in r.output and "--ci-groups" in r.output
    res = RankResult.load(tmp_path / "run")
    assert res.meta["adapted"]["knn_k"]["used"] == 2
    vals = res.pairs["cknna"].dropna()
    assert ((vals >= -1) & (vals <= 1)).all()
    assert "verdict" in res.meta and res.meta["verdict"]["pair"] == [res.pairs["vision"][0], res.pairs["text"][0]]


def test_empty_zoo_file(cpu, tmp_path):
    p = tmp_path / "empty.toml"
    p.write_text('name = "empty"\n')
    with pytest.raises(PairscoutError, match="defines no encoders"):
        pairscout.rank(str(p), "baseline:random-text", "generated:n=20", encode_settings=cpu, cache_dir=tmp_path)


def test_load_of_a_folder_without_a_result(tmp_path):
    with pytest.raises(PairscoutError, match="holds no rank result"):
        RankResult.load(tmp_path)


@pytest.mark.slow
def test_pretrained_pairs_rank_above_weight_free_baselines(cpu, tmp_path):
    """The reduced offline default: every pretrained x pretrained pair above every pair with a baseline."""
    pretrained = {"efficientnet-lite0", "all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2"}
    res = pairscout.rank("pack:efficientnet-lite0,baseline:pixels,baseline:random-net,baseline:random-vision",
                         "pack:all-MiniLM-L6-v2,pack:paraphrase-MiniLM-L3-v2,baseline:tfidf,baseline:random-text",
                         "generated:n=300,seed=0", settings=RankSettings(ci_groups=0, permutations=0, metrics=["cka_linear_debiased"]),
                         encode_settings=cpu, cache_dir=tmp_path)
    both = res.pairs["vision"].isin(pretrained) & res.pairs["text"].isin(pretrained)
    assert both.sum() == 2
    assert res.pairs.loc[both, "score"].min() > res.pairs.loc[~both, "score"].max()
    assert set(res.pairs.head(2)["vision"]) == {"efficientnet-lite0"}
