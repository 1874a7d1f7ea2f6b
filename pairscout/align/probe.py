"""``probe``: did the ranking predict which pairs align? (SAIL's linear probe, on a few pairs.)

For the top-K and a few of the bottom pairs of a rank run, :func:`probe` trains a short linear probe
(one linear layer per side, sigmoid loss, the same budget for every pair) on the train part of the
run's dataset and reads retrieval Recall@1/5/10 both ways on the held-out part (the dataset's
fixed-seed, label-stratified split). Then it asks which measure predicts: every registered measure (those the
rank run left out computed here for the probed pairs) and every unimodal score is correlated with the read-out
across the probed pairs, Spearman and Kendall with p-values, an interval of rho and Holm's correction across the
predictors (:mod:`pairscout.align.predictors`). A high positive rho says the measure ranked the pairs the way
alignment did.

Under ``torchrun`` every rank probes the same pairs in the same order and each probe trains data-parallel
(:mod:`pairscout.align.ddp`; ``batch_size`` is the global batch), so the table equals a one-process run's; rank 0
alone writes the files and the revisited verdict.

Files (``out``, by default the rank run's folder): ``probe.json`` (settings, correlations, pairs),
``probe.csv`` / ``probe.parquet`` (one row per probed pair), ``probe_correlations.csv`` / ``.parquet``.
:meth:`ProbeResult.load` reads them back (:mod:`pairscout.align.probe_result`).

Example:
    >>> res = probe("runs/demo", top_k=5, bottom_k=2)   # doctest: +SKIP
    >>> res.correlations[["metric", "spearman", "spearman_p_holm"]]
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

from pairscout.align import predictors as P
from pairscout.align.pairdata import PairData, PairSource, pair_data, source_from_rank
from pairscout.align.predictors import correlations
from pairscout.align.probe_result import CORR_TABLE, PROBE_JSON, PROBE_TABLE, ProbeResult
from pairscout.align.probe_settings import ProbeSettings
from pairscout.align.train import train
from pairscout.distributed import is_main
from pairscout.errors import PairscoutError

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
"""``progress(pair_label, step, total_steps)``."""

__all__ = ["CORR_TABLE", "PROBE_JSON", "PROBE_TABLE", "ProbeResult", "ProbeSettings", "ReadOut", "choose_readout", "correlations",
           "probe", "probe_pairs", "select_pairs", "verdict"]  # fmt: skip
TARGET = "mean_r1"
"""Read-out of data without labels: instance retrieval R@1, mean of both directions (identical captions interchangeable)."""
TARGETS = ("zs_top1", "class_mean_r1", "mean_r1", "mean_r5", "mean_r10", "class_mean_r5", "zs_top5")


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
        if (target.startswith("zs_") and not zs) or (target.startswith("class_") and labels is None):
            raise PairscoutError(f"--target {target} needs class labels{' and names' if target.startswith('zs_') else ''}; this dataset has none.",
                                 fix="use --target mean_r1.")
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


def probe_pairs(
    chosen: pd.DataFrame,
    load: Callable[[str, str], PairData],
    metrics: Sequence[str],
    settings: ProbeSettings | None = None,
    progress: ProgressFn | None = None,
    readout: ReadOut | None = None,
    computed_here: Sequence[str] = (),
) -> ProbeResult:
    """Probe the pairs in ``chosen`` (columns ``vision``, ``text`` and the metric columns) and correlate.

    ``load(vision, text)`` returns the pair's :class:`PairData`. This is the core of :func:`probe`,
    usable on embeddings that never went through a rank run. ``readout``: the target (default instance
    retrieval ``mean_r1``). The chance level of the target is recorded; when the best probed pair is not
    clearly above it (by two binomial standard errors on the held-out items), no correlation is computed.
    """
    from pairscout.align.evaluate import keyed_chance
    from pairscout.ranking.verdict import binomial_se

    settings = settings or ProbeSettings()
    readout = readout or ReadOut(settings.target or TARGET, "instance retrieval (default)")
    cfg = settings.train_config()
    chance: float | None = None
    n_items = 0
    rows = []
    for _, row in chosen.iterrows():
        v, t = str(row["vision"]), str(row["text"])
        label = f"probe {v} x {t}"
        data = load(v, t)
        cb = (lambda s, total, info, label=label: progress(label, s, total)) if progress else None
        t0 = time.perf_counter()
        res = train(data.vision, data.text, data.text_image_index, cfg, eval_data=data.eval, progress=cb,
                    caption_keys=data.text_keys, **data.tokens)  # fmt: skip
        if chance is None:
            ev = data.eval
            n_items = int(ev.vision.shape[0])
            if readout.target.startswith("zs_"):
                chance = min(1.0, int(readout.target[-1]) / ev.class_prompts.shape[0]) if ev.class_prompts is not None else float("nan")
            else:
                k = int(readout.target.rsplit("_r", 1)[1])
                keys = ev.text_keys if ev.text_keys is not None else torch.arange(ev.text.shape[0])
                if readout.target.startswith("class_"):
                    keys = ev.labels.long()[ev.text_image_index.long()]
                chance = keyed_chance(ev.text_image_index, keys, n_items, k)[f"mean_r{k}"]
        rec = row.to_dict()
        rec.update(res.metrics)
        rec.update({"final_loss": res.final_loss, "train_s": round(time.perf_counter() - t0, 3), "samples_per_s": res.samples_per_s,
                    "n_train": int(data.vision.shape[0]), "n_test": int(data.eval.vision.shape[0])})  # fmt: skip
        rows.append(rec)
        log.info("%s: R@1 i2t %.3f t2i %.3f", label, res.metrics["i2t_r1"], res.metrics["t2i_r1"])
    pairs = pd.DataFrame(rows)
    metric_cols = [m for m in metrics if m in pairs]
    if "score" in pairs and "score" not in metric_cols:
        metric_cols.append("score")
    if readout.target not in pairs:
        raise PairscoutError(f"the probe read no {readout.target!r} (the held-out set lacks what it needs).", fix="pass --target mean_r1.")
    best = float(pairs[readout.target].max())
    above = bool(chance is not None and not math.isnan(chance) and best - chance > 2 * binomial_se(chance, n_items))
    corr = correlations(pairs, metric_cols, readout.target, computed_here=computed_here)
    family = int(corr.attrs.get("family_size", 0)) if above else 0
    if not above:  # correlating noise would read as evidence: leave the table empty and say why
        corr = P.blank(corr, metric_cols)
    meta = {"kind": "pairscout.probe", "settings": asdict(settings), "train_config": cfg.to_dict(), "metrics": metric_cols,
            "target": readout.target, "target_why": readout.why, "chance": chance, "n_test_items": n_items,
            "best_target": best, "above_chance": above, "correction": P.CORRECTION, "family_size": family}  # fmt: skip
    return ProbeResult(pairs=pairs, correlations=corr, meta=meta)


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
    """Linear probes on the top and bottom pairs of a ranking, and whether the metrics predicted them.

    Args:
        run: a :class:`~pairscout.ranking.RankResult` or the folder ``pairscout rank --out`` wrote.
            Without it, the zoos are ranked first (``pairscout.rank(vision_zoo, text_zoo, data, n=n)``).
        vision_zoo, text_zoo, data, n: zoos and dataset when there is no ``run``.
        settings: pairs to probe (top_k, bottom_k), the probe's budget, the split.
        pairs: probe these (vision, text) names instead of top/bottom.
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
        src = source_from_rank(rank_res, data=None, cache_dir=cache_dir)
        src.run_dir = Path(out) if out is not None else None
    else:
        if vision_zoo is not None or text_zoo is not None:
            raise PairscoutError("probe got both a rank run and zoos.", fix="pass either --run DIR or --vision-zoo/--text-zoo/--data.")
        src = source_from_rank(run, data=data, cache_dir=cache_dir)
    src.device = settings.device  # missing embeddings are encoded on the user's device
    ranked = src.rank.pairs
    if pairs:
        keys = set(zip(ranked["vision"], ranked["text"], strict=True))
        missing = [p for p in pairs if tuple(p) not in keys]
        if missing:
            raise PairscoutError(f"pair {missing[0][0]},{missing[0][1]} is not in the rank run.", fix="pick pairs from its pairs.csv.")
        chosen = ranked[[(v, t) in set(map(tuple, pairs)) for v, t in zip(ranked["vision"], ranked["text"], strict=True)]].assign(group="chosen")
    else:
        chosen = select_pairs(ranked, settings.top_k, settings.bottom_k, settings.middle_k)
    # every pair's cache entry is checked before any training starts: a miss fails fast
    _check_cached(src, chosen)
    # which measure predicts? every registered measure (the ones rank left out computed here) and the unimodal scores
    options = P.measure_options(src.rank.meta)
    chosen, failed = P.add_measures(chosen, P.rank_rows(src), options, progress)
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

    here = [m for m in P.registry.MEASURES if m not in src.rank.metrics]
    result = probe_pairs(chosen, load, P.predictor_columns(chosen), settings, progress, readout, computed_here=here)
    result.meta.update({
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
    if not result.meta.get("above_chance"):
        from pairscout.align.predictors import readout_label
        from pairscout.ranking.verdict import PROBE_ADVICE

        v = replace(old, reason=" ".join(old.reason.replace(PROBE_ADVICE, "").split()) + (
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


def verdict(corr: pd.DataFrame, metric: str, meta: dict[str, Any] | None = None) -> str:
    """One line: did ``metric`` predict the probe's read-out (Holm-corrected), and which predictor did best?"""
    from pairscout.metrics.registry import label

    meta = meta or {}
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
    ok = corr[corr["spearman"].notna()] if "spearman_p_holm" in corr else corr.iloc[:0]
    if not ok.empty and ok["metric"].iloc[0] != metric:
        b = ok.iloc[0]
        rev = " - reversed: lower predicts a better read-out" if b["spearman"] < 0 else ""
        line += f" Strongest after correction: {b.get('label') or label(b['metric'])} (rho {b['spearman']:+.2f}, corrected p = {b['spearman_p_holm']:.3g}{rev})."
    return line
