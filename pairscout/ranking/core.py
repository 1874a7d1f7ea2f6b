"""``rank``: encode two zoos on one paired dataset and rank every vision x text pair.

The CLI command ``pairscout rank`` is a thin wrapper over :func:`rank`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pairscout import distributed
from pairscout.embeddings.cache import EmbeddingCache
from pairscout.embeddings.runner import EncodeSettings, ProgressFn, encode_zoo
from pairscout.errors import PairscoutError
from pairscout.estimation import Engine, estimate
from pairscout.metrics import registry
from pairscout.provenance import provenance
from pairscout.ranking import calibrated, compute, layered
from pairscout.ranking.result import RankResult, settings_conflict
from pairscout.ranking.settings import DEBIASED_BELOW, RankSettings
from pairscout.resolve import resolve_data, resolve_zoos
from pairscout.zoo.registry import Zoo

log = logging.getLogger(__name__)

def print_progress(stream: Any = None) -> ProgressFn:
    """A ``progress`` callback that prints ``HH:MM:SS phase: done/total`` to stderr when a phase starts and ends."""
    import sys

    started: set[str] = set()

    def cb(phase: str, done: int, total: int | None) -> None:
        end = total is not None and done >= total
        if phase in started and not end:
            return
        started.add(phase)
        print(f"{time.strftime('%H:%M:%S')} {phase}: {done}/{total if total is not None else '?'}{' done' if end else ''}",
              file=stream or sys.stderr, flush=True)

    return cb


def rank(
    vision_zoo: str | list[str] | Zoo = "offline",
    text_zoo: str | list[str] | Zoo = "offline",
    data: Any = "generated",
    *,
    n: int | None = None,
    settings: RankSettings | None = None,
    encode_settings: EncodeSettings | None = None,
    cache_dir: str | Path | None = None,
    out: str | Path | None = None,
    force: bool = False,
    plots: bool = True,
    progress: ProgressFn | bool | None = None,
    command: str | None = None,
    skip_bad: bool = False,
    columns: Mapping[str, str | None] | None = None,
) -> RankResult:
    """Rank every vision x text pair of two zoos on a paired dataset.

    Args:
        vision_zoo, text_zoo: zoo names, TOML paths, comma lists of ids, lists of ids, or :class:`Zoo` objects.
        data: a dataset spec (``generated``, a manifest path, ...) or a loaded ``PairedDataset``.
        n: rows: the generated dataset renders ``n`` rows, a file dataset gives a fixed-seed subset of ``n``
            (:func:`pairscout.resolve.resolve_data`, the same as ``pairscout rank --n``).
        settings: metrics, primary metric, confidence-interval and null settings.
        encode_settings: device, batch size, workers. The device (:func:`pairscout.runtime.pick_device`) is
            resolved once and holds the embeddings for every metric, the null, the intervals and the verdict;
            ``settings.precision`` ``auto`` picks the CKA products' precision for it
            (:func:`pairscout.runtime.metric_precision`). Under ``torchrun`` (world > 1) each process keeps a
            contiguous 1/world of the rows and the metric values and intervals come from all-reduced sufficient
            statistics (:mod:`pairscout.estimation.engine` says what is sharded and what is gathered).
        cache_dir: the embedding cache (default ``~/.cache/pairscout``).
        out: folder for the result files and plots; refused if it holds a run with other settings
            unless ``force``.
        progress: ``progress(phase, done, total)`` for every phase (encoding per model, each metric, null, plots);
            ``True``: a timestamped line on stderr when each phase starts and ends (a rank takes minutes; by default
            the API prints nothing).
        skip_bad: drop rows whose image is missing or corrupt.
        columns: image / caption / label column names of a manifest or Hugging Face dataset
            (``{"caption": "sentences"}``; the rest are detected), as ``--caption-column`` etc. give them.

    Returns:
        A :class:`RankResult` (pairs ranked best first, unimodal quality per model, metadata).

    Example:
        >>> res = pairscout.rank("offline", "offline", "generated:n=400")  # doctest: +SKIP
        >>> res.best()
    """
    t_start = time.perf_counter()
    if progress is True:
        progress = print_progress()
    elif progress is False:
        progress = None
    settings = settings or RankSettings()
    vz, tz = resolve_zoos(vision_zoo, text_zoo)
    if settings.layers is not None:  # --layers: a sweep for every encoder that can read hidden layers
        v_specs, v_skip = layered.with_layers(vz.encoders, settings.layers)
        t_specs, t_skip = layered.with_layers(tz.encoders, settings.layers)
        vz, tz = dataclasses.replace(vz, encoders=tuple(v_specs)), dataclasses.replace(tz, encoders=tuple(t_specs))
        if v_skip or t_skip:
            log.info("--layers: %s cannot read hidden layers; their final features are used", ", ".join(v_skip + t_skip))
    ds = resolve_data(data, n=n, seed=settings.seed, skip_bad=skip_bad, columns=columns)
    n_rows = len(ds)
    _, world = distributed.rank_world()
    if world > n_rows:
        raise PairscoutError(f"torch.distributed runs {world} processes but the data has {n_rows} rows; every process needs "
                             "at least one row of the shard it ranks.",
                             fix=f"start at most {n_rows} processes (torchrun --nproc_per_node), or rank more rows (--rows).")
    primary = settings.primary or ("cka_linear_debiased" if n_rows < DEBIASED_BELOW else "cka_linear")
    metrics = list(dict.fromkeys([primary, *settings.metrics]))
    used, adapted = calibrated.adapt_to_size(settings, n_rows, metrics)  # small data: k and groups adapted, and said
    compute.check_metrics(metrics, n_rows, used.knn_k)
    if settings.score not in ("primary", "combined"):
        raise PairscoutError(f"score {settings.score!r} is unknown.", fix="use 'primary' or 'combined'.")

    run_settings = {
        **settings.to_dict(),
        "metrics": metrics,
        "primary": primary,
        "vision_zoo": vz.to_dict(),
        "text_zoo": tz.to_dict(),
        "dataset_fingerprint": ds.fingerprint,
        "n": n_rows,
    }
    if out is not None:
        from pairscout.runs import check_replaceable

        check_replaceable(out, keep=(EmbeddingCache(cache_dir).root,))  # before any work: a file, or a folder of someone's files, is never replaced
    if out is not None and not force:
        diff = settings_conflict(Path(out), run_settings)
        if diff is not None:
            raise PairscoutError(
                f"{out} holds a rank run with other settings (they differ in {diff!r}).",
                fix="choose another --out folder, or pass --force to replace it.",
            )

    # one device for everything: encoding, every metric, the null, the intervals, the verdict, the unimodal scores
    enc_settings = encode_settings or EncodeSettings()
    engine = Engine.for_run(enc_settings.device, settings.precision, n_rows)  # device and precision, resolved once
    device, precision = engine.device, engine.precision
    enc_settings = dataclasses.replace(enc_settings, device=str(device))
    used = dataclasses.replace(used, precision=precision)
    cache = EmbeddingCache(cache_dir)
    t0 = time.perf_counter()
    v_enc = encode_zoo(vz.encoders, ds, cache=cache, settings=enc_settings, progress=progress)
    t_enc = encode_zoo(tz.encoders, ds, cache=cache, settings=enc_settings, progress=progress)
    encode_s = time.perf_counter() - t0
    failures = {**v_enc.failures, **t_enc.failures}
    v_names = [s.name for s in vz.encoders if s.name in v_enc.embeddings]
    t_names = [s.name for s in tz.encoders if s.name in t_enc.embeddings]
    if not v_names or not t_names:
        which = "vision" if not v_names else "text"
        raise PairscoutError(
            f"no {which} encoder could be encoded ({'; '.join(f'{k}: {v}' for k, v in failures.items()) or 'none given'}).",
            fix="fix the errors above and run again; finished embeddings are cached.",
        )

    # this process's rows on the device (all rows in one process; a contiguous 1/world shard under torchrun);
    # an encoder of a layer sweep has several views: its final features first, then the blocks
    x_views = [[(name, engine.local(t)) for name, t in layered.views(v_enc.embeddings[k])] for k in v_names]
    y_views = [[(name, engine.local(t)) for name, t in layered.views(t_enc.embeddings[k], n_rows, settings.caption_reduce)]
               for k in t_names]
    xs, ys = [v[0][1] for v in x_views], [v[0][1] for v in y_views]
    v_enc.embeddings.clear()  # keep only the rows this process ranks
    t_enc.embeddings.clear()
    t1 = time.perf_counter()
    choice = None
    if any(len(v) > 1 for v in (*x_views, *y_views)):  # a layer sweep: metrics on each pair's chosen layers
        if progress is not None:
            progress("layer sweep", 0, 1)
        choice = layered.choose(x_views, y_views, v_names, t_names, primary, used, engine)
        if progress is not None:
            progress("layer sweep", 1, 1)
        # every reported number is measured on the rows the choice did not see: k and groups adapt to them
        used, adapted = calibrated.adapt_to_size(dataclasses.replace(settings, precision=precision), choice.estimation_rows, metrics)
        compute.check_metrics(metrics, choice.estimation_rows, used.knn_k)
    mx, my = (choice.xs, choice.ys) if choice is not None else (xs, ys)
    m_engine = choice.engine if choice is not None else engine  # a sweep's metrics run on the estimation rows
    # one pass: every value, jackknife replicate and null (the jackknife groups shared by every metric)
    est = estimate(mx, my, metrics, groups=used.ci_groups, seed=used.seed, permutations=used.permutations,
                   null_method=used.null_method, options={m: used.metric_options(m) for m in metrics}, engine=m_engine,
                   progress=progress)
    pair_values, null_methods = est.columns(), est.null_methods
    primary_reps = est.replicates[primary].numpy() if primary in est.replicates else None
    if choice is not None:
        pair_values, primary_reps = choice.gather(pair_values, primary_reps)
    metrics_s = time.perf_counter() - t1

    specs = {s.name: s for s in (*vz.encoders, *tz.encoders)}
    rows = []
    for i, v in enumerate(v_names):
        for j, t in enumerate(t_names):
            row: dict[str, Any] = {"vision": v, "text": t, "vision_id": specs[v].id, "text_id": specs[t].id}
            for m, vals in pair_values.items():
                row[m] = float(vals[i, j])
            rows.append(row)
    pairs = pd.DataFrame(rows)
    if choice is not None:
        pairs = choice.annotate(pairs)
    if settings.score == "combined":
        z = [(pairs[m] - pairs[m].mean()) / (pairs[m].std(ddof=0) or 1.0) for m in metrics]
        pairs["score"] = sum(z) / len(z)
    else:
        pairs["score"] = pairs[primary]
    pairs = pairs.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    pairs.insert(0, "rank", np.arange(1, len(pairs) + 1))
    t2 = time.perf_counter()
    verdict = calibrated.rank_verdict(pairs, xs, ys, v_names, t_names, used, primary, pair_values, primary_reps, engine=engine)
    verdict_s = time.perf_counter() - t2

    labels = getattr(ds, "labels", None)
    model_rows = []
    for name, emb in [*zip(v_names, xs, strict=True), *zip(t_names, ys, strict=True)]:
        # k-NN accuracy and k-means read every row: under torchrun one model's rows are gathered at a time
        model_rows.append(compute.unimodal(specs[name], engine.full([emb])[0], labels, used))
    models = pd.DataFrame(model_rows)

    result = RankResult(
        pairs=pairs,
        models=models,
        meta={
            "kind": "pairscout.rank",
            "settings": run_settings,
            "dataset": ds.describe(),
            "vision_order": v_names,
            "text_order": t_names,
            "failures": failures,
            "verdict": verdict.to_dict(),
            "adapted": adapted,
            "null_methods": null_methods,
            **({"layers": choice.meta()} if choice is not None else {}),
            "timings_s": {"encode": round(encode_s, 3), "metrics": round(metrics_s, 3), "verdict": round(verdict_s, 3),
                          "total": round(time.perf_counter() - t_start, 3), "metrics_phases": est.timings},
            "neighbour_rows_searched_again": est.recomputed,
            "device": str(device),
            "metric_precision": precision,
            "distributed": {"world_size": world, "rows_per_rank": [(r + 1) * n_rows // world - r * n_rows // world for r in range(world)],
                            "sharded": ("metric values, jackknife replicates, CKA null moments, neighbour nulls; unimodal "
                                        "scores on one model's gathered rows at a time") if world > 1 else "none (one process)"},
            "torch_threads": torch.get_num_threads(),
            **provenance(command),
        },
    )
    if out is not None and distributed.is_main():  # under torchrun every process ranks, rank 0 writes
        from pairscout.runs import replace_folder

        # the run is built beside ``out`` and swapped in whole: no file of an older run (a probe of it, old
        # plots) survives, and a failed write leaves the old run as it was
        with replace_folder(out, keep=(cache.root,)) as staging:
            if plots:
                result.meta["plots"] = [str(p.relative_to(staging)) for p in write_plots(result, staging, progress=progress)]
            result.save(staging)
    return result


def write_plots(result: RankResult, out: Path, progress: ProgressFn | None = None) -> list[Path]:
    """Heatmap per metric, each metric against the primary one, unimodal quality (PNG + SVG)."""
    from pairscout import plots

    pdir = out / "plots"
    primary = result.primary
    jobs: list[tuple[str, Any]] = [(f"heatmap_{m}", lambda m=m: plots.heatmap(result.matrix(m), registry.label(m))) for m in result.metrics]
    jobs += [(f"scatter_{primary}_vs_{m}",
              lambda m=m: plots.metric_scatter(result.pairs, primary, m, xlabel=registry.label(primary), ylabel=registry.label(m)))
             for m in result.metrics if m != primary]  # fmt: skip
    jobs.append(("unimodal_quality", lambda: plots.unimodal_bars(result.models, compute.UNIMODAL_COLUMNS)))
    paths: list[Path] = []
    for i, (stem, make) in enumerate(jobs):
        fig = make()
        if fig is not None:
            paths += plots.render(fig, pdir, stem).paths
        if progress is not None:
            progress("plots", i + 1, len(jobs))
    return paths
