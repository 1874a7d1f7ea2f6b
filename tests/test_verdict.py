"""Verdict, k-NN ties, small data, probe read-outs and the multi-positive loss (issue 9)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from pairscout.align.evaluate import keyed_chance, retrieval_metrics
from pairscout.align.losses import InfoNCELoss, SigmoidLoss
from pairscout.errors import PairscoutError
from pairscout.metrics import all_pairs_cknna, all_pairs_mutual_knn
from pairscout.ranking import RankSettings
from pairscout.ranking import verdict as V
from pairscout.ranking.calibrated import adapt_to_size


# --- verdict -----------------------------------------------------------------------------------------
def _ranked(est: np.ndarray, v: list[str], t: list[str]) -> pd.DataFrame:
    rows = [{"vision": a, "text": b, "m": float(est[i, j])} for i, a in enumerate(v) for j, b in enumerate(t)]
    return pd.DataFrame(rows).sort_values("m", ascending=False, kind="stable").reset_index(drop=True)


def test_verdict_with_planted_duplicate_and_tie():
    g = torch.Generator().manual_seed(0)
    n = 400
    s = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 16, generator=g)
    vA = s @ w + 2.0 * torch.randn(n, 16, generator=g)
    vB = s @ w + 2.0 * torch.randn(n, 16, generator=g)  # the same signal, fresh noise: a planted tie
    vC = torch.randn(n, 16, generator=g)  # unrelated
    tA = s @ torch.randn(8, 12, generator=g) + 0.5 * torch.randn(n, 12, generator=g)
    tA2 = tA + 1e-3 * torch.randn(n, 12, generator=g)  # a near-duplicate copy of tA
    tR = torch.randn(n, 12, generator=g)
    xs, ys = [vA, vB, vC], [tA, tA2, tR]
    v, t = ["vA", "vB", "vC"], ["tA", "tA2", "tR"]
    from pairscout.metrics import all_pairs_cka

    est = all_pairs_cka(xs, ys, "linear", True).numpy()
    reps = V.jackknife_replicates(xs, ys, "cka_linear_debiased", groups=10, seed=0).numpy()
    dups = V.near_duplicates(dict(zip(v, xs, strict=True))) + V.near_duplicates(dict(zip(t, ys, strict=True)))
    assert [(a, b) for a, b, _ in dups] == [("tA", "tA2")]
    pairs = _ranked(est, v, t).rename(columns={"m": "cka_linear_debiased"})
    ver = V.decide(pairs, "cka_linear_debiased", est, reps, v, t, dups)
    best = ver.pair
    assert best[0] in ("vA", "vB") and best[1] in ("tA", "tA2")
    other_v = "vB" if best[0] == "vA" else "vA"
    twin = "tA2" if best[1] == "tA" else "tA"
    assert (best[0], twin) in ver.tied  # the duplicate: preferred neither
    assert (other_v, best[1]) in ver.tied  # the planted tie
    assert all(p[0] != "vC" and p[1] != "tR" for p in ver.tied)  # unrelated pairs are distinguishably lower
    assert ver.duplicates == [("tA", "tA2")]
    assert "near-duplicates" in ver.reason and "not distinguishable" in ver.reason
    d = ver.to_dict()
    assert d["pair"] == list(best) and V.Verdict.from_dict(d).tied == ver.tied


def test_tie_tests_are_holm_corrected_over_the_comparisons():
    """Two pairs each just below the best with uncorrected p = 0.03 and 0.04: one comparison alone would call them
    lower, but claiming both is two claims; Holm (0.06, 0.06) keeps them tied. A clear gap stays distinguishable."""
    from scipy import stats

    g = 10
    base = np.linspace(-1.0, 1.0, g)
    unit = base / np.sqrt((g - 1) / g * (base**2).sum())  # jackknife se of d * unit is exactly d-scale 1

    def diff_for(p: float) -> float:  # the difference whose paired t-test with se 1 has two-sided p
        return float(stats.t.isf(p / 2, df=g - 1))

    d1, d2 = diff_for(0.03), diff_for(0.04)
    est = np.array([[10.0, 10.0 - d1, 10.0 - d2, 0.0]])
    reps = np.zeros((g, 1, 4))
    reps[:, 0, 1], reps[:, 0, 2], reps[:, 0, 3] = unit, -unit, 0.01 * unit
    pairs = _ranked(est, ["v"], ["a", "b", "c", "d"]).rename(columns={"m": "cka"})
    ver = V.decide(pairs, "cka", est, reps, ["v"], ["a", "b", "c", "d"])
    by = {tuple(r["pair"]): r for r in ver.tests}
    assert by[("v", "b")]["p"] == pytest.approx(0.03, rel=1e-6) and by[("v", "c")]["p"] == pytest.approx(0.04, rel=1e-6)
    assert by[("v", "b")]["p_holm"] == pytest.approx(0.06, rel=1e-6) and by[("v", "c")]["p_holm"] == pytest.approx(0.06, rel=1e-6)
    assert ver.tied == [("v", "c"), ("v", "b")] and not by[("v", "d")]["tied"]  # in rank order
    assert "Holm-corrected over 3 comparisons" in ver.reason


def test_paired_test_is_sharper_than_overlapping_intervals():
    """Two pairs whose intervals overlap widely but whose difference is consistent across replicates."""
    base = np.linspace(0.0, 0.2, 10)  # shared noise across replicates
    reps = np.stack([np.stack([base + 0.10, base + 0.09])[None, :].reshape(1, 2) for base in base])  # (10, 1, 2)
    est = np.array([[0.2, 0.19]])
    r = V.paired_test(est, reps, (0, 0), (0, 1))
    assert r["p"] < 0.05  # distinguishable, although each interval (spread 0.2) covers the other's estimate


def test_update_from_probe_moves_only_when_separated():
    ver = V.Verdict(pair=("a", "x"), tied=[("b", "x")], reason="r")
    probed = pd.DataFrame({"vision": ["a", "b"], "text": ["x", "x"], "zs_top1": [0.50, 0.80]})
    new = V.update_from_probe(ver, probed, "zs_top1", 400)
    assert new.pair == ("b", "x") and new.source == "probe" and new.tied == []
    close = probed.assign(zs_top1=[0.50, 0.52])
    same = V.update_from_probe(ver, close, "zs_top1", 400)
    assert same.pair == ("a", "x") and "does not separate" in same.reason and same.tied == [("b", "x")]


def test_probe_separation_is_holm_corrected_over_the_tied_pairs():
    """Two tied pairs each read 0.076 below the best on 400 items (z = 2.17, p = 0.030 each): one comparison would
    separate it; two comparisons, Holm-corrected (0.060), separate neither."""
    ver = V.Verdict(pair=("a", "x"), tied=[("b", "x"), ("c", "x")], reason="r")
    probed = pd.DataFrame({"vision": ["a", "b", "c"], "text": ["x", "x", "x"], "zs_top1": [0.600, 0.524, 0.524]})
    assert V.update_from_probe(ver, probed, "zs_top1", 400).tied == [("b", "x"), ("c", "x")]
    one = V.Verdict(pair=("a", "x"), tied=[("b", "x")], reason="r")
    assert V.update_from_probe(one, probed.iloc[:2], "zs_top1", 400).tied == []


def test_update_from_probe_confirms_the_best_pair_and_unties_what_it_separates():
    """The probe reads the metrics' best pair highest: pairs clearly below it leave the tied list, close ones stay."""
    ver = V.Verdict(pair=("a", "x"), tied=[("b", "x"), ("c", "x"), ("d", "x")], reason="r")
    probed = pd.DataFrame({"vision": ["a", "b", "c"], "text": ["x", "x", "x"], "zs_top1": [0.96, 0.80, 0.95]})
    new = V.update_from_probe(ver, probed, "zs_top1", 80)
    assert new.pair == ("a", "x") and new.source == "rank"
    assert new.tied == [("c", "x"), ("d", "x")]  # b separated (z = 3.2, Holm p 0.003); c within; d not probed
    assert "separates the metrics' best pair from b x x" in new.reason and "does not separate it from c x x" in new.reason
    assert "Not probed: d x x" in new.reason and "does not separate them either" not in new.reason
    only = V.update_from_probe(V.Verdict(pair=("a", "x"), tied=[("b", "x")], reason="r"), probed, "zs_top1", 80)
    assert only.tied == [] and "it is no longer tied" in only.reason and "any more" not in only.reason
    missing = V.update_from_probe(V.Verdict(pair=("z", "x"), tied=[("a", "x"), ("b", "x")], reason="r"), probed, "zs_top1", 80)
    assert missing.pair == ("z", "x") and missing.tied == [("a", "x"), ("b", "x")] and "did not read the verdict's pair" in missing.reason


# --- k-NN ties -----------------------------------------------------------------------------------
def test_knn_ties_row_shuffle_does_not_change_mutual_knn_or_cknna():
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 10, (200,), generator=g)
    x = torch.randn(10, 32, generator=g)[lab] + 0.5 * torch.randn(200, 32, generator=g)
    y = torch.randn(10, 16, generator=g)[lab]  # identical rows per class: duplicate captions
    a, c = float(all_pairs_mutual_knn([x], [y], 10)), float(all_pairs_cknna([x], [y], 10))
    for _ in range(3):
        p = torch.randperm(200, generator=g)
        assert float(all_pairs_mutual_knn([x[p]], [y[p]], 10)) == pytest.approx(a, abs=1e-12)
        assert float(all_pairs_cknna([x[p]], [y[p]], 10)) == pytest.approx(c, abs=1e-9)


def test_tied_neighbours_share_slots_equally():
    from pairscout.metrics.knn import nearest_neighbours

    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # row 0's two nearest are tied rows 1, 2
    nb = nearest_neighbours(x, k=1)
    assert nb.weights is not None and nb.k == 1
    w = dict(zip(nb.indices[0].tolist(), nb.weights[0].tolist(), strict=True))
    assert w[1] == pytest.approx(0.5) and w[2] == pytest.approx(0.5)


def test_cknna_never_out_of_range_on_tiny_degenerate_data(caplog):
    g = torch.Generator().manual_seed(0)
    lab = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    x = torch.randn(12, 64, generator=g)
    y = torch.randn(2, 8, generator=g)[lab]
    with caplog.at_level(logging.WARNING):
        v = float(all_pairs_cknna([x], [y], 10))
    assert np.isnan(v) or -1 <= v <= 1


# --- small data ----------------------------------------------------------------------------------
def test_small_data_adapts_k_and_groups_and_says_so():
    used, notes = adapt_to_size(RankSettings(), 12, ["cka_linear_debiased", "mutual_knn", "cknna"])
    assert used.ci_groups == 2 and used.knn_k == 2
    assert set(notes) == {"ci_groups", "knn_k"} and "rows" in notes["knn_k"]["why"]
    used, notes = adapt_to_size(RankSettings(ci_groups=0), 12, ["cknna"])
    assert used.ci_groups == 0 and used.knn_k == 5
    with pytest.raises(PairscoutError, match=r"k >= 2.*n = 4.*--knn-k 10"):
        adapt_to_size(RankSettings(ci_groups=0), 4, ["cknna"])
    used, notes = adapt_to_size(RankSettings(), 1000, ["cknna"])
    assert notes == {} and used.knn_k == 10 and used.ci_groups == 10


# --- read-outs -----------------------------------------------------------------------------------
def test_instance_retrieval_known_answer():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.95, 0.0, 0.3]])  # image 2 prefers caption 0
    m = retrieval_metrics(sim, torch.arange(3))
    assert m["i2t_r1"] == pytest.approx(2 / 3)
    assert m["t2i_r1"] == pytest.approx(2 / 3)  # caption 0 prefers image 2


def test_duplicate_captions_are_interchangeable_known_answer():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.95, 0.0, 0.3]])
    keys = torch.tensor([7, 3, 7])  # captions 0 and 2 are the same text
    m = retrieval_metrics(sim, torch.arange(3), txt_keys=keys)
    assert m["i2t_r1"] == 1.0 and m["t2i_r1"] == 1.0
    assert retrieval_metrics(sim, torch.arange(3), txt_keys=torch.arange(3)) == retrieval_metrics(sim, torch.arange(3))


def test_class_aware_retrieval_and_chance_known_answer():
    sim = torch.tensor([[0.1, 0.9, 0.0, 0.0], [0.0, 0.1, 0.9, 0.0], [0.0, 0.0, 0.1, 0.9], [0.9, 0.0, 0.0, 0.1]])
    labels = torch.tensor([0, 0, 1, 1])
    m = retrieval_metrics(sim, torch.arange(4), txt_keys=labels, prefix="class_")
    # image 0 -> caption 1 (class 0: hit); image 1 -> caption 2 (class 1: miss); 2 -> 3 hit; 3 -> 0 miss
    assert m["class_i2t_r1"] == 0.5
    assert keyed_chance(torch.arange(4), labels, 4)["mean_r1"] == pytest.approx(0.5)
    assert keyed_chance(torch.arange(4), torch.arange(4), 4)["mean_r1"] == pytest.approx(0.25)


def test_choose_readout_labels_absent_present_and_override():
    from pairscout.data import load_dataset
    from pairscout.evaluation.probe import choose_readout

    ds = load_dataset("generated:n=20,seed=0,size=16")
    assert choose_readout(ds).target == "zs_top1" and choose_readout(ds).zero_shot
    assert choose_readout(ds, "mean_r1").target == "mean_r1"

    class NoLabels:
        labels = None
        classnames = None

        def flat_captions(self):
            return ["a cat", "a cat", "a dog"], None

    r = choose_readout(NoLabels())
    assert r.target == "mean_r1" and "2 distinct captions of 3" in r.why
    with pytest.raises(PairscoutError, match="needs class labels"):
        choose_readout(NoLabels(), "zs_top1")


# --- multi-positive loss and a probe on repeated captions --------------------------------------------
@pytest.mark.parametrize("chunk", [None, 2])
def test_sigmoid_pos_mask_equals_plain_labels(chunk):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    pos = torch.tensor([[1, 0, 0, 0, 1], [0, 1, 0, 0, 0], [0, 0, 1, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    ref = SigmoidLoss(norm="batch")
    logits = ref.get_logits(torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1))
    want = -torch.nn.functional.logsigmoid((pos.double() * 2 - 1) * logits).sum() / 4
    got = SigmoidLoss(norm="batch", chunk=chunk)(img, txt, torch.tensor([0, 1, 2, 2, 3]), pos_mask=pos)
    assert float(got) == pytest.approx(float(want), rel=1e-10)
    assert torch.isfinite(InfoNCELoss()(img, txt, torch.tensor([0, 1, 2, 2, 3]), pos_mask=pos))


def test_every_readout_s_chance_level_comes_from_its_record():
    """The chance level is read from the read-out's typed record (kind and k), not parsed from its name."""
    import math

    from pairscout.align.evaluate import EvalSet
    from pairscout.evaluation.probe import TARGETS, chance_level
    from pairscout.evaluation.readouts import READOUTS

    assert set(READOUTS) == set(TARGETS)
    labels, tii = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    ev = EvalSet(torch.randn(4, 3), torch.randn(8, 3), tii, labels=labels, class_prompts=torch.randn(2, 1, 3))
    want = {"zs_top1": 0.5, "zs_top5": 1.0, "class_map": 0.5, "heldout_loss": None, "loss_auc": None,
            "class_mean_r1": keyed_chance(tii, labels[tii], 4, 1)["mean_r1"],
            **{f"mean_r{k}": keyed_chance(tii, torch.arange(8), 4, k)[f"mean_r{k}"] for k in (1, 5, 10)}}
    assert {t: chance_level(ev, t, 4) for t in READOUTS} == pytest.approx(want)
    assert want["mean_r1"] != want["class_mean_r1"]
    assert math.isnan(chance_level(EvalSet(ev.vision, ev.text, tii, labels=labels), "zs_top1", 4))


def test_probe_on_repeated_captions_is_well_above_chance():
    """10 classes, 3 caption templates per class (every caption repeated many times): training with identical
    captions as positives and reading class-aware / caption-aware retrieval lands far above chance."""
    from pairscout.align.evaluate import EvalSet
    from pairscout.align.pairdata import caption_keys
    from pairscout.align.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    n = 600
    lab = torch.randint(0, 10, (n,), generator=g)
    img = torch.randn(10, 32, generator=g)[lab] + 0.7 * torch.randn(n, 32, generator=g)
    tpl = torch.randint(0, 3, (n,), generator=g)
    texts = [f"template {int(t)} of class {int(c)}" for c, t in zip(lab, tpl, strict=True)]
    temb = torch.randn(10, 16, generator=g)[lab] + 0.3 * torch.randn(3, 16, generator=g)[tpl]  # identical per text
    keys = caption_keys(texts)
    tr, te = torch.arange(0, 480), torch.arange(480, n)
    ev = EvalSet(img[te], temb[te], torch.arange(len(te)), labels=lab[te], text_keys=keys[te])
    cfg = TrainConfig(head="linear", out_dim=32, steps=150, batch_size=128, seed=0, device="cpu", log_every=50)
    res = train(img[tr], temb[tr], torch.arange(len(tr)), cfg, eval_data=ev, caption_keys=keys[tr])
    chance = keyed_chance(ev.text_image_index, ev.labels[ev.text_image_index], len(te))["mean_r1"]
    assert chance < 0.15
    assert res.metrics["class_mean_r1"] > 0.8
    inst_chance = keyed_chance(ev.text_image_index, ev.text_keys, len(te))["mean_r1"]
    assert res.metrics["mean_r1"] > inst_chance + 0.3


def test_cycle_knn_with_tied_neighbours_is_valid_and_shuffle_invariant():
    from pairscout.metrics.measures import cycle_knn

    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 5, (100,), generator=g)
    x, y = torch.randn(100, 8, generator=g), torch.randn(5, 4, generator=g)[lab]  # y: identical rows per class
    v = cycle_knn(x, y, 5)
    p = torch.randperm(100, generator=g)
    assert 0 <= v <= 1 and cycle_knn(x[p], y[p], 5) == pytest.approx(v)


def test_rank_columns_and_verdict_replicates_come_from_one_pass():
    """compute.pair_metrics and the verdict's jackknife_replicates read the one estimation pass: the same numbers."""
    from pairscout.estimation import estimate
    from pairscout.ranking import compute

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(60, 5, generator=g) for _ in range(2)]
    ys = [xs[0][:, :3] + torch.randn(60, 3, generator=g), torch.randn(60, 4, generator=g)]
    st = RankSettings(ci_groups=5, permutations=0)
    metrics = ["cka_linear_debiased", "cka_linear", "mutual_knn"]
    est = estimate(xs, ys, metrics, groups=5, seed=0, permutations=0, options={m: st.metric_options(m) for m in metrics})
    want = compute.pair_metrics(xs, ys, metrics, st, "cka_linear_debiased")
    got = est.columns()
    reps = V.jackknife_replicates(xs, ys, "cka_linear_debiased", groups=5, seed=0)
    assert set(got) == set(want) and reps.shape == (5, 2, 2)
    assert torch.equal(reps, est.replicates["cka_linear_debiased"])
    for k in want:
        assert np.allclose(got[k], want[k], atol=1e-12), k


def test_the_verdict_never_recommends_a_control_pair_and_says_when_controls_outscore():
    """Pairs with a ``baseline:`` encoder are controls: with real pairs present, the verdict picks the best real pair,
    tests ties among real pairs only, and names the controls ranked above it (a random text encoder that wins on
    templated captions); a zoo of controls only keeps its top pair."""
    g = torch.Generator().manual_seed(0)
    n = 300
    s = torch.randn(n, 6, generator=g)
    vA = s @ torch.randn(6, 16, generator=g) + torch.randn(n, 16, generator=g)
    tR = s @ torch.randn(6, 12, generator=g) + 0.1 * torch.randn(n, 12, generator=g)  # the control: strongest signal
    tA = s @ torch.randn(6, 12, generator=g) + 2.0 * torch.randn(n, 12, generator=g)
    tB = torch.randn(n, 12, generator=g)
    xs, ys, v, t = [vA], [tR, tA, tB], ["vA"], ["random-text", "tA", "tB"]
    from pairscout.metrics import all_pairs_cka

    est = all_pairs_cka(xs, ys, "linear", True).numpy()
    reps = V.jackknife_replicates(xs, ys, "cka_linear_debiased", groups=10, seed=0).numpy()
    pairs = _ranked(est, v, t).rename(columns={"m": "cka_linear_debiased"})
    ids = {"vA": "pack:vA", "random-text": "baseline:random-text", "tA": "hf:tA", "tB": "hf:tB"}
    pairs["vision_id"], pairs["text_id"] = pairs["vision"].map(ids), pairs["text"].map(ids)
    assert pairs["text"].iloc[0] == "random-text"  # the control ranks first
    ver = V.decide(pairs, "cka_linear_debiased", est, reps, v, t)
    assert ver.pair == ("vA", "tA")
    assert ver.controls_above == [("vA", "random-text")]
    assert [tuple(r["pair"]) for r in ver.tests] == [("vA", "tB")]  # ties tested among real pairs only
    assert "among pairs of real encoders" in ver.reason and "1 control pair" in ver.reason and "vA x random-text" in ver.reason
    assert V.Verdict.from_dict(ver.to_dict()).controls_above == ver.controls_above
    everything = pairs.assign(text_id="baseline:" + pairs["text"])  # controls only: the top pair, as before
    only = V.decide(everything, "cka_linear_debiased", est, reps, v, t)
    assert only.pair == ("vA", "random-text") and only.controls_above == [] and "control" not in only.reason
    plain = V.decide(pairs.drop(columns=["vision_id", "text_id"]), "cka_linear_debiased", est, reps, v, t)
    assert plain.pair == ("vA", "random-text")  # without ids nothing is known to be a control


def test_rank_table_marks_control_pairs_only_in_a_mixed_zoo():
    """The rank table marks each control pair ``c`` (and says so in its caption) when real pairs are ranked too;
    a zoo of controls only is printed as before."""
    from types import SimpleNamespace

    from rich.console import Console

    from pairscout.cli.rank import rank_table

    pairs = pd.DataFrame({"rank": [1, 2, 3], "vision": ["eff", "eff", "pix"], "text": ["random-text", "minilm", "minilm"],
                          "vision_id": ["pack:eff", "pack:eff", "baseline:pixels"],
                          "text_id": ["baseline:random-text", "pack:minilm", "pack:minilm"],
                          "m": [0.3, 0.2, 0.1], "m_lo": [0.2, 0.1, 0.0], "m_hi": [0.4, 0.3, 0.2]})
    res = SimpleNamespace(meta={"dataset": {"name": "d"}, "settings": {"n": 10, "score": "primary", "permutations": 0}},
                          primary="m", pairs=pairs, metrics=["m"])

    def text(r) -> str:
        con = Console(width=100, record=True)
        con.print(rank_table(r, 10))
        return con.export_text()

    out = text(res)
    assert "1 c" in out and "3 c" in out and "2 c" not in out and "c: a control pair" in out
    every = SimpleNamespace(**{**vars(res), "pairs": pairs.assign(text_id="baseline:" + pairs["text"])})
    assert " c " not in text(every).replace("c: a", "") and "c: a control pair" not in text(every)
