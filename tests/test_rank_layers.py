"""rank --layers end to end: the chosen layers, the corrected p, one cache entry per encoder, probe/align on them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pairscout.cli import app

runner = CliRunner()
VISION = "baseline:random-net,baseline:pixels"  # random-net: a timm resnet18 (5 stages) with random weights
TEXT = "pack:all-MiniLM-L6-v2,baseline:tfidf"  # MiniLM: 6 transformer blocks, shipped by pip


@pytest.fixture(scope="module")
def layered_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("layers")
    run, cache = d / "run", d / "cache"
    r = runner.invoke(app, ["rank", "--vision-zoo", VISION, "--text-zoo", TEXT, "--data", "generated:size=32", "--n", "64",
                            "--layers", "-1,-2", "--permutations", "19", "--ci-groups", "4", "--no-plots", "--workers", "0",
                            "--device", "cpu", "--out", str(run), "--cache-dir", str(cache)])  # fmt: skip
    assert r.exit_code == 0, r.output
    return run, cache, r.output


def test_each_pair_is_scored_at_its_best_layer_pair(layered_run):
    run, _, output = layered_run
    pairs = pd.read_csv(run / "pairs.csv", dtype={"vision_layer": str, "text_layer": str})
    meta = json.loads((run / "rank.json").read_text())
    views = meta["layers"]["views"]
    assert views == {"random-net": ["final", "3", "4"], "pixels": ["final"], "all-MiniLM-L6-v2": ["final", "4", "5"], "tfidf": ["final"]}
    for _, row in pairs.iterrows():
        block = np.asarray(meta["layers"]["cka"][f"{row['vision']} x {row['text']}"])
        assert row["layers_searched"] == block.size
        i, j = views[row["vision"]].index(row["vision_layer"]), views[row["text"]].index(row["text_layer"])
        assert block[i, j] == pytest.approx(block.max(), abs=1e-6)  # the chosen view pair is the maximum ...
        assert row["cka_linear_debiased"] == pytest.approx(block.max(), abs=1e-5)  # ... and the score is its value
        assert row["layer_excess"] == pytest.approx(row["cka_linear_debiased"] - row["layer_max_null"], abs=1e-5)
    assert (pairs.loc[pairs["vision"] == "pixels", "vision_layer"] == "final").all()
    # the p of the primary metric is the selection-corrected one; the naive one is kept beside it
    assert {"cka_linear_debiased_p_naive", "cka_linear_debiased_z_naive"} <= set(pairs.columns)
    mc = pairs["layer_p_mc"].to_numpy()
    assert np.all((mc * 20).round(6) == np.round(mc * 20))  # (1 + count) / (1 + 19 permutations)
    one = pairs["layers_searched"] == 1  # no search: the usual closed-form calibration stays
    assert one.any() and (~one).any()
    np.testing.assert_allclose(pairs.loc[one, "cka_linear_debiased_p"], pairs.loc[one, "cka_linear_debiased_p_naive"])
    assert not np.allclose(pairs.loc[~one, "cka_linear_debiased_z"], pairs.loc[~one, "cka_linear_debiased_z_naive"])
    assert "@" in output and "chosen by the layer sweep" in output


def test_one_cache_entry_holds_every_layer(layered_run):
    from safetensors import safe_open

    from pairscout.encode.cache import EmbeddingCache

    _, cache, _ = layered_run
    entries = [e for e in EmbeddingCache(cache).entries() if e.get("model_id") == "baseline:random-net"]
    assert len(entries) == 1 and sorted(entries[0]["layers"]) == ["3", "4"]
    with safe_open(entries[0]["path"], framework="pt") as f:
        assert {"pooled", "row_index", "layer.3", "layer.4"} <= set(f.keys())
        assert f.get_tensor("layer.3").shape == (64, 256) and f.get_tensor("layer.4").shape == (64, 512)


def test_align_trains_on_the_chosen_layers_and_the_model_uses_them(layered_run, tmp_path):
    from pairscout.align.model import AlignedModel

    run, cache, _ = layered_run
    pairs = pd.read_csv(run / "pairs.csv", dtype={"vision_layer": str, "text_layer": str})
    row = pairs[(pairs["vision"] == "random-net") & (pairs["text"] == "all-MiniLM-L6-v2")].iloc[0]
    out = tmp_path / "align"
    r = runner.invoke(app, ["align", str(run), "--pair", "random-net,all-MiniLM-L6-v2", "--steps", "5", "--out", str(out),
                            "--cache-dir", str(cache), "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layers"] == {"vision": row["vision_layer"], "text": row["text_layer"]}
    model = AlignedModel.load(out)
    for side, spec in (("vision", model.vision_spec), ("text", model.text_spec)):
        chosen = row[f"{side}_layer"]
        assert spec.layers == (None if chosen == "final" else [int(chosen)])  # only that block is computed
    emb = model.embed_texts(["a photo of a dog", "a red square"])
    enc = model.text_encoder.encode_texts(["a photo of a dog", "a red square"])
    feats = enc.pooled if row["text_layer"] == "final" else enc.layers[row["text_layer"]]
    with torch.inference_mode():
        expect = torch.nn.functional.normalize(model.text_head(feats.float(), None, None).float(), dim=-1)
    torch.testing.assert_close(emb, expect, atol=1e-5, rtol=1e-5)


def test_bad_layers_option_is_one_line(tmp_path):
    r = runner.invoke(app, ["rank", "--vision-zoo", "baseline:pixels", "--text-zoo", "baseline:tfidf", "--layers", "deep",
                            "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")])  # fmt: skip
    assert r.exit_code == 2
    assert "--layers 'deep' is neither 'all' nor a comma list" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["rank", "--vision-zoo", "baseline:random-net", "--text-zoo", "baseline:tfidf", "--layers", "all",
                            "--primary", "mutual_knn", "--data", "generated:size=32", "--n", "32", "--workers", "0", "--no-plots",
                            "--cache-dir", str(tmp_path / "c")])  # fmt: skip
    assert r.exit_code == 2 and "chooses layers by linear CKA" in r.output
