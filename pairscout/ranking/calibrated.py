"""What ``rank`` adds to the raw metric values so that its answer can be trusted: settings adapted to small
data (said, never silent), a calibrated score and corrected p-value per metric and pair, and the verdict.

Small data. The delete-a-group jackknife leaves ``n - ceil(n / G)`` rows per replicate, and the neighbour
metrics need k well below the rows they see. Rule (recorded in ``rank.json["adapted"]`` and printed):

* groups: ``G_eff = min(G, n // 5)`` (at least 5 rows per deleted group); below 2, intervals are off;
* k of mutual k-NN / CKNNA: ``k_eff = min(k, (n_rep - 1) // 2)`` with ``n_rep`` the rows of the smallest
  replicate (``n`` without intervals), so no neighbourhood covers more than half the rows it is drawn from;
  if ``k_eff`` falls below the metric's minimum (1 for mutual k-NN, 2 for CKNNA) the run stops with one line
  naming k, n and the option to change.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from pairscout.errors import PairscoutError
from pairscout.metrics.calibration import CKA_METRICS, CKNNA_PERM, N_PERM, NEIGHBOUR_METRICS, calibrate
from pairscout.ranking import verdict as V

if TYPE_CHECKING:
    from pairscout.ranking.core import RankSettings

log = logging.getLogger(__name__)

MIN_ROWS_PER_GROUP = 5


def adapt_to_size(settings: RankSettings, n: int, metrics: Sequence[str]) -> tuple[RankSettings, dict[str, Any]]:
    """Settings adapted to ``n`` rows (module docstring) and a record of what changed and why."""
    notes: dict[str, Any] = {}
    groups = settings.ci_groups
    if groups > 1 and n // MIN_ROWS_PER_GROUP < groups:
        g = n // MIN_ROWS_PER_GROUP
        notes["ci_groups"] = {"asked": groups, "used": g if g >= 2 else 0,
                              "why": f"{n} rows allow at most {g} jackknife groups of >= {MIN_ROWS_PER_GROUP} rows"}
        groups = g if g >= 2 else 0
    k = settings.knn_k
    if any(m in ("mutual_knn", "cknna") for m in metrics):
        n_rep = n - -(-n // groups) if groups > 1 else n
        k_max = (n_rep - 1) // 2
        need = 2 if "cknna" in metrics else 1
        if k_max < need:
            which = "CKNNA" if "cknna" in metrics else "mutual k-NN"
            raise PairscoutError(f"{which} needs k >= {need} neighbours within half of the {n_rep} rows each estimate sees "
                                 f"(n = {n}, --knn-k {settings.knn_k}, --ci-groups {groups}).",
                                 fix="use more data, or drop mutual_knn/cknna with --metrics, or pass --ci-groups 0.")
        if k > k_max:
            notes["knn_k"] = {"asked": k, "used": k_max,
                              "why": f"k must stay <= (rows - 1) / 2 = {k_max} for the {n_rep} rows each estimate sees"}
            k = k_max
    return dataclasses.replace(settings, ci_groups=groups, knn_k=k), notes


def metric_kwargs(metric: str, settings: RankSettings) -> dict[str, Any]:
    from pairscout.ranking import compute

    return compute._kwargs(metric, settings)


def metric_values(xs: list[torch.Tensor], ys: list[torch.Tensor], metrics: Sequence[str], settings: RankSettings, primary: str,
                  progress: Any = None, engine: Any = None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """:func:`pairscout.ranking.compute.pair_metrics` (values and jackknife intervals, no permutations), except
    that the primary metric's jackknife replicates are kept for the verdict's paired test, not recomputed.

    Same groups and seeds as ``pair_metrics`` (metric i gets seed ``settings.seed + 1000 i``), same formula
    ``se^2 = (G-1)/G sum_g (theta_(g) - mean)^2``, interval ``theta +- z_0.975 se``. ``engine``: the device and
    row shard of every evaluation (:mod:`pairscout.ranking.engine`; under torchrun ``xs``, ``ys`` are this rank's rows).
    """
    from pairscout.ranking.engine import plain

    eng = engine or plain(xs[0].device)
    from statistics import NormalDist

    from pairscout.ranking import compute

    out: dict[str, np.ndarray] = {}
    reps = None
    for i, m in enumerate(metrics):
        st = dataclasses.replace(settings, seed=settings.seed + 1000 * i, permutations=0)
        if m != primary or settings.ci_groups <= 1:
            out.update(compute.pair_metrics(xs, ys, [m], st, None, progress=progress, engine=eng))
            continue
        kw = metric_kwargs(m, settings)
        est = eng.value(m, xs, ys, **kw)
        r = V.jackknife_replicates(xs, ys, m, groups=settings.ci_groups, seed=st.seed, engine=eng, **kw)
        g = r.shape[0]
        se = ((g - 1) / g * ((r - r.mean(0)) ** 2).sum(0)).sqrt()
        z = NormalDist().inv_cdf(0.975)
        out[m], out[f"{m}_lo"], out[f"{m}_hi"], out[f"{m}_se"] = est.numpy(), (est - z * se).numpy(), (est + z * se).numpy(), se.numpy()
        reps = r.numpy()
    return out, reps


def calibrated_columns(xs: list[torch.Tensor], ys: list[torch.Tensor], metrics: Sequence[str], settings: RankSettings,
                       values: dict[str, np.ndarray], progress: Any = None,
                       sharded: bool = False) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``<m>_null``, ``<m>_null_sd``, ``<m>_z``, ``<m>_p``, ``<m>_p_holm`` for every metric, and how each null was made.

    ``settings.permutations`` is the Monte-Carlo budget of the metrics that need one (0 turns calibration off).
    ``progress(phase, done, total)`` with phase ``"<label>: null"``. ``sharded``: ``xs``, ``ys`` are this rank's
    rows under torchrun (:func:`pairscout.metrics.calibration.calibrate`).
    """
    from pairscout.metrics import registry

    cache: dict[Any, Any] = {}

    out: dict[str, np.ndarray] = {}
    how: dict[str, str] = {}
    if settings.permutations <= 0:
        return out, how
    for i, m in enumerate(metrics):
        if progress is not None:
            progress(f"{registry.label(m)}: null", 0, 1)
        if m not in (*CKA_METRICS, *NEIGHBOUR_METRICS):
            how[m] = "not calibrated (no null for this measure yet)"
            continue
        cal = calibrate(xs, ys, m, torch.from_numpy(np.asarray(values[m], dtype=np.float64)), n_perm=settings.permutations,
                        seed=settings.seed + 1000 * i, method=getattr(settings, "null_method", "auto"), cache=cache,
                        cknna_perm=CKNNA_PERM if settings.permutations == N_PERM else settings.permutations, sharded=sharded,
                        **metric_kwargs(m, settings))
        out[f"{m}_null"], out[f"{m}_null_sd"], out[f"{m}_z"] = cal.null_mean.numpy(), cal.null_sd.numpy(), cal.z.numpy()
        out[f"{m}_p"], out[f"{m}_p_holm"] = cal.p_value.numpy(), cal.p_holm.numpy()
        if cal.p_mc is not None:
            out[f"{m}_p_mc"] = cal.p_mc.numpy()
        how[m] = cal.method
        if progress is not None:
            progress(f"{registry.label(m)}: null", 1, 1)
    return out, how


def rank_verdict(pairs: pd.DataFrame, xs: list[torch.Tensor], ys: list[torch.Tensor], v_names: Sequence[str],
                 t_names: Sequence[str], settings: RankSettings, primary: str, values: dict[str, np.ndarray],
                 reps: np.ndarray | None = None, engine: Any = None) -> V.Verdict:
    """The verdict of a ranking (see :mod:`pairscout.ranking.verdict`), tested on the primary metric's jackknife
    replicates ``reps`` (G, m, t) (computed here when not given, on ``engine``; under torchrun ``xs``, ``ys`` are
    this rank's rows)."""
    from pairscout.metrics import registry

    est = np.asarray(values[primary], dtype=np.float64)
    if reps is None and settings.ci_groups > 1:
        reps = V.jackknife_replicates(xs, ys, primary, groups=settings.ci_groups, seed=settings.seed, engine=engine,
                                      **metric_kwargs(primary, settings)).numpy()
    prec = None if getattr(settings, "precision", "auto") == "auto" else settings.precision
    sharded = engine is not None and engine.sharded
    dups = (V.near_duplicates(dict(zip(v_names, xs, strict=True)), precision=prec, sharded=sharded)
            + V.near_duplicates(dict(zip(t_names, ys, strict=True)), precision=prec, sharded=sharded))
    label = registry.label(primary)
    if settings.score == "combined":
        label = f"combined score (ties tested on {label})"
    return V.decide(pairs, primary, est, reps, v_names, t_names, dups, label=label)


__all__ = ["N_PERM", "adapt_to_size", "calibrated_columns", "rank_verdict"]
