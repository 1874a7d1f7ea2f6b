"""``probe``: did the ranking predict which pairs align? (SAIL's linear probe, on a few pairs.)

For the top-K and a few of the bottom pairs of a rank run, :func:`probe` trains a short linear probe
(one linear layer per side, sigmoid loss, the same budget for every pair) on the train part of the
run's dataset and reads retrieval Recall@1/5/10 both ways on the held-out part (the dataset's
fixed-seed, label-stratified split). Then, for every ranking metric, it correlates the metric with
the probe's R@1 (mean of both directions) across the probed pairs: Spearman and Kendall, with
p-values (scipy.stats). A high positive rho says the metric ranked the pairs the way alignment did.

Under ``torchrun`` every rank probes the same pairs in the same order and each probe trains data-parallel
(:mod:`pairscout.align.ddp`; ``batch_size`` is the global batch), so the table equals a one-process run's; rank 0
alone writes the files and the revisited verdict.

Files (``out``, by default the rank run's folder): ``probe.json`` (settings, correlations, pairs),
``probe.csv`` / ``probe.parquet`` (one row per probed pair), ``probe_correlations.csv``.
:meth:`ProbeResult.load` reads them back.

Example:
    >>> res = probe("runs/demo", top_k=5, bottom_k=2)   # doctest: +SKIP
    >>> res.correlations[["metric", "spearman", "spearman_p"]]
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pairscout.align.pairdata import PairData, PairSource, pair_data, source_from_rank
from pairscout.align.probe_settings import ProbeSettings
from pairscout.align.train import train
from pairscout.distributed import is_main
from pairscout.errors import PairscoutError

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
"""``progress(pair_label, step, total_steps)``."""

PROBE_JSON, PROBE_TABLE, CORR_TABLE = "probe.json", "probe", "probe_correlations.csv"
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


def correlations(pairs: pd.DataFrame, metrics: Sequence[str], target: str = TARGET) -> pd.DataFrame:
    """Spearman and Kendall correlation (with two-sided p-values) of each metric column with ``target``.

    Rows with a NaN in either column are left out; fewer than 3 rows or a constant column give NaN.
    """
    from scipy import stats

    rows = []
    for m in metrics:
        if m not in pairs:
            continue
        sub = pairs[[m, target]].astype(float).dropna()
        n = len(sub)
        rho = rho_p = tau = tau_p = float("nan")
        if n >= 3 and sub[m].nunique() > 1 and sub[target].nunique() > 1:
            r = stats.spearmanr(sub[m], sub[target])
            k = stats.kendalltau(sub[m], sub[target])
            rho, rho_p, tau, tau_p = float(r.statistic), float(r.pvalue), float(k.statistic), float(k.pvalue)
        rows.append({"metric": m, "n_pairs": n, "spearman": rho, "spearman_p": rho_p, "kendall": tau, "kendall_p": tau_p})
    return pd.DataFrame(rows, columns=["metric", "n_pairs", "spearman", "spearman_p", "kendall", "kendall_p"])


@dataclass
class ProbeResult:
    """Probed pairs (rank-run columns + probe retrieval) and metric-vs-probe correlations."""

    pairs: pd.DataFrame
    correlations: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        return list(self.meta.get("metrics", []))

    def save(self, out: str | Path) -> Path:
        from pairscout._io import atomic_frame, atomic_write_text

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_frame(self.pairs, out / f"{PROBE_TABLE}.parquet")
        atomic_frame(self.pairs, out / f"{PROBE_TABLE}.csv")
        atomic_frame(self.correlations, out / CORR_TABLE)
        payload = {**self.meta, "correlations": _records(self.correlations), "pairs": _records(self.pairs)}
        atomic_write_text(out / PROBE_JSON, json.dumps(payload, indent=2, default=str) + "\n")
        return out

    @classmethod
    def load(cls, out: str | Path) -> ProbeResult:
        out = Path(out)
        path = out / PROBE_JSON
        if not path.is_file():
            raise PairscoutError(f"{out} holds no probe result ({PROBE_JSON} is missing).", fix="run `pairscout probe --run DIR` first.")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            pairs = pd.read_parquet(out / f"{PROBE_TABLE}.parquet")
        except (OSError, ValueError) as e:
            raise PairscoutError(f"the probe result in {out} is unreadable ({e}).", fix="run `pairscout probe` again.") from None
        corr = pd.DataFrame(payload.pop("correlations"), columns=["metric", "n_pairs", "spearman", "spearman_p", "kendall", "kendall_p"])
        payload.pop("pairs", None)
        return cls(pairs=pairs, correlations=corr.astype({c: float for c in corr.columns if c not in ("metric", "n_pairs")}), meta=payload)


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    recs = df.to_dict(orient="records")
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in recs]


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
    corr = correlations(pairs, metric_cols, readout.target)
    if not above:  # correlating noise would read as evidence: leave the table empty and say why
        corr[["spearman", "spearman_p", "kendall", "kendall_p"]] = float("nan")
    meta = {"kind": "pairscout.probe", "settings": asdict(settings), "train_config": cfg.to_dict(), "metrics": metric_cols,
            "target": readout.target, "target_why": readout.why, "chance": chance, "n_test_items": n_items,
            "best_target": best, "above_chance": above}  # fmt: skip
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
        from pairscout.encode.runner import EncodeSettings
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

    result = probe_pairs(chosen, load, src.rank.metrics, settings, progress, readout)
    result.meta.update({
        "rank_run": None if src.run_dir is None else str(src.run_dir),
        "primary": src.rank.primary,
        "dataset": src.rank.meta.get("dataset", {}),
        "dataset_fingerprint": src.dataset.fingerprint,
        "n_pairs_ranked": len(ranked),
        "seconds": round(time.perf_counter() - t_start, 3),
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })  # fmt: skip
    result.meta["verdict"] = _update_verdict(src, result)
    target = out if out is not None else src.run_dir
    if target is not None and is_main():  # under torchrun every rank probed the same pairs data-parallel; rank 0 writes
        result.save(target)
        result.meta["out"] = str(target)
    return result


def _update_verdict(src: PairSource, result: ProbeResult) -> dict[str, Any] | None:
    """The rank run's verdict revisited with the probe's read-out; written back into the run's ``rank.json``."""
    from pairscout._io import atomic_write_text
    from pairscout.ranking.result import META
    from pairscout.ranking.verdict import Verdict, update_from_probe

    meta = src.rank.meta
    old = meta.get("verdict_rank") or meta.get("verdict")
    if not old:
        return None
    if not result.meta.get("above_chance"):
        v = Verdict.from_dict(old)
        v.reason += (f" The probe's best pair reads {result.meta.get('best_target', float('nan')):.3f} {result.meta['target']}, "
                     f"not clearly above chance ({result.meta.get('chance', float('nan')):.3f}): it cannot revisit the verdict.")
    else:
        v = update_from_probe(Verdict.from_dict(old), result.pairs, result.meta["target"], int(result.meta["n_test_items"]))
    meta["verdict_rank"], meta["verdict"] = old, v.to_dict()
    if src.run_dir is not None and (src.run_dir / META).is_file() and is_main():
        atomic_write_text(src.run_dir / META, json.dumps(meta, indent=2, default=str) + "\n")
    return v.to_dict()


def _check_cached(src: PairSource, chosen: pd.DataFrame) -> None:
    from pairscout.align.pairdata import load_embeddings

    seen: set[str] = set()
    for v, t in zip(chosen["vision"], chosen["text"], strict=True):
        vs, ts = src.spec(str(v), "vision"), src.spec(str(t), "text")
        for spec, partner in ((vs, ts), (ts, vs)):
            if spec.id not in seen:
                load_embeddings(src, spec, partner=partner)
                seen.add(spec.id)


def verdict(corr: pd.DataFrame, metric: str, meta: dict[str, Any] | None = None) -> str:
    """One line: did ``metric`` predict the probe's read-out?"""
    meta = meta or {}
    if meta.get("above_chance") is False:
        return (f"the probe's best pair reads {meta.get('best_target', float('nan')):.3f} {meta.get('target')}, not clearly above chance "
                f"({meta.get('chance', float('nan')):.3f}): no correlation computed, it would correlate noise.")
    row = corr[corr["metric"] == metric]
    if row.empty or np.isnan(row["spearman"].iloc[0]):
        return f"{metric}: too few distinct pairs to tell."
    rho, p = float(row["spearman"].iloc[0]), float(row["spearman_p"].iloc[0])
    answer = "yes" if rho > 0 and p < 0.05 else ("in the right direction, not significantly" if rho > 0 else "no")
    return f"did {metric} predict the probe's {meta.get('target', TARGET)}? {answer} (Spearman rho {rho:+.2f}, p = {p:.3g}, {int(row['n_pairs'].iloc[0])} pairs)."
