"""``probe``: did the ranking predict which pairs align, and had you followed the verdict, how far are you from the best pair?

:func:`probe` trains a short linear probe (one linear layer per side, sigmoid loss, the same budget for every pair) on
the train part of the run's dataset for as many pairs as the budget allows (every pair of the demo; ``--pairs all``:
every pair), all of them in one fused pass (:mod:`pairscout.evaluation.fused`), and reads on the held-out part (the
dataset's fixed-seed, label-stratified split) every read-out of :data:`pairscout.evaluation.readouts.READOUTS`: zero-shot
top-1 / top-5 and class-aware mAP and R@1 (labels), instance R@1/5/10 both ways, the held-out sigmoid loss, and the
held-out loss at a few fixed steps with the area under that curve. The target is the read-out that separates the
non-baseline pairs most clearly against its own sampling noise (:func:`pairscout.evaluation.readouts.choose_target`; the F
statistic and its p for every read-out are recorded). Then it asks which measure predicts the target: every registered
measure (those the rank run left out computed here for the probed pairs) and every unimodal score is correlated with it
across the probed pairs, with and without the baseline pairs, Spearman and Kendall with p-values, an interval of rho and
Holm's correction across the predictors (:mod:`pairscout.evaluation.predictors`). Last, the regret table
(:mod:`pairscout.evaluation.regret`): the oracle pair and the regret of pairscout's verdict, freeze-align's and SAIL's rules
and a random pair, with paired bootstrap intervals. When no read-out separates the pairs, it says so in one line and
reports no correlation as evidence either way.

Under ``torchrun`` every rank probes the same pairs in the same order, one by one, each data-parallel
(:mod:`pairscout.align.ddp`; ``batch_size`` is the global batch), so the table equals a one-process run's up to float
rounding; rank 0 alone writes the files and the revisited verdict.

Files (``out``, by default the rank run's folder): ``probe.json`` (settings, target choice, correlations, regret, pairs),
``probe.csv`` / ``probe.parquet`` (one row per probed pair), ``probe_correlations.csv`` / ``.parquet`` and
``probe_correlations_without_baselines.csv`` / ``.parquet``. :meth:`ProbeResult.load` reads them back
(:mod:`pairscout.evaluation.result`).

Example:
    >>> res = probe("runs/demo")   # doctest: +SKIP
    >>> res.regret.sentence, res.correlations[["metric", "spearman", "spearman_p_holm"]]
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pairscout.align.pairdata import PairData, PairSource, pair_data, source_from_rank
from pairscout.align.train import train
from pairscout.distributed import is_main
from pairscout.errors import PairscoutError
from pairscout.evaluation import predictors as P
from pairscout.evaluation.predictors import correlations
from pairscout.evaluation.result import CORR_TABLE, PROBE_JSON, PROBE_TABLE, ProbeResult, ProbeSettings
from pairscout.metrics import registry

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
"""``progress(pair_label, step, total_steps)``."""

__all__ = ["CORR_TABLE", "PROBE_JSON", "PROBE_TABLE", "ProbeResult", "ProbeSettings", "ReadOut", "choose_readout", "correlations",
           "probe", "probe_pairs", "select_pairs", "verdict"]  # fmt: skip
TARGET = "mean_r1"
"""Read-out of data without labels: instance retrieval R@1, mean of both directions (identical captions interchangeable)."""
TARGETS = ("zs_top1", "class_mean_r1", "mean_r1", "mean_r5", "mean_r10", "zs_top5", "class_map", "heldout_loss", "loss_auc")


@dataclass(frozen=True)
class ReadOut:
    """Which held-out read-out the probe correlates the metrics with, and why (recorded in ``probe.json``).

    Rule (:func:`choose_readout`): labels and class names -> ``zs_top1`` (zero-shot top-1 over the classes, class
    prompts through the probe heads, per-class balanced); labels without names -> ``class_mean_r1`` (class-aware
    retrieval: any caption of the same class is a hit); no labels -> ``mean_r1`` (instance retrieval; identical
    captions are interchangeable, so a hit on any of them counts). ``--target`` overrides.
    """

    target: str
    why: str
    zero_shot: bool = False
    class_level: bool = False


def choose_readout(dataset: Any, target: str | None = None, class_level: bool = False) -> ReadOut:
    """The probe's read-out for ``dataset`` (rule in :class:`ReadOut`)."""
    labels = getattr(dataset, "labels", None)
    names = getattr(dataset, "classnames", None)
    texts = dataset.flat_captions()[0]
    distinct = len({" ".join(t.split()).casefold() for t in texts})
    rep = f"{distinct} distinct captions of {len(texts)}"
    zs = labels is not None and bool(names)
    if target is not None:
        if target not in TARGETS:
            raise PairscoutError(f"--target {target!r} is unknown.", fix=f"use one of {', '.join(TARGETS)}.")
        from pairscout.evaluation.readouts import READOUTS

        needs = READOUTS[target].needs
        if (needs == "labels and names" and not zs) or (needs and labels is None):
            raise PairscoutError(f"--target {target} needs class {needs}; this dataset has none.", fix="use --target mean_r1.")
        return ReadOut(target, f"chosen with --target ({rep})", zero_shot=zs, class_level=class_level)
    if zs:
        return ReadOut("zs_top1", f"the dataset has labels ({len(names)} classes; {rep}): zero-shot top-1 on held-out images, "
                       "class prompts through the probe heads, is what an aligned pair is for; class-aware retrieval is recorded too",
                       zero_shot=True, class_level=class_level)
    if labels is not None:
        return ReadOut("class_mean_r1", f"the dataset has labels but no class names ({rep}): class-aware retrieval "
                       "(any caption of the same class is a hit)", class_level=class_level)
    return ReadOut(TARGET, f"the dataset has no labels ({rep}): instance retrieval R@1, identical captions interchangeable")


def select_pairs(ranked: pd.DataFrame, top_k: int, bottom_k: int, middle_k: int = 0) -> pd.DataFrame:
    """The ``top_k`` best and ``bottom_k`` worst pairs, plus ``middle_k`` evenly spaced between them
    (no pair twice), in rank order, with a ``group`` column. Pairs from the middle give the
    correlations spread: with only the two ends, a metric is tested on little more than one jump."""
    if min(top_k, bottom_k, middle_k) < 0 or top_k + bottom_k + middle_k < 1:
        raise PairscoutError(f"top_k={top_k}, middle_k={middle_k}, bottom_k={bottom_k} probe no pair.", fix="pass --top-k 1 or more.")
    top = ranked.head(top_k).assign(group="top")
    rest = ranked.iloc[len(top):]
    bottom = rest.tail(min(bottom_k, len(rest))).assign(group="bottom") if bottom_k else rest.iloc[:0].assign(group="bottom")
    pool = rest.iloc[: len(rest) - len(bottom)]
    picks = sorted({int(round(x)) for x in np.linspace(0, len(pool) - 1, middle_k + 2)[1:-1]}) if middle_k and len(pool) else []
    middle = pool.iloc[picks].assign(group="middle")
    return pd.concat([top, middle, bottom]).reset_index(drop=True)


def choose_pairs(ranked: pd.DataFrame, settings: ProbeSettings, pairs: Sequence[tuple[str, str]] | None = None) -> tuple[pd.DataFrame, str]:
    """The pairs to probe and one line saying which and why: ``pairs`` when given, every pair with ``all_pairs``, the
    top / middle / bottom counts when set, else as many as ``settings.budget`` pair-steps allow (all of them when they fit;
    otherwise the top 5, the bottom 2 and the rest evenly spaced between)."""
    n = len(ranked)
    if pairs:
        keys = set(zip(ranked["vision"], ranked["text"], strict=True))
        missing = [p for p in pairs if tuple(p) not in keys]
        if missing:
            raise PairscoutError(f"pair {missing[0][0]},{missing[0][1]} is not in the rank run.", fix="pick pairs from its pairs.csv.")
        want = set(map(tuple, pairs))
        chosen = ranked[[(v, t) in want for v, t in zip(ranked["vision"], ranked["text"], strict=True)]].assign(group="chosen")
        return chosen.reset_index(drop=True), f"probing the {len(chosen)} pairs given with --pairs (of {n})"
    if settings.all_pairs:
        return ranked.assign(group="all").reset_index(drop=True), f"probing all {n} pairs (--pairs all), {n} x {settings.steps} steps, fused"
    if any(k is not None for k in (settings.top_k, settings.bottom_k, settings.middle_k)):
        chosen = select_pairs(ranked, settings.top_k or 0, settings.bottom_k or 0, settings.middle_k or 0)
        return chosen, (f"probing {len(chosen)} of {n} pairs: the top {settings.top_k or 0}, {settings.middle_k or 0} between and the bottom "
                        f"{settings.bottom_k or 0} (--top-k / --middle-k / --bottom-k)")
    fit = max(1, settings.budget // max(1, settings.steps))
    if fit >= n:
        return ranked.assign(group="all").reset_index(drop=True), (
            f"probing all {n} pairs: {n} x {settings.steps} steps fit the budget of {settings.budget:,} pair-steps (--budget), fused in one pass")
    top, bottom = min(5, fit), min(2, max(0, fit - 5))
    chosen = select_pairs(ranked, top, bottom, max(0, fit - top - bottom))
    return chosen, (f"probing {len(chosen)} of {n} pairs (the top {top}, the bottom {bottom}, the rest evenly spaced between): all {n} x "
                    f"{settings.steps} steps exceed the budget of {settings.budget:,} pair-steps; --pairs all (or --budget "
                    f"{n * settings.steps}) probes every pair, which the regret table needs")


def probe_pairs(
    chosen: pd.DataFrame,
    load: Callable[[str, str], PairData],
    metrics: Sequence[str],
    settings: ProbeSettings | None = None,
    progress: ProgressFn | None = None,
    readout: ReadOut | None = None,
    computed_here: Sequence[str] = (),
    *,
    models: pd.DataFrame | None = None,
    verdict_pair: tuple[str, str] | None = None,
    run: str = "RUN",
) -> ProbeResult:
    """Probe the pairs in ``chosen`` (columns ``vision``, ``text``, the metric columns, optionally ``baseline``) and
    correlate.

    ``load(vision, text)`` returns the pair's :class:`PairData`. This is the core of :func:`probe`, usable on
    embeddings that never went through a rank run. All pairs train in one fused pass (:mod:`pairscout.evaluation.fused`;
    under ``torchrun`` one by one, data-parallel). Every read-out of :data:`pairscout.evaluation.readouts.READOUTS` the data
    allows is recorded per pair; the target is the read-out that separates the non-baseline pairs most clearly
    against its own noise (:func:`pairscout.evaluation.readouts.choose_target`; ``settings.target`` overrides, ``readout``
    gives the fallback). When nothing separates them, or a proportion target's best pair is not clearly above chance
    (two binomial standard errors), no correlation is computed. ``models`` (the rank run's models table) and
    ``verdict_pair`` feed the regret table (:mod:`pairscout.evaluation.regret`).
    """
    from pairscout.evaluation import readouts as R
    from pairscout.evaluation.regret import regret_table, rule_pairs
    from pairscout.statistics import binomial_se

    settings = settings or ProbeSettings()
    readout = readout or ReadOut(settings.target or TARGET, "instance retrieval (default)")
    cfg = settings.train_config()
    t0 = time.perf_counter()
    keys = [(str(v), str(t)) for v, t in zip(chosen["vision"], chosen["text"], strict=True)]
    datas = [load(v, t) for v, t in keys]
    trained = _train_all(datas, keys, cfg, settings, progress)
    train_s = time.perf_counter() - t0
    rows, items = [], []
    for (_, row), data, tr in zip(chosen.iterrows(), datas, trained, strict=True):
        rec = row.to_dict()
        got, contrib = _read_out(data, tr, settings)
        rec.update(got)
        rec.update({"final_loss": tr.final_loss, "train_s": round(train_s / len(keys), 3), "samples_per_s": tr.samples_per_s,
                    "n_train": int(data.vision.shape[0]), "n_test": int(data.eval.vision.shape[0])})  # fmt: skip
        rows.append(rec)
        items.append(contrib)
        log.info("probe %s x %s: R@1 i2t %.3f t2i %.3f", *keys[len(rows) - 1], got["i2t_r1"], got["t2i_r1"])
    pairs = pd.DataFrame(rows)
    if "baseline" not in pairs:
        pairs["baseline"] = False
    pairs["baseline"] = pairs["baseline"].fillna(False).astype(bool)
    ev = datas[0].eval
    n_items = int(ev.vision.shape[0])
    if any(int(d.eval.vision.shape[0]) != n_items for d in datas):
        raise PairscoutError("the probed pairs have held-out sets of different sizes.", fix="probe pairs of one dataset and split.")

    # every read-out's per-pair value and its paired bootstrap replicates (one resampling of the held-out images for all)
    counts = R.bootstrap_counts(n_items, settings.bootstrap, settings.seed)
    cands = [r for r in R.READOUTS if all(r in c and c[r] is not None for c in items)]
    boot = {}
    for r in cands:
        mat = np.stack([np.asarray(c[r], dtype=np.float64) for c in items], axis=1)  # (n, P)
        boot[r] = (mat.sum(0), counts @ mat)
    real = ~pairs["baseline"].to_numpy()
    among = real if real.sum() >= 3 else np.ones(len(pairs), dtype=bool)  # fewer than 3 without a baseline: all pairs
    seps = [R.separation(v[among], b[:, among], r, len(cands)) for r, (v, b) in boot.items()]
    if settings.target is not None and settings.target not in pairs:
        raise PairscoutError(f"the probe read no {settings.target!r} (the held-out set lacks what it needs).", fix="pass --target mean_r1.")
    choice = R.choose_target(seps, readout.target, settings.target,
                             over="non-baseline pairs" if among is real else "probed pairs (fewer than 3 without a baseline encoder)")
    target = choice.target
    if target not in pairs:
        raise PairscoutError(f"the probe read no {target!r} (the held-out set lacks what it needs).", fix="pass --target mean_r1.")
    chance = chance_level(ev, target, n_items)
    best = float(pairs[target].max() if R.direction(target) > 0 else pairs[target].min())
    above = True if chance is None else bool(not math.isnan(chance) and best - chance > 2 * binomial_se(chance, n_items))
    evidence = above and choice.separated
    oriented = pairs.assign(**{target: R.direction(target) * pairs[target].astype(float)})
    metric_cols = [m for m in metrics if m in pairs]
    if "score" in pairs and "score" not in metric_cols:
        metric_cols.append("score")
    corr = correlations(oriented, metric_cols, target, computed_here=computed_here)
    corr_real = correlations(oriented[real].reset_index(drop=True), metric_cols, target, computed_here=computed_here)
    family = int(corr.attrs.get("family_size", 0)) if evidence else 0
    if not evidence:  # correlating noise would read as evidence: leave the tables empty and say why
        why = "probe at chance" if not above else "pairs not separated"
        corr, corr_real = P.blank(corr, metric_cols, why), P.blank(corr_real, metric_cols, why)
    regret = None
    # the candidates a researcher chooses among: the pairs without a weight-free baseline encoder (the baselines are
    # controls; biased linear CKA, for one, rates two random encoders highly); all pairs when fewer than 2 are left or the
    # verdict itself holds a baseline
    cand = real if real.sum() >= 2 and (verdict_pair is None or verdict_pair in {k for k, r in zip(keys, real, strict=True) if r}) \
        else np.ones(len(pairs), dtype=bool)
    if target in boot and cand.sum() >= 2:
        values, reps = boot[target]
        sub = pairs[cand].reset_index(drop=True)
        regret = regret_table(sub, target, values[cand], reps[:, cand], rule_pairs(sub, verdict_pair, models),
                              higher_better=R.direction(target) > 0, n_items=n_items, conclusive=evidence, label=registry.readout_label(target),
                              over="pairs without a baseline encoder" if not cand.all() else "probed pairs", run=run)  # fmt: skip
    meta = {"kind": "pairscout.probe", "settings": asdict(settings), "train_config": cfg.to_dict(), "metrics": metric_cols,
            "target": target, "target_why": choice.why if not choice.overridden else f"{choice.why}; {readout.why}",
            "target_direction": R.READOUTS[target].better if target in R.READOUTS else "higher", "target_choice": choice.to_dict(),
            "chance": chance, "n_test_items": n_items, "best_target": best, "above_chance": above, "separated": choice.separated,
            "evidence": evidence, "correction": P.CORRECTION, "family_size": family, "curve_steps": settings.curve_steps(),
            "readouts": {r: {"label": rec.label, "better": rec.better} for r, rec in R.READOUTS.items() if r in pairs},
            "n_baseline_pairs": int((~real).sum()), "separation_over": "non-baseline pairs" if among is real else "all probed pairs", "regret": None if regret is None else regret.to_dict(),
            "fused": _fused_ok(), "train_s": round(train_s, 3)}  # fmt: skip
    return ProbeResult(pairs=pairs, correlations=corr, meta=meta, correlations_without_baselines=corr_real)


def _fused_ok() -> bool:
    from pairscout import distributed

    return distributed.rank_world()[1] == 1


def _train_all(datas: Sequence[PairData], keys: Sequence[tuple[str, str]], cfg: Any, settings: ProbeSettings,
               progress: ProgressFn | None) -> list[Any]:
    """Every pair's heads, loss and held-out loss curve: one fused pass (under ``torchrun``: one by one, data-parallel)."""
    from pairscout.evaluation.fused import FusedPair, FusedResult, HeldOut, fused_train, heldout_positives

    steps = settings.curve_steps()
    if _fused_ok():
        fps = [FusedPair(d.vision, d.text, d.text_image_index, caption_keys=d.text_keys, label=f"{v} x {t}",
                         heldout=HeldOut(d.eval.vision, d.eval.text, heldout_positives(d.eval.text_image_index, int(d.eval.vision.shape[0]), d.eval.text_keys)))
               for d, (v, t) in zip(datas, keys, strict=True)]  # fmt: skip
        label = f"probe {len(keys)} pairs, fused"
        return fused_train(fps, cfg, curve_steps=steps, progress=(lambda s, total: progress(label, s, total)) if progress else None)
    out = []
    for d, (v, t) in zip(datas, keys, strict=True):
        label = f"probe {v} x {t}"
        cb = (lambda s, total, info, label=label: progress(label, s, total)) if progress else None
        res = train(d.vision, d.text, d.text_image_index, cfg, progress=cb, caption_keys=d.text_keys, **d.tokens)
        out.append(FusedResult(res.vision_head, res.text_head, res.loss_fn, res.history, res.final_loss, {}, res.samples_per_s))
    return out


def _read_out(data: PairData, tr: Any, settings: ProbeSettings) -> tuple[dict[str, float], dict[str, Any]]:
    """A trained pair's read-outs (``evaluate``'s, plus class-aware mAP, the held-out loss and its curve) and their
    per-image contributions (:func:`pairscout.evaluation.readouts.item_contributions`)."""
    from pairscout.align.evaluate import class_embeddings, evaluate, project
    from pairscout.evaluation import readouts as R
    from pairscout.evaluation.fused import heldout_positives

    ev = data.eval
    got = dict(evaluate(tr.vision_head, tr.text_head, ev))
    img, txt = project(tr.vision_head, ev.vision), project(tr.text_head, ev.text)
    cls = None
    if ev.labels is not None and ev.class_prompts is not None:
        c, p, d = ev.class_prompts.shape
        cls = class_embeddings(project(tr.text_head, ev.class_prompts.reshape(c * p, d)).reshape(c, p, -1))
    n = int(ev.vision.shape[0])
    contrib: dict[str, Any] = R.item_contributions(
        img, txt, ev.text_image_index, text_keys=ev.text_keys, labels=ev.labels, class_emb=cls,
        positives=heldout_positives(ev.text_image_index, n, ev.text_keys), scale=float(tr.loss_fn.logit_scale.detach().exp()),
        bias=float(tr.loss_fn.logit_bias.detach()))  # fmt: skip
    contrib["loss_auc"] = R.curve_area(tr.curve)
    for r, c in contrib.items():
        if c is not None:
            got[r] = float(np.sum(c))
    for s, c in sorted(tr.curve.items()):
        got[f"heldout_loss@{s}"] = float(c.sum())
    got["logit_scale"], got["logit_bias"] = float(tr.loss_fn.logit_scale.detach().exp()), float(tr.loss_fn.logit_bias.detach())
    return got, contrib


def chance_level(ev: Any, target: str, n_items: int) -> float | None:
    """The chance level of read-out ``target`` on the held-out set ``ev``, by its record's ``chance`` and ``k``
    (:class:`pairscout.evaluation.readouts.Readout`; None for a loss, which has none on this scale)."""
    from pairscout.align.evaluate import keyed_chance
    from pairscout.evaluation.readouts import READOUTS

    rec = READOUTS[target]
    if rec.chance is None:
        return None
    if rec.chance == "classes":
        return min(1.0, rec.k / ev.class_prompts.shape[0]) if ev.class_prompts is not None else float("nan")
    if rec.chance == "class_pairs":
        cls = ev.labels.long()
        return float((cls[:, None] == cls[ev.text_image_index.long()][None, :]).double().mean())
    keys = ev.text_keys if ev.text_keys is not None else torch.arange(ev.text.shape[0])
    if rec.chance == "class_captions":
        keys = ev.labels.long()[ev.text_image_index.long()]
    return keyed_chance(ev.text_image_index, keys, n_items, rec.k)[f"mean_r{rec.k}"]


def probe(
    run: Any = None,
    *,
    vision_zoo: Any = None,
    text_zoo: Any = None,
    data: Any = None,
    n: int | None = None,
    settings: ProbeSettings | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    cache_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: ProgressFn | None = None,
    command: str | None = None,
) -> ProbeResult:
    """Linear probes on the pairs of a ranking (as many as the budget allows), whether the metrics predicted them, and
    the verdict's regret.

    Args:
        run: a :class:`~pairscout.ranking.RankResult` or the folder ``pairscout rank --out`` wrote.
            Without it, the zoos are ranked first (``pairscout.rank(vision_zoo, text_zoo, data, n=n)``).
        vision_zoo, text_zoo, data, n: zoos and dataset when there is no ``run``.
        settings: which pairs (``all_pairs``, ``budget``, or top_k / middle_k / bottom_k), steps, the split.
        pairs: probe these (vision, text) names instead.
        cache_dir: the embedding cache the rank run used.
        out: where ``probe.json`` / ``probe.csv`` go (default: the run's folder; None with an in-memory run).

    Raises:
        CacheError: a pair's embeddings are not cached (the message names the command that makes them).
    """
    settings = settings or ProbeSettings()
    t_start = time.perf_counter()
    if run is None:
        from pairscout.embeddings.runner import EncodeSettings
        from pairscout.ranking import rank

        rank_res = rank(vision_zoo or "offline", text_zoo or "offline", data or "generated", n=n, cache_dir=cache_dir, out=out,
                        plots=out is not None, encode_settings=EncodeSettings(device=settings.device))
        src = source_from_rank(rank_res, data=None, cache_dir=cache_dir, device=settings.device, run_dir=out)
    else:
        if vision_zoo is not None or text_zoo is not None:
            raise PairscoutError("probe got both a rank run and zoos.", fix="pass either --run DIR or --vision-zoo/--text-zoo/--data.")
        src = source_from_rank(run, data=data, cache_dir=cache_dir, device=settings.device)  # missing embeddings: encoded there
    ranked = src.rank.pairs
    chosen, selection = choose_pairs(ranked, settings, pairs)
    chosen = chosen.assign(baseline=[src.spec(str(v), "vision").source == "baseline" or src.spec(str(t), "text").source == "baseline"
                                     for v, t in zip(chosen["vision"], chosen["text"], strict=True)])  # fmt: skip
    log.info("%s", selection)
    # every pair's cache entry is checked before any training starts: a miss fails fast
    _check_cached(src, chosen)
    # which measure predicts? every registered measure (the ones rank left out computed here) and the unimodal scores
    options = P.measure_options(src.rank.meta)
    t_measures = time.perf_counter()
    chosen, failed = P.add_measures(chosen, P.rank_rows(src), options, progress)
    t_measures = time.perf_counter() - t_measures
    chosen = P.add_unimodal(chosen, src.rank.models)

    readout = choose_readout(src.dataset, settings.target, settings.class_level)
    prompts: dict[str, Any] = {}

    def load(v: str, t: str) -> PairData:
        from pairscout.align.pairdata import encode_class_prompts

        d = pair_data(src, v, t, test_fraction=settings.test_fraction, seed=settings.seed, class_level=readout.class_level)
        if readout.zero_shot:  # one prompt encoding per text encoder (and chosen layer), shared by its pairs
            key = f"{t}@{d.text_layer}"
            if key not in prompts:
                prompts[key] = encode_class_prompts(d.text_spec, src.dataset.classnames, fit_texts=d.corpus, layer=d.text_layer)[0]
            d.eval.class_prompts = prompts[key]
        return d

    here = [m for m in registry.MEASURES if m not in src.rank.metrics]
    own = src.rank.rank_verdict  # pairscout's own verdict (rank's, before any probe revisited it)
    vpair = tuple(own.pair) if own is not None else (str(ranked["vision"].iloc[0]), str(ranked["text"].iloc[0]))
    result = probe_pairs(chosen, load, P.predictor_columns(chosen), settings, progress, readout, computed_here=here,
                         models=src.rank.models, verdict_pair=vpair,
                         run=str(src.run_dir) if src.run_dir is not None else "RUN")  # fmt: skip
    result.meta.update({
        "selection": selection,
        "measures_from_rank": [m for m in src.rank.metrics if m in result.pairs],
        "measures_computed_by_probe": here,
        "measure_options": {"k": options["k"], "clip_quantile": options["preprocess"].clip_quantile, "sigma_frac": options["sigma_frac"]},
        "measure_failures": failed,
        "rank_run": None if src.run_dir is None else str(src.run_dir),
        "primary": src.rank.primary,
        "dataset": src.rank.meta.get("dataset", {}),
        "dataset_fingerprint": src.dataset.fingerprint,
        "n_pairs_ranked": len(ranked),
        "seconds": round(time.perf_counter() - t_start, 3),
        "measures_s": round(t_measures, 3),
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })  # fmt: skip
    target = out if out is not None else src.run_dir
    result.meta["verdict"] = _update_verdict(src, result, None if target is None else Path(target))
    if target is not None and is_main():  # under torchrun every rank probed the same pairs data-parallel; rank 0 writes
        result.save(target)
        result.meta["out"] = str(target)
    return result


def _update_verdict(src: PairSource, result: ProbeResult, where: Path | None) -> dict[str, Any] | None:
    """The rank run's verdict revisited with the probe's read-out, kept as a revision by the run store
    (:mod:`pairscout.runs`): the probe never edits the rank run's ``rank.json``."""
    from pairscout.ranking.verdict import update_from_probe
    from pairscout.runs import STORE

    old = src.rank.rank_verdict if src.rank is not None else None
    if old is None:
        return None
    from pairscout.metrics.registry import readout_label
    from pairscout.ranking.verdict import PROBE_ADVICE

    before = " ".join(old.reason.replace(PROBE_ADVICE, "").split())  # the advice to probe is done
    if result.meta.get("separated") is False:
        v = replace(old, reason=before + " The probe cannot tell the non-baseline pairs apart on this data: it cannot revisit the verdict.")
    elif result.meta.get("target_direction") == "lower":  # a loss: the binomial tests of update_from_probe do not apply
        rg = result.meta.get("regret") or {}
        v = replace(old, reason=before + f" The probe's target is the {readout_label(result.meta['target'])}; its regret table: {rg.get('sentence', '')}")
    elif not result.meta.get("above_chance"):
        v = replace(old, reason=before + (
            f" The probe's best pair reads {result.meta.get('best_target', float('nan')):.3f} {readout_label(result.meta['target'])}, "
            f"not clearly above chance ({result.meta.get('chance', float('nan')):.3f}): it cannot revisit the verdict."))
    else:
        v = update_from_probe(old, result.pairs, result.meta["target"], int(result.meta["n_test_items"]))
    result.meta["rank_run_id"] = src.rank.run_id
    if src.run_dir is not None and (src.run_dir / "rank.json").is_file() and is_main():
        STORE.revise_verdict(src.run_dir, v, by="probe", where=where or src.run_dir)
    return v.to_dict()


def _check_cached(src: PairSource, chosen: pd.DataFrame) -> None:
    from pairscout.align.pairdata import load_embeddings

    seen: set[str] = set()
    for v, t in zip(chosen["vision"], chosen["text"], strict=True):
        vs, ts = src.spec(str(v), "vision"), src.spec(str(t), "text")
        for spec, partner in ((vs, ts), (ts, vs)):
            if spec.fingerprint() not in seen:  # one id may be pooled two ways: its settings tell them apart
                load_embeddings(src, spec, partner=partner)
                seen.add(spec.fingerprint())


def verdict(corr: pd.DataFrame, metric: str, meta: dict[str, Any] | None = None, corr_real: pd.DataFrame | None = None) -> str:
    """One line: did ``metric`` predict the probe's read-out (Holm-corrected), and which predictor did best? With
    ``corr_real`` (the table over the non-baseline pairs), the same rho without the baseline pairs."""
    from pairscout.metrics.registry import label

    meta = meta or {}
    if meta.get("separated") is False:
        from pairscout.evaluation.readouts import TargetChoice, cannot_tell

        return cannot_tell(TargetChoice.from_dict(meta["target_choice"]), int(meta.get("n_test_items") or 0),
                           meta.get("separation_over", "non-baseline pairs"))
    if meta.get("above_chance") is False:
        return (f"the probe's best pair reads {meta.get('best_target', float('nan')):.3f} {meta.get('target')}, not clearly above chance "
                f"({meta.get('chance', float('nan')):.3f}): no correlation computed, it would correlate noise.")
    row = corr[corr["metric"] == metric]
    if row.empty or np.isnan(row["spearman"].iloc[0]):
        return f"{metric}: too few distinct pairs to tell."
    rho, p = float(row["spearman"].iloc[0]), float(row["spearman_p"].iloc[0])
    ph = float(row["spearman_p_holm"].iloc[0]) if "spearman_p_holm" in row else p
    answer = ("yes" if ph < 0.05 else "yes before the correction, not after" if p < 0.05 else "in the right direction, not significantly") if rho > 0 else "no"
    fam = meta.get("family_size")
    line = (f"did {label(metric)} predict the probe's {meta.get('target', TARGET)}? {answer} (Spearman rho {rho:+.2f}, p = {p:.3g}, "
            f"Holm-corrected{f' over {fam} predictors' if fam else ''} p = {ph:.3g}, {int(row['n_pairs'].iloc[0])} pairs).")  # fmt: skip
    if corr_real is not None and int(meta.get("n_baseline_pairs") or 0):
        rr = corr_real[corr_real["metric"] == metric]
        if not rr.empty and rr["spearman"].notna().iloc[0]:
            line += (f" Without the {meta['n_baseline_pairs']} baseline pairs: rho {float(rr['spearman'].iloc[0]):+.2f}, Holm-corrected "
                     f"p = {float(rr['spearman_p_holm'].iloc[0]):.3g} ({int(rr['n_pairs'].iloc[0])} pairs).")
        else:
            line += f" Without the {meta['n_baseline_pairs']} baseline pairs: too few pairs or values to tell."
    ok = corr[corr["spearman"].notna()] if "spearman_p_holm" in corr else corr.iloc[:0]
    if not ok.empty and ok["metric"].iloc[0] != metric:
        b = ok.iloc[0]
        rev = " - reversed: lower predicts a better read-out" if b["spearman"] < 0 else ""
        line += f" Strongest after correction: {b.get('label') or label(b['metric'])} (rho {b['spearman']:+.2f}, corrected p = {b['spearman_p_holm']:.3g}{rev})."
    return line
