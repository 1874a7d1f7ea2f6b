"""probe (metric vs probe correlations), align (aligned model save/load, raw inputs) and their CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pairscout.align.evaluate import EvalSet, project
from pairscout.align.model import AlignedModel, align
from pairscout.align.pairdata import PairData, split_pair
from pairscout.align.train import TrainConfig
from pairscout.cli import app
from pairscout.embeddings.cache import Embeddings
from pairscout.evaluation.probe import ProbeResult, ProbeSettings, correlations, probe_pairs, select_pairs
from pairscout.zoo.spec import EncoderSpec

runner = CliRunner()
DATA = "generated:n=60,seed=0,size=32"
VISION = "baseline:pixels,baseline:random-vision"
TEXT = "baseline:tfidf,baseline:random-text"


# --- correlations with a known answer ---------------------------------------------------------------
def test_correlations_of_hand_made_columns():
    df = pd.DataFrame({"m_up": [1, 2, 3, 4, 5], "m_down": [5, 4, 3, 2, 1], "flat": [1, 1, 1, 1, 1], "mean_r1": [0.1, 0.2, 0.5, 0.6, 0.9]})
    c = correlations(df, ["m_up", "m_down", "flat"]).set_index("metric")
    assert c.loc["m_up", "spearman"] == pytest.approx(1.0) and c.loc["m_up", "kendall"] == pytest.approx(1.0)
    assert c.loc["m_down", "spearman"] == pytest.approx(-1.0)
    assert c.loc["m_up", "kendall_p"] == pytest.approx(2 / 120)  # exact test: 1 of 5! orderings, two-sided
    assert pd.isna(c.loc["flat", "spearman"]) and c.loc["flat", "n_pairs"] == 5


def test_probe_recovers_a_metric_that_tracks_the_true_noise_level():
    """Five 'text encoders' = a rotation of the image features plus growing noise; a metric column that is
    monotone in the noise must come out with Spearman ~ +1 against the probes' R@1, its mirror ~ -1."""
    g = torch.Generator().manual_seed(0)
    n, d = 400, 24
    x = torch.randn(n, d, generator=g)
    noises = [0.3, 0.8, 1.5, 2.5, 5.0]
    texts = {}
    for k, s in enumerate(noises):
        rot = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
        texts[f"t{k}"] = x @ rot + s * torch.randn(n, d, generator=g)
    train_rows, test_rows = torch.arange(300), torch.arange(300, 400)
    vemb = Embeddings(pooled=x, row_index=torch.arange(n))

    def load(v: str, t: str) -> PairData:
        temb = Embeddings(pooled=texts[t], row_index=torch.arange(n))
        xv, xt, idx, _ = split_pair(vemb, temb, train_rows)
        ev, et, eidx, _ = split_pair(vemb, temb, test_rows)
        spec = EncoderSpec(id="emb:x.npy", modality="vision")
        return PairData(spec, EncoderSpec(id=f"emb:{t}.npy", modality="text"), xv, xt, idx, EvalSet(ev, et, eidx), train_rows, test_rows, "fp")

    ranked = pd.DataFrame({"vision": "x", "text": list(texts), "clean": [-s for s in noises], "noisy": noises})
    res = probe_pairs(ranked, load, ["clean", "noisy"], ProbeSettings(steps=120, batch_size=100, out_dim=32))
    r1 = res.pairs["mean_r1"].tolist()
    assert r1[0] > 0.9 and r1[-1] < 0.2, r1
    c = res.correlations.set_index("metric")
    assert c.loc["clean", "spearman"] == pytest.approx(1.0) and c.loc["clean", "spearman_p"] < 0.05
    assert c.loc["noisy", "spearman"] == pytest.approx(-1.0) and c.loc["clean", "kendall"] == pytest.approx(1.0)


def test_select_pairs_takes_top_and_bottom_without_overlap():
    ranked = pd.DataFrame({"vision": list("abcde"), "text": list("vwxyz"), "rank": [1, 2, 3, 4, 5]})
    sel = select_pairs(ranked, 2, 2)
    assert sel["rank"].tolist() == [1, 2, 4, 5] and sel["group"].tolist() == ["top", "top", "bottom", "bottom"]
    assert select_pairs(ranked, 4, 3)["rank"].tolist() == [1, 2, 3, 4, 5]
    long = pd.DataFrame({"vision": [f"v{i}" for i in range(20)], "text": [f"t{i}" for i in range(20)], "rank": range(1, 21)})
    sel = select_pairs(long, 2, 2, middle_k=3)
    assert sel["rank"].tolist() == [1, 2, 7, 11, 14, 19, 20]  # evenly spaced through ranks 3..18
    assert sel["group"].tolist() == ["top", "top", "middle", "middle", "middle", "bottom", "bottom"]


# --- a small rank run shared by the CLI tests ------------------------------------------------------
@pytest.fixture(scope="module")
def rank_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_align")
    run, cache = root / "run", root / "cache"
    r = runner.invoke(app, ["rank", "--vision-zoo", VISION, "--text-zoo", TEXT, "--data", DATA, "--out", str(run), "--cache-dir", str(cache),
                            "--permutations", "0", "--ci-groups", "0", "--no-plots", "--workers", "0", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    return run, cache


def test_probe_cli_on_a_rank_run(rank_run):
    run, cache = rank_run
    r = runner.invoke(app, ["probe", "--run", str(run), "--cache-dir", str(cache), "--top-k", "2", "--bottom-k", "1", "--middle-k", "0",
                            "--steps", "25", "--out-dim", "32", "--batch-size", "32", "--device", "cpu", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert len(payload["pairs"]) == 3 and [p["group"] for p in payload["pairs"]] == ["top", "top", "bottom"]
    assert {c["metric"] for c in payload["correlations"]} >= {"cka_linear_debiased", "mutual_knn", "score"}
    assert "did the metric predict" in r.stderr and "R@1 i2t" in r.stderr, r.stderr[-3000:]
    saved = ProbeResult.load(run)
    assert saved.pairs[["vision", "text"]].values.tolist() == [[p["vision"], p["text"]] for p in payload["pairs"]]
    assert saved.pairs["mean_r1"].tolist() == pytest.approx([p["mean_r1"] for p in payload["pairs"]])
    assert (run / "probe.csv").is_file() and (run / "probe_correlations.csv").is_file()
    assert saved.correlations["metric"].tolist() == [c["metric"] for c in payload["correlations"]]


def test_probe_cli_pairs_all_records_the_readouts_the_target_and_the_regret(rank_run, tmp_path):
    """--pairs all probes every pair of the run (fused), says so first, records every read-out's separation and the
    regret table (printed too), and the correlations without the baseline pairs."""
    run, cache = rank_run
    r = runner.invoke(app, ["probe", "--run", str(run), "--cache-dir", str(cache), "--pairs", "all", "--steps", "20", "--out-dim", "16",
                            "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    meta = payload["meta"]
    assert len(payload["pairs"]) == 4 and "probing all 4 pairs (--pairs all)" in r.stderr
    assert meta["separation_over"] == "all probed pairs"  # every encoder here is a weight-free baseline
    assert {s["readout"] for s in meta["target_choice"]["separation"]} >= {"zs_top1", "class_map", "class_mean_r1", "mean_r1", "heldout_loss", "loss_auc"}
    assert all(f"heldout_loss@{s}" in payload["pairs"][0] for s in meta["curve_steps"]) and meta["curve_steps"] == [2, 5, 10, 20]
    assert [x["rule"] for x in meta["regret"]["rules"]] == ["pairscout", "freeze_align", "sail", "random"]
    assert "had you followed each rule" in r.stderr and "regret: " in r.stderr
    assert payload["correlations_without_baselines"] is not None
    saved = ProbeResult.load(tmp_path)
    assert saved.regret.oracle == tuple(meta["regret"]["oracle"]) and saved.target_choice.target == meta["target"]
    assert saved.correlations_without_baselines is not None and (tmp_path / "probe_correlations_without_baselines.csv").is_file()


def test_missing_cache_names_the_command(rank_run, tmp_path):
    run, _ = rank_run
    r = runner.invoke(app, ["probe", "--run", str(run), "--cache-dir", str(tmp_path / "empty"), "--steps", "5"])
    assert r.exit_code == 2
    line = r.output.strip()
    assert "\n" not in line and "no cached embeddings of baseline:" in line
    assert "pairscout encode --vision-zoo baseline:" in line and f"--data {DATA}" in line and "--cache-dir" in line


def test_align_cli_saves_a_model_that_zero_shots_raw_images(rank_run, tmp_path):
    run, cache = rank_run
    model_dir = tmp_path / "model"
    args = ["align", "--run", str(run), "--cache-dir", str(cache), "--pair", "pixels,tfidf", "--head", "glu", "--steps", "30",
            "--out-dim", "32", "--hidden-mult", "2", "--batch-size", "32", "--checkpoint-every", "10", "--keep-checkpoint", "--device", "cpu", "--out", str(model_dir)]  # fmt: skip
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["vision"] == "pixels" and payload["text"] == "tfidf" and 0 <= payload["metrics"]["mean_r1"] <= 1
    assert "zs_top1" in payload["metrics"] and "Recall@1" in r.stderr
    assert (model_dir / "config.json").is_file() and (model_dir / "heads.safetensors").is_file() and (model_dir / "fit_texts.json").is_file()
    assert json.loads((model_dir / "train" / "train_log.json").read_text())["status"] == "finished"

    # same folder again: refused without --resume; --resume with other settings: refused; with the same: fine
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "holds checkpoints of an earlier run" in r.output
    r = runner.invoke(app, [*args, "--resume", "--lr", "0.01"])
    assert r.exit_code == 2 and "other settings (lr: 0.001 there, 0.01 now)" in r.output
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "--force", "--drop-checkpoint"])  # the default: a finished run keeps no optimiser state
    assert r.exit_code == 0, r.output
    assert not (model_dir / "train" / "checkpoints").exists() and (model_dir / "heads.safetensors").is_file()
    r = runner.invoke(app, [*args[:-4], "--device", "cpu", "--out", str(model_dir)])  # a finished model is not overwritten silently
    assert r.exit_code == 2 and "already holds an aligned model" in r.output

    from pairscout.data import load_dataset

    ds = load_dataset(DATA)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        ds.load_image(i).save(paths[-1])
    r = runner.invoke(app, ["zero-shot", "--model", str(model_dir), *map(str, paths), "--classes", "circle,square,star", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert len(out) == 3 and all(len(o["top"]) == 3 for o in out)
    assert all(sum(t["p"] for t in o["top"]) == pytest.approx(1.0, abs=1e-5) for o in out)
    assert "embed identically" not in r.stderr
    # TF-IDF knows only the training captions' words: unknown class names embed alike, and that is said
    r = runner.invoke(app, ["zero-shot", "--model", str(model_dir), str(paths[0]), "--classes", "circle,zebra,quokka", "--json"])
    assert r.exit_code == 0, r.output
    assert "the classes 'zebra', 'quokka' embed identically through baseline:tfidf" in r.stderr


def test_align_errors_are_one_line(rank_run, tmp_path):
    run, cache = rank_run
    base = ["align", "--run", str(run), "--cache-dir", str(cache), "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "m")]
    cases = [
        (["--pair", "pixels,tfidf", "--head", "local_global"], "no cached token features of baseline:pixels"),
        (["--pair", "nosuch,tfidf"], "vision encoder 'nosuch' is not part of this run"),
        (["--pair", "pixels"], "--pair 'pixels' is malformed"),
        (["--pair", "pixels,tfidf", "--vision-zoo", "baseline:pixels"], "got both --run and --vision-zoo"),
    ]
    for extra, needle in cases:
        r = runner.invoke(app, [*base, *extra])
        assert r.exit_code == 2, (extra, r.output)
        errors = [line for line in r.output.splitlines() if "error:" in line]
        assert len(errors) == 1 and needle in errors[0], r.output


def test_aligned_model_round_trip_and_raw_inputs_match_the_cache(rank_run, tmp_path):
    run, cache = rank_run
    cfg = TrainConfig(head="mlp", out_dim=16, steps=20, batch_size=32, device="cpu")
    res = align(("pixels", "tfidf"), run=run, cache_dir=cache, config=cfg, zero_shot=False)
    model = res.model
    from pairscout.data import load_dataset

    ds = load_dataset(DATA)
    images = [ds.load_image(i) for i in range(8)]
    captions = [ds.captions[i][0] for i in range(8)]
    img, txt = model.embed_images(images), model.embed_texts(captions)
    assert img.shape == (8, 16) and torch.allclose(img.norm(dim=-1), torch.ones(8))

    model.save(tmp_path / "m")
    loaded = AlignedModel.load(tmp_path / "m")
    assert torch.equal(loaded.embed_images(images), img) and torch.equal(loaded.embed_texts(captions), txt)
    assert loaded.meta["dataset_fingerprint"] == ds.fingerprint and loaded.meta["train_config"]["head"] == "mlp"

    # raw images / texts through the rebuilt encoders land where the cached features do
    from pairscout.align.pairdata import load_embeddings, source_from_rank

    src = source_from_rank(run, cache_dir=cache)
    v = load_embeddings(src, src.spec("pixels", "vision"))
    t = load_embeddings(src, src.spec("tfidf", "text"))
    torch.testing.assert_close(project(model.vision_head, v.pooled[:8]), img, atol=1e-4, rtol=1e-4)
    first = torch.tensor([int(torch.nonzero(t.row_index == i)[0]) for i in range(8)])
    torch.testing.assert_close(project(model.text_head, t.pooled[first]), txt, atol=1e-4, rtol=1e-4)

    scores, idx = loaded.retrieve(texts=captions, images=images, k=3)
    assert scores.shape == (8, 3) and idx.shape == (8, 3)
    zs = loaded.zero_shot(images[:2], ds.classnames, top_k=2)
    assert zs.probs.shape == (2, len(ds.classnames)) and torch.allclose(zs.probs.sum(-1), torch.ones(2))


def test_align_says_when_the_short_probe_beat_it(tmp_path):
    """The run's probe read this pair clearly higher than the aligned model: one line says so and what to try; within
    the binomial noise, or without a probe, nothing is said."""
    from types import SimpleNamespace as S

    from pairscout.cli.align import against_probe_line
    from pairscout.evaluation.result import ProbeResult

    pairs = pd.DataFrame({"vision": ["v"], "text": ["t"], "zs_top1": [0.70]})
    ProbeResult(pairs=pairs, correlations=pd.DataFrame(), meta={"target": "zs_top1", "n_test_items": 400,
                                                                 "settings": {"steps": 300}}).save(tmp_path)
    res = S(model=S(vision_spec=S(name="v"), text_spec=S(name="t")), metrics={"zs_top1": 0.60})
    line = against_probe_line(tmp_path, res)
    assert line.startswith("note: the probe's linear heads (300 steps) read 0.700 zero-shot top-1") and "0.600" in line
    assert against_probe_line(tmp_path, S(model=res.model, metrics={"zs_top1": 0.68})) == ""  # within the noise
    assert against_probe_line(tmp_path / "none", res) == ""
