"""The fused multi-pair probe: equal to training the pairs one by one, read-outs as sums of per-image parts, the target
chosen by separation (a planted case where only the loss separates; a saturated case that cannot tell), and the regret
table on a planted zoo whose oracle is known."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pairscout.align.evaluate import EvalSet, evaluate, project
from pairscout.align.pairdata import PairData, split_pair
from pairscout.align.train import TrainConfig, train
from pairscout.embeddings.cache import Embeddings
from pairscout.evaluation import readouts as R
from pairscout.evaluation.fused import FusedPair, HeldOut, fused_train, heldout_positives
from pairscout.evaluation.probe import ProbeSettings, probe_pairs, verdict
from pairscout.evaluation.regret import regret_table, rule_pairs
from pairscout.zoo.spec import EncoderSpec


# --- fused == one by one ---------------------------------------------------------------------------------------------
def test_fused_training_equals_one_by_one_to_float_rounding():
    """Three pairs of different input widths (two share a vision table), one with caption keys, one with its own seed:
    every weight, bias, scale, bias of the loss and the final loss equal train()'s for that pair alone."""
    g = torch.Generator().manual_seed(0)
    n = 160
    x, x2 = torch.randn(n, 12, generator=g), torch.randn(n, 20, generator=g)
    ys = [x @ torch.randn(12, 8, generator=g), torch.randn(n, 8, generator=g), x2[:, :10] + 0.1 * torch.randn(n, 10, generator=g)]
    keys = torch.arange(n) % 120  # some captions identical: positives of each other's images
    cfg = TrainConfig(head="linear", out_dim=16, loss="sigmoid", steps=25, batch_size=48, weight_decay=1e-4, seed=3, log_every=5, device="cpu")
    pairs = [FusedPair(x, ys[0], torch.arange(n)), FusedPair(x, ys[1], torch.arange(n), seed=7),
             FusedPair(x2, ys[2], torch.arange(n), caption_keys=keys)]  # fmt: skip
    fused = fused_train(pairs, cfg)
    for p, f in zip(pairs, fused, strict=True):
        one = train(p.vision, p.text, p.text_image_index, dataclasses.replace(cfg, seed=cfg.seed if p.seed is None else p.seed),
                    caption_keys=p.caption_keys)  # fmt: skip
        for a, b in ((one.vision_head.proj.weight, f.vision_head.proj.weight), (one.vision_head.proj.bias, f.vision_head.proj.bias),
                     (one.text_head.proj.weight, f.text_head.proj.weight), (one.text_head.proj.bias, f.text_head.proj.bias),
                     (one.loss_fn.logit_scale, f.loss_fn.logit_scale), (one.loss_fn.logit_bias, f.loss_fn.logit_bias)):  # fmt: skip
            torch.testing.assert_close(b.detach(), a.detach(), atol=2e-6, rtol=1e-5)
        assert f.final_loss == pytest.approx(one.final_loss, rel=1e-5)
        assert [h["loss"] for h in f.history] == pytest.approx([h["loss"] for h in one.history if "loss" in h], rel=1e-5)
    assert fused[0].final_loss != pytest.approx(fused[1].final_loss, rel=1e-3)  # the pairs really trained differently


def test_heldout_curve_and_readout_items_sum_to_the_readouts():
    """The per-image contributions sum to evaluate()'s R@k, class-aware R@1 and zero-shot top-1, and the held-out loss
    read during fused training at the last step equals the one computed from the final heads."""
    g = torch.Generator().manual_seed(1)
    n, m, d = 80, 30, 6
    labels = torch.arange(n) % 4
    x = torch.randn(n, d, generator=g) + 2 * torch.nn.functional.one_hot(labels, d).float()
    y = x @ torch.randn(d, d, generator=g) + 0.5 * torch.randn(n, d, generator=g)
    ev_rows = torch.arange(n - m, n)
    keys = torch.arange(m) % 25
    ev = EvalSet(x[ev_rows], y[ev_rows], torch.arange(m), labels=labels[ev_rows], class_prompts=torch.randn(4, 3, d, generator=g), text_keys=keys)
    pos = heldout_positives(ev.text_image_index, m, keys)
    cfg = TrainConfig(head="linear", out_dim=8, loss="sigmoid", steps=12, batch_size=16, device="cpu")
    (res,) = fused_train([FusedPair(x[: n - m], y[: n - m], torch.arange(n - m), heldout=HeldOut(ev.vision, ev.text, pos))], cfg, curve_steps=(6, 12))
    assert sorted(res.curve) == [6, 12]
    got = evaluate(res.vision_head, res.text_head, ev)
    img, txt = project(res.vision_head, ev.vision), project(res.text_head, ev.text)
    from pairscout.align.evaluate import class_embeddings

    cls = class_embeddings(project(res.text_head, ev.class_prompts.reshape(12, d)).reshape(4, 3, -1))
    items = R.item_contributions(img, txt, ev.text_image_index, text_keys=keys, labels=ev.labels, class_emb=cls, positives=pos,
                                 scale=float(res.loss_fn.logit_scale.detach().exp()), bias=float(res.loss_fn.logit_bias.detach()))  # fmt: skip
    for k in ("mean_r1", "mean_r5", "mean_r10", "class_mean_r1", "zs_top1", "zs_top5"):
        assert items[k].shape == (m,) and items[k].sum() == pytest.approx(got[k], abs=1e-6), k
    assert items["heldout_loss"].sum() == pytest.approx(float(res.curve[12].sum()), rel=1e-5)
    assert 0 < items["class_map"].sum() <= 1
    # average precision by hand for one image: positives = captions of its class, ties against the query
    sim = (img @ txt.T)[0]
    posc = labels[ev_rows][0] == labels[ev_rows][ev.text_image_index]
    ap = np.mean([float(((sim >= sim[j]) & posc).sum()) / float((sim >= sim[j]).sum()) for j in torch.nonzero(posc).flatten()])
    assert items["class_map"][0] * m == pytest.approx(ap)
    area = R.curve_area(res.curve)
    assert area.sum() == pytest.approx(float((res.curve[6].sum() + res.curve[12].sum()) / 2))


# --- the target chosen by separation --------------------------------------------------------------------------------
def _planted(noises, n=150, d=16, test=40, seed=0, shared_noise=False):
    """Pairs of one 'vision encoder' with text encoders = a rotation of it plus noise of the given levels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    base = torch.randn(n, d, generator=g)
    texts = {}
    for k, s in enumerate(noises):
        rot = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
        noise = base if shared_noise else torch.randn(n, d, generator=g)
        texts[f"t{k}"] = x @ rot + s * noise
    train_rows, test_rows = torch.arange(n - test), torch.arange(n - test, n)
    vemb = Embeddings(pooled=x, row_index=torch.arange(n))

    def load(v: str, t: str) -> PairData:
        temb = Embeddings(pooled=texts[t], row_index=torch.arange(n))
        xv, xt, idx, _ = split_pair(vemb, temb, train_rows)
        ev, et, eidx, _ = split_pair(vemb, temb, test_rows)
        return PairData(EncoderSpec(id="emb:x.npy", modality="vision"), EncoderSpec(id=f"emb:{t}.npy", modality="text"),
                        xv, xt, idx, EvalSet(ev, et, eidx), train_rows, test_rows, "fp")  # fmt: skip

    ranked = pd.DataFrame({"vision": "x", "text": list(texts), "clean": [-s for s in noises]})
    return ranked, load


def test_only_the_loss_separates_and_the_target_picks_it():
    """Four pairs whose held-out retrieval is (nearly) perfect for all of them (R@10 = 1 everywhere, R@1 and R@5 within
    noise) while their noise, and so their held-out loss, differs: the target is the held-out loss, its F is recorded
    with every other read-out's, and the clean measure predicts it."""
    ranked, load = _planted([0.0, 0.3, 0.6, 0.9], n=224, d=64, test=24)
    res = probe_pairs(ranked, load, ["clean"], ProbeSettings(steps=150, batch_size=100, out_dim=32, bootstrap=200))
    assert res.pairs["mean_r10"].tolist() == pytest.approx([1.0] * 4)
    choice = res.target_choice
    seps = {s.readout: s for s in choice.separation}
    assert set(seps) == {"mean_r1", "mean_r5", "mean_r10", "heldout_loss", "loss_auc"}
    assert choice.separated and choice.target == "heldout_loss", (choice.target, {k: s.f for k, s in seps.items()})
    assert [k for k, s in seps.items() if s.separates] == ["heldout_loss"]
    assert math.isnan(seps["mean_r10"].f) and seps["mean_r1"].f < 3  # constant / within noise
    assert seps["heldout_loss"].p < 0.05 / 5  # Bonferroni over the five read-outs
    assert res.meta["target"] == "heldout_loss" and res.meta["target_direction"] == "lower" and res.meta["chance"] is None
    assert res.pairs["heldout_loss"].is_monotonic_increasing  # more noise, higher loss
    c = res.correlations.set_index("metric")
    assert c.loc["clean", "spearman"] == pytest.approx(1.0)  # the loss negated: the cleaner pair is the better one
    assert res.regret.oracle == ("x", "t0") and res.regret.conclusive


def test_a_saturated_readout_says_it_cannot_tell():
    """Four pairs of the same noise level (only the rotation and the noise draw differ): no read-out separates them beyond
    the noise of the held-out rows, the probe says so in one line, and no correlation is reported."""
    ranked, load = _planted([0.6, 0.6, 0.6, 0.6], n=120, test=30, seed=3, shared_noise=True)
    res = probe_pairs(ranked, load, ["clean"], ProbeSettings(steps=60, batch_size=64, out_dim=16, bootstrap=200))
    choice = res.target_choice
    assert not choice.separated and not any(s.separates for s in choice.separation), [(s.readout, s.f, s.p) for s in choice.separation]
    assert res.meta["evidence"] is False and res.correlations["spearman"].isna().all()
    assert set(res.correlations["answer"]) == {"pairs not separated"}
    line = verdict(res.correlations, "clean", res.meta)
    assert line.startswith("the probe cannot tell the 4 non-baseline pairs apart") and "\n" not in line
    assert res.regret is not None and not res.regret.conclusive and "no evidence" in res.regret.sentence


def test_separation_statistic_by_hand():
    rng = np.random.default_rng(0)
    reps = rng.normal(0, 0.01, size=(300, 5))  # independent noise, sd 0.01 per pair
    apart = R.separation(np.array([0.1, 0.2, 0.3, 0.4, 0.5]), reps + np.array([0.1, 0.2, 0.3, 0.4, 0.5]), "zs_top1", 3)
    assert apart.between_var == pytest.approx(0.025) and apart.separates and apart.f > 100
    dev = reps - reps.mean(1, keepdims=True)
    assert apart.noise_var == pytest.approx(np.var(dev, axis=0, ddof=1).mean() * 5 / 4)
    same = R.separation(np.array([0.5, 0.5, 0.5, 0.5, 0.5]) + rng.normal(0, 0.01, 5), reps + 0.5, "zs_top1", 3)
    assert not same.separates and 0 < same.f < 5
    pick = R.choose_target([same, dataclasses.replace(apart, readout="heldout_loss")], "zs_top1")
    assert pick.target == "heldout_loss" and pick.separated
    none = R.choose_target([same], "zs_top1")
    assert none.target == "zs_top1" and not none.separated and "no read-out separates" in none.why
    assert R.choose_target([same, apart], "zs_top1", override="zs_top1").overridden


# --- regret on a planted zoo ------------------------------------------------------------------------------------------
def test_regret_table_on_a_planted_zoo_with_a_known_oracle():
    """3 vision x 2 text encoders; the read-out is planted so that v2 x t1 is the oracle. pairscout's verdict picks it
    (regret 0), freeze-align's max-CKA pair is v0 x t0 (regret known), SAIL's best-k-NN vision with the best published
    text score is v1 x t0; a random pair costs the mean gap."""
    vis, txt = ["v0", "v1", "v2"], ["t0", "t1"]
    pairs = pd.DataFrame([(v, t) for v in vis for t in txt], columns=["vision", "text"])
    value = np.array([0.40, 0.50, 0.45, 0.55, 0.70, 0.80])  # v2 x t1 best
    pairs["cka_linear"] = [0.9, 0.3, 0.5, 0.2, 0.6, 0.7]  # v0 x t0 highest
    models = pd.DataFrame({"name": vis + txt, "modality": ["vision"] * 3 + ["text"] * 2, "knn_acc": [0.5, 0.9, 0.7, 0.6, 0.8],
                           "published_score": [np.nan, np.nan, np.nan, 62.0, np.nan], "published_metric": [""] * 3 + ["MTEB(eng, v1)", ""]})
    rng = np.random.default_rng(0)
    n_img = 200
    items = rng.normal(value / n_img, 0.002, size=(n_img, 6))  # per-image parts summing to about the value
    values = items.sum(0)
    reps = R.bootstrap_counts(n_img, 300, 0) @ items
    choices = rule_pairs(pairs, ("v2", "t1"), models)
    assert choices["freeze_align"][0] == ("v0", "t0") and choices["sail"][0] == ("v1", "t0")
    assert "published" in choices["sail"][1]
    rg = regret_table(pairs, "zs_top1", values, reps, choices, n_items=n_img)
    assert rg.oracle == ("v2", "t1") and rg.oracle_value == pytest.approx(values[5])
    by = {r.rule: r for r in rg.rules}
    assert by["pairscout"].regret == 0 and by["pairscout"].rank == 1 and by["pairscout"].lo == 0 == by["pairscout"].hi
    assert by["freeze_align"].regret == pytest.approx(values[5] - values[0]) and by["freeze_align"].lo > 0
    assert by["sail"].regret == pytest.approx(values[5] - values[2]) and by["sail"].rank == 5
    assert by["random"].regret == pytest.approx(values[5] - values.mean()) and by["random"].lo < by["random"].regret < by["random"].hi
    assert rg.sentence.startswith("pairscout's verdict is the best probed pair") and "align it" in rg.sentence
    # a lower-is-better read-out (a loss): the oracle is the lowest, regret is the chosen pair's minus the oracle's
    lossy = regret_table(pairs, "heldout_loss", -values, -reps, choices, higher_better=False, n_items=n_img)
    assert lossy.oracle == ("v2", "t1") and {r.rule: r.regret for r in lossy.rules} == pytest.approx({r.rule: r.regret for r in rg.rules})
    # without a published score the SAIL rule takes the text encoder's own k-NN accuracy
    assert rule_pairs(pairs, None, models.assign(published_score=np.nan))["sail"][0] == ("v1", "t1")
    from pairscout.evaluation.regret import Regret

    assert Regret.from_dict(rg.to_dict()) == rg


def test_the_budget_says_which_pairs_and_why():
    from pairscout.evaluation.probe import choose_pairs

    ranked = pd.DataFrame({"vision": [f"v{i}" for i in range(20)], "text": [f"t{i}" for i in range(20)], "rank": range(1, 21)})
    every, line = choose_pairs(ranked, ProbeSettings(steps=100, budget=2000))
    assert len(every) == 20 and line.startswith("probing all 20 pairs: 20 x 100 steps fit the budget of 2,000 pair-steps")
    some, line = choose_pairs(ranked, ProbeSettings(steps=100, budget=1200))
    assert len(some) == 12 and some["rank"].tolist()[:5] == [1, 2, 3, 4, 5] and some["rank"].tolist()[-2:] == [19, 20]
    assert line.startswith("probing 12 of 20 pairs") and "--pairs all" in line and "\n" not in line
    assert len(choose_pairs(ranked, ProbeSettings(steps=100, budget=10, all_pairs=True))[0]) == 20
    assert choose_pairs(ranked, ProbeSettings(top_k=2, bottom_k=1))[0]["rank"].tolist() == [1, 2, 20]


def test_shared_sides_reuse_each_encoders_svd_with_the_same_values():
    """The probe computes the measures the rank run left out for every pair; inside shared_sides SVCCA, PWCCA and
    Procrustes reuse each input's SVD (one per encoder, not per pair) and give exactly the values they give alone."""
    from pairscout.metrics import measures as M

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(200, 30, generator=g) for _ in range(2)]
    ys = [torch.randn(200, 20, generator=g) @ torch.randn(20, 20, generator=g) for _ in range(3)]
    names = ("svcca", "pwcca", "procrustes")
    alone = {(i, j, m): getattr(M, m)(x, y) for i, x in enumerate(xs) for j, y in enumerate(ys) for m in names}
    with M.shared_sides():
        shared = {(i, j, m): getattr(M, m)(x, y) for i, x in enumerate(xs) for j, y in enumerate(ys) for m in names}
        assert len(M._SIDES) == 5  # one SVD per input tensor
    assert shared == alone and M._SIDES is None
